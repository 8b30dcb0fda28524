"""The data model: a split's images and labels, a dataset's static description, the pair of splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageArrays:
    """Images and labels of one split.

    Attributes
    ----------
    images : np.ndarray
        ``uint8`` array of shape ``(N, C, H, W)`` (channels first).
    labels : np.ndarray
        ``int64`` array of shape ``(N,)``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 array of shape (N, C, H, W); got dtype "
                f"{self.images.dtype} and shape {self.images.shape}. Convert with "
                f"arrays_from_hf or reshape/cast before building ImageArrays."
            )
        if self.labels.dtype != np.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be an int64 array of shape (N,); got dtype "
                f"{self.labels.dtype} and shape {self.labels.shape}. Cast with "
                f"labels.astype(np.int64)."
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"images and labels must have the same length; got "
                f"{len(self.images)} images and {len(self.labels)} labels."
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    Attributes
    ----------
    name : str
        Registry name passed to :func:`load_dataset`.
    num_classes : int
        Number of label classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image.
    mean, std : tuple of float
        Per-channel mean and standard deviation of ``pixel / 255`` over the
        train split, used by :func:`to_tensor`.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Dataset:
    """A dataset's description with its train and test splits."""

    info: DatasetInfo
    train: ImageArrays
    test: ImageArrays
