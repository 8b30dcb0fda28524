import pytest
import torch
from scipy.spatial.distance import jensenshannon as scipy_jensenshannon
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedkd.models import build_model
from generators import (
    DeepInversion,
    InversionConfig,
    RunningStatistics,
    SuppliedStatistics,
    bn_statistics,
    competition_loss,
    feature_matching_loss,
    jensen_shannon,
    l2_prior,
    normalization_layers,
    total_variation,
)

SHAPE = (1, 12, 12)
NUM_CLASSES = 4


def _tiny_teacher(seed: int = 0) -> nn.Module:
    """Two conv→BN blocks whose running statistics come from a few forwards on random data."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    _fill_running_statistics(model, SHAPE, seed=seed)
    return model


def _fill_running_statistics(model: nn.Module, shape: tuple[int, ...], *, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            # Smooth-ish, non-centred inputs so the targets differ from noise statistics.
            model(torch.rand((32, *shape), generator=generator) * 2.0 + 0.5)
    model.eval()


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _small_config(**overrides) -> InversionConfig:
    settings = dict(iterations=30, batch_size=8, pixel_mean=None, pixel_std=None)
    settings.update(overrides)
    return InversionConfig(**settings)


# --- hooks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn_small", "mlp"])
def test_recorded_statistics_equal_those_of_inputs_captured_independently(name):
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10, seed=0).train()
    captured = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
        for layer in normalization_layers(model)
    ]
    images = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with bn_statistics(model) as stats:
        model(images)
        recorded = stats.batch_statistics()
    for handle in handles:
        handle.remove()

    assert len(recorded) == len(captured) == len(normalization_layers(model)) > 0
    for (mean, var), inputs in zip(recorded, captured, strict=False):
        dims = [0, *range(2, inputs.dim())]
        torch.testing.assert_close(mean, torch.mean(inputs, dim=dims))
        torch.testing.assert_close(var, torch.var(inputs, dim=dims, unbiased=False))


def test_recorded_statistics_equal_batchnorms_own_batch_statistics():
    # With momentum 1 a BatchNorm's running statistics become exactly its last batch's
    # statistics: the mean, and the variance with Bessel's correction.
    layer = nn.BatchNorm2d(3, momentum=1.0).train()
    images = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1
    with bn_statistics(layer) as stats:
        layer(images)
        ((mean, var),) = stats.batch_statistics()
    n = 4 * 5 * 5
    torch.testing.assert_close(mean, layer.running_mean)
    torch.testing.assert_close(var * n / (n - 1), layer.running_var)


def _conv_bn_with_running_statistics(mean: torch.Tensor, var: torch.Tensor) -> nn.Module:
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    return nn.Sequential(conv, bn).eval()


def _images_with_statistics(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    raw = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    centred = raw - raw.mean(dim=(0, 2, 3), keepdim=True)
    unit = centred / centred.std(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return unit * var.sqrt().view(1, 2, 1, 1) + mean.view(1, 2, 1, 1)


def test_feature_loss_is_zero_when_the_batch_has_the_running_statistics():
    mean, var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    model = _conv_bn_with_running_statistics(mean, var)
    with bn_statistics(model) as stats:
        model(_images_with_statistics(mean, var))
        assert stats.feature_loss().item() == pytest.approx(0.0, abs=1e-5)


def test_feature_loss_matches_hand_computation():
    mean, var = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    model = _conv_bn_with_running_statistics(mean, var)
    # Batch mean off by (0.3, −0.4) → ‖Δμ‖ = 0.5; variance off by (0, 0).
    images = _images_with_statistics(mean + torch.tensor([0.3, -0.4]), var)
    with bn_statistics(model) as stats:
        model(images)
        assert stats.feature_loss(weights=[2.0]).item() == pytest.approx(1.0, abs=1e-5)
        # The default weighs the first (here the only) BatchNorm layer ten times.
        assert stats.feature_loss().item() == pytest.approx(5.0, abs=1e-4)


def test_hooks_are_removed_after_the_block():
    model = _tiny_teacher()
    with bn_statistics(model) as stats:
        model(torch.randn(2, *SHAPE))
        assert _all_hooks(model) > 0
    assert _all_hooks(model) == 0
    with pytest.raises(RuntimeError, match="inside"):
        stats.batch_statistics()


def test_hooks_are_removed_when_the_block_raises():
    model = _tiny_teacher()
    with pytest.raises(KeyError), bn_statistics(model):
        model(torch.randn(2, *SHAPE))
        raise KeyError("boom")
    assert _all_hooks(model) == 0


def test_statistics_before_any_forward_raise():
    model = _tiny_teacher()
    with bn_statistics(model) as stats, pytest.raises(RuntimeError, match="forward"):
        stats.feature_loss()


def test_supplied_statistics_with_wrong_layer_count_raise():
    model = _tiny_teacher()
    one_layer = SuppliedStatistics([(torch.zeros(4), torch.ones(4))])
    with pytest.raises(ValueError, match="1 layers .* 2 BatchNorm layers"):
        bn_statistics(model, targets=one_layer)
    with pytest.raises(ValueError, match="2 BatchNorm layers"):
        DeepInversion(model, input_shape=SHAPE, num_classes=NUM_CLASSES, statistics=one_layer)


def test_supplied_statistics_with_wrong_channels_raise():
    model = _tiny_teacher()
    wrong = SuppliedStatistics([(torch.zeros(4), torch.ones(4)), (torch.zeros(7), torch.ones(7))])
    with pytest.raises(ValueError, match="layer 1 has 8 channels"):
        bn_statistics(model, targets=wrong)


def test_supplied_statistics_reject_malformed_pairs():
    with pytest.raises(ValueError, match="same length"):
        SuppliedStatistics([(torch.zeros(4), torch.ones(3))])
    with pytest.raises(ValueError, match=">= 0"):
        SuppliedStatistics([(torch.zeros(2), torch.tensor([1.0, -1.0]))])


def test_statistics_are_copies():
    mean, var = torch.zeros(4), torch.ones(4)
    supplied = SuppliedStatistics([(mean, var)])
    mean.add_(5.0)
    assert supplied.per_layer()[0][0].tolist() == [0.0] * 4

    model = _tiny_teacher()
    running = RunningStatistics.from_model(model)
    before = running.per_layer()[0][0].clone()
    model[1].running_mean.add_(1.0)
    torch.testing.assert_close(running.per_layer()[0][0], before)


def test_model_without_batchnorm_is_rejected():
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_statistics(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_feature_matching_loss_rejects_mismatched_lengths():
    pair = (torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="one of each"):
        feature_matching_loss([pair], [pair, pair], weights=[1.0])


# --- losses --------------------------------------------------------------------------------


def test_total_variation_of_constant_image_is_zero():
    assert total_variation(torch.full((2, 3, 5, 5), 1.7)).item() == 0.0
    assert total_variation(torch.full((2, 3, 5, 5), 1.7), norm="l1").item() == 0.0


def test_total_variation_of_checkerboard_matches_hand_computation():
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    board = (3.0 * ((rows + cols) % 2)).view(1, 1, 6, 6)
    # Horizontal and vertical neighbours differ by 3, diagonal neighbours by 0.
    assert total_variation(board).item() == pytest.approx((9 + 9 + 0 + 0) / 4)
    assert total_variation(board, norm="l1").item() == pytest.approx((3 + 3 + 0 + 0) / 4)


def test_total_variation_rejects_unknown_norm():
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        total_variation(torch.zeros(1, 1, 3, 3), norm="l3")


def test_l2_prior_is_mean_image_norm():
    images = torch.zeros(2, 1, 2, 2)
    images[0, 0, 0, 0] = 3.0
    images[0, 0, 1, 1] = 4.0  # norm 5
    images[1, 0, 0, 1] = 1.0  # norm 1
    assert l2_prior(images).item() == pytest.approx(3.0)


def test_jensen_shannon_matches_scipy():
    p_logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 3.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.5], [1.0, -2.0, 0.0]])
    expected = (
        sum(
            scipy_jensenshannon(torch.softmax(p / 2, -1).numpy(), torch.softmax(q / 2, -1).numpy()) ** 2
            for p, q in zip(p_logits.double(), q_logits.double(), strict=False)
        )
        / 2
    )
    value = jensen_shannon(p_logits, q_logits, temperature=2.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert jensen_shannon(q_logits, p_logits, temperature=2.0).item() == pytest.approx(value.item(), rel=1e-6)


def test_competition_loss_spans_zero_to_one():
    logits = torch.tensor([[1.0, -1.0, 0.3]])
    assert competition_loss(logits, logits, temperature=3.0).item() == pytest.approx(1.0)
    opposite = competition_loss(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]), temperature=1.0)
    assert opposite.item() == pytest.approx(0.0, abs=1e-6)


# --- DeepInversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(iterations=0), "iterations"),
        (dict(lr=0.0), "lr"),
        (dict(tv_weight=-1.0), "tv_weight"),
        (dict(jitter=-1), "jitter"),
        (dict(pixel_mean=(0.1,), pixel_std=None), "together"),
        (dict(pixel_std=(0.0,)), "pixel_std"),
    ],
)
def test_inversion_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        InversionConfig(**overrides)


@pytest.mark.slow  # inverts a full-size LeNet for seconds
def test_synthesis_loss_falls_on_a_lenet_teacher():
    teacher = build_model("lenet5_bn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    _fill_running_statistics(teacher, (1, 28, 28), seed=0)
    synthesizer = DeepInversion(
        teacher, input_shape=(1, 28, 28), num_classes=10, config=InversionConfig(iterations=30, batch_size=8)
    )
    images = synthesizer.synthesize(targets=torch.arange(8), generator=torch.Generator().manual_seed(0))
    history = synthesizer.loss_history
    assert images.shape == (8, 1, 28, 28)
    assert len(history) == 30
    assert min(history) < 0.5 * history[0]
    # Default clipping keeps pixels in the range of normalized [0, 1] MNIST images.
    assert images.min() >= (0 - 0.1307) / 0.3081 - 1e-5
    assert images.max() <= (1 - 0.1307) / 0.3081 + 1e-5


def test_synthesize_returns_a_copy_of_the_best_iterate():
    teacher = _tiny_teacher()
    synthesizer = DeepInversion(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config())
    seen: list[torch.Tensor] = []
    snapshots: list[torch.Tensor] = []

    def before_step(optimizer, args, kwargs):
        parameter = optimizer.param_groups[0]["params"][0]
        seen.append(parameter)
        snapshots.append(parameter.detach().clone())

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        images = synthesizer.synthesize(
            targets=torch.arange(8) % NUM_CLASSES, generator=torch.Generator().manual_seed(0)
        )
    finally:
        handle.remove()

    history = synthesizer.loss_history
    best = min(range(len(history)), key=history.__getitem__)
    parameter = seen[-1]
    assert not images.requires_grad
    torch.testing.assert_close(images, snapshots[best], rtol=0, atol=0)
    assert images.untyped_storage().data_ptr() != parameter.untyped_storage().data_ptr()
    assert not torch.equal(images, parameter.detach())  # the last step moved the pixels on
    last = parameter.detach().clone()
    images.add_(100.0)
    torch.testing.assert_close(parameter.detach(), last, rtol=0, atol=0)


def test_same_seed_gives_the_same_batch():
    teacher = _tiny_teacher()
    synthesizer = DeepInversion(
        teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=10, flip=True)
    )
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    first = synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(5))
    again = synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(5))
    other = synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_teacher_state_is_restored_and_unchanged():
    teacher = _tiny_teacher().train()
    teacher[4].eval()  # a frozen BatchNorm inside a model in training mode
    teacher[0].weight.requires_grad_(False)
    before = _state_copy(teacher)
    modes = [m.training for m in teacher.modules()]
    flags = [p.requires_grad for p in teacher.parameters()]

    synthesizer = DeepInversion(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=5))
    synthesizer.synthesize(targets=torch.arange(4), generator=torch.Generator().manual_seed(0))

    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert [m.training for m in teacher.modules()] == modes
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert _all_hooks(teacher) == 0


def test_supplied_statistics_steer_the_synthesis():
    teacher = _tiny_teacher()
    running = RunningStatistics.from_model(teacher).per_layer()
    shifted = SuppliedStatistics([(mean + 1.0, var) for mean, var in running])
    config = _small_config(iterations=10, ce_weight=0.0)
    targets = torch.arange(8) % NUM_CLASSES
    own = DeepInversion(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=config)
    supplied = DeepInversion(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=config, statistics=shifted)
    a = own.synthesize(targets=targets, generator=torch.Generator().manual_seed(0))
    b = supplied.synthesize(targets=targets, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


def test_sample_draws_balanced_targets_in_batches():
    teacher = _tiny_teacher()
    synthesizer = DeepInversion(
        teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=3, batch_size=4)
    )
    inputs, targets = synthesizer.sample(10, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == (10, *SHAPE)
    assert targets.dtype == torch.int64
    assert sorted(torch.bincount(targets, minlength=NUM_CLASSES).tolist()) == [2, 2, 3, 3]
    assert len(synthesizer.loss_history) == 3


def test_adaptive_inversion_needs_a_student_and_restores_it():
    teacher = _tiny_teacher(seed=0)
    student = _tiny_teacher(seed=1).train()
    before = _state_copy(student)
    synthesizer = DeepInversion(
        teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=5, adi_weight=1.0)
    )
    targets = torch.arange(4)
    with pytest.raises(ValueError, match="student"):
        synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(0))
    synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(0), student=student)
    assert student.training
    assert all(p.requires_grad and p.grad is None for p in student.parameters())
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "targets, match",
    [
        (torch.tensor([0, NUM_CLASSES]), "lie in"),
        (torch.tensor([[0, 1]]), "1-D"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_synthesize_rejects_bad_targets(targets, match):
    synthesizer = DeepInversion(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config())
    with pytest.raises(ValueError, match=match):
        synthesizer.synthesize(targets=targets, generator=torch.Generator().manual_seed(0))


def test_synthesis_works_under_no_grad():
    synthesizer = DeepInversion(
        _tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=5)
    )
    with torch.no_grad():
        synthesizer.synthesize(targets=torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert len(synthesizer.loss_history) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_synthesis_runs_on_the_teachers_device():
    teacher = _tiny_teacher().cuda()
    synthesizer = DeepInversion(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small_config(iterations=5))
    images = synthesizer.synthesize(targets=torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert images.device == next(teacher.parameters()).device
