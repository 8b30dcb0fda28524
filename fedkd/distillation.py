"""Softening, the KD loss, and the train / predict / distill / evaluate loops.

Everything here works on tensors and ``nn.Module``s and knows nothing about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities at temperature ``T``: ``softmax(logits / T)`` along the last axis."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return torch.softmax(logits / temperature, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 1.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss, averaged over the batch.

    ``α·T²·KL(p_T ‖ p_S) + (1 − α)·CE(y, student)`` where ``p_S = softmax(z_S / T)``.
    The ``T²`` factor keeps the gradient scale of the soft term independent of ``T``.
    Without ``labels`` the loss is the soft term alone, ``T²·KL``.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must have the same shape."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    soft = F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def random_translate(images: torch.Tensor, *, max_shift: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` of its width/height (zero padding).

    A cheap augmentation that matters when a student learns from only a few thousand
    transfer inputs.
    """
    if max_shift <= 0:
        return images
    batch = images.shape[0]
    shifts = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (2 * max_shift)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Pad with the image's own background value: inputs are normalized, so zero is not black.
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    shifted = F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros")
    return shifted + background


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam settings shared by local training and distillation."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64


# How the learning rate moves within one call of :func:`distill`: held, or annealed to zero along a
# cosine (FedDF's server-side distillation, Lin et al., NeurIPS 2020).
LR_SCHEDULES = ("constant", "cosine")


# The weight average reaches back at most about a third of a call's steps: its horizon 1 / (1 − decay)
# is capped at steps / 3. A decay chosen for a long round (0.99: the last ~100 of 630 steps) would
# otherwise keep a short call's student near its first step (after 30 steps, 74 % of the average).
AVERAGE_SPAN_DIVISOR = 3.0


def capped_average_decay(decay: float, steps: int) -> float:
    """``decay``, lowered where needed so that the average spans at most a third of ``steps``."""
    if decay <= 0 or steps <= 0:
        return decay
    return min(decay, max(0.0, 1.0 - AVERAGE_SPAN_DIVISOR / steps))


def check_average_decay(decay: float) -> None:
    """Refuse a weight-averaging decay outside [0, 1) (0 = no averaging)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the student's weight-averaging decay must lie in [0, 1) (0 = off), got {decay}.")


def _choose_schedule(schedule: str) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown learning-rate schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}.")


def _batches(num_examples: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(num_examples, generator=generator)
    for start in range(0, num_examples, batch_size):
        yield order[start : start + batch_size]


def _fit(
    model: nn.Module,
    num_examples: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    settings: OptimizerSettings,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None,
    schedule: str = "constant",
    average_decay: float = 0.0,
) -> float:
    """Minimize ``batch_loss(indices)`` over shuffled mini-batches; mean loss of the last epoch.

    ``schedule="cosine"`` anneals the learning rate from ``settings.lr`` to 0 along a cosine over
    every step of the call (one step per mini-batch). ``average_decay`` > 0 keeps an exponential
    moving average of the weights (BatchNorm statistics included) over the call's steps and
    leaves it in ``model`` at the end: Polyak averaging, which removes the step-to-step noise a
    constant learning rate leaves in the last iterate. A short call averages over fewer steps
    (:func:`capped_average_decay`).
    """
    _choose_schedule(schedule)
    check_average_decay(average_decay)
    steps = epochs * math.ceil(num_examples / settings.batch_size)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    annealing = None
    if schedule == "cosine":
        annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    averaged = None
    if average_decay > 0:
        decay = capped_average_decay(average_decay, steps)
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    model.train()
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in _batches(num_examples, settings.batch_size, generator):
            if len(batch) < 2:  # BatchNorm cannot normalise a single example
                continue
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if annealing is not None:
                annealing.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total += loss.item() * len(batch)
            count += len(batch)
        last_epoch_loss = total / max(count, 1)
    if averaged is not None and averaged.n_averaged.item() > 0:
        model.load_state_dict(averaged.module.state_dict())
    return last_epoch_loss


def train_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    settings: OptimizerSettings,
    generator: torch.Generator,
    max_shift: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Cross-entropy training; returns the mean loss of the last epoch."""

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = random_translate(images[batch], max_shift=max_shift, generator=generator)
        return F.cross_entropy(model(inputs), labels[batch])

    return _fit(
        model,
        len(images),
        batch_loss,
        epochs=epochs,
        settings=settings,
        generator=generator,
        optimizer=optimizer,
    )


def train_with_consensus(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    public: torch.Tensor,
    consensus: torch.Tensor,
    *,
    weight: float,
    temperature: float,
    epochs: int,
    settings: OptimizerSettings,
    generator: torch.Generator,
    max_shift: float = 0.0,
    input_weights: torch.Tensor | None = None,
) -> float:
    """Cross-entropy on the private examples plus ``weight`` × the KD loss toward the federation's
    consensus on public inputs, in the same steps (Cronus, Chang et al. 2019: the public inputs
    with the aggregated labels join the local training set, so the teacher learns the classes it
    lacks without forgetting them while it revisits its own). Each step pairs a private batch with
    an equally large random batch of public inputs; an epoch is one pass over the private data.
    ``input_weights`` (one per public input) scale each input's KD term (:func:`lacked_mass`).
    """
    if len(public) != len(consensus):
        raise ValueError(f"{len(public)} public inputs but {len(consensus)} rows of consensus.")
    if input_weights is not None and input_weights.shape != (len(public),):
        raise ValueError(
            f"input_weights must hold one weight per public input ({len(public)}), got {input_weights.shape}."
        )

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        picked = torch.randint(len(public), (len(batch),), generator=generator)
        views = (
            random_translate(images[batch], max_shift=max_shift, generator=generator),
            random_translate(public[picked], max_shift=max_shift, generator=generator),
        )
        private_logits, public_logits = model(torch.cat(views)).split([len(v) for v in views])
        loss = F.cross_entropy(private_logits, labels[batch])
        if input_weights is None:
            return loss + weight * kd_loss(public_logits, consensus[picked], temperature=temperature)
        log_student = F.log_softmax(public_logits / temperature, dim=-1)
        per_input = F.kl_div(log_student, consensus[picked], reduction="none").sum(1) * temperature**2
        return loss + weight * (input_weights[picked] * per_input).mean()

    return _fit(model, len(images), batch_loss, epochs=epochs, settings=settings, generator=generator, optimizer=None)


def lacked_classes(class_counts: torch.Tensor, *, share: float) -> torch.Tensor:
    """How much a client lacks each class, from 1 (no examples) down to 0 at ``share`` of a
    uniform partition's share (``1 / C``) and above: ``clip(1 − C · n_c / (n · share), 0, 1)``.

    ``share`` = 0.1 counts a class as lacked while it is under 1 % of a ten-class client's data.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}.")
    counts = class_counts.to(torch.float32)
    if counts.ndim != 1 or counts.sum() <= 0 or bool((counts < 0).any()):
        raise ValueError("class_counts must be one non-negative count per class, not all zero.")
    fraction = counts / counts.sum()
    return (1.0 - fraction * len(counts) / share).clamp(min=0.0, max=1.0)


def lacked_mass(consensus: torch.Tensor, lacked: torch.Tensor) -> torch.Tensor:
    """Each public input's weight in a client's co-distillation: the consensus's probability on
    the classes the client lacks (``consensus @ lacked``). The consensus teaches a client what it
    has not seen, and leaves the inputs of its own classes to its own data, so the teachers stay
    as different from each other as their data made them where they know something."""
    return consensus @ lacked.to(consensus.dtype)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` in evaluation mode (running BatchNorm statistics)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def distill(
    student: nn.Module,
    inputs: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    epochs: int,
    temperature: float,
    settings: OptimizerSettings,
    generator: torch.Generator,
    alpha: float = 1.0,
    labels: torch.Tensor | None = None,
    max_shift: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: str = "constant",
    average_decay: float = 0.0,
) -> float:
    """Fit ``student`` to ``teacher_probs`` on ``inputs`` with :func:`kd_loss`.

    ``schedule`` is the learning rate's course over the call (:data:`LR_SCHEDULES`);
    ``average_decay`` > 0 leaves the moving average of the weights in ``student`` (:func:`_fit`).
    Returns the mean loss of the last epoch.
    """
    if len(inputs) != len(teacher_probs):
        raise ValueError(f"{len(inputs)} transfer inputs but {len(teacher_probs)} rows of soft labels.")

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        batch_inputs = random_translate(inputs[batch], max_shift=max_shift, generator=generator)
        return kd_loss(
            student(batch_inputs),
            teacher_probs[batch],
            temperature=temperature,
            alpha=alpha,
            labels=None if labels is None else labels[batch],
        )

    return _fit(
        student,
        len(inputs),
        batch_loss,
        epochs=epochs,
        settings=settings,
        generator=generator,
        optimizer=optimizer,
        schedule=schedule,
        average_decay=average_decay,
    )


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1000) -> Evaluation:
    """Top-1 accuracy (0..1) and mean cross-entropy on ``(images, labels)``."""
    logits = predict_logits(model, images, batch_size=batch_size)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return Evaluation(accuracy=accuracy, loss=loss)


@torch.no_grad()
def class_mean_logits(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class average logit vectors on ``(images, labels)`` and the count of each class.

    Row ``c`` of the ``(C, C)`` result is the mean logit vector over the examples of class
    ``c`` (zeros where the class is absent). This is what an FD client shares.
    """
    logits = predict_logits(model, images)
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, logits.shape[1], dtype=logits.dtype).index_add_(0, labels, logits)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def train_with_class_targets(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_probs: torch.Tensor | None,
    weight: float,
    temperature: float,
    epochs: int,
    settings: OptimizerSettings,
    generator: torch.Generator,
    max_shift: float = 0.0,
) -> float:
    """Cross-entropy plus ``weight`` × the KD loss toward the soft label of each example's class.

    ``class_probs`` is ``(C, C)``: row ``c`` is the target distribution for examples of class
    ``c``; rows of NaN mark classes without a target. ``None`` means plain cross-entropy.
    """
    if class_probs is None:
        return train_supervised(
            model, images, labels, epochs=epochs, settings=settings, generator=generator, max_shift=max_shift
        )
    has_target = ~torch.isnan(class_probs).any(dim=1)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = random_translate(images[batch], max_shift=max_shift, generator=generator)
        logits = model(inputs)
        batch_labels = labels[batch]
        loss = F.cross_entropy(logits, batch_labels)
        mask = has_target[batch_labels]
        if weight > 0 and bool(mask.any()):
            loss = loss + weight * kd_loss(logits[mask], class_probs[batch_labels[mask]], temperature=temperature)
        return loss

    return _fit(model, len(images), batch_loss, epochs=epochs, settings=settings, generator=generator, optimizer=None)


def strong_augment(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """FixMatch's strong view for small grey images: a random rotation (±20°), scaling
    (0.85–1.15) and shift (up to 15 % of the side), then a random 10×10-pixel cutout filled with
    the background. Digits stay legible; the student must recognise them anyway."""
    batch = images.shape[0]
    if batch == 0:
        return images
    uniform = lambda low, high: low + (high - low) * torch.rand(batch, generator=generator)  # noqa: E731
    angle = uniform(-20.0, 20.0) * torch.pi / 180
    scale = uniform(0.85, 1.15)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.3
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    warped = F.grid_sample(images - background, grid, align_corners=False, padding_mode="zeros") + background
    height, width = images.shape[-2:]
    side = min(10, height, width)
    top = torch.randint(0, height - side + 1, (batch,), generator=generator)
    left = torch.randint(0, width - side + 1, (batch,), generator=generator)
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + side).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + side).view(-1, 1, 1))
    ).unsqueeze(1)
    return torch.where(inside, background.expand_as(warped), warped)


def consistency_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, *, confidence: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled term (Sohn et al. 2020): cross-entropy of the strong view toward
    the weak view's argmax, only where the weak view's top probability reaches ``confidence``;
    averaged over the whole batch (masked examples count as zero). The pseudo-label carries no
    gradient. Returns the loss and the mask."""
    if weak_logits.shape != strong_logits.shape:
        raise ValueError(
            f"weak {tuple(weak_logits.shape)} and strong {tuple(strong_logits.shape)} logits differ in shape."
        )
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence}.")
    probs = torch.softmax(weak_logits.detach(), dim=-1)
    top, pseudo = probs.max(dim=-1)
    mask = (top >= confidence).to(strong_logits.dtype)
    per_example = F.cross_entropy(strong_logits, pseudo, reduction="none")
    return (per_example * mask).mean(), mask


@dataclass(frozen=True)
class SemiSupervision:
    """FixMatch's knobs: the pseudo-label confidence τ, the unlabelled loss weight λ_u and μ,
    the unlabelled examples per labelled one in a step (the paper's τ = 0.95, λ_u = 1, μ = 7),
    and the decay of the weight average the student ends with. The paper averages with 0.999
    over 2²⁰ steps; a CPU-sized run takes a few thousand steps, where 0.99 averages over the
    last ~100 of them instead of dragging in the first ones."""

    confidence: float = 0.95
    weight: float = 1.0
    ratio: int = 7
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")


def cosine_decay(total_steps: int) -> Callable[[int], float]:
    """FixMatch's learning-rate schedule: ``cos(7π·step / (16·total))``, from 1 down to ≈ 0.2."""
    return lambda step: math.cos(7 * math.pi * min(step, total_steps) / (16 * max(total_steps, 1)))


def train_semi_supervised(
    student: nn.Module,
    inputs: torch.Tensor,
    teacher_probs: torch.Tensor,
    unlabelled: torch.Tensor,
    *,
    epochs: int,
    temperature: float,
    settings: OptimizerSettings,
    generator: torch.Generator,
    semi: SemiSupervision = SemiSupervision(),
    max_shift: float = 0.0,
) -> float:
    """FixMatch (Sohn et al., NeurIPS 2020) with a distillation term: each step takes a batch of
    ``ratio × batch_size`` unlabelled inputs and a batch of labelled ones, and minimizes
    ``kd_loss(weak labelled) + λ_u · consistency_loss(weak, strong unlabelled)``. An epoch is
    one pass over the unlabelled inputs. Returns the mean loss of the last epoch.

    As in the paper's reference code, the labelled, weak and strong views go through the network
    as one batch, so BatchNorm normalizes and tracks statistics of the mix it is evaluated on
    (separate passes leave the running statistics to the strongly augmented batch alone), the
    learning rate follows :func:`cosine_decay`, and the student ends with the exponential moving
    average of its weights and BatchNorm statistics (``semi.ema_decay``).
    """
    if len(inputs) != len(teacher_probs):
        raise ValueError(f"{len(inputs)} transfer inputs but {len(teacher_probs)} rows of soft labels.")
    if len(inputs) < 2:
        raise ValueError("semi-supervised training needs at least two labelled inputs.")
    if len(unlabelled) == 0:
        return distill(
            student,
            inputs,
            teacher_probs,
            epochs=epochs,
            temperature=temperature,
            settings=settings,
            generator=generator,
            max_shift=max_shift,
        )
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    unlabelled_batch = semi.ratio * settings.batch_size
    steps_per_epoch = math.ceil(len(unlabelled) / unlabelled_batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_decay(steps_per_epoch * epochs))
    average = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(semi.ema_decay), use_buffers=True)
    batch_size = min(settings.batch_size, len(inputs))
    student.train()
    last_epoch_loss = float("nan")
    steps = 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in _batches(len(unlabelled), unlabelled_batch, generator):
            if len(batch) < 2:  # BatchNorm cannot normalise a single example
                continue
            labelled = torch.randperm(len(inputs), generator=generator)[:batch_size]
            pool = unlabelled[batch]
            views = (
                random_translate(inputs[labelled], max_shift=max_shift, generator=generator),
                random_translate(pool, max_shift=max_shift, generator=generator),
                strong_augment(pool, generator=generator),
            )
            labelled_logits, weak_logits, strong_logits = student(torch.cat(views)).split([len(v) for v in views])
            loss = kd_loss(labelled_logits, teacher_probs[labelled], temperature=temperature)
            unsupervised, _ = consistency_loss(weak_logits.detach(), strong_logits, confidence=semi.confidence)
            loss = loss + semi.weight * unsupervised
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            average.update_parameters(student)
            total += loss.item()
            count += 1
        steps += count
        last_epoch_loss = total / max(count, 1)
    if steps:
        student.load_state_dict(average.module.state_dict())
    return last_epoch_loss
