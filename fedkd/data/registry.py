"""Dataset names and :func:`load_dataset`, which loads each dataset once per process."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedkd.data.arrays import Dataset, DatasetInfo, ImageArrays
from fedkd.data.embedded import DIGITS, load_digits
from fedkd.data.hub import HUB_DATASETS, load_hub_dataset
from fedkd.data.idx import IDX_DATASETS, load_idx_dataset, resolve_data_root


def available_datasets() -> list[str]:
    """Return the names :func:`load_dataset` accepts.

    Returns
    -------
    list of str
        The embedded default first, then the IDX names, then the Hub names.
    """
    return [DIGITS, *IDX_DATASETS, *HUB_DATASETS]


def load_dataset(name: str, *, data_root: str | Path | None = None) -> Dataset:
    """Load a dataset by name, once per process.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`. ``"digits"`` is a bundled
        5,000-image MNIST subset (4,000 train / 1,000 test) that needs no
        files; ``"mnist"`` and ``"fashion_mnist"`` read the original gzip IDX
        files under ``data_root/<name>/``; the Hub names go through Hugging
        Face ``datasets``.
    data_root : str or Path, optional
        Folder holding ``mnist/`` and ``fashion_mnist/`` with the original
        files. Only used by the IDX names; defaults to the environment
        variable ``FEDKD_DATA_ROOT``.

    Returns
    -------
    Dataset
        Shared across calls with the same name and resolved ``data_root``;
        its arrays are read-only.

    Raises
    ------
    ValueError
        For an unknown name, or an IDX name with no data root.
    FileNotFoundError
        When an IDX file is missing.
    RuntimeError
        When a Hub dataset is requested and the Hub cannot be reached.
    """
    if name not in available_datasets():
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(available_datasets())}.")
    # Only the IDX names depend on the root, so the others share one cache entry
    # whatever data_root the caller passes.
    root = str(resolve_data_root(data_root)) if name in IDX_DATASETS else None
    return _load_dataset_cached(name, root)


@functools.cache
def _load_dataset_cached(name: str, root: str | None) -> Dataset:
    if name == DIGITS:
        train, test = load_digits()
    elif root is not None:  # only the IDX names carry a root
        train, test = load_idx_dataset(name, Path(root))
    else:
        train, test = load_hub_dataset(name)
    mean, std = _channel_stats(train.images)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    _, channels, height, width = train.images.shape
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        input_shape=(int(channels), int(height), int(width)),
        mean=mean,
        std=std,
    )
    return Dataset(info=info, train=_read_only(train), test=_read_only(test))


def _read_only(arrays: ImageArrays) -> ImageArrays:
    # Every client in the process shares these arrays; one stray in-place edit
    # would silently corrupt everyone's data, so make that an error instead.
    arrays.images.setflags(write=False)
    arrays.labels.setflags(write=False)
    return arrays


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # A 256-bin histogram per channel gives exact moments without building a
    # float copy of the whole split (about 1.2 GB for CIFAR-10 in float64).
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)
