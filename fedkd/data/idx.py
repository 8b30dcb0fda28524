"""The original MNIST-format gzip IDX files under a data root (``data_root/<name>/``)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from fedkd.data.arrays import ImageArrays

DATA_ROOT_ENV = "FEDKD_DATA_ROOT"
# Local names read from the original IDX files under data_root/<name>/.
IDX_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_UBYTE = 0x08


def resolve_data_root(data_root: str | Path | None) -> Path:
    """``data_root``, or the ``FEDKD_DATA_ROOT`` environment variable when it is ``None``, resolved."""
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


def load_idx_dataset(name: str, root: Path) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) read from the four original gzip IDX files under ``root/name/``."""
    folder = root / name
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx_expecting(folder / f"{prefix}-images-idx3-ubyte.gz", magic=_IDX_IMAGES_MAGIC, kind="images")
        labels = _read_idx_expecting(folder / f"{prefix}-labels-idx1-ubyte.gz", magic=_IDX_LABELS_MAGIC, kind="labels")
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
