import math

import pytest
import torch
from torch import nn

from fedkd.distillation import (
    OptimizerSettings,
    capped_average_decay,
    distill,
    evaluate,
    kd_loss,
    predict_logits,
    random_translate,
    soften,
    train_supervised,
)


def test_soften_is_softmax_of_logits_over_temperature():
    probs = soften(torch.tensor([[2.0, 0.0]]), 2.0)
    e = math.e
    assert probs[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)


def test_soften_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        soften(torch.zeros(1, 3), 0.0)


def test_kd_loss_matches_hand_computation_with_t_squared_factor():
    # p_S = softmax([0, 0] / 2) = [0.5, 0.5]; KL(p_T || p_S) by hand, times T² = 4.
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    loss = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.8, 0.2]]), temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.770980, abs=1e-5)


def test_kd_loss_softens_the_student_at_the_same_temperature():
    e = math.e
    p_student = [e / (e + 1), 1 / (e + 1)]  # softmax([2, 0] / 2)
    kl = 0.8 * math.log(0.8 / p_student[0]) + 0.2 * math.log(0.2 / p_student[1])
    loss = kd_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.8, 0.2]]), temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl, rel=1e-5)


def test_kd_loss_mixes_cross_entropy_with_alpha():
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    loss = kd_loss(
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[0.8, 0.2]]),
        temperature=2.0,
        alpha=0.5,
        labels=torch.tensor([0]),
    )
    assert loss.item() == pytest.approx(0.5 * 4 * kl + 0.5 * math.log(2), rel=1e-5)


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    loss = kd_loss(logits, soften(logits, 3.0), temperature=3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_averages_over_the_batch():
    teacher = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    single = kd_loss(torch.zeros(1, 2), teacher[:1], temperature=1.0)
    double = kd_loss(torch.zeros(2, 2), teacher, temperature=1.0)
    assert double.item() == pytest.approx(single.item(), rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_kd_loss_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(torch.zeros(1, 2), torch.full((1, 2), 0.5), temperature=1.0, alpha=alpha, labels=torch.tensor([0]))


def test_kd_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.full((2, 2), 0.5), temperature=1.0)


def test_random_translate_keeps_shape_and_is_seeded():
    images = torch.randn(4, 1, 8, 8)
    a = random_translate(images, max_shift=0.2, generator=torch.Generator().manual_seed(1))
    b = random_translate(images, max_shift=0.2, generator=torch.Generator().manual_seed(1))
    assert a.shape == images.shape
    assert torch.equal(a, b)
    assert random_translate(images, max_shift=0.0, generator=torch.Generator()) is images


def _separable_problem(n=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 1, 4, 4, generator=generator) * 0.3
    images[:, 0, 0, 0] += labels.float() * 3 - 1.5
    return images, labels


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_train_supervised_learns_a_separable_problem():
    images, labels = _separable_problem()
    model = _tiny_model()
    before = evaluate(model, images, labels)
    train_supervised(
        model, images, labels, epochs=5, settings=OptimizerSettings(lr=0.05), generator=torch.Generator().manual_seed(0)
    )
    after = evaluate(model, images, labels)
    assert after.accuracy > 0.95 > before.accuracy or after.loss < before.loss / 2


def test_distill_moves_student_towards_teacher_probabilities():
    images, labels = _separable_problem()
    teacher_probs = torch.nn.functional.one_hot(labels, 2).float() * 0.9 + 0.05
    student = _tiny_model()
    gap_before = kd_loss(predict_logits(student, images), teacher_probs, temperature=2.0).item()
    distill(
        student,
        images,
        teacher_probs,
        epochs=5,
        temperature=2.0,
        settings=OptimizerSettings(lr=0.05),
        generator=torch.Generator().manual_seed(0),
    )
    gap_after = kd_loss(predict_logits(student, images), teacher_probs, temperature=2.0).item()
    assert gap_after < gap_before / 2
    assert evaluate(student, images, labels).accuracy > 0.95


def test_distill_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="rows of soft labels"):
        distill(
            _tiny_model(),
            torch.zeros(3, 1, 4, 4),
            torch.full((2, 2), 0.5),
            epochs=1,
            temperature=1.0,
            settings=OptimizerSettings(),
            generator=torch.Generator(),
        )


class _RecordingLinear(nn.Linear):
    """Keeps a copy of its weight at every forward pass: one per mini-batch, before that batch's step."""

    def __init__(self) -> None:
        super().__init__(4, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.weight.detach().clone())
        return super().forward(inputs.flatten(1))


def _recorded_distill(schedule: str = "constant", average_decay: float = 0.0) -> _RecordingLinear:
    torch.manual_seed(0)
    student = _RecordingLinear()
    inputs = torch.randn(64, 4)
    # One fixed target for every input: the gradient keeps its direction, so Adam's steps keep
    # their size unless the learning rate changes.
    targets = torch.tensor([[0.9, 0.05, 0.05]]).repeat(64, 1)
    distill(
        student,
        inputs,
        targets,
        epochs=2,
        temperature=1.0,
        settings=OptimizerSettings(lr=1e-2, batch_size=8),
        generator=torch.Generator().manual_seed(0),
        schedule=schedule,
        average_decay=average_decay,
    )
    return student


def _step_sizes(schedule: str) -> list[float]:
    student = _recorded_distill(schedule)
    weights = [*student.seen, student.weight.detach()]
    return [float((after - before).abs().max()) for before, after in zip(weights[:-1], weights[1:], strict=True)]


def test_cosine_schedule_anneals_the_students_steps_to_zero_within_the_call():
    constant, cosine = _step_sizes("constant"), _step_sizes("cosine")
    assert len(constant) == len(cosine) == 16  # 2 epochs × 8 batches
    assert constant[-1] > 0.5 * constant[0]
    assert cosine[0] == pytest.approx(constant[0])  # both start at the full rate
    assert cosine[-1] < 0.05 * cosine[0]  # the last step's rate is (1 + cos(15π/16)) / 2 ≈ 0.01 of it
    assert cosine[len(cosine) // 2] < 0.7 * cosine[0]


def test_unknown_schedule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        _step_sizes("linear")


def _moving_average(iterates: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = iterates[0]
    for weight in iterates[1:]:
        average = decay * average + (1 - decay) * weight
    return average


def test_weight_averaging_leaves_the_moving_average_of_the_steps_in_the_student():
    plain, averaged = _recorded_distill(average_decay=0.0), _recorded_distill(average_decay=0.8)
    # The same steps were taken: averaging only changes what the student keeps at the end.
    torch.testing.assert_close(torch.stack(plain.seen), torch.stack(averaged.seen))
    iterates = [*plain.seen[1:], plain.weight.detach()]  # the weights after each of the 16 steps
    torch.testing.assert_close(averaged.weight.detach(), _moving_average(iterates, 0.8))
    assert not torch.allclose(averaged.weight, plain.weight)


def test_a_short_call_averages_over_at_most_a_third_of_its_steps():
    assert capped_average_decay(0.99, 630) == 0.99  # a 2,000-input round of 10 epochs: as asked
    assert capped_average_decay(0.99, 16) == pytest.approx(1 - 3 / 16)
    assert capped_average_decay(0.0, 16) == 0.0
    plain, averaged = _recorded_distill(average_decay=0.0), _recorded_distill(average_decay=0.99)
    iterates = [*plain.seen[1:], plain.weight.detach()]
    torch.testing.assert_close(averaged.weight.detach(), _moving_average(iterates, 1 - 3 / 16))


def test_weight_averaging_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        _recorded_distill(average_decay=1.0)
