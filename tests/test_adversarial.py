"""Adversarial data-free distillation: DFAD's and DAFL's losses, and the generator–student game."""

import math

import numpy as np
import pytest
import torch
from test_generators import NUM_CLASSES, SHAPE, _state_copy, _tiny_teacher
from torch import nn

from fedkd.data import load_dataset, to_tensor
from fedkd.distillation import OptimizerSettings, evaluate, train_supervised
from fedkd.models import build_model
from generators.adversarial import (
    AdversarialConfig,
    AdversarialDistillation,
    penultimate_features,
    pooled_features,
)
from generators.common import balanced_targets
from generators.losses import (
    activation_loss,
    attention_map,
    attention_transfer_loss,
    information_entropy_loss,
    logit_discrepancy,
    one_hot_loss,
    total_variation,
)


def test_logit_discrepancy_is_the_mean_absolute_difference():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert logit_discrepancy(student, torch.zeros(2, 2)).item() == pytest.approx(2.5)
    assert logit_discrepancy(student, student).item() == 0.0


def test_logit_discrepancy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        logit_discrepancy(torch.zeros(2, 3), torch.zeros(2, 2))


def test_one_hot_loss_is_cross_entropy_to_the_arg_max():
    # softmax([0, ln 3]) = (1/4, 3/4): the arg-max class has probability 3/4.
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert one_hot_loss(logits).item() == pytest.approx(math.log(4.0 / 3.0))


def test_activation_loss_is_minus_the_mean_absolute_feature():
    features = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert activation_loss(features).item() == pytest.approx(-2.5)


def test_information_entropy_loss_is_the_negative_entropy_of_the_mean_prediction():
    balanced = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert information_entropy_loss(balanced).item() == pytest.approx(-math.log(2.0))
    skewed = torch.tensor([[0.0, math.log(3.0)]])  # mean prediction (1/4, 3/4)
    expected = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert information_entropy_loss(skewed).item() == pytest.approx(expected)
    # Two confident but opposite predictions average to a balanced batch: the loss is minimal.
    opposite = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    assert information_entropy_loss(opposite).item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_attention_map_is_the_normalized_channel_mean_of_squares():
    features = torch.zeros(1, 2, 1, 2)
    features[0, 0, 0] = torch.tensor([3.0, 0.0])
    features[0, 1, 0] = torch.tensor([1.0, 2.0])
    # Channel means of squares: (9 + 1) / 2 = 5 and (0 + 4) / 2 = 2; then unit l2 norm.
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    torch.testing.assert_close(attention_map(features), expected)
    # Independent of the number of channels: a channel repeated leaves the map as it was.
    torch.testing.assert_close(attention_map(features.repeat(1, 3, 1, 1)), expected)


def test_attention_transfer_loss_sums_stage_mean_squared_differences():
    student = [torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 1)]
    student[0][0, 0, 0, 0] = 1.0  # map (1, 0)
    teacher = [torch.ones(1, 4, 1, 2), torch.ones(1, 2, 1, 1)]  # maps (1/√2, 1/√2) and (1)
    half = 1 / math.sqrt(2.0)
    expected = ((1 - half) ** 2 + half**2) / 2
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected)
    assert attention_transfer_loss(teacher, teacher).item() == 0.0
    with pytest.raises(ValueError, match="same number"):
        attention_transfer_loss(student[:1], teacher)
    with pytest.raises(ValueError, match="different sizes"):
        attention_transfer_loss([torch.ones(1, 1, 2, 2)], [torch.ones(1, 1, 1, 1)])


def test_pooled_features_capture_every_pooling_stage_and_unhook():
    model = build_model("lenet5_half", input_shape=(1, 28, 28), num_classes=10).eval()
    with pooled_features(model) as captured:
        model(torch.zeros(2, 1, 28, 28))
    assert [tuple(f.shape) for f in captured] == [(2, 3, 14, 14), (2, 8, 5, 5)]
    model(torch.zeros(2, 1, 28, 28))
    assert len(captured) == 2
    with pytest.raises(ValueError, match="MaxPool2d"), pooled_features(_tiny_teacher()):
        pass


def test_attention_transfer_changes_the_student_step():
    """With attention_weight > 0 the student's loss carries the term, so its update differs."""
    teacher = build_model("lenet5_bn", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()

    def student_after(weight: float) -> dict[str, torch.Tensor]:
        student = build_model("lenet5_half", input_shape=(1, 28, 28), num_classes=10, seed=1)
        game = AdversarialDistillation(
            teacher,
            student,
            input_shape=(1, 28, 28),
            num_classes=10,
            total_iterations=2,
            generator=torch.Generator().manual_seed(0),
            config=AdversarialConfig(batch_size=8, student_steps=1, bank_batches=2, attention_weight=weight),
        )
        losses = game.step()
        assert losses["student_loss"] > 0
        return _state_copy(student)

    plain, attended = student_after(0.0), student_after(250.0)
    assert any(not torch.equal(plain[name], attended[name]) for name in plain)


def test_penultimate_features_capture_the_last_linear_input_and_unhook():
    teacher = _tiny_teacher()
    inputs = torch.randn(3, *SHAPE)
    with penultimate_features(teacher) as captured:
        teacher(inputs)
    expected = teacher[:-1](inputs)
    torch.testing.assert_close(captured[0], expected)
    assert not teacher[-1]._forward_pre_hooks


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"batch_size": 1}, "batch_size"),
        ({"student_steps": 0}, "student_steps"),
        ({"adversarial_weight": -1.0}, "adversarial_weight"),
        ({"generator_lr": 0.0}, "generator_lr"),
        ({"entropy_weight": float("nan")}, "entropy_weight"),
        ({"student_optimizer": "lbfgs"}, "student_optimizer"),
        ({"attention_weight": -1.0}, "attention_weight"),
        ({"num_generators": 0}, "num_generators"),
        ({"adversarial_weight": 0.0, "bn_weight": 0.0, "ce_weight": 0.0}, "would not learn"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        AdversarialConfig(**overrides)


def _game(teacher: nn.Module, student: nn.Module, **overrides) -> AdversarialDistillation:
    settings = dict(batch_size=8, latent_dim=8, width=4, bank_batches=3, pixel_mean=(0.5,), pixel_std=(0.5,))
    settings.update(overrides)
    return AdversarialDistillation(
        teacher,
        student,
        input_shape=SHAPE,
        num_classes=NUM_CLASSES,
        total_iterations=10,
        generator=torch.Generator().manual_seed(0),
        config=AdversarialConfig(**settings),
    )


def test_a_step_trains_the_student_and_generator_and_leaves_the_teacher_alone():
    teacher, student = _tiny_teacher(0), _tiny_teacher(1)
    before_teacher, before_student = _state_copy(teacher), _state_copy(student)
    game = _game(teacher, student, activation_weight=0.1, entropy_weight=0.1, one_hot_weight=0.1)
    generator_before = {k: v.clone() for k, v in game.network.state_dict().items()}
    losses = game.step()
    assert {"generator_bn", "generator_ce", "generator_discrepancy", "generator_activation"} <= set(losses)
    for name, value in _state_copy(teacher).items():
        torch.testing.assert_close(value, before_teacher[name], rtol=0, atol=0)
    assert any(not torch.equal(v, before_student[k]) for k, v in _state_copy(student).items())
    assert any(not torch.equal(v, generator_before[k]) for k, v in game.network.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())
    assert game.bank_size == 8


def test_the_student_optimizer_is_dfads_sgd_when_asked():
    adam = _game(_tiny_teacher(0), _tiny_teacher(1)).student_optimizer
    sgd = _game(_tiny_teacher(0), _tiny_teacher(1), student_optimizer="sgd", student_lr=0.1).student_optimizer
    assert isinstance(adam, torch.optim.Adam)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    assert sgd.defaults["lr"] == 0.1


def test_the_bank_keeps_only_the_latest_batches():
    game = _game(_tiny_teacher(0), _tiny_teacher(1))
    for _ in range(5):
        game.step()
    assert game.bank_size == 3 * 8
    # Stored inputs are 8-bit pixels: (x * 0.5 + 0.5) * 255 is a whole number.
    pixels = (game.bank_inputs * 0.5 + 0.5) * 255
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-4)


def test_the_generator_maximizes_the_discrepancy():
    """With the adversarial term the generator's inputs separate teacher and student more."""

    def discrepancy_after(weight: float) -> float:
        teacher, student = _tiny_teacher(0), _tiny_teacher(1)
        game = _game(
            teacher,
            student,
            adversarial_weight=weight,
            bn_weight=0.0,
            ce_weight=1e-3,
            generator_lr=3e-2,
            student_lr=1e-9,
            student_steps=5,
        )
        for _ in range(15):
            game.step()
        # Measured in training mode (batch statistics), as the generator is trained.
        game.network.train()
        random = torch.Generator().manual_seed(5)
        with torch.no_grad():
            images = game.network(
                torch.randn(256, 8, generator=random), torch.randint(0, NUM_CLASSES, (256,), generator=random)
            )
            return logit_discrepancy(student.eval()(images), teacher.eval()(images)).item()

    assert discrepancy_after(1.0) > 1.3 * discrepancy_after(0.0)


def test_the_total_variation_prior_smooths_the_generated_inputs():
    """With DeepInversion's image prior the generator's inputs vary less between neighbouring pixels."""

    def variation_after(weight: float) -> float:
        game = _game(_tiny_teacher(0), _tiny_teacher(1), tv_weight=weight, generator_lr=3e-2, student_steps=1)
        for _ in range(15):
            losses = game.step()
        assert ("generator_tv" in losses) == (weight > 0)
        game.network.train()
        random = torch.Generator().manual_seed(5)
        with torch.no_grad():
            images = game.network(
                torch.randn(256, 8, generator=random), torch.randint(0, NUM_CLASSES, (256,), generator=random)
            )
        return total_variation(images).item()

    assert variation_after(100.0) < 0.5 * variation_after(0.0)


def test_sample_is_a_forward_pass_in_the_pixel_range():
    game = _game(_tiny_teacher(0), _tiny_teacher(1))
    images, targets = game.sample(10, generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, *SHAPE) and targets.shape == (10,)
    assert images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6
    assert torch.bincount(targets, minlength=NUM_CLASSES).tolist() == [3, 3, 2, 2]


def test_an_ensemble_of_generators_takes_turns_and_shares_the_bank():
    game = _game(_tiny_teacher(0), _tiny_teacher(1), num_generators=3)
    starts = [{k: v.clone() for k, v in network.state_dict().items()} for network in game.networks]
    # Independently initialized: no two generators start from the same weights.
    assert not torch.equal(starts[0]["embed.weight"], starts[1]["embed.weight"])

    def moved(index: int) -> bool:
        state = game.networks[index].state_dict()
        return any(not torch.equal(value, starts[index][name]) for name, value in state.items())

    assert game.network is game.networks[0]
    game.step()
    assert [moved(index) for index in range(3)] == [True, False, False]
    assert game.network is game.networks[1]
    game.step()
    game.step()
    assert [moved(index) for index in range(3)] == [True, True, True]
    assert game.bank_size == 3 * 8


def test_an_ensemble_samples_from_every_generator():
    game = _game(_tiny_teacher(0), _tiny_teacher(1), num_generators=2)
    for network in game.networks[1:]:
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(1.0)
    images, targets = game.sample(6, generator=torch.Generator().manual_seed(0))
    # Input i comes from generator i mod 2: replay sample()'s draws (classes, then noise).
    replay = torch.Generator().manual_seed(0)
    torch.testing.assert_close(balanced_targets(6, NUM_CLASSES, replay), targets)
    noise = torch.randn(6, 8, generator=replay)
    for index, network in enumerate(game.networks):
        network.eval()
        with torch.no_grad():
            expected = network(noise[index::2], targets[index::2])
        torch.testing.assert_close(images[index::2], expected)


@pytest.fixture(scope="module")
def digits_teacher():
    dataset = load_dataset("digits")
    info = dataset.info
    images, labels = to_tensor(dataset.train.images, info), torch.from_numpy(dataset.train.labels.astype(np.int64))
    teacher = build_model("lenet5_bn", input_shape=info.input_shape, num_classes=10, seed=0)
    train_supervised(
        teacher,
        images,
        labels,
        epochs=3,
        settings=OptimizerSettings(batch_size=64),
        generator=torch.Generator().manual_seed(0),
    )
    test = to_tensor(dataset.test.images, info), torch.from_numpy(dataset.test.labels.astype(np.int64))
    return teacher.eval(), info, test


@pytest.mark.slow
def test_adversarial_distillation_beats_distillation_on_noise(digits_teacher):
    """Same student, steps and loss; only the inputs differ: generated adversarially vs Gaussian noise."""
    teacher, info, (test_images, test_labels) = digits_teacher
    assert evaluate(teacher, test_images, test_labels).accuracy > 0.85
    iterations, config = 60, AdversarialConfig(batch_size=64, pixel_mean=info.mean, pixel_std=info.std)

    student = build_model("lenet5_half", input_shape=info.input_shape, num_classes=10, seed=1)
    game = AdversarialDistillation(
        teacher,
        student,
        input_shape=info.input_shape,
        num_classes=10,
        total_iterations=iterations,
        generator=torch.Generator().manual_seed(0),
        config=config,
    )
    for _ in range(iterations):
        game.step()
    adversarial = evaluate(student, test_images, test_labels).accuracy

    noise_student = build_model("lenet5_half", input_shape=info.input_shape, num_classes=10, seed=1)
    optimizer = torch.optim.Adam(noise_student.parameters(), lr=config.student_lr)
    random = torch.Generator().manual_seed(0)
    noise_student.train()
    for _ in range(iterations * config.student_steps):
        inputs = torch.randn((config.batch_size, *info.input_shape), generator=random)
        with torch.no_grad():
            targets = teacher(inputs)
        loss = logit_discrepancy(noise_student(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    noise = evaluate(noise_student, test_images, test_labels).accuracy
    assert adversarial > noise + 0.2, (adversarial, noise)


def test_the_student_objective_is_l1_at_temperature_zero_and_hintons_loss_above():
    from fedkd.distillation import kd_loss, soften
    from generators.losses import logit_discrepancy, student_objective

    student, teacher = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.randn(6, 10)
    assert torch.equal(student_objective(student, teacher, temperature=0.0), logit_discrepancy(student, teacher))
    for temperature in (1.0, 4.0):
        expected = kd_loss(student, soften(teacher, temperature), temperature=temperature)
        assert torch.allclose(student_objective(student, teacher, temperature=temperature), expected)
    assert (
        student_objective(teacher, teacher, temperature=4.0).abs()
        < 1e-6
        < student_objective(student, teacher, temperature=4.0)
    )
