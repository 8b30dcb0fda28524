"""Private feature statistics: what data-free synthesis inverts when teachers train with DP-SGD.

DeepInversion matches the per-channel mean and variance each BatchNorm layer saw in training. A
DP-SGD teacher has GroupNorm instead (BatchNorm mixes examples, which per-sample gradients
forbid) and keeps no running statistics; computing them on the private data and handing them to
the synthesizer would leak that data through the synthetic images. So the client releases them
under the Gaussian mechanism, and the synthesizer inverts against the released copy:

1. every private example contributes one vector: for each normalization layer's input, the
   per-channel mean and second moment over that example's spatial positions;
2. each layer's block is divided by that layer's *reference scale* — the mean norm of the block
   on uniform random pixels, which depends on the weights but on no data, so it costs no privacy —
   and the whole vector is clipped to L2 norm ``clip_norm`` in those units (the sum's sensitivity
   to adding or removing one example). Raw moments differ by orders of magnitude between layers
   and architectures (norms of 500 to 13,000 measured on MNIST); in reference units they sit
   near 1–2, so one default clip norm fits every teacher;
3. ``N(0, (σ · clip_norm)²)`` noise is added to the sum, which is divided by the partition size
   (already public: every soft-label reply carries it as its aggregation weight) and multiplied
   back by the reference scales;
4. per layer, ``mean = E[m]`` and ``var = E[s] − mean²`` (floored at a small positive value).

One release per round is one Gaussian event at sample rate 1 in the client's
:class:`~fedkd.privacy.accountant.PrivacyLedger`, composed with its DP-SGD steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedkd.privacy.mechanisms import clip_rows
from generators.hooks import SuppliedStatistics, layer_channels, normalization_layers

# Released variances are floored here: noise can push E[s] − mean² below zero, and the feature
# loss compares variances, so a negative target would be unreachable.
VARIANCE_FLOOR = 1e-4


def statistics_layout(model: nn.Module) -> list[int]:
    """Channels of each normalization layer's input, in :func:`normalization_layers` order."""
    layers = normalization_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm or GroupNorm layer, so there are no feature "
            "statistics to invert; use a teacher with normalization layers (e.g. 'cnn_small')."
        )
    return [layer_channels(layer) for layer in layers]


@torch.no_grad()
def per_sample_moments(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """``(n, 2 · Σ channels)``: per example and layer, ``[channel means, channel second moments]``.

    The model runs in eval mode (GroupNorm normalizes each example alone either way); its mode
    is restored afterwards.
    """
    layers = normalization_layers(model)
    statistics_layout(model)
    recorded: dict[int, torch.Tensor] = {}

    def recorder(index: int):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs = args[0].flatten(start_dim=2)  # (B, C, positions)
            recorded[index] = torch.cat([inputs.mean(dim=2), inputs.square().mean(dim=2)], dim=1)

        return record

    handles = [layer.register_forward_pre_hook(recorder(index)) for index, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    rows = []
    try:
        for batch in images.split(batch_size):
            recorded.clear()
            model(batch)
            rows.append(torch.cat([recorded[index] for index in range(len(layers))], dim=1))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.cat(rows).double()


def reference_scales(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    generator: torch.Generator,
    num_inputs: int = 256,
) -> list[float]:
    """Per layer, the mean norm of its moment block on uniform random pixels (no data involved)."""
    pixels = torch.rand((num_inputs, *input_shape), generator=generator)
    mean = torch.tensor(pixel_mean, dtype=pixels.dtype).view(-1, 1, 1)
    std = torch.tensor(pixel_std, dtype=pixels.dtype).view(-1, 1, 1)
    moments = per_sample_moments(model, (pixels - mean) / std)
    scales, start = [], 0
    for channels in statistics_layout(model):
        block = moments[:, start : start + 2 * channels]
        start += 2 * channels
        scales.append(max(float(block.norm(dim=1).mean()), 1e-12))
    return scales


def release_feature_statistics(
    moments: NDArray[np.floating] | torch.Tensor,
    layout: Sequence[int],
    *,
    scales: Sequence[float],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> SuppliedStatistics:
    """Clip each example's moment vector (in reference units), add Gaussian noise to the sum, and
    turn the noisy average into per-layer ``(mean, var)`` targets. ``noise_multiplier = 0``
    releases them without noise (no guarantee)."""
    moments = np.asarray(moments, dtype=np.float64)
    width = 2 * sum(layout)
    if moments.ndim != 2 or moments.shape[1] != width or len(moments) == 0:
        raise ValueError(
            f"moments must be (n ≥ 1, {width}) for layers with {list(layout)} channels, got {moments.shape}."
        )
    if len(scales) != len(layout) or not all(np.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"give one finite scale > 0 per layer ({len(layout)}), got {list(scales)}.")
    if noise_multiplier < 0 or not np.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and ≥ 0, got {noise_multiplier}.")
    unit = np.repeat(np.asarray(scales, dtype=np.float64), [2 * channels for channels in layout])
    total = clip_rows(moments / unit, clip_norm).sum(axis=0)
    if noise_multiplier > 0:
        total = total + rng.normal(0.0, noise_multiplier * clip_norm, size=total.shape)
    average = total / len(moments) * unit
    statistics = []
    start = 0
    for channels in layout:
        mean = average[start : start + channels]
        second = average[start + channels : start + 2 * channels]
        start += 2 * channels
        var = np.maximum(second - mean**2, VARIANCE_FLOOR)
        statistics.append((torch.from_numpy(mean).float(), torch.from_numpy(var).float()))
    return SuppliedStatistics(statistics)
