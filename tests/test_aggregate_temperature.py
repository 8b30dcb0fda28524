"""Combining the clients' soft labels at another temperature than the student's (strategy.aggregate_temperature)."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import RunConfig, StrategyConfig
from fedkd.data.local import info_for
from fedkd.models import build_model
from strategies.aggregation import class_weighted, retemper
from strategies.registry import BuildContext
from strategies.transfer import PostProcessed, StatelessAggregation, retempered


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.exp((logits - logits.max(axis=-1, keepdims=True)) / temperature)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def test_retemper_recovers_the_rows_at_another_temperature_of_the_same_logits():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(5, 7, 10))
    at_four = _softmax(logits, 4.0)
    np.testing.assert_allclose(
        retemper(at_four, from_temperature=4.0, to_temperature=1.0), _softmax(logits, 1.0), atol=1e-5
    )
    np.testing.assert_allclose(
        retemper(at_four, from_temperature=4.0, to_temperature=2.0), _softmax(logits, 2.0), atol=1e-5
    )
    # and back: a round trip leaves the rows as they were
    round_trip = retemper(
        retemper(at_four, from_temperature=4.0, to_temperature=1.0), from_temperature=1.0, to_temperature=4.0
    )
    np.testing.assert_allclose(round_trip, at_four, atol=1e-5)


def test_retemper_keeps_zero_rows_entries_at_zero_and_refuses_bad_temperatures():
    rows = np.array([[0.0, 0.25, 0.75]])
    out = retemper(rows, from_temperature=1.0, to_temperature=0.5)
    assert out[0, 0] == 0.0 and out.argmax() == 2
    with pytest.raises(ValueError, match="temperature"):
        retemper(rows, from_temperature=0.0, to_temperature=1.0)


def test_the_retempered_aggregator_combines_at_its_temperature_and_returns_the_students():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(4, 6, 3))
    counts = np.array([[9, 1, 0], [0, 5, 5], [3, 3, 3], [0, 0, 8]], dtype=float)
    sent = _softmax(logits, 4.0).astype(np.float32)
    aggregator = retempered(StatelessAggregation(class_weighted), sent_at=4.0, combined_at=1.0)
    result = aggregator.aggregate(sent, counts, client_ids=[0, 1, 2, 3])
    combined = class_weighted(_softmax(logits, 1.0), counts)
    np.testing.assert_allclose(result, _softmax(np.log(combined), 4.0), atol=1e-5)
    # combining at T = 1 is not the same as combining the softened rows
    assert not np.allclose(result, class_weighted(sent, counts), atol=1e-3)


def _context(**changes) -> BuildContext:
    config = RunConfig(**changes)
    info = info_for(config.split_spec())
    return BuildContext(config, info, build_model("cnn_fc", input_shape=info.input_shape, num_classes=info.num_classes))


def test_the_run_combines_at_the_aggregate_temperature_only_where_it_differs_from_the_students():
    combined = _context(temperature=4.0, strategy=StrategyConfig(aggregate_temperature=1.0)).aggregator
    assert isinstance(combined, PostProcessed) and combined.step_name == "combined at T=1"
    assert not isinstance(_context(temperature=1.0).aggregator, PostProcessed)
    assert not isinstance(_context(strategy=StrategyConfig(aggregate_temperature=0.0)).aggregator, PostProcessed)


def test_aggregate_temperature_refuses_negative_values_and_is_off_by_default():
    with pytest.raises(ValueError, match="aggregate_temperature"):
        StrategyConfig(aggregate_temperature=-1.0)
    assert RunConfig().strategy.aggregate_temperature == 0.0
    assert not isinstance(_context().aggregator, PostProcessed)
