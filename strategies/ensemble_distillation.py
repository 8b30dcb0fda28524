"""Ensemble distillation on a public transfer set (FedED / FedDF-style, soft labels only).

Each round the server sends every sampled client the indices of the public transfer inputs;
each client trains its own teacher (any architecture) on its private partition and answers
with its soft labels ``softmax(z / T)`` on those inputs. The server validates the replies,
aggregates them (default: weighted by partition size) and distills the aggregate into the
global student with ``α·T²·KL(p_T ‖ p_S) + (1 − α)·CE``.

What crosses the wire: down, the task config and N int32 indices; up, an ``N × C`` float32
matrix and three scalars. No weights, gradients or raw data leave a client.

References
----------
Sui et al., "FedED: Federated Learning via Ensemble Distillation for Medical Relation
Extraction", EMNLP 2020. Lin et al., "Ensemble Distillation for Robust Model Fusion in
Federated Learning", NeurIPS 2020. Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd.messages import (
    CLIENT_ID,
    EPSILON,
    CONSENSUS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SOFT_LABELS_ARRAY,
    SOFT_LABELS_KEY,
    TASK_KEY,
    TRANSFER_KEY,
    consensus_record,
    synthetic_transfer_record,
    transfer_record,
)
from fedkd.checkpoint import arrays_record
from fedkd.privacy.accountant import PrivacyLedger
from fedkd.student import Student
from strategies.aggregation import Aggregator
from strategies.private_aggregation import ServerPrivacy, WorstClientEpsilon
from strategies.sampling import ClientSampling
from strategies.synthetic_transfer import SyntheticTransfer
from strategies.validation import InvalidReply, log_reasons, validate_soft_labels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftLabelReply:
    """One accepted client reply."""

    client_id: int
    num_examples: int
    probs: np.ndarray
    epsilon: float | None = None  # the client's own DP-SGD budget spent so far


@dataclass(frozen=True)
class ParsedReplies:
    accepted: list[SoftLabelReply]
    failed: list[str]
    rejected: list[str]
    rejected_nodes: list[int]


def parse_soft_label_replies(
    replies: Iterable[Message], *, num_inputs: int, num_classes: int, probabilities: bool = True
) -> ParsedReplies:
    """Split replies into accepted soft labels (sorted by client id), failures and rejections.

    Sorting makes the aggregate independent of the order in which replies arrived.
    ``probabilities=False`` accepts finite rows that are not probability vectors (noisy shares).
    """
    accepted: list[SoftLabelReply] = []
    failed: list[str] = []
    rejected: list[str] = []
    rejected_nodes: list[int] = []
    for reply in replies:
        source = f"node {reply.metadata.src_node_id}"
        if reply.has_error():
            failed.append(f"{source}: {reply.error.reason}")
            continue
        try:
            metrics = reply.content[METRICS_KEY]
            probs = reply.content[SOFT_LABELS_KEY][SOFT_LABELS_ARRAY].numpy()
            probs = validate_soft_labels(
                probs, num_inputs=num_inputs, num_classes=num_classes, probabilities=probabilities
            )
            num_examples = int(metrics[NUM_EXAMPLES])
            if num_examples < 1:
                raise InvalidReply(f"num-examples must be ≥ 1, got {num_examples}.")
            epsilon = float(metrics[EPSILON]) if EPSILON in metrics else None
            accepted.append(SoftLabelReply(int(metrics[CLIENT_ID]), num_examples, probs, epsilon))
        except (KeyError, TypeError, ValueError) as error:
            rejected.append(f"{source}: {error}")
            rejected_nodes.append(int(reply.metadata.src_node_id))
    accepted.sort(key=lambda reply: reply.client_id)
    return ParsedReplies(accepted=accepted, failed=failed, rejected=rejected, rejected_nodes=sorted(rejected_nodes))


class EnsembleDistillation(Strategy):
    """Aggregate client soft labels on a public transfer set and distill them into a student.

    Subclasses that set ``shares_consensus`` also send the last aggregate back down, for the
    clients to digest before their next local training (FedMD, DS-FL).

    Parameters
    ----------
    student : Student
        The server-side student with its transfer inputs.
    transfer_indices : np.ndarray
        Indices (into the public split) of the transfer inputs, in the student's order.
    num_classes : int
        Width of a soft-label row.
    aggregator : Aggregator
        Pure function from ``(K, N, C)`` soft labels and ``(K,)`` weights to ``(N, C)``.
    sampling : ClientSampling
        Which connected clients are asked each round.
    min_replies : int
        A round with fewer valid replies skips distillation and keeps the student as it was.
    synthetic : SyntheticTransfer, optional
        Data-free mode: each round the transfer set is pooled from synthetic inputs the clients
        invert from their teachers (see :mod:`strategies.synthetic_transfer`), instead of the
        public inputs named by ``transfer_indices``.
    server_privacy : ServerPrivacy, optional
        ``privacy=gaussian|gnmax``: each round a fresh batch of public inputs is labelled and its
        aggregate released through the mechanism (replacing ``aggregator``); the student learns
        from every released batch so far.
    client_privacy_delta : float, optional
        ``privacy=dpsgd``: clients report their ε; the round reports the worst at this δ.
    """

    def __init__(
        self,
        *,
        student: Student,
        transfer_indices: np.ndarray,
        num_classes: int,
        aggregator: Aggregator,
        sampling: ClientSampling = ClientSampling(),
        min_replies: int = 1,
        synthetic: SyntheticTransfer | None = None,
        server_privacy: ServerPrivacy | None = None,
        client_privacy_delta: float | None = None,
    ) -> None:
        self.student = student
        self.server_privacy = server_privacy
        self.client_privacy_delta = client_privacy_delta
        self.client_epsilons = WorstClientEpsilon()
        # Private release: all public inputs, this round's query positions, and every release so far.
        self._public_inputs = student.transfer_inputs
        self._round_positions: np.ndarray | None = None
        self._released: list[tuple[np.ndarray, np.ndarray]] = []
        self.transfer_indices = np.asarray(transfer_indices)
        self.synthetic = synthetic
        self._num_inputs = len(self.transfer_indices)
        self._synthesis_rejected = 0
        # Synthetic mode: this round's decoded pool, and earlier pools with their soft labels.
        self._round_inputs: torch.Tensor | None = None
        self._bank: list[tuple[torch.Tensor, np.ndarray]] = []
        self.num_classes = num_classes
        self.aggregator = aggregator
        self.sampling = sampling
        self.min_replies = min_replies
        self.consensus: np.ndarray | None = None

    shares_consensus = False

    def summary(self) -> None:
        transfer = (
            f"{len(self.transfer_indices)} public transfer inputs"
            if self.synthetic is None
            else f"synthetic transfer, {self.synthetic.per_client} inputs per client"
        )
        logger.info(
            "%s: %s, aggregator=%s, fraction_train=%.2f, "
            "min_replies=%d",
            type(self).__name__,
            transfer,
            getattr(self.aggregator, "__name__", self.aggregator),
            self.sampling.fraction,
            self.min_replies,
        )
        if self.server_privacy is not None:
            privacy = self.server_privacy
            logger.info(
                "privacy=%s: %d queries per round, noise multiplier %.4g (noise std %.4g) for "
                "ε=%s at δ=%g over the run",
                privacy.config.mechanism, privacy.queries, privacy.noise_multiplier,
                privacy.noise_std, privacy.config.epsilon, privacy.config.delta,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask each sampled client for soft labels on the transfer inputs (no weights sent).

        With synthetic transfer, first query the same clients for synthetic inputs and pool them.
        """
        task = ConfigRecord({**config, "server-round": server_round})
        node_ids = self.sampling.select(grid, server_round=server_round)
        content = {TASK_KEY: task}
        if self.server_privacy is not None:
            self._round_positions = self.server_privacy.query_positions(server_round)
            self._num_inputs = len(self._round_positions)
            content[TASK_KEY] = ConfigRecord({**task, **self.server_privacy.client_task()})
            content[TRANSFER_KEY] = transfer_record(self.transfer_indices[self._round_positions])
        elif self.synthetic is None:
            content[TRANSFER_KEY] = transfer_record(self.transfer_indices)
        else:
            pool = self.synthetic.gather(grid, node_ids, task)
            log_reasons(logger, server_round, "synthesis failed", pool.failed)
            log_reasons(logger, server_round, "synthetic inputs rejected", pool.rejected)
            self._synthesis_rejected = len(pool.rejected)
            self._num_inputs = len(pool.images)
            if self._num_inputs == 0:
                logger.warning("round %d: no client sent synthetic inputs; nothing to label.", server_round)
                return []
            self._round_inputs = self.synthetic.decode(pool.images)
            content[TRANSFER_KEY] = synthetic_transfer_record(pool.images)
        if self.shares_consensus and self.consensus is not None:
            content[CONSENSUS_KEY] = consensus_record(self.transfer_indices, self.consensus)
        return [
            Message(
                RecordDict(content),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id in node_ids
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, aggregate and distill; returns the student's weights and round metrics."""
        noisy_shares = self.server_privacy is not None and self.server_privacy.noise_at_clients
        parsed = parse_soft_label_replies(
            replies, num_inputs=self._num_inputs, num_classes=self.num_classes, probabilities=not noisy_shares
        )
        for reply in parsed.accepted:
            if reply.epsilon is not None:
                self.client_epsilons.update(reply.client_id, reply.epsilon)
        log_reasons(logger, server_round, "client failed", parsed.failed)
        log_reasons(logger, server_round, "reply rejected", parsed.rejected)
        metrics = {
            "clients": len(parsed.accepted),
            "failed": len(parsed.failed),
            "rejected": len(parsed.rejected) + self._synthesis_rejected,
            "rejected-nodes": parsed.rejected_nodes,
        }
        if self.synthetic is not None:
            metrics["synthetic-inputs"] = self._num_inputs
        if len(parsed.accepted) < self.min_replies:
            logger.warning(
                "round %d: %d valid replies, fewer than min_replies=%d; the student is unchanged.",
                server_round,
                len(parsed.accepted),
                self.min_replies,
            )
            return None, MetricRecord({**metrics, **self._privacy_metrics()})
        soft_labels = np.stack([reply.probs for reply in parsed.accepted])
        if self.server_privacy is not None:
            targets = self._released_transfer_set(self.server_privacy.release(soft_labels, server_round=server_round))
            metrics["distill-inputs"] = len(targets)
        else:
            weights = np.array([reply.num_examples for reply in parsed.accepted], dtype=np.float64)
            targets = self.aggregator(soft_labels, weights)
        if self.shares_consensus:
            self.consensus = targets
        if self.synthetic is not None:
            targets = self._synthetic_transfer_set(targets)
            metrics["distill-inputs"] = len(targets)
        metrics["distill-loss"] = self.student.learn(targets, server_round=server_round)
        return self.student.arrays(), MetricRecord({**metrics, **self._privacy_metrics()})

    def _privacy_metrics(self) -> dict[str, float]:
        """Cumulative ε and δ of the run so far, when privacy is on."""
        if self.server_privacy is not None:
            return {"epsilon": self.server_privacy.epsilon(), "delta": self.server_privacy.config.delta}
        if self.client_privacy_delta is not None:
            return {"epsilon": self.client_epsilons.epsilon(), "delta": self.client_privacy_delta}
        return {}

    def privacy_state(self) -> dict[str, object] | None:
        """What a checkpoint keeps of the accounting: the server's ledger, or each client's ε."""
        if self.server_privacy is not None:
            privacy = self.server_privacy
            return {
                "mechanism": privacy.config.mechanism,
                "noise_multiplier": privacy.noise_multiplier,
                "ledger": privacy.ledger.to_record(),
                "delta": privacy.config.delta,
            }
        if self.client_privacy_delta is not None:
            return {
                "mechanism": "dpsgd",
                "client_epsilon": {str(k): v for k, v in sorted(self.client_epsilons.by_client.items())},
                "delta": self.client_privacy_delta,
            }
        return None

    def state_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """What this strategy carries from one round to the next, for checkpoints."""
        arrays: dict[str, np.ndarray] = {}
        if self.consensus is not None:
            arrays["consensus"] = self.consensus
        for index, (positions, labels) in enumerate(self._released):
            arrays[f"released-positions-{index}"], arrays[f"released-labels-{index}"] = positions, labels
        for index, (inputs, labels) in enumerate(self._bank):
            arrays[f"bank-inputs-{index}"], arrays[f"bank-labels-{index}"] = inputs.numpy(), labels
        clients = sorted(self.client_epsilons.by_client)
        state: dict[str, ArrayRecord | ConfigRecord] = {
            "arrays": arrays_record(arrays),
            "counts": ConfigRecord({"released": len(self._released), "bank": len(self._bank)}),
            "client-epsilons": ConfigRecord(
                {"clients": clients, "epsilons": [self.client_epsilons.by_client[c] for c in clients]}
            ),
        }
        if self.server_privacy is not None:
            state["server-ledger"] = ConfigRecord(self.server_privacy.ledger.to_record())
        return state

    def load_state_records(self, state: dict[str, ArrayRecord | ConfigRecord]) -> None:
        """Continue from :meth:`state_records` of an earlier run of the same configuration."""
        arrays = {name: array.numpy() for name, array in state["arrays"].items()}
        counts = state["counts"]
        self.consensus = arrays.get("consensus")
        self._released = [
            (arrays[f"released-positions-{i}"], arrays[f"released-labels-{i}"]) for i in range(int(counts["released"]))
        ]
        self._bank = [
            (torch.from_numpy(arrays[f"bank-inputs-{i}"].copy()), arrays[f"bank-labels-{i}"])
            for i in range(int(counts["bank"]))
        ]
        epsilons = state["client-epsilons"]
        for client, epsilon in zip(epsilons["clients"], epsilons["epsilons"]):
            self.client_epsilons.update(int(client), float(epsilon))
        if self.server_privacy is not None:
            self.server_privacy.ledger = PrivacyLedger.from_record(state["server-ledger"])
        if self._released:
            positions = np.concatenate([batch for batch, _ in self._released])
            self.student.transfer_inputs = self._public_inputs[torch.from_numpy(positions)]
        if self._bank and self.synthetic is not None and self.synthetic.keep_pools:
            self.student.transfer_inputs = torch.cat([inputs for inputs, _ in self._bank])

    def _released_transfer_set(self, targets: np.ndarray) -> np.ndarray:
        """Point the student at every privately released batch so far (post-processing is free)."""
        assert self._round_positions is not None
        self._released.append((self._round_positions, targets))
        positions = np.concatenate([batch for batch, _ in self._released])
        self.student.transfer_inputs = self._public_inputs[torch.from_numpy(positions)]
        return np.concatenate([labels for _, labels in self._released])

    def _synthetic_transfer_set(self, targets: np.ndarray) -> np.ndarray:
        """Point the student at this round's pool, or at every pool so far (``keep_pools``)."""
        assert self.synthetic is not None and self._round_inputs is not None
        if not self.synthetic.keep_pools:
            self.student.transfer_inputs = self._round_inputs
            return targets
        self._bank.append((self._round_inputs, targets))
        self.student.transfer_inputs = torch.cat([inputs for inputs, _ in self._bank])
        return np.concatenate([labels for _, labels in self._bank])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The student is evaluated centrally on the test split; clients are not asked."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
