"""Label partitions (flwr-datasets partitioners) and the public/private federated split."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a non-empty 1-D integer array; got dtype {array.dtype} and shape {array.shape}."
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
            f"num_partitions must be an integer in 1..{num_examples} (the number of labels); got {num_partitions!r}."
        )
    num_partitions = int(num_partitions)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}. Known schemes: {', '.join(PARTITION_SCHEMES)}.")
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
    from flwr_datasets.partitioner import IidPartitioner

    if type(partitioner) is IidPartitioner:
        # Its partition k is `Dataset.shard(num_partitions, k, contiguous=True)` of the shuffled
        # rows: the first len % n shards one row longer, as np.array_split cuts. Read one by one,
        # 10,000 partitions take many minutes; cut at once, milliseconds.
        return list(np.array_split(order, num_partitions))
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and set(mapping) == set(range(num_partitions)):
        return [order[np.asarray(mapping[pid], dtype=np.int64)] for pid in range(num_partitions)]
    return [partitioner.load_partition(pid).with_format("arrow")[:]["row"].to_numpy() for pid in range(num_partitions)]


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
    validation_indices : np.ndarray
        Sorted ``int64`` positions held out of the public set and of every
        partition, for choosing settings without the test split (empty by default).
    """

    public_indices: np.ndarray
    client_indices: tuple[np.ndarray, ...]
    validation_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

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
    validation_size: int = 0,
) -> FederatedSplit:
    """Draw a public set and a validation hold-out, then partition the rest among clients.

    The public set is a uniform random sample (``np.random.default_rng(seed)``)
    of the train split and the hold-out the next ``validation_size`` of the same
    permutation, so a hold-out leaves the public set as it was; the remaining
    examples are divided with :func:`partition_indices`. Results are cached per process, so each of many
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
    validation_size : int
        Examples held out of the public set and of every partition (0: none).
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
    if not isinstance(validation_size, (int, np.integer)) or validation_size < 0:
        raise ValueError(f"validation_size must be an integer ≥ 0; got {validation_size!r}.")
    remaining = num_examples - int(public_size) - int(validation_size)
    if remaining < num_clients:
        raise ValueError(
            f"Only {max(remaining, 0)} training examples remain after reserving "
            f"public_size={public_size} and validation_size={validation_size} of {num_examples}, "
            f"too few for num_clients={num_clients}; lower num_clients, public_size or validation_size."
        )
    return _federated_split_cached(
        _LabelsKey(labels),
        int(num_clients),
        int(public_size),
        scheme,
        float(alpha),
        int(classes_per_partition),
        int(seed),
        int(validation_size),
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
    validation_size: int,
) -> FederatedSplit:
    labels = key.labels
    order = np.random.default_rng(seed).permutation(len(labels))
    public = np.sort(order[:public_size]).astype(np.int64)
    held_out = public_size + validation_size
    validation = np.sort(order[public_size:held_out]).astype(np.int64)
    rest = np.sort(order[held_out:]).astype(np.int64)
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
    for array in (public, validation, *clients):
        array.setflags(write=False)
    return FederatedSplit(public_indices=public, client_indices=clients, validation_indices=validation)
