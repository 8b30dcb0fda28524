"""An amortized synthesizer: train a small generator network once, then sample by forward pass.

DeepInversion optimizes every batch of pixels from scratch (hundreds of teacher forward and
backward passes per batch). DAFL (Chen et al., ICCV 2019) and Fast-DFKD (Fang et al., AAAI
2022) instead train a generator ``G(z, y)`` against the teacher, so that after training any
number of inputs costs one cheap forward pass each. The generator here is trained with
DeepInversion's own objective — cross-entropy to the requested class, BatchNorm feature
matching at every teacher layer, image priors, optionally Adaptive DeepInversion's competition
term — so the two synthesizers differ only in what is optimized: pixels or generator weights.

References
----------
Chen et al., "Data-Free Learning of Student Networks", ICCV 2019 (DAFL).
Fang et al., "Up to 100× Faster Data-free Knowledge Distillation", AAAI 2022 (Fast-DFKD).
Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
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
    StatisticsTargets,
    bn_statistics,
    layer_weights,
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of :class:`AmortizedGenerator`; the defaults suit 28×28 and 32×32 data.

    Parameters
    ----------
    steps : int
        Adam steps on the generator's weights.
    lr : float
        Adam learning rate of the generator.
    batch_size : int
        Inputs generated per training step; BatchNorm statistics are matched per batch.
    latent_dim : int
        Size of the noise vector ``z`` (the class enters as a learned embedding).
    width : int
        Channels of the generator's widest layer; its cost grows with the square.
    bn_weight, first_bn_multiplier, tv_weight, l2_weight, ce_weight, adi_weight, adi_temperature, jitter
        As in :class:`~generators.deepinversion.InversionConfig`.
    pixel_mean, pixel_std : tuple of float, optional
        Normalization of the teacher's inputs. The generator's output is squashed into the
        range normalized ``[0, 1]`` pixels can take; ``None`` for both leaves it unbounded.
    """

    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 64
    latent_dim: int = 64
    width: int = 32
    bn_weight: float = 1.0
    first_bn_multiplier: float = DEFAULT_FIRST_BN_MULTIPLIER
    tv_weight: float = 0.05
    l2_weight: float = 0.0
    ce_weight: float = 1.0
    adi_weight: float = 0.0
    adi_temperature: float = 3.0
    jitter: int = 2
    pixel_mean: tuple[float, ...] | None = MNIST_MEAN
    pixel_std: tuple[float, ...] | None = MNIST_STD

    def __post_init__(self) -> None:
        check_synthesis_config(self, counts={"steps": 1, "batch_size": 2, "latent_dim": 1, "width": 1})


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: noise and a class id to one image (DAFL's MNIST generator, conditioned).

    A linear layer maps ``z ⊙ embed(y)`` to a ``width × s/4 × s/4`` map, two upsampling
    convolutions bring it to ``s × s``, and a sigmoid squashes each pixel into ``[low, high]``.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        latent_dim: int,
        width: int,
        bounds: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.start = (height // 4, width_px // 4)
        self.out_size = (height, width_px)
        self.width = width
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, width * self.start[0] * self.start[1]),
            nn.BatchNorm1d(width * self.start[0] * self.start[1]),
        )
        half = max(width // 2, 1)
        self.body = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(size=self.out_size),
            nn.Conv2d(width, half, 3, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(half, channels, 3, padding=1),
        )
        if bounds is None:
            self.register_buffer("low", None)
            self.register_buffer("span", None)
        else:
            self.register_buffer("low", bounds[0].detach().clone())
            self.register_buffer("span", (bounds[1] - bounds[0]).detach().clone())

    def forward(self, noise: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.project(noise * self.embed(targets))
        hidden = hidden.view(len(noise), self.width, *self.start)
        raw = self.body(hidden)
        low, span = self.low, self.span
        if not isinstance(low, torch.Tensor) or not isinstance(span, torch.Tensor):
            return raw
        return low + span * torch.sigmoid(raw)


class AmortizedGenerator:
    """Synthesize inputs with a generator network trained on one teacher's BatchNorm statistics.

    Same interface as :class:`~generators.deepinversion.DeepInversion`: :meth:`synthesize`
    turns class ids into inputs and :meth:`sample` hands out a class-balanced batch. The
    generator is trained on first use (or explicitly with :meth:`fit`); every later call is a
    forward pass.

    Parameters
    ----------
    teacher : nn.Module
        Classifier with BatchNorm layers; left exactly as it was (weights, mode, flags).
    input_shape : Sequence[int]
        ``(C, H, W)`` of one input.
    num_classes : int
        Number of teacher outputs.
    config : GeneratorConfig
        Loss weights and optimizer settings.
    statistics : StatisticsTargets, optional
        BatchNorm statistics to match instead of the teacher's running statistics.
    class_prior : Sequence[float], optional
        Relative weight of each class, e.g. the class counts of the teacher's training data:
        training batches and samples follow it, since a teacher cannot invert a class it never
        saw. Uniform by default.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        config: GeneratorConfig = GeneratorConfig(),
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
        self.network: ConditionalGenerator | None = None
        self._loss_history: list[float] = []

    @property
    def loss_history(self) -> list[float]:
        """Total loss at every training step of the latest :meth:`fit` (a copy)."""
        return list(self._loss_history)

    def _new_network(self, generator: torch.Generator) -> ConditionalGenerator:
        config = self.config
        device, dtype = module_device(self.teacher), module_dtype(self.teacher)
        bounds = pixel_bounds(config.pixel_mean, config.pixel_std, device=device, dtype=dtype)
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = ConditionalGenerator(
                input_shape=self.input_shape,
                num_classes=self.num_classes,
                latent_dim=config.latent_dim,
                width=config.width,
                bounds=bounds,
            )
        return network.to(device=device, dtype=dtype)

    def fit(
        self,
        *,
        generator: torch.Generator,
        student: nn.Module | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> AmortizedGenerator:
        """Train the generator network for ``config.steps`` steps against the teacher.

        The network starts fresh, or from ``start`` (a state dict of an earlier fit's
        :attr:`network`): Fast-DFKD's reuse, where a generator that already inverts a similar
        teacher needs only a few steps to follow it.
        """
        config = self.config
        if config.adi_weight > 0 and student is None:
            raise ValueError(
                f"adi_weight={config.adi_weight} needs a student to compete with; pass student=... or set adi_weight=0."
            )
        network = self._new_network(generator)
        if start is not None:
            try:
                network.load_state_dict(start)
            except RuntimeError as error:
                raise ValueError(
                    "the generator state to start from does not fit this generator (another input shape, "
                    f"class count, latent_dim or width?): {error}"
                ) from error
        network.train()
        device = module_device(self.teacher)
        optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, betas=(0.5, 0.999))
        competing = student is not None and config.adi_weight > 0
        frozen_modules = [self.teacher, student] if student is not None and competing else [self.teacher]
        self._loss_history = []
        hooks = bn_statistics(self.teacher, targets=self.statistics) if config.bn_weight > 0 else nullcontext(None)
        with frozen(frozen_modules), torch.enable_grad(), hooks as stats:
            weights = (
                None if stats is None else layer_weights(stats.num_layers, first_multiplier=config.first_bn_multiplier)
            )
            for _ in range(config.steps):
                noise = torch.randn(
                    (config.batch_size, config.latent_dim), generator=generator, device=generator.device
                ).to(device)
                targets = balanced_targets(config.batch_size, self.num_classes, generator, self.class_prior).to(device)
                images = network(noise, targets)
                augmented = roll_jitter(images, config.jitter, generator)
                logits = self.teacher(augmented)
                loss = inversion_objective(
                    config,
                    images=images,
                    augmented=augmented,
                    logits=logits,
                    targets=targets,
                    feature_loss=None if stats is None else stats.feature_loss(weights),
                    student=student if competing else None,
                )
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"generator loss became {value} at step {len(self._loss_history)}; "
                        "lower config.lr or the loss weights."
                    )
                self._loss_history.append(value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        network.eval()
        self.network = network
        return self

    def synthesize(
        self, *, targets: torch.Tensor, generator: torch.Generator, student: nn.Module | None = None
    ) -> torch.Tensor:
        """One generated input per class id in ``targets`` (trains the generator on first use).

        Returns
        -------
        Tensor
            ``(B, C, H, W)`` on the teacher's device, detached.
        """
        check_targets(targets, self.num_classes)
        if self.network is None:
            self.fit(generator=generator, student=student)
        assert self.network is not None
        device = module_device(self.teacher)
        noise = torch.randn((len(targets), self.config.latent_dim), generator=generator, device=generator.device).to(
            device
        )
        with torch.no_grad():
            return self.network(noise, targets.to(device=device, dtype=torch.long)).detach()

    def sample(
        self, num: int, *, generator: torch.Generator, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` generated inputs with targets following the class prior, like ``DeepInversion.sample``."""
        targets = balanced_targets(num, self.num_classes, generator, self.class_prior)
        images = torch.cat(
            [
                self.synthesize(targets=chunk, generator=generator, student=student)
                for chunk in targets.split(max(self.config.batch_size, 256))
            ]
        )
        return images, targets.to(images.device)
