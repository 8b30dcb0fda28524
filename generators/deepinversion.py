"""DeepInversion (Yin et al., CVPR 2020): optimize pixels until a teacher sees its training data.

A batch of noise is optimized with Adam so that (i) the teacher classifies it as the requested
classes, (ii) every BatchNorm layer sees the per-channel mean and variance it recorded during
training, and (iii) it looks like an image (total variation and l2 priors). Adaptive
DeepInversion adds a term that seeks inputs on which a student still disagrees with the teacher.

The synthesizer has the two methods of the CMI / Fast-Datafree synthesizers: :meth:`synthesize`
turns class ids into inputs, :meth:`sample` hands out a class-balanced batch for distillation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from generators.common import (
    MNIST_MEAN,
    MNIST_STD,
    balanced_targets,
    check_class_prior,
    check_synthesis_config,
    check_targets,
    check_teacher_setup,
    frozen,
    inversion_objective,
    module_device,
    module_dtype,
    pixel_bounds,
    roll_jitter,
)
from generators.hooks import (
    DEFAULT_FIRST_BN_MULTIPLIER,
    BatchNormStatistics,
    StatisticsTargets,
    bn_statistics,
    layer_weights,
)


@dataclass(frozen=True)
class InversionConfig:
    """Hyper-parameters of :class:`DeepInversion`; the defaults suit 28×28 normalized MNIST.

    Parameters
    ----------
    iterations : int
        Adam steps per batch.
    lr : float
        Adam learning rate on the (normalized) pixels.
    batch_size : int
        Inputs optimized together; BatchNorm statistics are matched per batch, so very small
        batches match them poorly.
    bn_weight : float
        Weight of the BatchNorm feature-matching loss.
    first_bn_multiplier : float
        Extra weight of the first BatchNorm layer inside the feature loss.
    tv_weight : float
        Weight of the l2 total variation prior (:func:`~generators.losses.total_variation`).
    l2_weight : float
        Weight of the l2 norm prior (:func:`~generators.losses.l2_prior`).
    ce_weight : float
        Weight of the cross-entropy between the teacher's output and the requested classes.
    adi_weight : float
        Weight of Adaptive DeepInversion's competition term; 0 turns it off.
    adi_temperature : float
        Temperature of the teacher/student distributions in the competition term (3 in
        DeepInversion's code).
    jitter : int
        Each step rolls the batch by up to this many pixels along each axis, so that the
        result does not depend on exact pixel positions.
    flip : bool
        Also flip the batch horizontally with probability ½ each step. Off by default:
        mirrored digits and letters are not the same class.
    pixel_mean, pixel_std : tuple of float, optional
        The normalization of the teacher's inputs, one value per channel or one for all.
        Pixels are kept in the range that normalized ``[0, 1]`` images can take. ``None``
        for both turns clipping off.
    """

    iterations: int = 200
    lr: float = 0.1
    batch_size: int = 64
    bn_weight: float = 1.0
    first_bn_multiplier: float = DEFAULT_FIRST_BN_MULTIPLIER
    tv_weight: float = 0.05
    l2_weight: float = 0.0
    ce_weight: float = 1.0
    adi_weight: float = 0.0
    adi_temperature: float = 3.0
    jitter: int = 2
    flip: bool = False
    pixel_mean: tuple[float, ...] | None = MNIST_MEAN
    pixel_std: tuple[float, ...] | None = MNIST_STD

    def __post_init__(self) -> None:
        check_synthesis_config(self, counts={"iterations": 1, "batch_size": 1})


class DeepInversion:
    """Synthesize inputs from a teacher's BatchNorm statistics.

    Parameters
    ----------
    teacher : nn.Module
        Classifier with BatchNorm layers. Its parameters, buffers, training mode and
        ``requires_grad`` flags are the same after every call as before.
    input_shape : Sequence[int]
        ``(C, H, W)`` of one input.
    num_classes : int
        Number of teacher outputs; :meth:`sample` draws targets from ``range(num_classes)``.
    config : InversionConfig
        Loss weights and optimizer settings.
    statistics : StatisticsTargets, optional
        BatchNorm statistics to match, e.g. :class:`~generators.hooks.SuppliedStatistics`
        released by a client. By default the teacher's running statistics, read anew at each
        :meth:`synthesize` so that a teacher trained further in between is followed.
    class_prior : Sequence[float], optional
        Relative weight of each class for :meth:`sample`, e.g. the class counts of the
        teacher's training data. Uniform by default.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        config: InversionConfig = InversionConfig(),
        statistics: StatisticsTargets | None = None,
        class_prior: Sequence[float] | None = None,
    ) -> None:
        shape = check_teacher_setup(teacher, input_shape, num_classes, config, statistics)
        self.teacher = teacher
        self.input_shape = shape
        self.num_classes = num_classes
        self.config = config
        self.statistics = statistics
        self.class_prior = check_class_prior(class_prior, num_classes)
        self._loss_history: list[float] = []

    @property
    def loss_history(self) -> list[float]:
        """Total loss at every iteration of the latest :meth:`synthesize` call (a copy)."""
        return list(self._loss_history)

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = roll_jitter(images, self.config.jitter, generator)
        if self.config.flip:
            coin = torch.rand((), generator=generator, device=generator.device)
            if bool(coin < 0.5):
                images = torch.flip(images, dims=(3,))
        return images

    def synthesize(
        self,
        *,
        targets: torch.Tensor,
        generator: torch.Generator,
        student: nn.Module | None = None,
    ) -> torch.Tensor:
        """Optimize one batch of inputs, one per entry of ``targets``.

        Parameters
        ----------
        targets : Tensor
            ``(B,)`` class ids the teacher should predict.
        generator : torch.Generator
            Source of the initial noise, jitter and flips; same state, same result.
        student : nn.Module, optional
            Needed when ``config.adi_weight > 0``: the competition term seeks inputs on which
            it disagrees with the teacher. Its state is restored like the teacher's.

        Returns
        -------
        Tensor
            ``(B, C, H, W)`` on the teacher's device: a detached copy of the iterate with the
            lowest total loss.
        """
        config = self.config
        check_targets(targets, self.num_classes)
        if config.adi_weight > 0 and student is None:
            raise ValueError(
                f"adi_weight={config.adi_weight} needs a student to compete with; pass student=... or set adi_weight=0."
            )
        device, dtype = module_device(self.teacher), module_dtype(self.teacher)
        targets = targets.to(device=device, dtype=torch.long)
        bounds = pixel_bounds(config.pixel_mean, config.pixel_std, device=device, dtype=dtype)

        # Noise is drawn on the generator's device and then moved, so one seed gives the same
        # start on CPU and GPU.
        noise = torch.randn((len(targets), *self.input_shape), generator=generator, device=generator.device)
        pixels = noise.to(device=device, dtype=dtype)
        if bounds is not None:
            pixels = torch.clamp(pixels, *bounds)
        pixels.requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=config.lr)

        competing = student is not None and config.adi_weight > 0
        frozen_modules = [self.teacher, student] if student is not None and competing else [self.teacher]
        self._loss_history = []
        best_loss, best = math.inf, pixels.detach().clone()
        with frozen(frozen_modules), torch.enable_grad(), self._statistics_hooks() as stats:
            weights = (
                None if stats is None else layer_weights(stats.num_layers, first_multiplier=config.first_bn_multiplier)
            )
            for _ in range(config.iterations):
                optimizer.zero_grad(set_to_none=True)
                augmented = self._augment(pixels, generator)
                logits = self.teacher(augmented)
                loss = inversion_objective(
                    config,
                    images=pixels,
                    augmented=augmented,
                    logits=logits,
                    targets=targets,
                    feature_loss=None if stats is None else stats.feature_loss(weights),
                    student=student,
                )
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"DeepInversion loss became {value} at iteration "
                        f"{len(self._loss_history)}; "
                        "lower config.lr or the loss weights."
                    )
                self._loss_history.append(value)
                # The loss belongs to the pixels before this step, so that is the iterate to keep.
                if value < best_loss:
                    best_loss, best = value, pixels.detach().clone()
                loss.backward()
                optimizer.step()
                if bounds is not None:
                    with torch.no_grad():
                        pixels.clamp_(*bounds)
        return best

    @contextmanager
    def _statistics_hooks(self) -> Iterator[BatchNormStatistics | None]:
        if self.config.bn_weight == 0:
            yield None
            return
        with bn_statistics(self.teacher, targets=self.statistics) as stats:
            yield stats

    def sample(
        self,
        num: int,
        *,
        generator: torch.Generator,
        student: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` synthesized inputs with class-balanced random targets.

        Targets cycle through the classes (so counts differ by at most one) in an order
        shuffled by ``generator``; they are synthesized in batches of ``config.batch_size``.

        Returns
        -------
        tuple[Tensor, Tensor]
            Inputs ``(num, C, H, W)`` and their int64 targets ``(num,)``, on the teacher's device.
        """
        targets = balanced_targets(num, self.num_classes, generator, self.class_prior)
        batches = [
            self.synthesize(targets=chunk, generator=generator, student=student)
            for chunk in targets.split(self.config.batch_size)
        ]
        return torch.cat(batches), targets.to(batches[0].device)
