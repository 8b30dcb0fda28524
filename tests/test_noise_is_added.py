"""Every private release really carries the noise its ledger is charged for.

Each test draws the same release many times with fresh seeds and measures the spread of what is
released, then compares it with the calibrated standard deviation. With the noise removed the
spread is zero and every test fails; with a wrong scale it misses the tolerance (±10 % on a
standard deviation estimated from thousands of draws: its own error is about 1–2 %).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedkd.config import RunConfig
from fedkd.privacy.client import shared_rows
from fedkd.privacy.config import PrivacyConfig
from fedkd.privacy.feature_statistics import release_feature_statistics
from fedkd.privacy.mechanisms import GNMAX_SENSITIVITY, sum_sensitivity
from strategies.private_aggregation import ServerPrivacy

DRAWS = 4000


def _server(mechanism: str, *, epsilon: float = 2.0, queries: int = 4, clients: int = 1) -> ServerPrivacy:
    config = PrivacyConfig(mechanism=mechanism, epsilon=epsilon, queries=queries)
    return ServerPrivacy(config, rounds=1, num_public=queries, expected_clients=clients, seed=0)


def test_the_gaussian_release_adds_the_calibrated_noise_to_the_sum():
    clients = 100  # the sum is divided by them, so the simplex projection stays linear
    server = _server("gaussian", epsilon=2.0, clients=clients)
    expected_std = server.noise_multiplier * sum_sensitivity(server.queries, server.config.clip_norm)
    assert server.noise_multiplier > 0 and expected_std == pytest.approx(server.noise_std)
    # Every client sends rows (0.5, 0.5): the released p0 = (50 + n0) / (100 + n0 + n1)
    # ≈ 0.5 + (n0 − n1) / 200, whose standard deviation is σ / (100 √2) while σ ≪ 100.
    rows = np.full((clients, server.queries, 2), 0.5)
    released = np.stack(
        [server.release(rows, server_round=draw)[:, 0] for draw in range(1, DRAWS // server.queries + 1)]
    )
    assert expected_std < 5
    assert released.std() == pytest.approx(expected_std / (clients * math.sqrt(2)), rel=0.1)


def test_client_shares_sum_to_at_least_the_calibrated_noise():
    run = RunConfig(privacy=PrivacyConfig(mechanism="gaussian", noise_at="clients"))
    probs = np.full((DRAWS, 2), 0.5, dtype=np.float32)
    shares = 4
    total = sum(
        shared_rows(probs, run, noise_std=0.3, noise_shares=shares, rng=np.random.default_rng(client))
        for client in range(shares)
    )
    assert (total - shares * probs).std() == pytest.approx(0.3, rel=0.1)


def test_gnmax_flips_a_close_vote_as_often_as_its_sigma_says():
    server = _server("gnmax", epsilon=1.0, queries=1)
    sigma = server.noise_std
    assert sigma == pytest.approx(server.noise_multiplier * GNMAX_SENSITIVITY) and sigma > 1
    # Two classes, class 1 ahead by one σ: the noisy argmax picks class 0 with probability Φ(−1/√2).
    lead = round(sigma)
    votes = np.zeros((100 + lead, 1, 2))
    votes[:50, 0, 0] = 1
    votes[50:, 0, 1] = 1
    picks = np.array([server.release(votes, server_round=draw)[0].argmax() for draw in range(1, DRAWS + 1)])
    expected = norm.cdf(-lead / (sigma * math.sqrt(2)))
    assert (picks == 0).mean() == pytest.approx(expected, abs=0.025)


def test_feature_statistics_carry_their_noise():
    # 200 examples whose clipped moment vectors all equal one point: only noise can spread the release.
    moments = np.full((200, 2), 0.5)
    sigma, clip = 1.5, 3.0
    means = [
        release_feature_statistics(
            moments, [1], scales=[1.0], clip_norm=clip, noise_multiplier=sigma, rng=np.random.default_rng(draw)
        )
        .per_layer()[0][0]
        .item()
        for draw in range(DRAWS)
    ]
    # The mean is (Σ x + N(0, (σ·clip)²)) / n.
    assert np.std(means) == pytest.approx(sigma * clip / len(moments), rel=0.1)


def test_dp_sgd_steps_carry_noise_where_the_data_gives_no_gradient():
    """A weight whose input is always zero gets no gradient from the data: only DP-SGD's noise can
    move it, by about the learning rate on Adam's first step; without noise it stays put."""
    from fedkd.distillation import OptimizerSettings
    from fedkd.privacy.accountant import PrivacyLedger
    from fedkd.privacy.dpsgd import train_dp_sgd

    def moved(noise_multiplier: float) -> float:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2))
        torch.nn.init.zeros_(model[1].weight)
        images = torch.zeros(64, 1, 1, 2)
        images[:, 0, 0, 0] = torch.randn(64, generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
        train_dp_sgd(
            model,
            images,
            labels,
            epochs=1,
            settings=OptimizerSettings(lr=0.01, batch_size=64),
            generator=torch.Generator().manual_seed(2),
            noise_multiplier=noise_multiplier,
            max_grad_norm=1.0,
            ledger=PrivacyLedger(),
        )
        return float(model[1].weight.detach()[:, 1].abs().max())

    assert moved(0.0) == 0.0
    assert moved(1.0) > 0.005


@pytest.mark.parametrize("replies", [2, 3, 5])
def test_client_noise_stays_at_least_calibrated_when_clients_drop_out(replies):
    """Each client's share is sized for the fewest replies a round accepts (min_replies = 2 of 5
    expected), so however many answer, the released sum carries at least σ."""
    config = PrivacyConfig(mechanism="gaussian", noise_at="clients", queries=4)
    server = ServerPrivacy(config, rounds=1, num_public=4, expected_clients=5, seed=0, min_replies=2)
    task = server.client_task()
    run = RunConfig(privacy=config)
    probs = np.full((DRAWS, 2), 0.5, dtype=np.float32)
    total = sum(
        shared_rows(
            probs,
            run,
            noise_std=task["privacy-noise-std"],
            noise_shares=task["privacy-noise-shares"],
            rng=np.random.default_rng(client),
        )
        for client in range(replies)
    )
    spread = (total - replies * probs).std()
    assert spread >= 0.95 * server.noise_std
    assert spread == pytest.approx(server.noise_std * math.sqrt(replies / 2), rel=0.1)
