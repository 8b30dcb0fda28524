"""Pieces every synthesizer shares: freezing the teacher, the pixel range, input checks."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generators.hooks import RunningStatistics, check_statistics
from generators.losses import competition_loss, l2_prior, total_variation

# Normalization of MNIST (mean and std of pixel / 255), the default pixel range to clip to.
MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)


def is_count(value: object, *, minimum: int) -> bool:
    # bool is an Integral too, but `iterations=True` is a mistake, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum


def module_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


@contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; each flag restored afterwards.

    Flags are saved per submodule and per parameter, so a model that was, say, in training
    mode with one frozen layer comes back exactly so.
    """
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            # Eval mode: BatchNorm normalizes with its running statistics and does not update
            # them, and dropout is off, so the synthesis neither sees nor changes batch noise.
            module.eval()
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for sub, training in modes:
            sub.training = training
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


def pixel_bounds(
    pixel_mean: Sequence[float] | None,
    pixel_std: Sequence[float] | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Lowest and highest normalized value a ``[0, 1]`` pixel can take, shaped ``(1, C, 1, 1)``."""
    if pixel_mean is None or pixel_std is None:
        return None
    mean = torch.tensor(tuple(pixel_mean), device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(tuple(pixel_std), device=device, dtype=dtype).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def check_pixel_normalization(pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None) -> None:
    if (pixel_mean is None) != (pixel_std is None):
        raise ValueError("pixel_mean and pixel_std must be given together (to clip pixels) or both be None.")
    if pixel_mean is not None and pixel_std is not None:
        if len(pixel_mean) != len(pixel_std) or not pixel_mean:
            raise ValueError(
                f"pixel_mean {pixel_mean} and pixel_std {pixel_std} must have the "
                "same, non-zero length (one value per channel)."
            )
        if any(not s > 0 for s in pixel_std):
            raise ValueError(f"pixel_std must be > 0 in every channel, got {pixel_std}.")


def check_input_shape(input_shape: Sequence[int], pixel_mean: Sequence[float] | None) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(is_count(side, minimum=1) for side in shape):
        raise ValueError(f"input_shape must be three positive integers (C, H, W), got {input_shape!r}.")
    if pixel_mean is not None and len(pixel_mean) not in (1, shape[0]):
        raise ValueError(
            f"pixel_mean has {len(pixel_mean)} values for {shape[0]}-channel "
            "inputs; give one value per channel or a single value for all."
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def check_targets(targets: torch.Tensor, num_classes: int) -> None:
    if targets.dim() != 1 or targets.numel() == 0:
        raise ValueError(f"targets must be a non-empty 1-D tensor of class ids, got shape {tuple(targets.shape)}.")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets must hold integer class ids, got dtype {targets.dtype}.")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes - 1}], got values in [{low}, {high}].")


def check_class_prior(prior: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    """``prior`` as a normalized float64 tensor, or ``None`` for uniform classes."""
    if prior is None:
        return None
    weights = torch.as_tensor(tuple(prior), dtype=torch.float64)
    if weights.shape != (num_classes,):
        raise ValueError(f"class_prior needs {num_classes} weights, one per class, got {tuple(weights.shape)}.")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(
            "class_prior must hold finite weights >= 0 with a positive sum (e.g. the class counts "
            f"of the teacher's training data), got {tuple(prior)}."
        )
    return weights / weights.sum()


def balanced_targets(
    num: int, num_classes: int, generator: torch.Generator, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """``num`` class ids in proportion to ``prior`` (uniform by default), shuffled by ``generator``.

    Counts are the largest-remainder rounding of ``num * prior``, so they are exact up to one
    and deterministic; with a uniform prior the classes simply cycle.
    """
    if not is_count(num, minimum=1):
        raise ValueError(f"num must be an integer >= 1, got {num!r}.")
    order = torch.randperm(num, generator=generator, device=generator.device).cpu()
    if prior is None:
        return torch.arange(num)[order] % num_classes
    quotas = prior * num
    counts = torch.floor(quotas).to(torch.int64)
    shortfall = num - int(counts.sum())
    if shortfall > 0:
        # Stable sort keeps ties in class order, so the rounding is deterministic.
        remainders = quotas - counts.to(torch.float64)
        counts[torch.sort(remainders, descending=True, stable=True).indices[:shortfall]] += 1
    ordered = torch.repeat_interleave(torch.arange(num_classes), counts)
    return ordered[order]


def roll_jitter(images: torch.Tensor, jitter: int, generator: torch.Generator) -> torch.Tensor:
    """Roll the whole batch by up to ``jitter`` pixels along each axis."""
    if jitter == 0:
        return images
    shifts = torch.randint(-jitter, jitter + 1, (2,), generator=generator, device=generator.device)
    return torch.roll(images, shifts=tuple(shifts.tolist()), dims=(2, 3))


LOSS_WEIGHTS = ("bn_weight", "first_bn_multiplier", "tv_weight", "l2_weight", "ce_weight", "adi_weight")


def check_synthesis_config(config: Any, *, counts: Mapping[str, int]) -> None:
    """Validate the settings both synthesizer configs share, plus their own ``counts``.

    ``counts`` maps each integer field to its minimum.
    """
    for name, minimum in counts.items():
        value = getattr(config, name)
        if not is_count(value, minimum=minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if not is_count(config.jitter, minimum=0):
        raise ValueError(f"jitter must be a whole number of pixels >= 0, got {config.jitter!r}.")
    for name in ("lr", "adi_temperature"):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    for name in LOSS_WEIGHTS:
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}; use 0 to turn the term off.")
    check_pixel_normalization(config.pixel_mean, config.pixel_std)


def inversion_objective(
    config: Any,
    *,
    images: torch.Tensor,
    augmented: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    feature_loss: torch.Tensor | None,
    student: nn.Module | None,
) -> torch.Tensor:
    """DeepInversion's total loss: CE + BatchNorm features + ADI competition + image priors.

    ``logits`` are the teacher's on ``augmented``; the priors see the un-augmented ``images``,
    since a roll would add a seam to the total variation.
    """
    loss = config.ce_weight * F.cross_entropy(logits, targets)
    if feature_loss is not None:
        loss = loss + config.bn_weight * feature_loss
    if config.adi_weight > 0 and student is not None:
        loss = loss + config.adi_weight * competition_loss(
            logits, student(augmented), temperature=config.adi_temperature
        )
    if config.tv_weight > 0:
        loss = loss + config.tv_weight * total_variation(images)
    if config.l2_weight > 0:
        loss = loss + config.l2_weight * l2_prior(images)
    return loss


def check_teacher_setup(
    teacher: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    config: Any,
    statistics: Any,
) -> tuple[int, int, int]:
    """Check a synthesizer's arguments up front — not in the middle of a federated round.

    Returns the input shape as ``(C, H, W)``.
    """
    shape = check_input_shape(input_shape, config.pixel_mean)
    if not is_count(num_classes, minimum=2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if config.bn_weight > 0:
        check_statistics(RunningStatistics.from_model(teacher) if statistics is None else statistics, teacher)
    return shape
