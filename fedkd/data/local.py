"""The tensors one participant works with: a client's private partition, the public transfer
inputs, the test split. Built from the rest of :mod:`fedkd.data` and cached per process, so
hundreds of simulated clients in one process share one copy of the dataset and one partitioning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedkd.config import SplitSpec
from fedkd.data.arrays import Dataset, DatasetInfo
from fedkd.data.partition import FederatedSplit, federated_split
from fedkd.data.registry import load_dataset
from fedkd.data.tensors import to_tensor


def dataset_for(spec: SplitSpec) -> Dataset:
    return load_dataset(spec.dataset, data_root=spec.data_root or None)


# What another process loaded and handed over (:func:`adopt_shared_data`): consulted before
# loading anything, so a process that adopted a run's data never reads the dataset's files.
_ADOPTED_SPLITS: dict[SplitSpec, FederatedSplit] = {}
_ADOPTED_INFO: dict[SplitSpec, DatasetInfo] = {}
_ADOPTED_TENSORS: dict[tuple[str, str, str], LabeledTensors] = {}


def split_for(spec: SplitSpec) -> FederatedSplit:
    """The run's public set and private partitions (computed once per process)."""
    adopted = _ADOPTED_SPLITS.get(spec)
    return adopted if adopted is not None else _computed_split(spec)


@lru_cache(maxsize=8)
def _computed_split(spec: SplitSpec) -> FederatedSplit:
    dataset = dataset_for(spec)
    return federated_split(
        dataset.train.labels,
        num_clients=spec.num_clients,
        public_size=spec.public_size,
        scheme=spec.scheme,
        alpha=spec.alpha,
        classes_per_partition=spec.classes_per_partition,
        seed=spec.seed,
        validation_size=spec.validation_size,
    )


@dataclass(frozen=True)
class LabeledTensors:
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@lru_cache(maxsize=2)
def _converted_split(dataset_name: str, data_root: str, split: str) -> LabeledTensors:
    """A whole split as normalized tensors, converted once per process.

    Every client of a simulated federation indexes into this one copy; converting each
    partition anew every round costs more than the lookup at hundreds of clients.
    """
    dataset = load_dataset(dataset_name, data_root=data_root or None)
    arrays = dataset.train if split == "train" else dataset.test
    return LabeledTensors(to_tensor(arrays.images, dataset.info), torch.tensor(arrays.labels, dtype=torch.int64))


def _tensors(spec: SplitSpec, indices: np.ndarray | None, *, split: str) -> LabeledTensors:
    whole = _ADOPTED_TENSORS.get((spec.dataset, spec.data_root, split))
    if whole is None:
        whole = _converted_split(spec.dataset, spec.data_root, split)
    if indices is None:
        return whole
    rows = torch.tensor(np.asarray(indices), dtype=torch.int64)
    return LabeledTensors(whole.images[rows], whole.labels[rows])


def share_loaded_data(spec: SplitSpec) -> None:
    """Load the run's split and dataset tensors now and move the tensors to shared memory, so
    that processes forked afterwards (``engine=processes``) all read this one copy."""
    split_for(spec)
    for split in ("train", "test"):
        whole = _converted_split(spec.dataset, spec.data_root, split)
        whole.images.share_memory_()
        whole.labels.share_memory_()


def shared_data_for(spec: SplitSpec) -> dict[str, Any]:
    """The run's split, dataset description and normalized tensors (as NumPy arrays), for
    :func:`adopt_shared_data` in another process (``engine=ray`` hands them over through Ray's
    object store, which maps one copy per machine)."""
    train = _converted_split(spec.dataset, spec.data_root, "train")
    test = _converted_split(spec.dataset, spec.data_root, "test")
    return {
        "spec": spec,
        "split": split_for(spec),
        "info": info_for(spec),
        "train_images": train.images.numpy(),
        "train_labels": train.labels.numpy(),
        "test_images": test.images.numpy(),
        "test_labels": test.labels.numpy(),
    }


def adopt_shared_data(
    *,
    spec: SplitSpec,
    split: FederatedSplit,
    info: DatasetInfo,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> None:
    """Use the data :func:`shared_data_for` produced elsewhere for ``spec``, without copying the
    arrays (read-only ones, as Ray's object store gives, stay read-only: nothing here writes to
    a whole split)."""
    _ADOPTED_SPLITS[spec] = split
    _ADOPTED_INFO[spec] = info
    with warnings.catch_warnings():  # torch warns that it cannot protect a read-only array
        warnings.simplefilter("ignore", UserWarning)
        for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
            _ADOPTED_TENSORS[(spec.dataset, spec.data_root, name)] = LabeledTensors(
                torch.from_numpy(images), torch.from_numpy(labels)
            )


def private_partition(spec: SplitSpec, client_id: int) -> LabeledTensors:
    """Client ``client_id``'s private examples."""
    if not 0 <= client_id < spec.num_clients:
        raise ValueError(f"client id {client_id} is outside 0..{spec.num_clients - 1}.")
    return _tensors(spec, split_for(spec).client_indices[client_id], split="train")


def public_inputs(spec: SplitSpec, positions: np.ndarray | None = None) -> LabeledTensors:
    """Public transfer examples; ``positions`` index into the public set (all when ``None``).

    The labels are returned for the server's optional use; clients only read the images.
    """
    public = split_for(spec).public_indices
    if positions is not None:
        positions = np.asarray(positions)
        if positions.size and (positions.min() < 0 or positions.max() >= len(public)):
            raise ValueError(
                f"transfer positions must lie in 0..{len(public) - 1}, got {positions.min()}..{positions.max()}."
            )
        public = public[positions]
    return _tensors(spec, public, split="train")


def validation_split(spec: SplitSpec) -> LabeledTensors:
    """The labelled hold-out of the training pool (``validation_size``; empty without one): in no
    partition and not in the public set, scored only to choose settings."""
    return _tensors(spec, split_for(spec).validation_indices, split="train")


def evaluation_split(spec: SplitSpec) -> LabeledTensors:
    """The held-out test split, used only for evaluation."""
    return _tensors(spec, None, split="test")


def info_for(spec: SplitSpec) -> DatasetInfo:
    adopted = _ADOPTED_INFO.get(spec)
    return adopted if adopted is not None else dataset_for(spec).info
