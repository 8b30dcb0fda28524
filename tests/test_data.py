"""Tests for fedkd.data: loading, IDX reading, partitions and federated splits."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd import data
from fedkd.data import embedded, hub

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(_idx_bytes(array)))


def _write_tiny_mnist(root: Path, name: str = "mnist", n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx_gz(root / name / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx_gz(root / name / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # Unequal class sizes, like real data.
    rng = np.random.default_rng(7)
    return rng.choice(10, size=3000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())


# ---------------------------------------------------------------------------
# Registry and loading
# ---------------------------------------------------------------------------


def test_available_datasets_lists_all_names() -> None:
    names = data.available_datasets()
    assert names[0] == "digits"
    for name in ("mnist", "fashion_mnist", "ylecun/mnist", "zalando-datasets/fashion_mnist", "uoft-cs/cifar10"):
        assert name in names


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match="digits"):
        data.load_dataset("svhn")


def test_digits_shapes_and_split(digits: data.Dataset) -> None:
    assert digits.train.images.shape == (4000, 1, 28, 28)
    assert digits.test.images.shape == (1000, 1, 28, 28)
    assert digits.train.images.dtype == np.uint8
    assert digits.train.labels.dtype == np.int64
    assert digits.info.num_classes == 10
    assert digits.info.input_shape == (1, 28, 28)
    # Stratified: 400 train and 100 test per class.
    assert np.bincount(digits.train.labels).tolist() == [400] * 10
    assert np.bincount(digits.test.labels).tolist() == [100] * 10
    assert 0.1 < digits.info.mean[0] < 0.2 and 0.25 < digits.info.std[0] < 0.35


def test_digits_is_cached_deterministic_and_read_only(digits: data.Dataset) -> None:
    assert data.load_dataset("digits") is digits
    # data_root plays no part for the embedded set, so it shares the entry.
    assert data.load_dataset("digits", data_root="/nowhere") is digits
    fresh_train, fresh_test = embedded.load_digits()
    assert np.array_equal(fresh_train.labels, digits.train.labels)
    assert np.array_equal(fresh_test.images, digits.test.images)
    with pytest.raises(ValueError):
        digits.train.images[0, 0, 0, 0] = 1


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def test_read_tiny_idx_layout(tmp_path: Path) -> None:
    images, labels = _write_tiny_mnist(tmp_path)
    dataset = data.load_dataset("mnist", data_root=tmp_path)
    assert dataset.train.images.shape == (20, 1, 28, 28)
    assert np.array_equal(dataset.train.images[:, 0], images)
    assert np.array_equal(dataset.test.labels, labels.astype(np.int64))
    assert dataset.info.name == "mnist"


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tiny_mnist(tmp_path, name="fashion_mnist", n=12)
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    assert len(data.load_dataset("fashion_mnist").train) == 12


def test_no_data_root_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    with pytest.raises(ValueError, match="data_root"):
        data.load_dataset("mnist")


def test_missing_idx_file_names_path_and_data_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_root") as info:
        data.load_dataset("mnist", data_root=tmp_path / "empty")
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_bad_magic_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 8))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)


def test_swapped_idx_files_are_rejected(tmp_path: Path) -> None:
    _write_tiny_mnist(tmp_path)
    folder = tmp_path / "mnist"
    labels_bytes = (folder / "train-labels-idx1-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(labels_bytes)
    with pytest.raises(ValueError, match="0x00000803"):
        data.load_dataset("mnist", data_root=tmp_path)


def test_truncated_idx_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros(10, np.uint8))[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="shared MNIST files not present")
def test_real_mnist_test_label_counts() -> None:
    labels = data.read_idx(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------
# Hugging Face conversion and Hub access
# ---------------------------------------------------------------------------


def test_arrays_from_hf_pil_cifar_shaped() -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    hf = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 3, 9]})
    arrays = data.arrays_from_hf(hf, image_column="img", label_column="label")
    assert arrays.images.shape == (5, 3, 32, 32)
    assert arrays.images.dtype == np.uint8
    assert arrays.labels.dtype == np.int64
    assert np.array_equal(arrays.images, pixels.transpose(0, 3, 1, 2))
    assert arrays.labels.tolist() == [0, 1, 2, 3, 9]


def test_arrays_from_hf_arrays_and_grayscale() -> None:
    datasets = pytest.importorskip("datasets")
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    # Nested lists come back as int64; they must still end up uint8 NCHW.
    arrays = data.arrays_from_hf(
        datasets.Dataset.from_dict({"img": pixels, "label": np.arange(4)}),
        image_column="img",
        label_column="label",
    )
    assert arrays.images.shape == (4, 3, 32, 32) and arrays.images.dtype == np.uint8
    assert np.array_equal(arrays.images, pixels.transpose(0, 3, 1, 2))

    gray = pixels[..., 0]
    arrays = data.arrays_from_hf(
        datasets.Dataset.from_dict({"image": gray, "label": np.arange(4)}),
        image_column="image",
        label_column="label",
    )
    assert arrays.images.shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="columns"):
        data.arrays_from_hf(
            datasets.Dataset.from_dict({"image": gray, "label": np.arange(4)}),
            image_column="img",
            label_column="label",
        )


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="data_root"):
        data.load_dataset("uoft-cs/cifar10")
    assert time.perf_counter() - start < 10


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=0.0: False)
    datasets = pytest.importorskip("datasets")
    if datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets was imported in offline mode; covered by the offline test")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable"):
        data.load_dataset("ylecun/mnist")
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------


def _assert_valid_partitions(parts: list[np.ndarray], num_examples: int, *, cover: bool) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    assert joined.min() >= 0 and joined.max() < num_examples
    if cover:
        assert len(joined) == num_examples
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


@pytest.mark.parametrize("scheme", data.PARTITION_SCHEMES)
def test_partition_schemes_are_valid_and_deterministic(labels: np.ndarray, scheme: str) -> None:
    parts = data.partition_indices(labels, num_partitions=20, scheme=scheme, seed=3)
    assert len(parts) == 20
    _assert_valid_partitions(parts, len(labels), cover=True)
    again = data.partition_indices(labels, num_partitions=20, scheme=scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=False))
    other = data.partition_indices(labels, num_partitions=20, scheme=scheme, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=False))


def test_iid_partitions_are_balanced_and_mixed(labels: np.ndarray) -> None:
    sorted_labels = np.sort(labels)  # the shuffle must stop contiguous shards being one class
    parts = data.partition_indices(sorted_labels, num_partitions=10, scheme="iid")
    assert {len(p) for p in parts} == {300}
    assert all(len(np.unique(sorted_labels[p])) == 10 for p in parts)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_limits_classes(labels: np.ndarray, k: int) -> None:
    parts = data.partition_indices(labels, num_partitions=30, scheme="pathological", classes_per_partition=k)
    assert all(len(np.unique(labels[p])) <= k for p in parts)


def test_dirichlet_smaller_alpha_is_more_skewed(labels: np.ndarray) -> None:
    def mean_classes(alpha: float) -> float:
        parts = data.partition_indices(labels, num_partitions=30, scheme="dirichlet", alpha=alpha, seed=0)
        return float(np.mean([len(np.unique(labels[p])) for p in parts if len(p)]))

    assert mean_classes(0.05) < mean_classes(1.0) < mean_classes(100.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0, "scheme": "iid"}, "num_partitions"),
        ({"num_partitions": 3001, "scheme": "iid"}, "num_partitions"),
        ({"num_partitions": 5, "scheme": "shards"}, "iid, dirichlet, pathological"),
        ({"num_partitions": 5, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_partitions": 5, "scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_partitions": 5, "scheme": "pathological", "classes_per_partition": 0}, "classes_per_partition"),
        ({"num_partitions": 5, "scheme": "pathological", "classes_per_partition": 11}, "classes_per_partition"),
    ],
)
def test_partition_validation(labels: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.partition_indices(labels, **kwargs)


def test_partition_rejects_non_integer_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        data.partition_indices(np.array([0.5, 1.0]), num_partitions=1, scheme="iid")


def test_many_dirichlet_partitions_are_fast() -> None:
    big = np.random.default_rng(0).integers(0, 10, size=60_000)
    data.partition_indices(big[:100], num_partitions=2, scheme="dirichlet")  # library imports
    start = time.perf_counter()
    parts = data.partition_indices(big, num_partitions=1000, scheme="dirichlet", alpha=0.5)
    elapsed = time.perf_counter() - start
    _assert_valid_partitions(parts, len(big), cover=True)
    assert elapsed < 15, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("num_examples, num_partitions", [(103, 10), (1000, 7), (500, 500)])
def test_iid_partitions_cut_at_once_equal_flowers_one_by_one(num_examples: int, num_partitions: int) -> None:
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedkd.data.partition import _read_partitions

    order = np.random.default_rng(1).permutation(num_examples)
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = datasets.Dataset.from_dict({"label": np.zeros(num_examples, dtype=np.int64), "row": order})
    fast = _read_partitions(partitioner, order)
    one_by_one = [
        partitioner.load_partition(pid).with_format("arrow")[:]["row"].to_numpy() for pid in range(num_partitions)
    ]
    assert len(fast) == num_partitions
    assert all(np.array_equal(a, b) for a, b in zip(fast, one_by_one, strict=True))


def test_many_iid_partitions_are_fast() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=60_000)
    data.partition_indices(labels[:100], num_partitions=2, scheme="iid")  # library imports
    start = time.perf_counter()
    parts = data.partition_indices(labels, num_partitions=10_000, scheme="iid")
    elapsed = time.perf_counter() - start
    _assert_valid_partitions(parts, len(labels), cover=True)
    assert elapsed < 15, f"took {elapsed:.1f} s"


# ---------------------------------------------------------------------------
# Federated split
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", data.PARTITION_SCHEMES)
def test_federated_split_disjoint_and_sized(labels: np.ndarray, scheme: str) -> None:
    split = data.federated_split(labels, num_clients=12, public_size=500, scheme=scheme, seed=1)
    assert split.num_clients == 12
    assert len(split.public_indices) == 500
    assert split.public_indices.dtype == np.int64
    everything = np.concatenate([split.public_indices, *split.client_indices])
    assert len(np.unique(everything)) == len(everything)
    assert len(everything) == len(labels)


def test_federated_split_public_is_uniform(labels: np.ndarray) -> None:
    split = data.federated_split(
        labels, num_clients=10, public_size=1000, scheme="pathological", classes_per_partition=1
    )
    assert len(np.unique(labels[split.public_indices])) == 10


def test_federated_split_data_free(labels: np.ndarray) -> None:
    split = data.federated_split(labels, num_clients=4, public_size=0, scheme="iid")
    assert len(split.public_indices) == 0
    assert sum(len(c) for c in split.client_indices) == len(labels)


def test_federated_split_is_cached_and_read_only(labels: np.ndarray) -> None:
    first = data.federated_split(labels, num_clients=8, public_size=100, scheme="dirichlet")
    assert data.federated_split(labels.copy(), num_clients=8, public_size=100, scheme="dirichlet") is first
    changed = labels.copy()
    changed[0] = (changed[0] + 1) % 10
    assert data.federated_split(changed, num_clients=8, public_size=100, scheme="dirichlet") is not first
    with pytest.raises(ValueError):
        first.client_indices[0][0] = 0


def test_a_validation_hold_out_is_in_no_partition_and_leaves_the_public_set_as_it_was(labels: np.ndarray) -> None:
    without = data.federated_split(labels, num_clients=10, public_size=300, scheme="dirichlet", seed=3)
    held = data.federated_split(
        labels, num_clients=10, public_size=300, scheme="dirichlet", seed=3, validation_size=400
    )
    assert len(without.validation_indices) == 0
    assert len(held.validation_indices) == 400 and held.validation_indices.dtype == np.int64
    np.testing.assert_array_equal(held.public_indices, without.public_indices)
    partitions = np.concatenate(held.client_indices)
    assert not np.intersect1d(held.validation_indices, partitions).size
    assert not np.intersect1d(held.validation_indices, held.public_indices).size
    assert len(partitions) == len(labels) - 300 - 400
    assert len(np.unique(labels[held.validation_indices])) == 10  # a uniform draw, like the public set
    with pytest.raises(ValueError):
        held.validation_indices[0] = 0


def test_federated_split_validation(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="validation_size"):
        data.federated_split(labels, num_clients=2, public_size=10, scheme="iid", validation_size=-1)
    with pytest.raises(ValueError, match="lower num_clients, public_size or validation_size"):
        data.federated_split(labels, num_clients=100, public_size=2000, scheme="iid", validation_size=950)
    with pytest.raises(ValueError, match="lower num_clients"):
        data.federated_split(labels, num_clients=101, public_size=2900, scheme="iid")
    with pytest.raises(ValueError, match="public_size"):
        data.federated_split(labels, num_clients=2, public_size=3000, scheme="iid")
    with pytest.raises(ValueError, match="public_size"):
        data.federated_split(labels, num_clients=2, public_size=-1, scheme="iid")
    with pytest.raises(ValueError, match="num_clients"):
        data.federated_split(labels, num_clients=0, public_size=10, scheme="iid")


# ---------------------------------------------------------------------------
# Torch helper
# ---------------------------------------------------------------------------


def test_to_tensor_normalizes(digits: data.Dataset) -> None:
    torch = pytest.importorskip("torch")
    batch = data.to_tensor(digits.train.images, digits.info)
    assert batch.dtype == torch.float32
    assert tuple(batch.shape) == (4000, 1, 28, 28)
    assert abs(float(batch.mean())) < 1e-3
    assert abs(float(batch.std()) - 1.0) < 1e-3
    expected = (digits.train.images[0, 0, 14, 14] / 255 - digits.info.mean[0]) / digits.info.std[0]
    assert float(batch[0, 0, 14, 14]) == pytest.approx(expected, rel=1e-5)


def test_to_tensor_rejects_wrong_shape(digits: data.Dataset) -> None:
    with pytest.raises(ValueError, match="shape"):
        data.to_tensor(np.zeros((2, 3, 32, 32), np.uint8), digits.info)


def test_to_uint8_inverts_to_tensor_exactly(digits: data.Dataset) -> None:
    images = digits.train.images[:16]
    tensor = data.to_tensor(images, digits.info)
    np.testing.assert_array_equal(data.to_uint8(tensor, digits.info), images)


def test_to_uint8_clips_out_of_range_inputs(digits: data.Dataset) -> None:
    tensor = torch.full((2, *digits.info.input_shape), 1e6)
    tensor[1] = -1e6
    pixels = data.to_uint8(tensor, digits.info)
    assert pixels.dtype == np.uint8
    assert (pixels[0] == 255).all() and (pixels[1] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        data.to_uint8(torch.zeros(2, 3, 5, 5), digits.info)
