"""PATE's Confident-GNMax (privacy=pate), many teachers per client, and the semi-supervised student."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from fedkd.config import PartitionConfig, PrivacyConfig, RunConfig
from fedkd.distillation import (
    OptimizerSettings,
    SemiSupervision,
    consistency_loss,
    strong_augment,
    train_semi_supervised,
)
from fedkd.models import build_model
from fedkd.privacy.accountant import RDP_ORDERS
from fedkd.privacy.client import teacher_shards
from fedkd.privacy.mechanisms import (
    confident_gnmax,
    gnmax_labels,
    is_vote_count_matrix,
    summed_votes,
    threshold_check,
)
from fedkd.privacy.pate_analysis import (
    confident_gnmax_cost,
    rdp_gnmax_data_independent,
    rdp_smooth_sensitivity_gaussian,
    rdp_threshold_data_independent,
    release_epsilon,
)
from strategies.pate_release import PATERelease, pate_epsilon

PATE = dict(mechanism="pate", threshold=200.0, sigma_threshold=150.0, sigma_gnmax=40.0)


def _votes(rng, *, queries, teachers=250, classes=10, agreement=0.9):
    """Vote histograms where each teacher picks the query's class with probability ``agreement``."""
    truth = rng.integers(0, classes, size=queries)
    picks = np.where(
        rng.random((queries, teachers)) < agreement, truth[:, None], rng.integers(0, classes, (queries, teachers))
    )
    return np.stack([np.bincount(row, minlength=classes) for row in picks])


# --- the mechanism ---------------------------------------------------------------------------


def _estimated_sigma(rate, margin):
    """σ from Pr[noise ≥ margin] = rate under N(0, σ²)."""
    return margin / stats.norm.isf(rate)


def test_threshold_check_noise_has_the_stated_spread():
    # The check releases only the comparison; its rate at a known margin pins down σ, and it
    # would be 0 or 1 without noise.
    sigma, threshold, draws = 150.0, 200.0, 40_000
    rng = np.random.default_rng(0)
    for margin in (75.0, 150.0):
        counts = np.zeros((draws, 10))
        counts[:, 3] = threshold - margin
        rate = threshold_check(counts, threshold=threshold, sigma=sigma, rng=rng).mean()
        assert 0.0 < rate < 0.5
        assert _estimated_sigma(rate, margin) == pytest.approx(sigma, rel=0.05)
    at_threshold = np.zeros((draws, 10))
    at_threshold[:, 0] = threshold
    assert threshold_check(at_threshold, threshold=threshold, sigma=sigma, rng=rng).mean() == pytest.approx(
        0.5, abs=0.01
    )


def test_gnmax_noise_has_the_stated_spread():
    # Two classes d votes apart: the runner-up wins with Pr[N(0, 2σ²) ≥ d].
    sigma, margin, draws = 40.0, 60.0, 40_000
    counts = np.zeros((draws, 10))
    counts[:, 1], counts[:, 2] = 150, 150 - margin
    flipped = (gnmax_labels(counts, sigma=sigma, rng=np.random.default_rng(1)) != 1).mean()
    assert flipped > 0.0
    assert _estimated_sigma(flipped, margin) / math.sqrt(2) == pytest.approx(sigma, rel=0.05)


def test_confident_gnmax_answers_only_confident_queries_and_labels_them_by_vote():
    counts = np.zeros((4, 10), dtype=np.int64)
    counts[0, 2] = counts[2, 7] = 250  # unanimous: answered with near certainty
    counts[1, :] = 25  # flat: max 25, far below T = 200
    counts[3, :5] = 50
    answered, labels = confident_gnmax(
        counts, threshold=200.0, sigma_threshold=10.0, sigma_gnmax=5.0, rng=np.random.default_rng(0)
    )
    assert answered.tolist() == [True, False, True, False]
    assert labels.tolist() == [2, 7]  # one label per answered query, nothing for refusals


def test_a_refused_query_costs_only_the_threshold_check():
    orders = np.array([2.0, 8.0, 32.0])
    votes = _votes(np.random.default_rng(2), queries=5)
    refused = confident_gnmax_cost(
        votes, answered=np.zeros(5, bool), threshold=200, sigma1=150, sigma2=40, orders=orders, delta=1e-5
    )
    one = np.array([True, False, False, False, False])
    answered = confident_gnmax_cost(
        votes, answered=one, threshold=200, sigma1=150, sigma2=40, orders=orders, delta=1e-5
    )
    assert refused.data_independent_rdp == pytest.approx(5 * rdp_threshold_data_independent(sigma=150, orders=orders))
    assert answered.data_independent_rdp - refused.data_independent_rdp == pytest.approx(
        rdp_gnmax_data_independent(sigma=40, orders=orders)
    )


@pytest.mark.parametrize("seed", range(4))
def test_reported_epsilon_is_never_above_the_data_independent_one(seed):
    rng = np.random.default_rng(seed)
    votes = _votes(rng, queries=200, agreement=rng.uniform(0.3, 0.95))
    answered = rng.random(200) < 0.5
    result = pate_epsilon(votes, answered, config=PrivacyConfig(**PATE), num_teachers=250, releases=1, rng=rng)
    assert result.epsilon <= result.data_independent
    assert result.epsilon == min(result.released, result.data_independent)
    assert result.answered == answered.sum() and result.queries == 200


def test_strong_consensus_makes_the_released_epsilon_smaller_than_the_data_independent_one():
    # The paper's MNIST regime: ~300 answered queries with near-unanimous votes.
    rng = np.random.default_rng(3)
    votes = _votes(rng, queries=640, agreement=0.95)
    answered = votes.max(axis=1) + rng.normal(0, 150, 640) >= 200
    result = pate_epsilon(votes, answered, config=PrivacyConfig(**PATE), num_teachers=250, releases=1, rng=rng)
    assert result.released < 2.0 < result.data_independent
    assert result.epsilon == result.released


def test_pate_converts_rdp_to_epsilon_as_the_accountant_of_every_other_mechanism_does():
    """Balle et al.'s conversion (Opacus's): ε's of PATE and of DP-SGD/Gaussian runs compare."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rng = np.random.default_rng(5)
    votes = _votes(rng, queries=100, agreement=0.9)
    answered = np.ones(100, bool)
    config = PrivacyConfig(**PATE)
    result = pate_epsilon(votes, answered, config=config, num_teachers=250, releases=1, rng=np.random.default_rng(0))
    beta = config.release_beta
    orders = np.array([o for o in RDP_ORDERS if o < 1 / (2 * beta)], dtype=np.float64)
    cost = confident_gnmax_cost(
        votes,
        answered=answered,
        threshold=config.threshold,
        sigma1=config.sigma_threshold,
        sigma2=config.sigma_gnmax,
        orders=orders,
        delta=config.delta,
    )
    gnss = [rdp_smooth_sensitivity_gaussian(beta=beta, sigma=config.release_sigma, order=o) for o in orders]
    expected, _ = get_privacy_spent(orders=orders, rdp=cost.data_independent_rdp + np.array(gnss), delta=config.delta)
    assert result.data_independent == pytest.approx(expected, rel=1e-9)

    # The released ε too: the same draw as release_epsilon's, converted by Balle et al.'s bound.
    def released(improved: bool) -> float:
        release = release_epsilon(
            votes,
            answered=answered,
            num_teachers=250,
            threshold=config.threshold,
            sigma1=config.sigma_threshold,
            sigma2=config.sigma_gnmax,
            order=config.release_order,
            delta=config.delta,
            beta=beta,
            sigma_ss=config.release_sigma,
            rng=np.random.default_rng(0),
            improved_conversion=improved,
        )
        return release.epsilon + release.release_cost

    assert result.released == pytest.approx(released(True), rel=1e-9)
    order = config.release_order
    assert released(False) - released(True) == pytest.approx(math.log(order) / (order - 1) - math.log(1 - 1 / order))


def test_each_release_of_epsilon_is_paid_for():
    rng = np.random.default_rng(4)
    votes = _votes(rng, queries=50)
    answered = np.ones(50, bool)
    config = PrivacyConfig(**PATE)
    once = pate_epsilon(votes, answered, config=config, num_teachers=250, releases=1, rng=np.random.default_rng(0))
    twice = pate_epsilon(votes, answered, config=config, num_teachers=250, releases=2, rng=np.random.default_rng(0))
    assert twice.released > once.released and twice.data_independent > once.data_independent


def test_vote_counts_must_be_whole_votes_per_teacher():
    good = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    assert is_vote_count_matrix(good, teachers_per_client=3)
    assert not is_vote_count_matrix(good * 2, teachers_per_client=3)  # one record would move 2 votes
    assert not is_vote_count_matrix(good - 0.5, teachers_per_client=3)
    assert summed_votes(np.stack([good, good]), teachers_per_client=3).tolist() == [[4, 0, 2], [0, 6, 0]]
    with pytest.raises(ValueError, match="whole vote"):
        summed_votes(np.stack([good, good * 2]), teachers_per_client=3)


def test_pate_release_labels_answered_queries_and_hands_the_rest_over_unlabelled():
    num_public, queries, clients, per_client = 120, 60, 50, 5
    inputs = torch.randn(num_public, 1, 8, 8)
    # σ₁ small enough that unanimous queries (250 votes) pass T = 200 and flat ones (50) never do.
    config = PrivacyConfig(**{**PATE, "sigma_threshold": 10.0}, queries=queries, teachers_per_client=per_client)
    source = PATERelease(
        config=config, inputs=inputs, indices=np.arange(num_public), num_teachers=clients * per_client, seed=0
    )
    source.prepare(1, None, [], None)  # type: ignore[arg-type]
    truth = np.random.default_rng(0).integers(0, 10, queries)
    replies = np.zeros((clients, queries, 10), dtype=np.float32)
    replies[:, np.arange(queries), truth] = per_client  # unanimous teachers
    replies[:, :10] = 0
    replies[:, :10, :5] = 1  # ten flat queries: refused
    learned = source.distillation_set(replies, np.ones(clients), server_round=1)
    metrics = source.round_metrics()
    assert metrics["queries-answered"] == 50 and metrics["queries"] == queries
    assert len(learned.inputs) == len(learned.targets) == 50
    assert learned.targets.argmax(axis=1).tolist() == truth[10:].tolist()
    assert len(learned.unlabelled) == num_public - 50
    assert metrics["epsilon"] <= metrics["epsilon-data-independent"]
    restored = PATERelease(config=config, inputs=inputs, indices=np.arange(num_public), num_teachers=250, seed=0)
    restored.load_state_records(source.state_records())
    assert restored.round_metrics() == metrics


# --- many teachers per client ----------------------------------------------------------------


@pytest.mark.parametrize("num_examples, teachers", [(204, 1), (1000, 5), (7, 7), (23, 4)])
def test_teacher_shards_are_disjoint_and_cover_the_partition(num_examples, teachers):
    shards = teacher_shards(num_examples, teachers, rng=np.random.default_rng(0))
    assert len(shards) == teachers
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(num_examples))  # each example in exactly one shard
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    again = teacher_shards(num_examples, teachers, rng=np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=False))  # the same every round


def test_too_few_examples_for_the_teachers_names_the_fix():
    with pytest.raises(ValueError, match="teachers_per_client"):
        teacher_shards(3, 5, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(privacy=dict(mechanism="gnmax", teachers_per_client=5)), "needs privacy=pate"),
        (dict(privacy=dict(mechanism="pate"), transfer="synthetic"), "transfer=public"),
        (dict(semi_supervised=True, kd_alpha=0.5, public_labels=True), "semi_supervised"),
        (dict(privacy=dict(mechanism="pate", sigma_gnmax=0.0)), "sigma_gnmax"),
        (dict(privacy=dict(mechanism="pate", release_order=1.0)), "release_order"),
    ],
)
def test_bad_pate_settings_fail_with_the_fix(kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        RunConfig(privacy=PrivacyConfig(**kwargs.pop("privacy", {})), **kwargs)


# --- the semi-supervised student -------------------------------------------------------------


def test_consistency_loss_pulls_the_strong_view_to_confident_pseudo_labels_only():
    weak = torch.tensor([[10.0, 0.0, 0.0], [0.3, 0.2, 0.1]])  # confident, not confident
    strong = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
    loss, mask = consistency_loss(weak, strong, confidence=0.95)
    assert mask.tolist() == [1.0, 0.0]
    expected = torch.nn.functional.cross_entropy(strong[:1], torch.tensor([0])) / 2  # averaged over the batch
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert strong.grad[1].abs().sum() == 0  # the unconfident example pulls nowhere
    none, _ = consistency_loss(weak, strong, confidence=1.0)
    assert none.item() == 0.0


def test_strong_augment_keeps_shape_changes_images_and_is_reproducible():
    images = torch.randn(6, 1, 28, 28)
    out = strong_augment(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and not torch.allclose(out, images)
    assert torch.equal(out, strong_augment(images, generator=torch.Generator().manual_seed(0)))


def test_semi_supervised_training_learns_from_labels_and_unlabelled_inputs():
    torch.manual_seed(0)
    # Two blobs: a few labelled points, many unlabelled; the student must separate them.
    centers = torch.tensor([-2.0, 2.0]).view(2, 1, 1, 1)
    labels = torch.arange(2).repeat(40)
    images = centers[labels] + 0.5 * torch.randn(80, 1, 8, 8)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=2, seed=0)
    targets = torch.nn.functional.one_hot(labels[:6], 2).float()
    train_semi_supervised(
        model,
        images[:6],
        targets,
        images[6:],
        epochs=3,
        temperature=1.0,
        settings=OptimizerSettings(lr=1e-2, batch_size=4),
        generator=torch.Generator().manual_seed(0),
    )
    model.eval()
    assert (model(images).argmax(dim=1) == labels).float().mean() > 0.9


def test_semi_supervised_student_ends_with_the_moving_average_of_its_weights():
    torch.manual_seed(0)
    images = torch.randn(40, 1, 8, 8)
    targets = torch.nn.functional.one_hot(torch.arange(2).repeat(4), 2).float()

    def trained(decay: float) -> dict[str, torch.Tensor]:
        model = build_model("cnn_small", input_shape=(1, 8, 8), num_classes=2, seed=0)
        train_semi_supervised(
            model,
            images[:8],
            targets,
            images[8:],
            epochs=4,
            temperature=1.0,
            settings=OptimizerSettings(lr=1e-2, batch_size=2),
            generator=torch.Generator().manual_seed(0),
            semi=SemiSupervision(ema_decay=decay, ratio=2),
        )
        return {name: value.clone() for name, value in model.state_dict().items()}

    last_iterate, averaged = trained(0.0), trained(0.9)
    moved = [name for name, value in last_iterate.items() if value.is_floating_point()]
    assert any(not torch.allclose(last_iterate[name], averaged[name]) for name in moved)
    # The average lags the last iterate: it sits between it and the untrained weights.
    untrained = build_model("cnn_small", input_shape=(1, 8, 8), num_classes=2, seed=0).state_dict()
    weight = next(name for name in moved if name.endswith("weight"))
    assert (averaged[weight] - untrained[weight]).norm() < (last_iterate[weight] - untrained[weight]).norm()


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_semi_supervision_refuses_a_decay_outside_zero_one(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        SemiSupervision(ema_decay=decay)


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture()
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.mark.slow
def test_pate_runs_end_to_end_with_several_teachers_per_client(task_identity, tmp_path):
    from grids import RecordingGrid

    from federation.client_app import app as client_app
    from federation.run import run_federation

    config = RunConfig(
        dataset="digits",
        num_clients=4,
        rounds=2,
        local_epochs=2,
        distill_epochs=1,
        public_size=300,
        partition=PartitionConfig(scheme="iid"),
        client_models=("lenet5_bn",),
        student_model="cnn_small",
        semi_supervised=True,
        privacy=PrivacyConfig(
            mechanism="pate",
            queries=60,
            teachers_per_client=3,
            threshold=8.0,
            sigma_threshold=2.0,
            sigma_gnmax=1.0,
            release_order=8.0,
            epsilon=math.inf,
        ),
    )
    grid = RecordingGrid(client_app, num_nodes=config.num_clients)
    rows = run_federation(grid, config, run_dir=tmp_path)
    assert [row["queries"] for row in rows] == [60, 120]
    for row in rows:
        assert 0 < row["queries_answered"] <= row["queries"]
        assert row["distill_inputs"] == row["queries_answered"]
        assert 0 < row["epsilon"] <= row["epsilon_data_independent"]
    assert rows[1]["epsilon_data_independent"] > rows[0]["epsilon_data_independent"]
    assert (tmp_path / "privacy.json").exists()
