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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.messages import TRANSFER_KEY, transfer_record
from fedkd.mixup import MixupPairs, draw_pairs, mix
from fedkd.seeding import SeedPurpose, numpy_generator
from strategies.aggregation import Aggregator, retemper, running_average
from strategies.robust_aggregation import REPUTATION_DECAY, Reputation, trust_weighted

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


@runtime_checkable
class ClientAggregator(Protocol):
    """Combines a round's accepted soft labels, knowing which client sent which row.

    The plain :data:`~strategies.aggregation.Aggregator` functions see only the stack; an
    aggregator that keeps state across rounds (reputation) needs the client ids, and one that
    may use public labels (a root set) needs those too.
    """

    @property
    def name(self) -> str: ...

    def aggregate(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        client_ids: Sequence[int],
        labels: NDArray[np.integer] | None = None,
    ) -> NDArray[np.float32]: ...

    def state_records(self) -> StateRecords: ...

    def load_state_records(self, state: StateRecords) -> None: ...


@dataclass(frozen=True)
class StatelessAggregation:
    """A plain aggregator function, as a :class:`ClientAggregator` (no state, ignores ids and labels)."""

    function: Aggregator

    @property
    def name(self) -> str:
        function = getattr(self.function, "func", self.function)  # a functools.partial: what it binds
        return str(getattr(function, "__name__", function))

    def aggregate(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        client_ids: Sequence[int],
        labels: NDArray[np.integer] | None = None,
    ) -> NDArray[np.float32]:
        return self.function(soft_labels, weights)

    def state_records(self) -> StateRecords:
        return {}

    def load_state_records(self, state: StateRecords) -> None:
        return None


class RobustAggregation:
    """``strategy.aggregator=robust``: per-class trust, with each client's reputation carried
    across rounds (and checkpointed) and, where the server may use public labels, those labels
    as the reference (FLTrust's root set). See :mod:`strategies.robust_aggregation`."""

    name = "robust"

    def __init__(self, num_classes: int, *, decay: float = REPUTATION_DECAY) -> None:
        self.reputation = Reputation(num_classes, decay=decay)

    def aggregate(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        client_ids: Sequence[int],
        labels: NDArray[np.integer] | None = None,
    ) -> NDArray[np.float32]:
        if len(client_ids) != soft_labels.shape[0]:
            raise ValueError(f"{soft_labels.shape[0]} soft-label matrices but {len(client_ids)} client ids.")
        result = trust_weighted(
            soft_labels,
            weights,
            reputation=self.reputation.of(client_ids),
            population=self.reputation.everyone(),
            labels=labels,
        )
        self.reputation.update(client_ids, result.evidence)
        return result.targets

    def state_records(self) -> StateRecords:
        return {"reputation": arrays_record(self.reputation.arrays())}

    def load_state_records(self, state: StateRecords) -> None:
        record = stored(state, "reputation", ArrayRecord)
        self.reputation.load_arrays({key: record[key].numpy() for key in ("clients", "claimed", "confirmed")})


@dataclass(frozen=True)
class PostProcessed:
    """A :class:`ClientAggregator` followed by a step on its ``(N, C)`` result (DS-FL's ERA), and
    optionally preceded by one on the clients' ``(K, N, C)`` rows (:func:`retempered`)."""

    inner: ClientAggregator
    step: Callable[[NDArray[np.float32]], NDArray[np.float32]]
    step_name: str
    before: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None

    @property
    def name(self) -> str:
        return f"{self.step_name}({self.inner.name})"

    def aggregate(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        client_ids: Sequence[int],
        labels: NDArray[np.integer] | None = None,
    ) -> NDArray[np.float32]:
        rows = soft_labels if self.before is None else self.before(soft_labels)
        return self.step(self.inner.aggregate(rows, weights, client_ids=client_ids, labels=labels))

    def state_records(self) -> StateRecords:
        return self.inner.state_records()

    def load_state_records(self, state: StateRecords) -> None:
        self.inner.load_state_records(state)


class RoundAveraged:
    """A :class:`ClientAggregator` whose result is the running average of ``inner``'s results over
    the rounds (:func:`strategies.aggregation.running_average`), kept in the checkpoint.

    Only for a transfer set that is the same every round (the public set without mixup views):
    the rows of two rounds must describe the same inputs.
    """

    def __init__(self, inner: ClientAggregator, *, decay: float) -> None:
        running_average(None, np.zeros((0, 0)), decay=decay)  # refuses a bad decay now
        self.inner, self.decay = inner, decay
        self.average: NDArray[np.float64] | None = None

    @property
    def name(self) -> str:
        return f"{self.inner.name}, averaged over rounds with decay {self.decay:g}"

    def aggregate(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        client_ids: Sequence[int],
        labels: NDArray[np.integer] | None = None,
    ) -> NDArray[np.float32]:
        current = self.inner.aggregate(soft_labels, weights, client_ids=client_ids, labels=labels)
        self.average = running_average(self.average, current, decay=self.decay)
        return self.average.astype(np.float32)

    def state_records(self) -> StateRecords:
        state = self.inner.state_records()
        if self.average is not None:
            state["round-average"] = arrays_record({"targets": self.average})
        return state

    def load_state_records(self, state: StateRecords) -> None:
        self.inner.load_state_records(state)
        record = state.get("round-average")
        self.average = record["targets"].numpy() if isinstance(record, ArrayRecord) else None


def retempered(inner: ClientAggregator, *, sent_at: float, combined_at: float) -> PostProcessed:
    """``inner`` combining the clients' rows at temperature ``combined_at`` instead of ``sent_at``.

    The clients send ``softmax(z / T)`` at the run's temperature ``T = sent_at``; the rows are
    re-tempered to ``combined_at``, combined, and the aggregate is re-tempered back to ``T`` for
    the student (:func:`strategies.aggregation.retemper`). Softened rows suit the student's loss;
    on strongly non-IID partitions they suit the combination less, since a client softened to
    T = 4 spreads probability over classes it never saw.
    """
    return PostProcessed(
        inner,
        step=functools.partial(retemper, from_temperature=combined_at, to_temperature=sent_at),
        step_name=f"combined at T={combined_at:g}",
        before=functools.partial(retemper, from_temperature=sent_at, to_temperature=combined_at),
    )


def client_aggregator(aggregator: Aggregator | ClientAggregator) -> ClientAggregator:
    """``aggregator`` as a :class:`ClientAggregator` (a plain function becomes stateless)."""
    if isinstance(aggregator, ClientAggregator):
        return aggregator
    return StatelessAggregation(aggregator)


def aggregator_state(aggregator: ClientAggregator) -> StateRecords:
    """The aggregator's checkpoint records under ``aggregator/`` keys, beside a source's own."""
    return {f"aggregator/{key}": record for key, record in aggregator.state_records().items()}


def load_aggregator_state(aggregator: ClientAggregator, state: StateRecords) -> None:
    prefix = "aggregator/"
    aggregator.load_state_records({key[len(prefix) :]: r for key, r in state.items() if key.startswith(prefix)})


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
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        server_round: int,
        client_ids: Sequence[int],
    ) -> DistillationSet:
        """Turn the accepted ``(K, N, C)`` soft labels (and ``(K,)`` weights) of ``client_ids``
        into targets."""
        ...

    def round_metrics(self) -> dict[str, Any]: ...

    def state_records(self) -> StateRecords: ...

    def load_state_records(self, state: StateRecords) -> None: ...


class PublicTransfer:
    """Every round the clients label the whole public transfer set; the aggregator combines them.

    With ``mixup_views`` > 0 the clients also label that many fresh mixed pairs of public inputs
    each round (:mod:`fedkd.mixup`); the student then learns from the public inputs with this
    round's targets and from every round's views with the targets they got in their round.

    Parameters
    ----------
    inputs : torch.Tensor
        The normalized public inputs, in the order of ``indices``.
    indices : np.ndarray
        Their positions in the public split (what travels down: N int32 values).
    aggregator : Aggregator or ClientAggregator
        ``(K, N, C)`` soft labels and ``(K,)`` weights to ``(N, C)`` targets.
    labels : torch.Tensor, optional
        Public labels, only when the run allows the server to use them (``public_labels=true``).
    mixup_views : int
        Mixed pairs labelled per round (down: two int32 positions and a float32 weight each).
    seed : int
        The run's seed; each round's pairs derive from it.
    """

    probabilities = True

    def __init__(
        self,
        *,
        inputs: torch.Tensor,
        indices: NDArray[np.integer],
        aggregator: Aggregator | ClientAggregator,
        labels: torch.Tensor | None = None,
        mixup_views: int = 0,
        seed: int = 0,
    ) -> None:
        if len(inputs) != len(indices):
            raise ValueError(f"{len(inputs)} public inputs but {len(indices)} indices; they must match.")
        if mixup_views and labels is not None:
            raise ValueError("mixup views have no labels; public labels cannot be used beside them.")
        self.inputs = inputs
        self.indices = np.asarray(indices)
        self.aggregator = client_aggregator(aggregator)
        self.labels = labels
        self.mixup_views = mixup_views
        self.seed = seed
        self._round_pairs: MixupPairs | None = None
        # Every round's views so far, and the targets each got in its round.
        self.kept_pairs = MixupPairs.concatenate([])
        self.kept_targets = np.zeros((0, 0), dtype=np.float32)

    def describe(self) -> str:
        views = f" and {self.mixup_views} mixup views per round" if self.mixup_views else ""
        return f"{len(self.indices)} public transfer inputs{views}, aggregator={self.aggregator.name}"

    def prepare(self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> RoundTransfer:
        self._round_pairs = None
        if self.mixup_views:
            rng = numpy_generator(self.seed, server_round, SeedPurpose.MIXUP_VIEWS)
            self._round_pairs = draw_pairs(self.indices, self.mixup_views, rng)
        num_views = 0 if self._round_pairs is None else len(self._round_pairs)
        return RoundTransfer(
            {TRANSFER_KEY: transfer_record(self.indices, self._round_pairs)},
            num_inputs=len(self.indices) + num_views,
        )

    def distillation_set(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        server_round: int,
        client_ids: Sequence[int] = (),
    ) -> DistillationSet:
        # Public labels, where the run lets the server use them, are a trusted root set.
        root = None if self.labels is None else self.labels.numpy()
        if self._round_pairs is None:
            targets = self.aggregator.aggregate(soft_labels, weights, client_ids=client_ids, labels=root)
            # Every input has a target here; a semi-supervised student adds consistency on them all.
            return DistillationSet(self.inputs, targets, aggregate=targets, labels=self.labels, unlabelled=self.inputs)
        everything = self.aggregator.aggregate(soft_labels, weights, client_ids=client_ids, labels=None)
        public_targets, view_targets = everything[: len(self.indices)], everything[len(self.indices) :]
        self.kept_pairs = MixupPairs.concatenate([self.kept_pairs, self._round_pairs])
        self.kept_targets = (
            view_targets if not len(self.kept_targets) else np.concatenate([self.kept_targets, view_targets])
        )
        views = mix(
            self.inputs[self._positions(self.kept_pairs.first)],
            self.inputs[self._positions(self.kept_pairs.second)],
            self.kept_pairs.weight,
        )
        return DistillationSet(
            torch.cat([self.inputs, views]),
            np.concatenate([public_targets, self.kept_targets]),
            aggregate=public_targets,
            unlabelled=self.inputs,
        )

    def _positions(self, public_positions: NDArray[np.integer]) -> torch.Tensor:
        """Rows of ``self.inputs`` that hold the given public-split positions."""
        order = np.argsort(self.indices)
        rows = order[np.searchsorted(self.indices, public_positions, sorter=order)]
        return torch.from_numpy(rows.astype(np.int64))

    def round_metrics(self) -> dict[str, Any]:
        return {"mixup-views": len(self.kept_pairs)} if self.mixup_views else {}

    def state_records(self) -> StateRecords:
        state = aggregator_state(self.aggregator)
        if self.mixup_views:
            state["mixup-views"] = arrays_record(
                {
                    "first": self.kept_pairs.first,
                    "second": self.kept_pairs.second,
                    "weight": self.kept_pairs.weight,
                    "targets": self.kept_targets,
                }
            )
        return state

    def load_state_records(self, state: StateRecords) -> None:
        load_aggregator_state(self.aggregator, state)
        if self.mixup_views:
            record = stored(state, "mixup-views", ArrayRecord)
            self.kept_pairs = MixupPairs(record["first"].numpy(), record["second"].numpy(), record["weight"].numpy())
            self.kept_targets = record["targets"].numpy()
