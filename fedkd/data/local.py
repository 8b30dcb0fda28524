"""The tensors one participant works with: a client's private partition, the public transfer
inputs, the test split. Built from the rest of :mod:`fedkd.data` and cached per process, so
hundreds of simulated clients in one process share one copy of the dataset and one partitioning."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedkd.config import SplitSpec
from fedkd.data.arrays import Dataset, DatasetInfo
from fedkd.data.partition import FederatedSplit, federated_split
from fedkd.data.registry import load_dataset
from fedkd.data.tensors import to_tensor


def dataset_for(spec: SplitSpec) -> Dataset:
    return load_dataset(spec.dataset, data_root=spec.data_root or None)


@lru_cache(maxsize=8)
def split_for(spec: SplitSpec) -> FederatedSplit:
    """The run's public set and private partitions (computed once per process)."""
    dataset = dataset_for(spec)
    return federated_split(
        dataset.train.labels,
        num_clients=spec.num_clients,
        public_size=spec.public_size,
        scheme=spec.scheme,
        alpha=spec.alpha,
        classes_per_partition=spec.classes_per_partition,
        seed=spec.seed,
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


def evaluation_split(spec: SplitSpec) -> LabeledTensors:
    """The held-out test split, used only for evaluation."""
    return _tensors(spec, None, split="test")


def info_for(spec: SplitSpec) -> DatasetInfo:
    return dataset_for(spec).info
