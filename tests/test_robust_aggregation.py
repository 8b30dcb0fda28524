"""The robust aggregator: per-class trust against a refined reference, reputation across rounds,
public labels as a root set. Pure math, checked by hand and by properties, without Flower."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkd.config import RunConfig, StrategyConfig
from fedkd.data.local import info_for
from fedkd.models import build_model
from strategies.aggregation import median, robust, weighted_mean
from strategies.registry import build_strategy
from strategies.robust_aggregation import (
    PRIOR_STRENGTH,
    Evidence,
    Reputation,
    chance_precision,
    claim_evidence,
    class_acceptance,
    class_precision,
    input_trust,
    trust_weighted,
    trust_weighted_mean,
    trusted_vote,
    typical_precision,
    weighted_quantile,
)
from strategies.transfer import PostProcessed, RobustAggregation

HONEST = np.array([[1.0, 0.0], [0.0, 1.0]])
FLIPPED = HONEST[:, ::-1]


def test_claim_evidence_by_hand():
    stack = np.array([[[0.8, 0.2], [0.3, 0.7]]])  # one client, two inputs
    evidence = claim_evidence(stack, np.array([0, 0]))
    np.testing.assert_allclose(evidence.claimed, [[1.1, 0.9]])
    np.testing.assert_allclose(evidence.confirmed, [[1.1, 0.0]])  # the reference says 0 twice


def test_class_precision_and_chance_by_hand():
    evidence = Evidence(claimed=np.array([[10.0, 0.0]]), confirmed=np.array([[10.0, 0.0]]))
    # (confirmed + 10 · 0.5) / (claimed + 10): 15/20 on a class claimed ten times, the prior 0.5 on the other
    np.testing.assert_allclose(class_precision(evidence), [[0.75, 0.5]])
    np.testing.assert_allclose(chance_precision(np.array([0, 0, 1, 2]), 4), [0.5, 0.25, 0.25, 0.0])


def test_weighted_quantile_by_hand():
    values = np.array([[0.1], [0.9], [0.5]])
    assert weighted_quantile(values, np.array([[1.0], [1.0], [1.0]]), 0.5)[0] == 0.5
    assert weighted_quantile(values, np.array([[1.0], [1.0], [1.0]]), 0.75)[0] == 0.9
    assert weighted_quantile(values, np.array([[5.0], [1.0], [1.0]]), 0.5)[0] == 0.1  # weight, not count
    assert np.isnan(weighted_quantile(values, np.zeros((3, 1)), 0.5)[0])


def test_class_acceptance_by_hand():
    precision = np.array([[0.9], [0.9], [0.3], [0.05]])
    # the lower weighted median of the claims: equal claims, 0.3; claims of the sure clients count triple, 0.9
    np.testing.assert_allclose(typical_precision(precision, np.ones((4, 1))), [0.3])
    np.testing.assert_allclose(typical_precision(precision, np.array([[3.0], [3.0], [1.0], [1.0]])), [0.9])
    # typical 0.9, chance 0.1: typical lift 0.8, full acceptance from a lift of 0.4 up, none at chance or below
    accept = class_acceptance(precision, np.array([0.9]), np.array([0.1]))
    np.testing.assert_allclose(accept[:, 0], [1.0, 1.0, 0.2 / 0.4, 0.0])
    # a typical client no better than chance: the class carries no signal, everyone is accepted
    np.testing.assert_allclose(class_acceptance(np.full((2, 1), 0.1), np.array([0.1]), np.array([0.2])), 1.0)


def test_input_trust_and_trust_weighted_mean_by_hand():
    stack = np.array([HONEST, FLIPPED])
    trust = input_trust(stack, np.array([[1.0, 0.5], [0.0, 0.0]]))
    np.testing.assert_allclose(trust, [[1.0, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(trust_weighted_mean(stack, np.array([1.0, 3.0]), trust), HONEST)
    # nobody trusted on an input: the plain weighted mean there
    nobody = trust_weighted_mean(stack, np.array([1.0, 3.0]), np.zeros((2, 2)))
    np.testing.assert_allclose(nobody, weighted_mean(stack, np.array([1.0, 3.0])))


def test_the_reference_is_a_vote_that_confidence_cannot_buy():
    # Two unsure clients say class 0, one sure client says class 1: the weighted mean follows the
    # sure one, the vote does not; a client not accepted on its class does not vote.
    unsure = np.array([[0.6, 0.4]])
    sure = np.array([[0.0, 1.0]])
    stack = np.array([unsure, unsure, sure])
    assert weighted_mean(stack, np.ones(3)).argmax() == 1
    np.testing.assert_array_equal(trusted_vote(stack, np.ones((3, 2))), [0])
    np.testing.assert_array_equal(trusted_vote(stack, np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])), [1])


def test_a_flipping_minority_gets_no_weight_by_hand():
    # Clients A, B honest, C flipped, equal weights. Pass 1: no evidence yet, so the argmax of the
    # coordinate-wise median is the reference: [0, 1]. Evidence: A, B claimed [1, 1], confirmed [1, 1];
    # C confirmed [0, 0]. Precision (c + 5)/(1 + 10): A, B 6/11, C 5/11; chance [1/2, 1/2]; typical
    # 6/11, lift 1/22, so A, B are accepted fully (1/22 ≥ 0.5 · 1/22) and C not at all (lift < 0).
    stack = np.array([HONEST, HONEST, FLIPPED])
    result = trust_weighted(stack, np.ones(3))
    np.testing.assert_allclose(result.targets, HONEST, atol=1e-7)
    np.testing.assert_allclose(result.trust, [[1, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(result.evidence.confirmed, [[1, 1], [1, 1], [0, 0]])
    # The weighted mean keeps a third of the mass on the wrong class.
    np.testing.assert_allclose(weighted_mean(stack, np.ones(3)), [[2 / 3, 1 / 3], [1 / 3, 2 / 3]], rtol=1e-6)
    # With the labels as root set the reference is given: same verdict in one pass.
    labelled = trust_weighted(stack, np.ones(3), labels=np.array([0, 1]))
    np.testing.assert_allclose(labelled.targets, HONEST, atol=1e-7)


def _non_iid_round(rng, *, truth, knowledge, attackers=(), kind="flip", num_classes=10):
    """Soft labels of clients that know a few classes each: sure and right on those, sure and
    wrong (some known class) elsewhere. Attackers answer as if the truth were flipped."""
    stack = []
    for client, known in enumerate(knowledge):
        seen = num_classes - 1 - truth if client in attackers and kind == "flip" else truth
        rows = np.full((len(truth), num_classes), 0.01)
        guesses = rng.choice(known, size=len(truth))
        claims = np.where(np.isin(seen, known), seen, guesses)
        rows[np.arange(len(truth)), claims] = 0.9
        stack.append(rows / rows.sum(axis=1, keepdims=True))
    return np.stack(stack)


def test_non_iid_knowledge_survives_where_the_median_loses_it():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, size=400)
    knowledge = [rng.choice(10, size=3, replace=False) for _ in range(30)]
    stack, weights = _non_iid_round(rng, truth=truth, knowledge=knowledge), rng.uniform(100, 1000, size=30)

    def accuracy(targets):
        return float((targets.argmax(axis=1) == truth).mean())

    # seed 0: weighted 0.935, robust 0.935, median 0.11 (sure rows: most medians are the 0.01 floor)
    assert accuracy(robust(stack, weights)) >= accuracy(weighted_mean(stack, weights)) - 0.01
    assert accuracy(robust(stack, weights)) > accuracy(median(stack, weights)) + 0.3


def test_a_confident_flipping_minority_is_outvoted_on_non_iid_data():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, size=400)
    knowledge = [rng.choice(10, size=4, replace=False) for _ in range(30)]
    stack = _non_iid_round(rng, truth=truth, knowledge=knowledge, attackers=range(9))  # 30 %
    weights = rng.uniform(100, 1000, size=30)

    def accuracy(targets):
        return float((targets.argmax(axis=1) == truth).mean())

    # seed 0: weighted 0.85, median 0.11, robust 0.925
    assert accuracy(robust(stack, weights)) > accuracy(weighted_mean(stack, weights)) + 0.04
    assert accuracy(robust(stack, weights)) > accuracy(median(stack, weights)) + 0.3


def _dirichlet_stack(seed, clients, inputs=6, classes=3):
    rng = np.random.default_rng(seed)
    stack = rng.dirichlet(np.full(classes, 0.3), size=(clients, inputs))
    return rng, stack, rng.uniform(1, 50, size=clients)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), clients=st.integers(2, 7))
def test_client_order_does_not_matter_with_reputation(seed, clients):
    rng, stack, weights = _dirichlet_stack(seed, clients)
    reputation = Evidence(rng.uniform(0, 20, size=(clients, 3)), np.zeros((clients, 3)))
    reputation = Evidence(reputation.claimed, reputation.claimed * rng.uniform(0, 1, size=(clients, 3)))
    order = rng.permutation(clients)
    permuted = Evidence(reputation.claimed[order], reputation.confirmed[order])
    first = trust_weighted(stack, weights, reputation=reputation)
    second = trust_weighted(stack[order], weights[order], reputation=permuted)
    np.testing.assert_allclose(first.targets, second.targets, atol=1e-6)
    np.testing.assert_allclose(first.evidence.claimed[order], second.evidence.claimed, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), clients=st.integers(1, 7))
def test_clients_that_agree_get_the_weighted_mean(seed, clients):
    rng, stack, weights = _dirichlet_stack(seed, clients)
    agreeing = np.repeat(stack[:1], clients, axis=0)
    np.testing.assert_allclose(robust(agreeing, weights), weighted_mean(agreeing, weights), atol=1e-6)
    # and so they do with any reputation, as long as all of them share it
    shared = Evidence(np.full((clients, 3), 7.0), np.full((clients, 3), 3.0))
    with_reputation = trust_weighted(agreeing, weights, reputation=shared).targets
    np.testing.assert_allclose(with_reputation, weighted_mean(agreeing, weights), atol=1e-6)


def _colluding_round(honest: int, attackers: int, *, inputs=30, classes=3):
    """Honest clients say the truth (input n is class n mod C); colluders all say the next class."""
    truth = np.arange(inputs) % classes
    right = np.full((inputs, classes), 0.05)
    right[np.arange(inputs), truth] = 0.9
    wrong = np.roll(right, 1, axis=1)
    return np.stack([right] * honest + [wrong] * attackers), right


def test_reputation_keeps_out_attackers_that_sampling_made_a_majority():
    """Rounds 1–2 sample 6 honest clients (ids 0–5) and 4 colluders (ids 6–9); round 3 samples
    2 honest and 3 colluders. Within round 3 alone the colluders are the truth; the trust they
    lost in rounds 1–2 keeps them out. Without reputation (a fresh aggregator) the aggregate follows them."""
    minority, right = _colluding_round(6, 4)
    majority, _ = _colluding_round(2, 3)
    aggregation = RobustAggregation(3)
    for _ in range(2):
        early = aggregation.aggregate(minority, np.ones(10), client_ids=list(range(10)))
        np.testing.assert_array_equal(early.argmax(axis=1), right.argmax(axis=1))
    remembered = aggregation.aggregate(majority, np.ones(5), client_ids=[0, 1, 6, 7, 8])
    forgotten = RobustAggregation(3).aggregate(majority, np.ones(5), client_ids=[0, 1, 6, 7, 8])
    assert (remembered.argmax(axis=1) == right.argmax(axis=1)).all()
    assert (forgotten.argmax(axis=1) != right.argmax(axis=1)).all()  # the baseline: colluders win


def test_reputation_decays_and_round_trips_through_its_arrays():
    reputation = Reputation(2, decay=0.5)
    reputation.update([4, 2], Evidence(np.array([[2.0, 0.0], [4.0, 4.0]]), np.array([[2.0, 0.0], [0.0, 4.0]])))
    reputation.update([2], Evidence(np.array([[2.0, 2.0]]), np.array([[0.0, 0.0]])))
    np.testing.assert_allclose(reputation.of([2, 4, 9]).claimed, [[4.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(reputation.of([2]).confirmed, [[0.0, 2.0]])
    np.testing.assert_allclose(reputation.precision(9), [0.5, 0.5])  # a stranger holds the prior
    restored = Reputation(2)
    restored.load_arrays(reputation.arrays())
    assert restored.by_client.keys() == reputation.by_client.keys()
    np.testing.assert_allclose(restored.of([2, 4]).claimed, reputation.of([2, 4]).claimed)
    assert PRIOR_STRENGTH > 0


def test_the_robust_aggregation_keeps_its_reputation_in_checkpoint_records():
    stack, _ = _colluding_round(6, 4)
    aggregation = RobustAggregation(3)
    aggregation.aggregate(stack, np.ones(10), client_ids=list(range(10)))
    restored = RobustAggregation(3)
    restored.load_state_records(aggregation.state_records())
    np.testing.assert_allclose(
        restored.reputation.of(range(10)).confirmed, aggregation.reputation.of(range(10)).confirmed
    )
    with pytest.raises(ValueError, match="start the run afresh"):
        RobustAggregation(3).load_state_records({})
    with pytest.raises(ValueError, match="client ids"):
        aggregation.aggregate(stack, np.ones(10), client_ids=[0])


@pytest.mark.parametrize(
    ("strategy", "transfer"),
    [
        ("ensemble_distillation", "public"),
        ("ensemble_distillation", "synthetic"),
        ("fedmd", "public"),
        ("dsfl", "public"),
    ],
)
def test_every_soft_label_strategy_runs_the_robust_aggregator_and_checkpoints_its_reputation(strategy, transfer):
    config = RunConfig(strategy=StrategyConfig(name=strategy, aggregator="robust"), transfer=transfer, public_size=50)
    info = info_for(config.split_spec())
    built = build_strategy(
        config,
        info=info,
        student_model=build_model(config.student_model, input_shape=info.input_shape, num_classes=info.num_classes),
    )
    aggregator = built.source.aggregator
    inner = aggregator.inner if isinstance(aggregator, PostProcessed) else aggregator
    assert isinstance(inner, RobustAggregation)
    inner.aggregate(*_colluding_round(3, 1, classes=info.num_classes)[:1], np.ones(4), client_ids=[0, 1, 2, 3])
    state = built.state_records()
    assert "source/aggregator/reputation" in state
    restored = build_strategy(config, info=info, student_model=built.student.model)
    restored.load_state_records(state)
    restored_inner = restored.source.aggregator
    restored_inner = restored_inner.inner if isinstance(restored_inner, PostProcessed) else restored_inner
    assert sorted(restored_inner.reputation.by_client) == [0, 1, 2, 3]
