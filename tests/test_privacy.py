"""The accountant, the calibration and the mechanisms: checked against Opacus and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedkd.config import ClientTask, PrivacyConfig, RunConfig, StrategyConfig
from fedkd.distillation import OptimizerSettings
from fedkd.models import build_model
from fedkd.privacy.accountant import RDP_ORDERS, PrivacyLedger, calibrate_noise_multiplier
from fedkd.privacy.dpsgd import calibrate_for_run, make_private_compatible, train_dp_sgd
from fedkd.privacy.mechanisms import (
    clip_rows,
    gaussian_mean,
    gaussian_noise_share,
    gnmax_labels,
    one_hot,
    sum_sensitivity,
    to_simplex,
    vote_counts,
)
from strategies.private_aggregation import ServerPrivacy, WorstClientEpsilon
from strategies.registry import check_run


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS)


# --- accountant ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "rate", "steps"), [(1.1, 0.01, 600), (4.0, 1.0, 3), (30.0, 1.0, 300)])
def test_ledger_epsilon_equals_opacus_direct_computation(sigma, rate, steps):
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    assert ledger.epsilon(1e-5) == pytest.approx(opacus_epsilon([(sigma, rate, steps)], 1e-5), rel=1e-12)


def test_ledger_matches_the_closed_form_gaussian_rdp():
    # Without subsampling the Gaussian mechanism's RDP is α·T/(2σ²) after T releases (Mironov 2017).
    sigma, steps, delta = 5.0, 4, 1e-5
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    orders = np.array(RDP_ORDERS, dtype=float)
    rdp = orders * steps / (2 * sigma**2)
    expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert ledger.epsilon(delta) == pytest.approx(expected, rel=1e-9)


def test_ledger_merges_repeated_releases_like_opacus_step():
    ledger = PrivacyLedger()
    accountant = RDPAccountant()
    for _ in range(5):
        ledger.record(noise_multiplier=2.0, sample_rate=0.1)
        accountant.step(noise_multiplier=2.0, sample_rate=0.1)
    ledger.record(noise_multiplier=3.0, sample_rate=1.0, steps=2)
    accountant.history.append((3.0, 1.0, 2))
    assert ledger.history == accountant.history


def test_ledger_round_trips_through_a_record():
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=2.0, sample_rate=0.1, steps=7)
    ledger.record(noise_multiplier=1.5, sample_rate=1.0)
    assert PrivacyLedger.from_record(ledger.to_record()) == ledger


def test_empty_ledger_spends_nothing_and_noise_free_releases_are_refused():
    assert PrivacyLedger().epsilon(1e-5) == 0.0
    with pytest.raises(ValueError, match="ε = ∞"):
        PrivacyLedger().record(noise_multiplier=0.0, sample_rate=1.0)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(
    sigmas=st.lists(st.floats(0.5, 20.0), min_size=1, max_size=6),
    rate=st.floats(0.01, 1.0),
)
def test_epsilon_never_decreases_as_releases_compose(sigmas, rate):
    ledger = PrivacyLedger()
    spent = [0.0]
    for sigma in sigmas:
        ledger.record(noise_multiplier=sigma, sample_rate=rate, steps=3)
        spent.append(ledger.epsilon(1e-5))
    assert all(later >= earlier for earlier, later in zip(spent, spent[1:], strict=False))


# Each calibration is a bisection over Opacus's accountant: the quick tier tries a few fixed
# draws and the extremes, the slow tier many random ones.
CALIBRATIONS = dict(
    epsilon=st.floats(0.3, 10.0),
    delta=st.sampled_from([1e-6, 1e-5, 1e-3]),
    rate=st.floats(0.005, 1.0),
    steps=st.integers(1, 2000),
)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(**CALIBRATIONS)
@example(epsilon=0.3, delta=1e-6, rate=1.0, steps=2000)  # the most noise
@example(epsilon=10.0, delta=1e-3, rate=0.005, steps=1)  # the least
def test_calibrated_noise_never_overshoots_the_target(epsilon, delta, rate, steps):
    check_calibration(epsilon, delta, rate, steps)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(**CALIBRATIONS)
def test_calibrated_noise_never_overshoots_the_target_on_many_draws(epsilon, delta, rate, steps):
    check_calibration(epsilon, delta, rate, steps)


def check_calibration(epsilon, delta, rate, steps):
    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=rate, steps=steps)
    spent = opacus_epsilon([(sigma, rate, steps)], delta)
    assert spent <= epsilon
    assert spent >= epsilon - 0.05 or sigma <= 1e-3  # and wastes little of the budget


def test_calibration_without_a_budget_means_no_noise():
    assert calibrate_noise_multiplier(target_epsilon=math.inf, delta=1e-5, sample_rate=1.0, steps=10) == 0.0
    with pytest.raises(ValueError, match="privacy.delta"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=0.0, sample_rate=1.0, steps=10)
    with pytest.raises(ValueError, match="privacy.epsilon"):
        calibrate_noise_multiplier(target_epsilon=-1.0, delta=1e-5, sample_rate=1.0, steps=10)


# --- mechanisms ----------------------------------------------------------------------------


def test_clip_rows_bounds_each_row_and_leaves_short_ones_alone():
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    clipped = clip_rows(rows, 1.0)
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5])
    np.testing.assert_allclose(clipped[1], rows[1])
    with pytest.raises(ValueError, match="clip_norm"):
        clip_rows(rows, 0.0)


def test_one_client_moves_the_clipped_sum_by_at_most_the_sensitivity():
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(5, 20, 10)) * 3
    with_all = clip_rows(stack, 1.0).sum(axis=0)
    without_last = clip_rows(stack[:-1], 1.0).sum(axis=0)
    assert np.linalg.norm(with_all - without_last) <= sum_sensitivity(20, 1.0) + 1e-9


def test_to_simplex_gives_probability_rows():
    rows = to_simplex(np.array([[0.5, -0.2, 0.9], [-1.0, -2.0, -0.1]]))
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-6)
    assert (rows >= 0).all()
    np.testing.assert_allclose(rows[1], 1 / 3)  # nothing positive: uniform


def test_gaussian_mean_without_noise_is_the_plain_mean_and_noise_has_the_stated_scale():
    rng = np.random.default_rng(1)
    stack = rng.dirichlet(np.ones(4), size=(6, 50))
    exact = gaussian_mean(stack, clip_norm=1.0, noise_std=0.0, expected_clients=6, rng=rng)
    np.testing.assert_allclose(exact, stack.mean(axis=0), rtol=1e-5)
    shares = np.stack([gaussian_noise_share((200, 4), noise_std=3.0, num_shares=9, rng=rng) for _ in range(9)])
    assert shares.sum(axis=0).std() == pytest.approx(3.0, rel=0.1)


def test_gnmax_counts_votes_and_releases_the_noisy_argmax():
    votes = one_hot(np.array([[0, 1, 1], [2, 1, 1], [2, 1, 0]]).reshape(-1), 3).reshape(3, 3, 3)
    counts = vote_counts(votes)
    np.testing.assert_array_equal(counts, [[1, 0, 2], [0, 3, 0], [1, 2, 0]])
    assert gnmax_labels(counts, sigma=0.0, rng=np.random.default_rng(0))[:2].tolist() == [2, 1]
    # Huge noise: the answer no longer follows the votes.
    noisy = gnmax_labels(np.tile([[10, 0, 0]], (400, 1)), sigma=1e4, rng=np.random.default_rng(0))
    assert 0.2 < (noisy == 0).mean() < 0.5


def test_server_privacy_calibrates_for_the_whole_run_and_stays_within_budget():
    config = PrivacyConfig(mechanism="gnmax", epsilon=2.0, queries=10)
    server = ServerPrivacy(config, rounds=3, num_public=25, expected_clients=4, seed=0)
    positions = [server.query_positions(r) for r in (1, 2, 3)]
    assert all(len(p) == 10 for p in positions) and len(set(positions[0]) & set(positions[1])) == 0
    rng = np.random.default_rng(0)
    spent = []
    for server_round in (1, 2, 3):
        shares = one_hot(rng.integers(0, 3, size=40), 3).reshape(4, 10, 3)
        targets = server.release(shares, server_round=server_round)
        assert targets.shape == (10, 3)
        spent.append(server.epsilon())
    assert spent == sorted(spent) and spent[-1] <= 2.0
    assert server.ledger.history == [(server.noise_multiplier, 1.0, 30)]


def test_server_privacy_without_noise_reports_infinite_epsilon():
    server = ServerPrivacy(
        PrivacyConfig(mechanism="gaussian", epsilon=math.inf, queries=5),
        rounds=2,
        num_public=5,
        expected_clients=2,
        seed=0,
    )
    stack = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 5))
    np.testing.assert_allclose(server.release(stack, server_round=1), stack.mean(axis=0), rtol=1e-5)
    assert server.epsilon() == math.inf and server.ledger.history == []


def test_worst_client_epsilon_keeps_each_clients_latest():
    worst = WorstClientEpsilon()
    worst.update(1, 0.5)
    worst.update(2, 1.5)
    worst.update(1, 1.0)
    assert worst.epsilon() == 1.5


# --- DP-SGD --------------------------------------------------------------------------------


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_private_compatible_model_has_no_batchnorm_and_trains_with_a_ledger():
    model = make_private_compatible(build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=0))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    images, labels = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    sigma = calibrate_for_run(target_epsilon=3.0, delta=1e-5, num_examples=40, batch_size=8, epochs_in_run=4).training
    ledger = PrivacyLedger()
    for _ in range(2):  # two rounds of two epochs: the ledger carries over
        train_dp_sgd(
            model,
            images,
            labels,
            epochs=2,
            settings=OptimizerSettings(batch_size=8),
            generator=torch.Generator().manual_seed(0),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            ledger=ledger,
        )
    assert ledger.history == [(sigma, 1 / 5, 20)]
    assert ledger.epsilon(1e-5) <= 3.0
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())  # hooks gone


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_dp_sgd_changes_the_weights_and_is_reproducible():
    def run():
        model = make_private_compatible(build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=0))
        images = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        labels = torch.randint(0, 10, (30,), generator=torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        train_dp_sgd(
            model,
            images,
            labels,
            epochs=1,
            settings=OptimizerSettings(batch_size=10),
            generator=torch.Generator().manual_seed(0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            ledger=PrivacyLedger(),
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first, second = run(), run()
    torch.testing.assert_close(first, second)
    untouched = make_private_compatible(build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=0))
    assert not torch.allclose(first, torch.cat([p.detach().flatten() for p in untouched.parameters()]))


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(privacy=PrivacyConfig(mechanism="dpsgd"), strategy=StrategyConfig(name="fd")), "strategy=fd"),
        (dict(privacy=PrivacyConfig(mechanism="gnmax"), strategy=StrategyConfig(name="dsfl")), "ensemble_distillation"),
        (dict(privacy=PrivacyConfig(mechanism="gaussian", queries=5000)), "privacy.queries"),
        (dict(privacy=PrivacyConfig(mechanism="gnmax"), transfer="synthetic"), "transfer=synthetic"),
        (dict(privacy=PrivacyConfig(mechanism="gaussian"), transfer="synthetic"), "privacy=dpsgd"),
    ],
)
def test_unsupported_privacy_settings_fail_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_run(RunConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mechanism="laplace"), "privacy mechanism"),
        (dict(epsilon=0.0), "privacy.epsilon"),
        (dict(delta=1.0), "privacy.delta"),
        (dict(noise_at="nowhere"), "noise_at"),
        (dict(queries=0), "privacy.queries"),
        (dict(feature_clip_norm=0.0), "privacy.feature_clip_norm"),
    ],
)
def test_bad_privacy_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(**kwargs)


def test_dpsgd_with_synthetic_transfer_releases_feature_statistics_every_round():
    config = RunConfig(
        privacy=PrivacyConfig(mechanism="dpsgd", teacher_model="client_models"), transfer="synthetic", rounds=4
    )
    assert config.releases_feature_statistics
    task = ClientTask(mode="soft-labels", server_round=1, run=config)
    assert task.feature_releases == 4
    assert (
        ClientTask(
            mode="soft-labels", server_round=1, run=RunConfig(privacy=PrivacyConfig(mechanism="dpsgd"))
        ).feature_releases
        == 0
    )
