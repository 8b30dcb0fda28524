"""Conversion between ``uint8`` images and normalized ``float32`` tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedkd.data.arrays import DatasetInfo

if TYPE_CHECKING:
    import torch


def to_tensor(images: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    """Convert ``uint8`` images to a normalized ``float32`` tensor.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` array of shape ``(N, C, H, W)`` or one image ``(C, H, W)``
        matching ``info.input_shape``.
    info : DatasetInfo
        Supplies the per-channel mean and std.

    Returns
    -------
    torch.Tensor
        ``float32`` tensor ``(x / 255 - mean) / std`` of the same shape.
    """
    import torch

    array = np.asarray(images)
    shape = tuple(info.input_shape)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or tuple(array.shape[-3:]) != shape:
        channels, height, width = shape
        raise ValueError(
            f"images must be uint8 of shape (N, {channels}, {height}, {width}) or "
            f"{shape} for dataset {info.name!r}; got dtype {array.dtype} and shape "
            f"{array.shape}."
        )
    tensor = torch.from_numpy(array.astype(np.float32)).div_(255.0)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def to_uint8(tensor: torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """Inverse of :func:`to_tensor`: normalized inputs to ``uint8`` pixels, rounded and clipped.

    Synthetic inputs cross the wire in this form, exactly like real images: four times fewer
    bytes than ``float32``, and whoever receives them normalizes them as it would real data.
    """
    import torch

    shape = tuple(info.input_shape)
    if tensor.dim() != 4 or tuple(tensor.shape[1:]) != shape:
        raise ValueError(
            f"expected normalized inputs of shape (N, {', '.join(map(str, shape))}) for dataset "
            f"{info.name!r}, got {tuple(tensor.shape)}."
        )
    mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
    pixels = tensor.detach().to("cpu", torch.float32) * std + mean
    return (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
