"""Co-distillation: the consensus travels down and the clients learn it in their local training
(strategy.consensus_weight; fedkd.distillation.train_with_consensus)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.config import (
    CO_DISTILLATION_WEIGHT,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
)
from fedkd.distillation import (
    OptimizerSettings,
    lacked_classes,
    lacked_mass,
    predict_logits,
    train_supervised,
    train_with_consensus,
)
from fedkd.messages import CONSENSUS_KEY, SOFT_LABELS_ARRAY, consensus_record, consensus_targets
from strategies.registry import check_run


def _linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    private = torch.randn(64, 1, 2, 2, generator=generator) + 2.0  # one cluster, all class 0
    labels = torch.zeros(64, dtype=torch.long)
    public = torch.randn(64, 1, 2, 2, generator=generator) - 2.0  # another cluster
    consensus = torch.tensor([[0.05, 0.9, 0.05]]).repeat(64, 1)  # the federation calls it class 1
    return private, labels, public, consensus


def _fit(weight: float | None) -> nn.Module:
    private, labels, public, consensus = _data()
    model = _linear(0)
    settings = OptimizerSettings(lr=0.05, batch_size=16)
    generator = torch.Generator().manual_seed(1)
    if weight is None:
        train_supervised(model, private, labels, epochs=20, settings=settings, generator=generator)
    else:
        train_with_consensus(
            model,
            private,
            labels,
            public,
            consensus,
            weight=weight,
            temperature=2.0,
            epochs=20,
            settings=settings,
            generator=generator,
        )
    return model


def test_a_teacher_learns_the_consensus_on_the_public_inputs_and_keeps_its_own_classes():
    private, _, public, _ = _data()
    co_distilled, alone = _fit(1.0), _fit(None)
    # Its own data (class 0) stays class 0 either way.
    assert (predict_logits(co_distilled, private).argmax(1) == 0).float().mean() > 0.95
    # The public cluster: the consensus's class 1 with the consensus, the only class it knows without.
    assert (predict_logits(co_distilled, public).argmax(1) == 1).float().mean() > 0.95
    assert (predict_logits(alone, public).argmax(1) == 1).float().mean() < 0.05


def test_weight_zero_leaves_only_the_cross_entropy():
    private, labels, public, consensus = _data()
    with_zero = _fit(0.0)
    # Same steps and draws as with the consensus, minus its loss: the public predictions stay class 0.
    assert (predict_logits(with_zero, public).argmax(1) == 1).float().mean() < 0.05
    with pytest.raises(ValueError, match="consensus"):
        train_with_consensus(
            _linear(0),
            private,
            labels,
            public,
            consensus[:10],
            weight=1.0,
            temperature=1.0,
            epochs=1,
            settings=OptimizerSettings(),
            generator=torch.Generator(),
        )


def test_the_consensus_travels_as_float16_and_comes_back_as_probability_rows():
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=50).astype(np.float32)
    record = consensus_record(np.arange(50), probs)
    assert record[SOFT_LABELS_ARRAY].numpy().dtype == np.float16
    positions, rows = consensus_targets(record)
    np.testing.assert_array_equal(positions, np.arange(50))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(rows, probs, atol=2e-3)


def test_the_default_weight_is_on_for_ensemble_distillation_on_public_inputs_without_privacy():
    assert RunConfig().consensus_weight == CO_DISTILLATION_WEIGHT
    assert RunConfig(strategy=StrategyConfig(name="fedmd")).consensus_weight == 0.0
    assert RunConfig(transfer="synthetic").consensus_weight == 0.0
    private = RunConfig(privacy=PrivacyConfig(mechanism="gaussian"), strategy=StrategyConfig(aggregator="weighted"))
    assert private.consensus_weight == 0.0
    # Resolved on use: a copy with a privacy mechanism gets that mechanism's default, not the copied 1.
    assert dataclasses.replace(RunConfig(), privacy=PrivacyConfig(mechanism="gaussian")).consensus_weight == 0.0
    # A weight given explicitly is kept.
    assert RunConfig(strategy=StrategyConfig(consensus_weight=0.3)).consensus_weight == 0.3
    with pytest.raises(ValueError, match="consensus_weight"):
        StrategyConfig(consensus_weight=-0.5)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"strategy": StrategyConfig(name="fedavg", consensus_weight=1.0)}, "strategy=fedavg"),
        ({"transfer": "synthetic", "strategy": StrategyConfig(consensus_weight=1.0)}, "transfer=public"),
        (
            {
                "privacy": PrivacyConfig(mechanism="gaussian"),
                "strategy": StrategyConfig(aggregator="weighted", consensus_weight=1.0),
            },
            "privacy=gaussian",
        ),
    ],
)
def test_an_explicit_weight_where_no_consensus_can_travel_is_refused_with_the_fix(change, names):
    config = dataclasses.replace(RunConfig(public_size=100), **change)
    with pytest.raises(ValueError, match=names) as raised:
        check_run(config)
    assert "consensus_weight=0" in str(raised.value)


def test_ensemble_distillation_sends_the_last_aggregate_down_only_with_co_distillation():
    from fedkd.config import RunConfig as Run
    from fedkd.data.local import info_for
    from fedkd.models import build_model
    from strategies.registry import build_strategy

    def built(weight: float):
        config = Run(public_size=40, strategy=StrategyConfig(consensus_weight=weight))
        info = info_for(config.split_spec())
        student = build_model(config.student_model, input_shape=info.input_shape, num_classes=info.num_classes)
        return build_strategy(config, info=info, student_model=student)

    for weight, travels in ((1.0, True), (0.0, False)):
        strategy = built(weight)
        strategy.consensus = np.full((40, 10), 0.1, dtype=np.float32)
        records = strategy.consensus_records()
        assert (CONSENSUS_KEY in records) is travels


def test_lacked_classes_by_hand():
    counts = torch.tensor([50, 0, 1, 10, 39])  # five classes, uniform share 0.2
    # share 0.5 of uniform is 0.1 of the data: class 1 (0 %) fully lacked, class 2 (1 %) 0.9, class 3 (10 %) 0.
    np.testing.assert_allclose(lacked_classes(counts, share=0.5).numpy(), [0.0, 1.0, 0.9, 0.0, 0.0], atol=1e-6)
    # share 1: lacked in proportion up to the uniform share itself.
    np.testing.assert_allclose(lacked_classes(counts, share=1.0).numpy(), [0.0, 1.0, 0.95, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="share"):
        lacked_classes(counts, share=0.0)
    with pytest.raises(ValueError, match="class_counts"):
        lacked_classes(torch.zeros(5), share=0.5)


def test_lacked_mass_weighs_each_input_by_the_consensus_on_the_lacked_classes():
    consensus = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    lacked = torch.tensor([0.0, 1.0, 0.5])
    np.testing.assert_allclose(lacked_mass(consensus, lacked).numpy(), [0.1, 0.3 + 0.25], atol=1e-6)
    # A client that lacks nothing learns nothing from the consensus.
    assert torch.equal(lacked_mass(consensus, torch.zeros(3)), torch.zeros(2))


def test_input_weights_of_zero_leave_the_public_inputs_alone():
    private, labels, public, consensus = _data()
    model = _linear(0)
    train_with_consensus(
        model,
        private,
        labels,
        public,
        consensus,
        weight=1.0,
        temperature=2.0,
        epochs=20,
        settings=OptimizerSettings(lr=0.05, batch_size=16),
        generator=torch.Generator().manual_seed(1),
        input_weights=torch.zeros(len(public)),
    )
    assert (predict_logits(model, public).argmax(1) == 1).float().mean() < 0.05
    with pytest.raises(ValueError, match="input_weights"):
        train_with_consensus(
            model,
            private,
            labels,
            public,
            consensus,
            weight=1.0,
            temperature=2.0,
            epochs=1,
            settings=OptimizerSettings(),
            generator=torch.Generator(),
            input_weights=torch.ones(3),
        )


def test_unit_input_weights_are_the_unweighted_loss():
    private, labels, public, consensus = _data()
    models = []
    for input_weights in (None, torch.ones(len(public))):
        model = _linear(0)
        train_with_consensus(
            model,
            private,
            labels,
            public,
            consensus,
            weight=0.7,
            temperature=2.0,
            epochs=2,
            settings=OptimizerSettings(lr=0.05, batch_size=16),
            generator=torch.Generator().manual_seed(1),
            input_weights=input_weights,
        )
        models.append(model)
    for first, second in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
