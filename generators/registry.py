"""Build a synthesizer by name: the one place that maps a run's settings to a synthesizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from generators.amortized import AmortizedGenerator, GeneratorConfig
from generators.deepinversion import DeepInversion, InversionConfig
from generators.hooks import StatisticsTargets

SYNTHESIZERS = ("generator", "deepinversion")


class Synthesizer(Protocol):
    def sample(
        self, num: int, *, generator: torch.Generator, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` synthesized inputs and the class ids they were synthesized for."""
        ...


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
) -> Synthesizer:
    """A synthesizer inverting ``teacher``, with default loss weights and ``steps`` of optimization.

    ``steps`` is the number of generator training steps (``generator``) or of pixel updates per
    batch (``deepinversion``); ``pixel_mean``/``pixel_std`` are the data's normalization;
    ``class_prior`` weights the classes synthesized (uniform by default).
    """
    mean, std = tuple(pixel_mean), tuple(pixel_std)
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
