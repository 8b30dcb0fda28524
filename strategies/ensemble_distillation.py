"""Ensemble distillation on a public transfer set (FedED / FedDF-style, soft labels only).

Each round the server sends every sampled client the indices of the public transfer inputs;
each client trains its own teacher (any architecture) on its private partition and answers
with its soft labels ``softmax(z / T)`` on those inputs. The server validates the replies,
aggregates them (default: weighted by partition size) and distills the aggregate into the
global student with ``α·T²·KL(p_T ‖ p_S) + (1 − α)·CE``.

Where the transfer inputs come from — the public split, a pool the clients synthesize, or a
privately released batch of queries — is the strategy's :class:`~strategies.transfer.TransferSource`.

What crosses the wire (public transfer): down, the task config and N int32 indices, and with
co-distillation (``strategy.consensus_weight`` > 0, the default on public inputs without privacy)
from round 2 the last round's aggregate as ``N × C`` float16 with its N int32 positions; up, an
``N × C`` float32 matrix, three scalars and (``class_weighted``) C class counts. No weights,
gradients or raw data leave a client.

References
----------
Sui et al., "FedED: Federated Learning via Ensemble Distillation for Medical Relation
Extraction", EMNLP 2020. Lin et al., "Ensemble Distillation for Robust Model Fusion in
Federated Learning", NeurIPS 2020. Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015. Chang et al., "Cronus: Robust and Heterogeneous Collaborative Learning with
Black-Box Knowledge Transfer", 2019 (the consensus learned beside the private data).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd.checkpoint import arrays_record
from fedkd.messages import (
    CLASS_COUNTS,
    CONSENSUS_KEY,
    EPSILON,
    METRICS_KEY,
    NUM_EXAMPLES,
    SOFT_LABELS_ARRAY,
    SOFT_LABELS_KEY,
    TASK_KEY,
    array_record,
    consensus_record,
    metric_record,
    number,
    values,
)
from fedkd.privacy.config import PrivacyConfig
from fedkd.student import Student
from strategies.aggregation import PER_CLASS_WEIGHTS
from strategies.pate_release import PATERelease
from strategies.private_aggregation import PrivateRelease, ServerPrivacy, WorstClientEpsilon
from strategies.registry import BuildContext, StateRecords, StrategySpec, register
from strategies.sampling import ClientSampling
from strategies.synthetic_transfer import SyntheticTransfer
from strategies.transfer import DistillationSet, PublicTransfer, TransferSource, stored
from strategies.validation import InvalidReply, Triage, triage, validate_soft_labels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftLabelReply:
    """One accepted client reply."""

    num_examples: int
    probs: np.ndarray
    epsilon: float | None = None  # the client's own DP-SGD budget spent so far
    class_counts: np.ndarray | None = None  # examples per class (strategy.aggregator=class_weighted)


def parse_soft_label_replies(
    replies: Iterable[Message],
    *,
    num_inputs: int,
    num_classes: int,
    probabilities: bool = True,
    class_counts: bool = False,
) -> Triage[SoftLabelReply]:
    """Accepted soft labels (in client-id order), failures and rejections.

    ``probabilities=False`` accepts finite rows that are not probability vectors (noisy shares).
    ``class_counts=True``: every reply must carry its client's class counts.
    """

    def parse(reply: Message) -> SoftLabelReply:
        metrics = metric_record(reply.content, METRICS_KEY)
        probs = validate_soft_labels(
            array_record(reply.content, SOFT_LABELS_KEY)[SOFT_LABELS_ARRAY].numpy(),
            num_inputs=num_inputs,
            num_classes=num_classes,
            probabilities=probabilities,
        )
        num_examples = int(number(metrics, NUM_EXAMPLES))
        if num_examples < 1:
            raise InvalidReply(f"num-examples must be ≥ 1, got {num_examples}.")
        epsilon = number(metrics, EPSILON) if EPSILON in metrics else None
        counts = parse_class_counts(metrics, num_classes=num_classes) if class_counts else None
        return SoftLabelReply(num_examples, probs, epsilon, counts)

    return triage(replies, parse)


def parse_class_counts(metrics: MetricRecord, *, num_classes: int) -> np.ndarray:
    """A reply's per-class example counts: ``num_classes`` non-negative integers, not all zero."""
    if CLASS_COUNTS not in metrics:
        raise InvalidReply(f"{CLASS_COUNTS} missing; strategy.aggregator=class_weighted needs every client's.")
    counts = np.asarray(values(metrics, CLASS_COUNTS))
    if counts.shape != (num_classes,) or counts.dtype.kind not in "iu" or np.any(counts < 0) or counts.sum() < 1:
        raise InvalidReply(f"{CLASS_COUNTS} must be {num_classes} non-negative integers, not all zero; got {counts}.")
    return counts.astype(np.float64)


class EnsembleDistillation(Strategy):
    """Aggregate client soft labels on transfer inputs and distill them into a student.

    Subclasses that set ``shares_consensus`` also send the last aggregate back down, for the
    clients to digest before their next local training (FedMD, DS-FL); so does any run with
    ``co_distillation``, whose clients learn from it during their local training.

    Parameters
    ----------
    student : Student
        The server-side student.
    source : TransferSource
        Where each round's transfer inputs come from and how their labels become targets.
    num_classes : int
        Width of a soft-label row.
    sampling : ClientSampling
        Which connected clients are asked each round.
    min_replies : int
        A round with fewer valid replies skips distillation and keeps the student as it was.
    client_privacy : PrivacyConfig, optional
        ``privacy=dpsgd``: clients report their ε; the round reports the worst at the run's δ.
    weights_by_class : bool
        The aggregator weighs clients per class (``class_weighted``): each reply carries the
        client's class counts, which replace the partition sizes as weights.
    co_distillation : bool
        Send the last round's aggregate on the public inputs down (``strategy.consensus_weight`` > 0).
    """

    shares_consensus = False
    evaluates_on_clients = False

    def __init__(
        self,
        *,
        student: Student,
        source: TransferSource,
        num_classes: int,
        sampling: ClientSampling = ClientSampling(),
        min_replies: int = 1,
        client_privacy: PrivacyConfig | None = None,
        weights_by_class: bool = False,
        co_distillation: bool = False,
    ) -> None:
        self.sends_consensus = self.shares_consensus or co_distillation
        self.student = student
        self.weights_by_class = weights_by_class
        self.source = source
        self.num_classes = num_classes
        self.sampling = sampling
        self.min_replies = min_replies
        self.client_privacy = client_privacy
        self.client_epsilons = WorstClientEpsilon()
        self.consensus: np.ndarray | None = None
        self._num_inputs = 0

    def summary(self) -> None:
        logger.info(
            "%s: %s, fraction_train=%.2f, min_replies=%d",
            type(self).__name__,
            self.source.describe(),
            self.sampling.fraction,
            self.min_replies,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each sampled client for soft labels on this round's transfer inputs (no weights sent)."""
        task = ConfigRecord({**config, "server-round": server_round})
        node_ids = self.sampling.select(grid, server_round=server_round)
        transfer = self.source.prepare(server_round, grid, node_ids, task)
        if transfer is None:
            return []
        self._num_inputs = transfer.num_inputs
        content: dict[str, Any] = {TASK_KEY: ConfigRecord({**task, **transfer.task}), **transfer.records}
        content.update(self.consensus_records())
        return [
            Message(RecordDict(content), dst_node_id=node_id, message_type=MessageType.TRAIN) for node_id in node_ids
        ]

    def consensus_records(self) -> dict[str, ArrayRecord]:
        """The last round's aggregate and the public inputs it labels, where the consensus travels down."""
        if not self.sends_consensus or self.consensus is None:
            return {}
        if not isinstance(self.source, PublicTransfer):
            raise TypeError(f"the consensus labels public inputs; this run's transfer is {self.source.describe()}.")
        return {CONSENSUS_KEY: consensus_record(self.source.indices, self.consensus)}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, aggregate and distill; returns the student's weights and round metrics."""
        parsed = parse_soft_label_replies(
            replies,
            num_inputs=self._num_inputs,
            num_classes=self.num_classes,
            probabilities=self.source.probabilities,
            class_counts=self.weights_by_class,
        )
        for client_id, reply in parsed.accepted:
            if reply.epsilon is not None:
                self.client_epsilons.update(client_id, reply.epsilon)
        parsed.log(logger, server_round)
        metrics: dict[str, Any] = {
            "clients": len(parsed.accepted),
            "failed": len(parsed.failed),
            "rejected-nodes": parsed.rejected_nodes,
        }
        if len(parsed.accepted) < self.min_replies:
            logger.warning(
                "round %d: %d valid replies, fewer than min_replies=%d; the student is unchanged.",
                server_round,
                len(parsed.accepted),
                self.min_replies,
            )
            return None, MetricRecord(self._round_metrics(metrics, parsed))
        soft_labels = np.stack([reply.probs for reply in parsed.payloads])
        weights = (
            np.stack([reply.class_counts for reply in parsed.payloads if reply.class_counts is not None])
            if self.weights_by_class
            else np.array([reply.num_examples for reply in parsed.payloads], dtype=np.float64)
        )
        learned = self.source.distillation_set(
            soft_labels, weights, server_round=server_round, client_ids=parsed.client_ids
        )
        if self.sends_consensus:
            self.consensus = learned.aggregate
        metrics["distill-loss"] = self._distill(learned, server_round)
        return self.student.arrays(), MetricRecord(self._round_metrics(metrics, parsed))

    def _distill(self, learned: DistillationSet, server_round: int) -> float:
        return self.student.learn(
            learned.inputs,
            learned.targets,
            server_round=server_round,
            labels=learned.labels,
            unlabelled=learned.unlabelled,
        )

    def _round_metrics(self, metrics: dict[str, Any], parsed: Triage[SoftLabelReply]) -> dict[str, Any]:
        source = self.source.round_metrics()
        # A round's rejections count the soft-label replies and any synthetic inputs refused.
        rejected = len(parsed.rejected) + int(source.pop("synthesis-rejected", 0))
        return {**metrics, "rejected": rejected, **source, **self._client_privacy_metrics()}

    def _client_privacy_metrics(self) -> dict[str, float]:
        """The worst ε any DP-SGD client has reported so far."""
        if self.client_privacy is None:
            return {}
        return {"epsilon": self.client_epsilons.epsilon(), "delta": self.client_privacy.delta}

    def privacy_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the accounting: the server's ledger, or each client's ε."""
        if isinstance(self.source, (PrivateRelease, PATERelease)):
            return self.source.privacy_state()
        if self.client_privacy is not None:
            return {
                "mechanism": "dpsgd",
                "client_epsilon": {str(k): v for k, v in sorted(self.client_epsilons.by_client.items())},
                "delta": self.client_privacy.delta,
                "adjacency": self.client_privacy.adjacency,
            }
        return None

    def state_records(self) -> StateRecords:
        """What this strategy and its source carry from one round to the next, for checkpoints."""
        clients = sorted(self.client_epsilons.by_client)
        state: StateRecords = {f"source/{key}": record for key, record in self.source.state_records().items()}
        state["client-epsilons"] = ConfigRecord(
            {"clients": clients, "epsilons": [self.client_epsilons.by_client[c] for c in clients]}
        )
        if self.consensus is not None:
            state["consensus"] = arrays_record({"probs": self.consensus})
        return state

    def load_state_records(self, state: StateRecords) -> None:
        prefix = "source/"
        self.source.load_state_records(
            {key[len(prefix) :]: record for key, record in state.items() if key.startswith(prefix)}
        )
        epsilons = stored(state, "client-epsilons", ConfigRecord)
        for client, epsilon in zip(values(epsilons, "clients"), values(epsilons, "epsilons"), strict=True):
            self.client_epsilons.update(int(client), float(epsilon))
        consensus = state.get("consensus")
        if isinstance(consensus, ArrayRecord):
            self.consensus = consensus["probs"].numpy()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The student is evaluated centrally on the test split; clients are not asked."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def transfer_source(context: BuildContext) -> TransferSource:
    """The run's transfer source: synthetic pool, private release or the public set."""
    config = context.config
    if config.transfer == "synthetic":
        return SyntheticTransfer(
            info=context.info,
            per_client=config.synthesis.per_client,
            aggregator=context.aggregator,
            keep_pools=config.synthesis.keep_pools,
            replay_inputs=config.synthesis.replay_inputs,
            seed=config.seed,
            timeout=config.round_timeout,
        )
    if config.privacy.mechanism == "pate":
        public = context.public_transfer()
        return PATERelease(
            config=config.privacy,
            inputs=public.inputs,
            indices=public.indices,
            num_teachers=config.num_clients * config.privacy.teachers_per_client,
            seed=config.seed,
        )
    if config.privacy.on_server:
        public = context.public_transfer()
        privacy = ServerPrivacy(
            config.privacy,
            rounds=config.rounds,
            num_public=len(public.inputs),
            expected_clients=context.expected_clients,
            min_replies=config.strategy.min_replies,
            seed=config.seed,
        )
        return PrivateRelease(privacy=privacy, inputs=public.inputs, indices=public.indices)
    return context.public_transfer()


def client_privacy(context: BuildContext) -> PrivacyConfig | None:
    """DP-SGD clients report their ε; the strategy reports the worst at the run's δ."""
    privacy = context.config.privacy
    return privacy if privacy.mechanism == "dpsgd" else None


Distiller = TypeVar("Distiller", bound=EnsembleDistillation)


def build_soft_label_strategy(kind: type[Distiller], context: BuildContext, source: TransferSource) -> Distiller:
    """A soft-label strategy of class ``kind`` for the run, learning from ``source``."""
    return kind(
        student=context.student(),
        source=source,
        num_classes=context.info.num_classes,
        sampling=context.sampling,
        min_replies=context.config.strategy.min_replies,
        client_privacy=client_privacy(context),
        weights_by_class=context.config.aggregator in PER_CLASS_WEIGHTS,
        co_distillation=context.config.consensus_weight > 0,
    )


def build(context: BuildContext) -> EnsembleDistillation:
    return build_soft_label_strategy(EnsembleDistillation, context, transfer_source(context))


register(
    StrategySpec(
        name="ensemble_distillation",
        client_mode="soft-labels",
        build=build,
        privacy=("dpsgd", "gaussian", "gnmax", "pate"),
        synthetic_transfer=True,
        attacks=True,
        aggregators=True,
        mixup_views=True,
        needs_public_set=True,
        co_distillation=True,
    )
)
