"""The amortized (generator-network) synthesizer: same contract as DeepInversion."""

import pytest
import torch
from test_generators import NUM_CLASSES, SHAPE, _all_hooks, _fill_running_statistics, _state_copy, _tiny_teacher
from torch import nn

from fedkd.models import build_model
from generators.amortized import AmortizedGenerator, GeneratorConfig
from generators.registry import build_synthesizer


def _small(**overrides) -> GeneratorConfig:
    settings = dict(steps=20, batch_size=8, latent_dim=8, width=8, pixel_mean=None, pixel_std=None)
    settings.update(overrides)
    return GeneratorConfig(**settings)


@pytest.mark.slow  # trains a generator against a full-size LeNet for 40 steps
def test_training_loss_falls_on_a_lenet_teacher_and_outputs_stay_in_pixel_range():
    teacher = build_model("lenet5_bn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    _fill_running_statistics(teacher, (1, 28, 28), seed=0)
    synthesizer = AmortizedGenerator(
        teacher, input_shape=(1, 28, 28), num_classes=10, config=GeneratorConfig(steps=40, batch_size=16)
    )
    images, targets = synthesizer.sample(30, generator=torch.Generator().manual_seed(0))
    history = synthesizer.loss_history
    assert images.shape == (30, 1, 28, 28) and targets.shape == (30,)
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5
    assert images.min() >= (0 - 0.1307) / 0.3081 - 1e-5
    assert images.max() <= (1 - 0.1307) / 0.3081 + 1e-5


def test_generator_is_trained_once_then_sampling_is_a_forward_pass():
    synthesizer = AmortizedGenerator(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())
    generator = torch.Generator().manual_seed(0)
    synthesizer.sample(8, generator=generator)
    network = synthesizer.network
    first_history = synthesizer.loss_history
    synthesizer.sample(8, generator=generator)
    assert synthesizer.network is network
    assert synthesizer.loss_history == first_history


def test_a_warm_started_fit_continues_from_the_given_generator():
    teacher = _tiny_teacher()
    trained = AmortizedGenerator(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())
    trained.fit(generator=torch.Generator().manual_seed(0))
    assert trained.network is not None
    start = {k: v.clone() for k, v in trained.network.state_dict().items()}

    def fit_one_step(start_from):
        synthesizer = AmortizedGenerator(
            teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(steps=1, lr=1e-6)
        )
        synthesizer.fit(generator=torch.Generator().manual_seed(1), start=start_from)
        assert synthesizer.network is not None
        return synthesizer.network.state_dict()

    warm, cold = fit_one_step(start), fit_one_step(None)
    # One tiny step from the kept generator stays next to it; a fresh one starts elsewhere.
    weights = [k for k, v in start.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(warm[k], start[k], atol=1e-4) for k in weights)
    assert not all(torch.allclose(cold[k], start[k], atol=1e-2) for k in weights)


def test_a_generator_state_of_another_shape_is_refused_with_the_reason():
    other = AmortizedGenerator(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(width=4))
    other.fit(generator=torch.Generator().manual_seed(0))
    assert other.network is not None
    synthesizer = AmortizedGenerator(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())
    with pytest.raises(ValueError, match="does not fit this generator"):
        synthesizer.fit(generator=torch.Generator().manual_seed(0), start=other.network.state_dict())


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_same_seed_gives_the_same_samples_and_another_seed_does_not():
    def run(seed):
        synthesizer = AmortizedGenerator(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())
        return synthesizer.sample(12, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    assert torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_samples_differ_within_a_class():
    synthesizer = AmortizedGenerator(_tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())
    images = synthesizer.synthesize(
        targets=torch.zeros(6, dtype=torch.long), generator=torch.Generator().manual_seed(0)
    )
    assert images.flatten(1).std(dim=0).mean() > 1e-3


def test_teacher_is_left_exactly_as_it_was():
    teacher = _tiny_teacher().train()
    teacher[0].weight.requires_grad_(False)
    before = _state_copy(teacher)
    modes = [m.training for m in teacher.modules()]
    flags = [p.requires_grad for p in teacher.parameters()]
    AmortizedGenerator(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(steps=5)).sample(
        4, generator=torch.Generator().manual_seed(0)
    )
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert [m.training for m in teacher.modules()] == modes
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert _all_hooks(teacher) == 0


def test_hooks_are_removed_when_training_fails():
    teacher = _tiny_teacher()
    synthesizer = AmortizedGenerator(
        teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(lr=1e30, steps=50)
    )
    with pytest.raises(RuntimeError, match="lower config.lr"):
        synthesizer.fit(generator=torch.Generator().manual_seed(0))
    assert _all_hooks(teacher) == 0


@pytest.mark.slow  # seconds of training; the quick tier keeps the cheaper checks
def test_competition_term_needs_a_student():
    synthesizer = AmortizedGenerator(
        _tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(adi_weight=1.0)
    )
    with pytest.raises(ValueError, match="student"):
        synthesizer.fit(generator=torch.Generator().manual_seed(0))
    student = _tiny_teacher(seed=1)
    before = _state_copy(student)
    synthesizer.fit(generator=torch.Generator().manual_seed(0), student=student)
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 1}, "batch_size"),
        ({"width": True}, "width"),
        ({"lr": float("nan")}, "lr"),
        ({"tv_weight": -1.0}, "tv_weight"),
        ({"pixel_mean": (0.5,), "pixel_std": None}, "together"),
    ],
)
def test_generator_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        _small(**overrides)


def test_teacher_without_batchnorm_is_rejected_up_front():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(144, NUM_CLASSES))
    with pytest.raises(ValueError, match="BatchNorm"):
        AmortizedGenerator(teacher, input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small())


@pytest.mark.parametrize("method", ["adversarial", "generator", "deepinversion"])
def test_registry_builds_each_synthesizer_with_the_data_normalization(method):
    teacher = build_model("cnn_small", input_shape=(1, 28, 28), num_classes=10, seed=0)
    _fill_running_statistics(teacher, (1, 28, 28), seed=0)
    synthesizer = build_synthesizer(
        method,
        teacher,
        input_shape=(1, 28, 28),
        num_classes=10,
        steps=3,
        pixel_mean=(0.5,),
        pixel_std=(0.25,),
        proxy_student=lambda seed: build_model("lenet5_half", input_shape=(1, 28, 28), num_classes=10, seed=seed),
    )
    images, targets = synthesizer.sample(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 28, 28) and targets.shape == (5,)
    assert images.min() >= -2.0 - 1e-5 and images.max() <= 2.0 + 1e-5


def test_registry_needs_a_proxy_student_for_the_adversarial_generator():
    with pytest.raises(ValueError, match="proxy_student"):
        build_synthesizer(
            "adversarial",
            _tiny_teacher(),
            input_shape=SHAPE,
            num_classes=NUM_CLASSES,
            steps=1,
            pixel_mean=(0.0,),
            pixel_std=(1.0,),
        )


def test_registry_rejects_unknown_methods():
    with pytest.raises(ValueError, match="generator"):
        build_synthesizer(
            "gan",
            _tiny_teacher(),
            input_shape=SHAPE,
            num_classes=NUM_CLASSES,
            steps=1,
            pixel_mean=(0.0,),
            pixel_std=(1.0,),
        )


def test_balanced_targets_follow_a_prior_exactly_up_to_rounding():
    from generators.common import balanced_targets, check_class_prior

    prior = check_class_prior([6.0, 3.0, 1.0, 0.0], 4)
    targets = balanced_targets(21, 4, torch.Generator().manual_seed(0), prior)
    counts = torch.bincount(targets, minlength=4).tolist()
    # 21 × (0.6, 0.3, 0.1, 0) = (12.6, 6.3, 2.1, 0): floors (12, 6, 2, 0), one left for class 0.
    assert counts == [13, 6, 2, 0]
    uniform = balanced_targets(8, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(uniform, minlength=4).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("prior", [[1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * 4, [float("nan")] * 4])
def test_bad_class_priors_are_rejected(prior):
    with pytest.raises(ValueError, match="class_prior"):
        AmortizedGenerator(
            _tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(), class_prior=prior
        )


def test_samples_skip_classes_the_prior_excludes():
    synthesizer = AmortizedGenerator(
        _tiny_teacher(), input_shape=SHAPE, num_classes=NUM_CLASSES, config=_small(steps=2), class_prior=[0, 1, 0, 1]
    )
    _, targets = synthesizer.sample(10, generator=torch.Generator().manual_seed(0))
    assert set(targets.tolist()) == {1, 3}
