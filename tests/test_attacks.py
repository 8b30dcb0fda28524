"""Simulated malicious clients: who attacks, what each attack sends, and what the server makes of it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from baselines import untrained_student_accuracy
from hypothesis import given
from hypothesis import strategies as st

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.attacks import ATTACK_KINDS, attacked_logits, collusion, flip_labels, malicious_clients
from fedkd.checkpoint import load_checkpoint
from fedkd.config import (
    AttackConfig,
    PartitionConfig,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
    run_config_from_mapping,
)
from fedkd.data.local import public_inputs
from strategies.registry import check_run


@given(num_clients=st.integers(1, 500), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_the_malicious_share_is_a_fixed_seeded_choice_of_the_right_size(num_clients, fraction, seed):
    chosen = malicious_clients(num_clients, fraction, seed)
    assert len(chosen) == round(fraction * num_clients)
    assert chosen <= set(range(num_clients))
    assert chosen == malicious_clients(num_clients, fraction, seed)


def test_flipped_labels_all_move_to_another_class():
    labels = torch.arange(10)
    flipped = flip_labels(labels, 10)
    assert flipped.tolist() == list(range(9, -1, -1)) and not (flipped == labels).any()


def test_each_logit_attack_does_what_it_says():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    assert torch.isnan(attacked_logits(logits, "nan", scale=1.0, generator=generator)).all()
    inverted = attacked_logits(logits, "scale", scale=-4.0, generator=generator)
    assert (inverted.argmax(dim=1) == logits.argmin(dim=1)).all()
    noise = attacked_logits(logits, "random", scale=1.0, generator=generator)
    assert noise.shape == logits.shape and torch.isfinite(noise).all()
    assert (noise.argmax(dim=1) == logits.argmax(dim=1)).float().mean() < 0.5
    for honest in ("none", "flip"):
        assert attacked_logits(logits, honest, scale=1.0, generator=generator) is logits
    with pytest.raises(ValueError, match="attack kind"):
        attacked_logits(logits, "poison", scale=1.0, generator=generator)


def _honest_logits(seed: int, inputs: int = 200, classes: int = 10) -> torch.Tensor:
    return torch.randn(inputs, classes, generator=torch.Generator().manual_seed(seed)) * 4


def test_colluders_agree_on_a_seeded_target_and_send_its_wrong_class_with_honest_confidence():
    plan = collusion(10, seed=3, server_round=1, lie_fraction=0.4)
    assert plan.target != plan.wrong
    later = collusion(10, seed=3, server_round=5, lie_fraction=0.4)
    assert (later.target, later.wrong) == (plan.target, plan.wrong)  # fixed for the run
    for client_seed in (0, 1):  # two attackers with different teachers
        logits = _honest_logits(client_seed)
        sent = attacked_logits(logits, "collude", scale=1.0, generator=torch.Generator(), plan=plan)
        on_target = logits.argmax(dim=1) == plan.target
        assert on_target.any()
        assert (sent[on_target].argmax(dim=1) == plan.wrong).all()
        torch.testing.assert_close(sent[~on_target], logits[~on_target])
        # the same confidence: a row's values are only permuted
        torch.testing.assert_close(sent.sort(dim=1).values, logits.sort(dim=1).values)
    with pytest.raises(ValueError, match="shared plan"):
        attacked_logits(logits, "collude", scale=1.0, generator=torch.Generator())


def test_adaptive_attackers_move_the_argmax_to_the_runner_up_on_the_same_seeded_inputs():
    plan = collusion(10, seed=3, server_round=2, lie_fraction=0.4)
    lies = plan.lies(200)
    assert int(lies.sum()) == 80
    assert not torch.equal(lies, collusion(10, seed=3, server_round=3, lie_fraction=0.4).lies(200))
    for client_seed in (0, 1):
        logits = _honest_logits(client_seed)
        sent = attacked_logits(logits, "adaptive", scale=1.0, generator=torch.Generator(), plan=plan)
        runner_up = logits.topk(2, dim=1).indices[:, 1]
        assert (sent[lies].argmax(dim=1) == runner_up[lies]).all()
        torch.testing.assert_close(sent[~lies], logits[~lies])
        torch.testing.assert_close(sent.sort(dim=1).values, logits.sort(dim=1).values)


def test_adaptive_attackers_stay_inside_the_robust_acceptance_region_that_plain_liars_leave():
    """Honest clients right 90 % of the time; attackers that move the argmax on 40 % of inputs
    keep full acceptance from the robust rule, attackers that move it everywhere get none."""
    from strategies.robust_aggregation import trust_weighted

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 10, (400,), generator=generator)

    def teacher(seed: int) -> torch.Tensor:
        logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(seed))
        right = torch.rand(400, generator=torch.Generator().manual_seed(seed + 100)) < 0.9
        logits[torch.arange(400)[right], truth[right]] += 6.0
        return logits

    plan = collusion(10, seed=0, server_round=1, lie_fraction=0.4)
    every_input = collusion(10, seed=0, server_round=1, lie_fraction=1.0)
    honest = [teacher(seed) for seed in range(7)]
    attackers = [teacher(seed) for seed in range(7, 10)]
    for chosen, accepted in ((plan, True), (every_input, False)):
        sent = honest + [attacked_logits(a, "adaptive", scale=1.0, generator=generator, plan=chosen) for a in attackers]
        stack = torch.stack(sent).softmax(dim=2).numpy()
        trust = trust_weighted(stack, np.ones(10)).trust
        if accepted:
            assert trust[7:].mean() > 0.9 * trust[:7].mean(), (trust[7:].mean(), trust[:7].mean())
        else:
            assert trust[7:].mean() < 0.1 * trust[:7].mean()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(attack=AttackConfig(kind="nan", fraction=0.1), strategy=StrategyConfig(name="fedavg")),
            "strategy=fedavg",
        ),
        (
            dict(attack=AttackConfig(kind="nan", fraction=0.1), privacy=PrivacyConfig(mechanism="gnmax")),
            "privacy=gnmax",
        ),
    ],
)
def test_attacks_the_run_cannot_simulate_fail_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_run(RunConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="poison", fraction=0.1), "attack.kind"),
        (dict(kind="nan", fraction=1.5), "attack.fraction"),
        (dict(kind="adaptive", fraction=0.1, lie_fraction=2.0), "attack.lie_fraction"),
        (dict(kind="nan"), "attacks nobody"),
    ],
)
def test_bad_attack_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_a_bare_nan_from_the_command_line_means_the_nan_attack():
    config = run_config_from_mapping({"attack": {"kind": math.nan, "fraction": 0.1}})
    assert config.attack.kind == "nan"
    assert set(ATTACK_KINDS) == {"none", "random", "flip", "scale", "nan", "collude", "adaptive"}


TINY = RunConfig(
    dataset="digits",
    num_clients=5,
    rounds=2,
    public_size=300,
    local_epochs=2,
    distill_epochs=3,
    partition=PartitionConfig(scheme="iid"),
    client_models=("cnn_small",),
    student_model="cnn_small",
    # The settings the attack results were measured with (README). At the recipe's T = 4 the honest
    # teachers' soft labels here are nearly uniform, and robust no longer resists the ×(−20) minority
    # in this five-client run (0.009 against weighted's 0.008; README says so).
    temperature=1.0,
    augment_shift=0.1,
    distill_ema=0.0,
)


@pytest.mark.slow
def test_a_nan_client_is_rejected_every_round_and_the_rest_still_teach():
    config = dataclasses.replace(TINY, attack=AttackConfig(kind="nan", fraction=0.2))
    (attacker,) = malicious_clients(5, 0.2, config.seed)
    rows = run_federation(InProcessGrid(client_app, num_nodes=5), config, run_dir=None)
    assert [row["rejected"] for row in rows] == [1, 1]
    assert [row["rejected_nodes"] for row in rows] == [[attacker + 1]] * 2  # node k + 1 holds partition k
    assert all(row["clients"] == 4 for row in rows)
    # the four honest teachers still teach: final − untrained was 0.37 (seed 0)
    assert rows[-1]["student_accuracy"] > untrained_student_accuracy(config) + 0.15


@pytest.mark.slow
def test_the_median_resists_a_minority_that_the_mean_follows():
    attack = AttackConfig(kind="scale", fraction=0.4, scale=-20.0)

    def accuracy(aggregator):
        config = dataclasses.replace(TINY, attack=attack, strategy=StrategyConfig(aggregator=aggregator))
        return run_federation(InProcessGrid(client_app, num_nodes=5), config, run_dir=None)[-1]["student_accuracy"]

    # median − mean was 0.37 for seed 0 (the mean followed the attackers down to 0.02)
    assert accuracy("median") > accuracy("mean") + 0.1


@pytest.mark.slow
def test_the_robust_aggregator_resists_a_confident_minority_that_the_mean_follows(tmp_path):
    """Two of five clients send inverted logits ×20 (one-hot on their teacher's least likely
    class). The three honest teachers are mostly right but unsure at T = 2.5 (under 2/3 on their
    class), so the weighted mean's consensus follows the attackers; the robust one keeps to the
    honest teachers. Scored on the consensus (the aggregate that travels down and that the student
    fits), which the aggregator alone decides: the five-client student's accuracy near chance
    varies more between seeds than the aggregators differ."""
    attack = AttackConfig(kind="scale", fraction=0.4, scale=-20.0)

    def consensus_right(aggregator):
        config = dataclasses.replace(
            TINY, attack=attack, strategy=StrategyConfig(aggregator=aggregator), local_epochs=5, temperature=2.5
        )
        run_dir = tmp_path / aggregator
        run_federation(InProcessGrid(client_app, num_nodes=5), config, run_dir=run_dir)
        checkpoint = load_checkpoint(run_dir)
        assert checkpoint is not None
        consensus = checkpoint.strategy["consensus"]["probs"].numpy()
        assert len(consensus) == config.public_size  # public transfer labels every public input
        labels = public_inputs(config.split_spec()).labels.numpy()
        return float((consensus.argmax(axis=1) == labels).mean())

    # Seeds 0–9 on one machine: robust 0.43–0.65 of the public inputs right, weighted 0.09–0.27;
    # robust − weighted 0.27–0.47 (mean 0.35).
    assert consensus_right("robust") > consensus_right("weighted") + 0.15
