"""Hugging Face Hub datasets through ``datasets``, with fast failure when the Hub is out of reach."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from fedkd.data.arrays import ImageArrays

# Hugging Face Hub names mapped to their image column.
HUB_DATASETS: dict[str, str] = {
    "ylecun/mnist": "image",
    "zalando-datasets/fashion_mnist": "image",
    "uoft-cs/cifar10": "img",
}
_HUB_LABEL_COLUMN = "label"

# Seconds to wait for the Hub before declaring it unreachable.
_HUB_TIMEOUT_S = 3.0
_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


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
            f"Column {label_column!r} has negative labels (min {labels.min()}); expected class ids 0..num_classes-1."
        )
    return ImageArrays(images=np.ascontiguousarray(images), labels=labels.astype(np.int64))


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


def load_hub_dataset(name: str) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) of a Hub dataset; fails within seconds when offline or the Hub is unreachable."""
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
    column = HUB_DATASETS[name]
    return (
        arrays_from_hf(loaded["train"], image_column=column, label_column=_HUB_LABEL_COLUMN),
        arrays_from_hf(loaded["test"], image_column=column, label_column=_HUB_LABEL_COLUMN),
    )
