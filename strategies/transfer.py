"""Where a round's transfer inputs come from, and how the clients' soft labels on them become
what the student learns: one small protocol, four sources.

* :class:`PublicTransfer` — a public split, labelled in full every round (FedED, FedMD, DS-FL);
* :class:`strategies.synthetic_transfer.SyntheticTransfer` — inputs the clients synthesize from
  their teachers each round, pooled by the server (data-free transfer);
* :class:`strategies.private_aggregation.PrivateRelease` — a fresh batch of public inputs per
  round whose aggregate is released under a DP mechanism (``privacy=gaussian|gnmax``);
* :class:`strategies.pate_release.PATERelease` — PATE's Confident-GNMax (``privacy=pate``).

A source owns its inputs, its targets and any state it keeps across rounds; the strategy
(:class:`strategies.ensemble_distillation.EnsembleDistillation`) owns sampling, reply triage and
the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedkd.messages import TRANSFER_KEY, transfer_record
from strategies.aggregation import Aggregator

StateRecords = dict[str, ArrayRecord | ConfigRecord]
Record = TypeVar("Record", ArrayRecord, ConfigRecord)


def stored(state: StateRecords, key: str, kind: type[Record]) -> Record:
    """``state[key]``, checked to be the kind of record that was saved there."""
    record = state.get(key)
    if not isinstance(record, kind):
        raise ValueError(
            f"checkpoint state lacks a {kind.__name__} named {key!r}; it was written by another version "
            "or configuration: start the run afresh in a new folder."
        )
    return record


def stored_count(state: StateRecords, key: str, name: str) -> int:
    """A non-negative count saved in the ConfigRecord ``state[key]`` under ``name``."""
    value = stored(state, key, ConfigRecord).get(name)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint state {key!r} holds no count {name!r}; start the run afresh in a new folder.")
    return value


@dataclass(frozen=True)
class RoundTransfer:
    """What a round sends beside the task: the records naming the inputs, extra task keys, and
    how many rows each reply must hold."""

    records: dict[str, ArrayRecord]
    num_inputs: int
    task: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistillationSet:
    """What the student learns from this round: inputs, their soft-label targets, and public
    labels where the run lets the server use them. ``aggregate`` is this round's aggregate on
    this round's inputs (what FedMD and DS-FL send back down). ``unlabelled``: public inputs
    without targets, for a semi-supervised student (``semi_supervised=true``)."""

    inputs: torch.Tensor
    targets: NDArray[np.float32]
    aggregate: NDArray[np.float32]
    labels: torch.Tensor | None = None
    unlabelled: torch.Tensor | None = None


class TransferSource(Protocol):
    """The transfer inputs of a soft-label strategy and what becomes of their labels."""

    @property
    def probabilities(self) -> bool:
        """Whether replies must be probability rows (noisy shares are not)."""
        ...

    def describe(self) -> str: ...

    def prepare(
        self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord
    ) -> RoundTransfer | None:
        """This round's inputs for ``node_ids``; ``None`` when there is nothing to label."""
        ...

    def distillation_set(
        self, soft_labels: NDArray[np.float32], weights: NDArray[np.float64], *, server_round: int
    ) -> DistillationSet:
        """Turn the accepted ``(K, N, C)`` soft labels (and ``(K,)`` weights) into targets."""
        ...

    def round_metrics(self) -> dict[str, Any]: ...

    def state_records(self) -> StateRecords: ...

    def load_state_records(self, state: StateRecords) -> None: ...


class PublicTransfer:
    """Every round the clients label the whole public transfer set; the aggregator combines them.

    Parameters
    ----------
    inputs : torch.Tensor
        The normalized public inputs, in the order of ``indices``.
    indices : np.ndarray
        Their positions in the public split (what travels down: N int32 values).
    aggregator : Aggregator
        ``(K, N, C)`` soft labels and ``(K,)`` weights to ``(N, C)`` targets.
    labels : torch.Tensor, optional
        Public labels, only when the run allows the server to use them (``public_labels=true``).
    """

    probabilities = True

    def __init__(
        self,
        *,
        inputs: torch.Tensor,
        indices: NDArray[np.integer],
        aggregator: Aggregator,
        labels: torch.Tensor | None = None,
    ) -> None:
        if len(inputs) != len(indices):
            raise ValueError(f"{len(inputs)} public inputs but {len(indices)} indices; they must match.")
        self.inputs = inputs
        self.indices = np.asarray(indices)
        self.aggregator = aggregator
        self.labels = labels

    def describe(self) -> str:
        return f"{len(self.indices)} public transfer inputs, aggregator={getattr(self.aggregator, '__name__', self.aggregator)}"

    def prepare(self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> RoundTransfer:
        return RoundTransfer({TRANSFER_KEY: transfer_record(self.indices)}, num_inputs=len(self.indices))

    def distillation_set(
        self, soft_labels: NDArray[np.float32], weights: NDArray[np.float64], *, server_round: int
    ) -> DistillationSet:
        targets = self.aggregator(soft_labels, weights)
        # Every input has a target here; a semi-supervised student adds consistency on them all.
        return DistillationSet(self.inputs, targets, aggregate=targets, labels=self.labels, unlabelled=self.inputs)

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def state_records(self) -> StateRecords:
        return {}

    def load_state_records(self, state: StateRecords) -> None:
        return None
