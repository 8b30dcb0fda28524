"""Private feature statistics for data-free synthesis from DP-SGD teachers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedkd.models import build_model
from fedkd.privacy.accountant import PrivacyLedger, calibrate_beside
from fedkd.privacy.dpsgd import FEATURE_BUDGET_SHARE, batches_per_epoch, calibrate_for_run, make_private_compatible
from fedkd.privacy.feature_statistics import (
    VARIANCE_FLOOR,
    per_sample_moments,
    reference_scales,
    release_feature_statistics,
    statistics_layout,
)
from generators.hooks import RunningStatistics, bn_statistics, normalization_layers
from generators.registry import build_synthesizer


def dp_teacher():
    return make_private_compatible(build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=0))


def images(count, seed=0):
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_a_dp_sgd_teacher_has_groupnorm_layers_and_no_running_statistics_to_invert():
    teacher = dp_teacher()
    assert statistics_layout(teacher) == [16, 32, 64]
    assert all(isinstance(layer, torch.nn.GroupNorm) for layer in normalization_layers(teacher))
    with pytest.raises(ValueError, match="SuppliedStatistics"):
        RunningStatistics.from_model(teacher)


def test_noise_free_release_reproduces_the_batch_statistics_the_synthesizer_measures():
    teacher, batch = dp_teacher(), images(24)
    layout = statistics_layout(teacher)
    released = release_feature_statistics(
        per_sample_moments(teacher, batch, batch_size=7),  # batching must not matter
        layout,
        scales=[1.0] * len(layout),
        clip_norm=1e12,
        noise_multiplier=0.0,
        rng=np.random.default_rng(0),
    )
    teacher.eval()
    with bn_statistics(teacher, targets=released) as hooks, torch.no_grad():
        teacher(batch)
        measured = hooks.batch_statistics()
    for (mean, var), (target_mean, target_var) in zip(measured, released.per_layer(), strict=False):
        torch.testing.assert_close(target_mean, mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(target_var, var.clamp_min(VARIANCE_FLOOR), rtol=1e-3, atol=1e-4)


def test_reference_scales_use_no_data_and_put_real_moments_near_one():
    teacher = dp_teacher()
    arguments = dict(input_shape=(1, 28, 28), pixel_mean=(0.13,), pixel_std=(0.31,))
    scales = reference_scales(teacher, generator=torch.Generator().manual_seed(3), **arguments)
    assert scales == reference_scales(teacher, generator=torch.Generator().manual_seed(3), **arguments)
    assert len(scales) == 3 and all(scale > 0 for scale in scales)


@settings(max_examples=25, deadline=None)
@given(
    clip_norm=st.floats(0.1, 10.0),
    outlier=st.floats(1.0, 1e6),
    scale=st.floats(0.01, 100.0),
)
def test_one_example_moves_the_noise_free_release_by_at_most_its_clip_norm(clip_norm, outlier, scale):
    layout = [2, 3]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(9, 10))
    with_outlier = np.vstack([base, np.full((1, 10), outlier)])

    def scaled_sum(moments):
        released = release_feature_statistics(
            moments, layout, scales=[scale, scale], clip_norm=clip_norm, noise_multiplier=0.0, rng=rng
        )
        # Only the means are linear in the sum; they carry half of each block.
        means = torch.cat([mean for mean, _ in released.per_layer()]).double().numpy()
        return means * len(moments) / scale

    assert np.linalg.norm(scaled_sum(with_outlier) - scaled_sum(base)) <= clip_norm * (1 + 1e-9)


def test_release_noise_has_the_calibrated_scale():
    layout, n, clip_norm, sigma = [4], 50, 2.0, 3.0
    moments = np.zeros((n, 8))
    means = [
        release_feature_statistics(
            moments, layout, scales=[5.0], clip_norm=clip_norm, noise_multiplier=sigma, rng=np.random.default_rng(seed)
        ).per_layer()[0][0]
        for seed in range(400)
    ]
    spread = torch.stack(means).std().item()
    assert spread == pytest.approx(sigma * clip_norm * 5.0 / n, rel=0.1)


@pytest.mark.parametrize(
    ("moments", "layout", "scales", "match"),
    [
        (np.zeros((3, 5)), [2], [1.0], r"\(n ≥ 1, 4\)"),
        (np.zeros((0, 4)), [2], [1.0], r"\(n ≥ 1, 4\)"),
        (np.zeros((3, 4)), [2], [0.0], "scale"),
    ],
)
def test_bad_release_inputs_say_what_is_expected(moments, layout, scales, match):
    with pytest.raises(ValueError, match=match):
        release_feature_statistics(
            moments, layout, scales=scales, clip_norm=1.0, noise_multiplier=1.0, rng=np.random.default_rng(0)
        )


# Each calibration is a bisection over Opacus's accountant (about a second): the quick tier tries
# a few fixed draws and both branches, the slow tier many random ones.
CALIBRATIONS_BESIDE = dict(
    epsilon=st.floats(0.5, 8.0),
    fixed_sigma=st.floats(5.0, 50.0),
    fixed_steps=st.integers(1, 5),
    rate=st.floats(0.01, 0.2),
    steps=st.integers(10, 300),
)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(**CALIBRATIONS_BESIDE)
@example(epsilon=0.5, fixed_sigma=5.0, fixed_steps=5, rate=0.2, steps=300)  # the fixed releases alone overspend
@example(epsilon=8.0, fixed_sigma=50.0, fixed_steps=1, rate=0.01, steps=10)
def test_calibration_beside_fixed_releases_never_overshoots(epsilon, fixed_sigma, fixed_steps, rate, steps):
    check_calibration_beside(epsilon, fixed_sigma, fixed_steps, rate, steps)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(**CALIBRATIONS_BESIDE)
def test_calibration_beside_fixed_releases_never_overshoots_on_many_draws(
    epsilon, fixed_sigma, fixed_steps, rate, steps
):
    check_calibration_beside(epsilon, fixed_sigma, fixed_steps, rate, steps)


def check_calibration_beside(epsilon, fixed_sigma, fixed_steps, rate, steps):
    fixed = [(fixed_sigma, 1.0, fixed_steps)]
    if PrivacyLedger(list(fixed)).epsilon(1e-5) >= epsilon:
        with pytest.raises(ValueError, match="fixed releases alone"):
            calibrate_beside(target_epsilon=epsilon, delta=1e-5, sample_rate=rate, steps=steps, fixed=fixed)
        return
    sigma = calibrate_beside(target_epsilon=epsilon, delta=1e-5, sample_rate=rate, steps=steps, fixed=fixed)
    ledger = PrivacyLedger(list(fixed))
    ledger.record(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    assert epsilon - 0.011 <= ledger.epsilon(1e-5) <= epsilon


def test_the_whole_run_of_dp_sgd_and_feature_releases_meets_the_target():
    arguments = dict(target_epsilon=2.0, delta=1e-5, num_examples=600, batch_size=32, epochs_in_run=3)
    alone = calibrate_for_run(**arguments)
    plan = calibrate_for_run(**arguments, feature_releases=3)
    assert alone.features == 0 and plan.features > 0
    assert plan.training > alone.training  # DP-SGD gives up the share the statistics take
    batches = batches_per_epoch(600, 32)
    ledger = PrivacyLedger()
    for _ in range(3):  # one round: its DP-SGD epoch, then its release
        ledger.record(noise_multiplier=plan.training, sample_rate=1 / batches, steps=batches)
        ledger.record(noise_multiplier=plan.features, sample_rate=1.0)
    assert ledger.epsilon(1e-5) <= 8.0
    features_only = PrivacyLedger([(plan.features, 1.0, 3)]).epsilon(1e-5)
    assert features_only <= FEATURE_BUDGET_SHARE * 2.0
    assert calibrate_for_run(**{**arguments, "target_epsilon": math.inf}, feature_releases=3).features == 0


@pytest.mark.parametrize("method", ["deepinversion", "generator", "adversarial"])
def test_a_dp_sgd_teacher_synthesizes_against_released_statistics(method):
    teacher, data = dp_teacher(), images(40)
    layout = statistics_layout(teacher)
    released = release_feature_statistics(
        per_sample_moments(teacher, data),
        layout,
        scales=reference_scales(
            teacher,
            input_shape=(1, 28, 28),
            pixel_mean=(0.5,),
            pixel_std=(0.5,),
            generator=torch.Generator().manual_seed(0),
        ),
        clip_norm=3.0,
        noise_multiplier=2.0,
        rng=np.random.default_rng(0),
    )
    synthesizer = build_synthesizer(
        method,
        teacher,
        input_shape=(1, 28, 28),
        num_classes=10,
        steps=3,
        pixel_mean=(0.5,),
        pixel_std=(0.5,),
        statistics=released,
        proxy_student=lambda seed: build_model("lenet5_half", input_shape=(1, 28, 28), num_classes=10, seed=seed),
    )
    inputs, targets = synthesizer.sample(8, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == (8, 1, 28, 28) and torch.isfinite(inputs).all() and targets.shape == (8,)


PLANS = dict(num_examples=st.integers(50, 20000), batch_size=st.sampled_from([16, 32, 64]), releases=st.integers(0, 3))


@settings(max_examples=1, deadline=None, derandomize=True)
@given(**PLANS)
@example(num_examples=6700, batch_size=32, releases=0)  # Opacus takes 209 steps there, not 210
@example(num_examples=6700, batch_size=32, releases=3)
def test_the_plan_holds_for_the_steps_opacus_actually_takes(num_examples, batch_size, releases):
    check_plan_against_opacus(num_examples, batch_size, releases)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(**PLANS)
def test_the_plan_holds_for_the_steps_opacus_actually_takes_on_many_draws(num_examples, batch_size, releases):
    check_plan_against_opacus(num_examples, batch_size, releases)


def check_plan_against_opacus(num_examples, batch_size, releases):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.empty(num_examples, 0)), batch_size=batch_size)
    )
    plan = calibrate_for_run(
        target_epsilon=8.0,
        delta=1e-5,
        num_examples=num_examples,
        batch_size=batch_size,
        epochs_in_run=3,
        feature_releases=releases,
    )
    ledger = PrivacyLedger()  # what Opacus's accountant records: rate 1/len(loader), len(loader) steps
    ledger.record(noise_multiplier=plan.training, sample_rate=1 / len(loader), steps=3 * len(loader))
    if releases:
        ledger.record(noise_multiplier=plan.features, sample_rate=1.0, steps=releases)
    assert ledger.epsilon(1e-5) <= 8.0
