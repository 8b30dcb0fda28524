"""Mixup views of the public transfer inputs, labelled by the teachers like the inputs themselves.

A student distilled on a fixed transfer set sees only those inputs; the teachers' function
between them is left to guess. Labelling *mixed* inputs ``λ·x_a + (1 − λ)·x_b`` with the
teachers' own predictions on them ("function matching", Beyer et al., "Knowledge distillation:
A good teacher is patient and consistent", CVPR 2022) shows the student that function on many
more inputs, at the price of one more soft-label row per view. This differs from mixup
(Zhang et al., ICLR 2018), which interpolates the *targets*; the teachers here are asked.

The server draws the pairs and weights each round and sends them down beside the transfer
indices; every client builds the same views from the public split and labels them. Pure
functions, no Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray


@dataclass(frozen=True)
class MixupPairs:
    """Which public inputs each view mixes, and how: view i is
    ``weight[i] · public[first[i]] + (1 − weight[i]) · public[second[i]]`` (positions in the
    public split, weights in [0, 1])."""

    first: NDArray[np.int32]
    second: NDArray[np.int32]
    weight: NDArray[np.float32]

    def __post_init__(self) -> None:
        if not (self.first.shape == self.second.shape == self.weight.shape) or self.first.ndim != 1:
            raise ValueError(
                f"mixup pairs need three equal-length vectors, got shapes {self.first.shape}, "
                f"{self.second.shape}, {self.weight.shape}."
            )
        if not np.isfinite(self.weight).all() or np.any(self.weight < 0) or np.any(self.weight > 1):
            raise ValueError("mixup weights must lie in [0, 1].")

    def __len__(self) -> int:
        return len(self.first)

    @staticmethod
    def concatenate(parts: list[MixupPairs]) -> MixupPairs:
        if not parts:
            return MixupPairs(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        return MixupPairs(
            np.concatenate([p.first for p in parts]),
            np.concatenate([p.second for p in parts]),
            np.concatenate([p.weight for p in parts]),
        )


def draw_pairs(positions: NDArray[np.integer], count: int, rng: np.random.Generator) -> MixupPairs:
    """``count`` views, each mixing two of ``positions`` drawn uniformly, with λ ~ U(0, 1)."""
    if count < 0:
        raise ValueError(f"the number of mixup views must be ≥ 0, got {count}.")
    positions = np.asarray(positions)
    if count and len(positions) < 2:
        raise ValueError(f"mixup views need at least two public inputs, got {len(positions)}.")
    first = positions[rng.integers(0, len(positions), size=count)].astype(np.int32)
    second = positions[rng.integers(0, len(positions), size=count)].astype(np.int32)
    return MixupPairs(first, second, rng.random(count).astype(np.float32))


def mix(first: torch.Tensor, second: torch.Tensor, weight: NDArray[np.floating]) -> torch.Tensor:
    """The views ``weight · first + (1 − weight) · second``, row by row.

    Normalization is affine, so mixing normalized inputs equals normalizing mixed raw ones.
    """
    if first.shape != second.shape or len(first) != len(weight):
        raise ValueError(
            f"cannot mix inputs of shapes {tuple(first.shape)} and {tuple(second.shape)} with {len(weight)} weights."
        )
    lam = torch.as_tensor(np.asarray(weight, dtype=np.float32)).view(-1, *([1] * (first.dim() - 1)))
    return lam * first + (1 - lam) * second


def mix_within_batch(inputs: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The batch with a ``fraction`` of its rows replaced by mixes with other rows of the batch.

    Row ``i`` (for the first ``round(fraction · n)`` rows) becomes ``λᵢ · x_i + (1 − λᵢ) · x_π(i)``
    with π a random permutation and λᵢ ~ U(0, 1); the caller relabels the result with its teacher
    (function matching), so the targets are never interpolated. The remaining rows are kept, so
    the student still sees the inputs themselves.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the mixed fraction of a batch must lie in [0, 1], got {fraction}.")
    count = round(fraction * len(inputs))
    if count == 0 or len(inputs) < 2:
        return inputs
    partners = torch.randperm(len(inputs), generator=generator, device=generator.device)[:count].to(inputs.device)
    weights = torch.rand(count, generator=generator, device=generator.device).cpu().numpy()
    mixed = inputs.clone()
    mixed[:count] = mix(inputs[:count], inputs[partners], weights)
    return mixed
