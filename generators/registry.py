"""Build a synthesizer by name: the one place that maps a run's settings to a synthesizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from generators.adversarial import AdversarialConfig, AdversarialDistillation
from generators.amortized import AmortizedGenerator, GeneratorConfig
from generators.deepinversion import DeepInversion, InversionConfig
from generators.hooks import StatisticsTargets

SYNTHESIZERS = ("adversarial", "generator", "deepinversion")
# Builds the proxy student of the adversarial synthesizer from a seed.
StudentFactory = Callable[[int], nn.Module]


class Synthesizer(Protocol):
    def sample(
        self, num: int, *, generator: torch.Generator, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` synthesized inputs and the class ids they were synthesized for."""
        ...


class ProxyAdversarialSynthesizer:
    """A generator trained adversarially against a local proxy student, then sampled by forward pass.

    Where the real student is not available (a federated client synthesizing for the server),
    the DFAD game is played against a fresh proxy student trained alongside: the
    generator still seeks inputs on which a small student and the teacher disagree, which
    spreads the synthetic set over the teacher's decision regions. The proxy is discarded.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        iterations: int,
        proxy_student: StudentFactory,
        config: AdversarialConfig,
        statistics: StatisticsTargets | None,
        class_prior: Sequence[float] | None,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be ≥ 1, got {iterations}.")
        self.teacher, self.input_shape, self.num_classes = teacher, tuple(input_shape), num_classes
        self.iterations, self.config, self.proxy_student = iterations, config, proxy_student
        self.statistics, self.class_prior = statistics, class_prior
        self.game: AdversarialDistillation | None = None

    def sample(
        self, num: int, *, generator: torch.Generator, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.game is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            proxy = self.proxy_student(seed)
            game = AdversarialDistillation(
                self.teacher,
                proxy,
                input_shape=self.input_shape,
                num_classes=self.num_classes,
                total_iterations=self.iterations,
                generator=generator,
                config=self.config,
                statistics=self.statistics,
                class_prior=self.class_prior,
            )
            for _ in range(self.iterations):
                game.step()
            self.game = game
        return self.game.sample(num, generator=generator)


def build_synthesizer(
    method: str,
    teacher: nn.Module,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    steps: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    statistics: StatisticsTargets | None = None,
    class_prior: Sequence[float] | None = None,
    proxy_student: StudentFactory | None = None,
) -> Synthesizer:
    """A synthesizer inverting ``teacher``, with default loss weights and ``steps`` of optimization.

    ``steps`` is the number of iterations of the generator–student game (``adversarial``, against
    a proxy student), of generator training steps (``generator``) or of pixel updates per batch
    (``deepinversion``); ``pixel_mean``/``pixel_std`` are the data's normalization;
    ``class_prior`` weights the classes synthesized (uniform by default); ``proxy_student``
    builds, from a seed, the student an ``adversarial`` generator plays against.
    """
    mean, std = tuple(pixel_mean), tuple(pixel_std)
    if method == "adversarial":
        if proxy_student is None:
            raise ValueError(
                "synthesis method 'adversarial' trains its generator against a student; pass "
                "proxy_student=<seed -> nn.Module>, e.g. a LeNet-5-half built by fedkd.models.build_model."
            )
        return ProxyAdversarialSynthesizer(
            teacher,
            input_shape=input_shape,
            num_classes=num_classes,
            iterations=steps,
            proxy_student=proxy_student,
            config=AdversarialConfig(pixel_mean=mean, pixel_std=std),
            statistics=statistics,
            class_prior=class_prior,
        )
    if method == "generator":
        return AmortizedGenerator(
            teacher,
            input_shape=input_shape,
            num_classes=num_classes,
            config=GeneratorConfig(steps=steps, pixel_mean=mean, pixel_std=std),
            statistics=statistics,
            class_prior=class_prior,
        )
    if method == "deepinversion":
        return DeepInversion(
            teacher,
            input_shape=input_shape,
            num_classes=num_classes,
            config=InversionConfig(iterations=steps, pixel_mean=mean, pixel_std=std),
            statistics=statistics,
            class_prior=class_prior,
        )
    raise ValueError(f"Unknown synthesis method {method!r}; choose one of {list(SYNTHESIZERS)}.")
