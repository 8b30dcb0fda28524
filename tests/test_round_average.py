"""The student's targets averaged over the rounds (strategy.round_average, temporal ensembling)."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.config import RunConfig, StrategyConfig
from strategies.aggregation import running_average, weighted_mean
from strategies.transfer import RoundAveraged, StatelessAggregation


def _rows(seed: int, shape=(5, 3)) -> np.ndarray:
    values = np.random.default_rng(seed).random(shape)
    return values / values.sum(axis=-1, keepdims=True)


def test_running_average_by_hand():
    first, second = _rows(0), _rows(1)
    np.testing.assert_allclose(running_average(None, first, decay=0.7), first)
    expected = 0.7 * first + 0.3 * second
    np.testing.assert_allclose(running_average(first, second, decay=0.7), expected / expected.sum(1, keepdims=True))
    np.testing.assert_allclose(running_average(first, second, decay=0.0), second)
    with pytest.raises(ValueError, match="decay"):
        running_average(first, second, decay=1.0)
    with pytest.raises(ValueError, match="shape"):
        running_average(first, _rows(2, (4, 3)), decay=0.5)


def test_the_round_averaged_aggregator_carries_the_average_across_rounds_and_checkpoints():
    aggregator = RoundAveraged(StatelessAggregation(weighted_mean), decay=0.5)
    weights = np.ones(2)
    rounds = [np.stack([_rows(10 * r), _rows(10 * r + 1)]).astype(np.float32) for r in range(3)]
    targets = [aggregator.aggregate(stack, weights, client_ids=[0, 1]) for stack in rounds]
    means = [weighted_mean(stack, weights).astype(np.float64) for stack in rounds]
    expected = means[0]
    for mean in means[1:]:
        expected = running_average(expected, mean, decay=0.5)
    np.testing.assert_allclose(targets[-1], expected, atol=1e-6)
    assert not np.allclose(targets[-1], means[-1], atol=1e-3)  # not the last round's aggregate alone
    # A resumed run continues from the checkpointed average.
    resumed = RoundAveraged(StatelessAggregation(weighted_mean), decay=0.5)
    resumed.load_state_records(aggregator.state_records())
    following = np.stack([_rows(90), _rows(91)]).astype(np.float32)
    np.testing.assert_allclose(
        resumed.aggregate(following, weights, client_ids=[0, 1]),
        aggregator.aggregate(following, weights, client_ids=[0, 1]),
    )


def test_round_average_is_refused_outside_zero_one_and_beside_mixup_views():
    with pytest.raises(ValueError, match="round_average"):
        StrategyConfig(round_average=1.0)
    with pytest.raises(ValueError, match="round_average"):
        RunConfig(strategy=StrategyConfig(round_average=0.5), mixup_views=10)


def test_the_public_transfer_averages_over_rounds_only_when_asked():
    from fedkd.data.local import info_for
    from fedkd.models import build_model
    from strategies.registry import BuildContext

    def transfer(config: RunConfig):
        info = info_for(config.split_spec())
        student = build_model("cnn_fc", input_shape=info.input_shape, num_classes=info.num_classes)
        return BuildContext(config, info, student).public_transfer()

    averaged = transfer(RunConfig(public_size=50, strategy=StrategyConfig(round_average=0.5))).aggregator
    assert isinstance(averaged, RoundAveraged) and averaged.decay == 0.5
    assert not isinstance(transfer(RunConfig(public_size=50)).aggregator, RoundAveraged)
