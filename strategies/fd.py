"""FD: federated distillation with per-class average logits and no public data.

Each client trains on its private data with cross-entropy plus ``β ×`` a distillation term that
pulls its output on every example of class ``c`` toward the global average logit vector of
class ``c``. After training it computes its own average logit vector for each class and sends
the ``C × C`` matrix with its per-class example counts. The server averages each class's rows,
weighted by the counts, and sends the global matrix back next round.

FD has no global model. Every client evaluates its own model on the test split, and
``student_accuracy`` for this strategy is the example-weighted mean of those accuracies.

What crosses the wire: up, a ``C × C`` float32 matrix, ``C`` int64 class counts (these reveal
the client's label distribution) and three scalars; down, the task config and the ``C × C``
global matrix.

Reference
---------
Jeong, Oh, Kim, Bennis, Kim, "Communication-Efficient On-Device Machine Learning: Federated
Distillation and Augmentation under Non-IID Private Data", NeurIPS 2018 Workshop on Machine
Learning on the Phone and other Consumer Devices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.messages import (
    CLASS_LOGITS_KEY,
    COUNTS,
    LOGITS,
    METRICS_KEY,
    NUM_EXAMPLES,
    TASK_KEY,
    array_record,
    class_logits_record,
    metric_record,
    number,
)
from strategies.registry import BuildContext, StrategySpec, register
from strategies.sampling import ClientSampling
from strategies.transfer import stored
from strategies.validation import InvalidReply, triage

logger = logging.getLogger(__name__)


def _weighted_sums(
    class_logits: NDArray[np.floating], counts: NDArray[np.integer]
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    if class_logits.ndim != 3 or class_logits.shape[1] != class_logits.shape[2]:
        raise ValueError(f"class logits must be (clients, C, C), got shape {class_logits.shape}.")
    if counts.shape != class_logits.shape[:2]:
        raise ValueError(f"counts must be (clients, C) = {class_logits.shape[:2]}, got {counts.shape}.")
    if (counts < 0).any():
        raise ValueError("class counts must be non-negative.")
    weighted = np.einsum("kc,kcd->kcd", counts.astype(np.float64), class_logits.astype(np.float64))
    return weighted, counts.astype(np.int64)


def _divide(sums: NDArray[np.float64], totals: NDArray[np.int64]) -> NDArray[np.float32]:
    with np.errstate(invalid="ignore", divide="ignore"):
        averaged = sums / totals[:, None]
    averaged[totals == 0] = np.nan
    return averaged.astype(np.float32)


def average_class_logits(
    class_logits: NDArray[np.floating], counts: NDArray[np.integer]
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Count-weighted average of the clients' per-class logit vectors.

    Parameters
    ----------
    class_logits : (K, C, C) array
        Client k's mean logit vector for each class.
    counts : (K, C) array
        Client k's number of examples of each class.

    Returns
    -------
    global_logits : (C, C) float32
        Row c averages the clients' rows c, weighted by their class-c counts; NaN where no
        client holds class c.
    totals : (C,) int64
        Examples of each class over all clients.
    """
    weighted, counts = _weighted_sums(class_logits, counts)
    totals = counts.sum(axis=0)
    return _divide(weighted.sum(axis=0), totals), totals


def leave_one_out_class_logits(
    class_logits: NDArray[np.floating], counts: NDArray[np.integer]
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """For each client k, the count-weighted average of the *other* clients' class logits.

    Returns ``(K, C, C)`` averages (NaN rows where no other client holds the class) and the
    ``(K, C)`` counts behind them. What client k distills from must not echo its own outputs.
    """
    weighted, counts = _weighted_sums(class_logits, counts)
    sums_without = weighted.sum(axis=0, keepdims=True) - weighted
    totals_without = counts.sum(axis=0, keepdims=True) - counts
    with np.errstate(invalid="ignore", divide="ignore"):
        averaged = sums_without / totals_without[:, :, None]
    averaged[totals_without == 0] = np.nan
    return averaged.astype(np.float32), totals_without


@dataclass(frozen=True)
class ClassLogitReply:
    node_id: int  # where the next round's leave-one-out targets go
    logits: np.ndarray
    counts: np.ndarray


def parse_class_logit_reply(reply: Message, *, num_classes: int) -> ClassLogitReply:
    """The reply's matrix and counts, or a ``ValueError`` saying what is wrong with them."""
    record = array_record(reply.content, CLASS_LOGITS_KEY)
    logits = record[LOGITS].numpy()
    counts = record[COUNTS].numpy()
    if logits.shape != (num_classes, num_classes) or not np.issubdtype(logits.dtype, np.floating):
        raise InvalidReply(
            f"class logits have shape {logits.shape} and dtype {logits.dtype}, expected float ({num_classes}, {num_classes})."
        )
    if not np.isfinite(logits).all():
        raise InvalidReply("class logits hold NaN/Inf values.")
    if counts.shape != (num_classes,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise InvalidReply(f"class counts must be {num_classes} non-negative integers, got {counts!r}.")
    return ClassLogitReply(int(reply.metadata.src_node_id), logits, counts)


class FederatedDistillation(Strategy):
    """Jeong et al.'s FD: per-class average logits up; down, each client's leave-one-out average."""

    evaluates_on_clients = True

    def __init__(
        self,
        *,
        num_classes: int,
        sampling: ClientSampling = ClientSampling(),
        min_replies: int = 1,
    ) -> None:
        self.num_classes = num_classes
        self.sampling = sampling
        self.min_replies = min_replies
        # Last round's accepted contributions, by node id: what the next round's targets are
        # computed from (each node gets them without its own).
        self.contributions: dict[int, ClassLogitReply] = {}
        self._last_sampled: list[int] = []

    def summary(self) -> None:
        logger.info("FederatedDistillation: %d classes, fraction_train=%.2f", self.num_classes, self.sampling.fraction)

    def targets_for(self, node_ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Each node's global per-class logits without its own contribution, and their counts."""
        if not self.contributions:
            return {}
        contributors = list(self.contributions)
        logits = np.stack([self.contributions[c].logits for c in contributors])
        counts = np.stack([self.contributions[c].counts for c in contributors])
        global_logits, totals = average_class_logits(logits, counts)
        without, totals_without = leave_one_out_class_logits(logits, counts)
        position = {client: index for index, client in enumerate(contributors)}
        return {
            node: (without[position[node]], totals_without[position[node]])
            if node in position
            else (global_logits, totals)
            for node in node_ids
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        task = ConfigRecord({**config, "server-round": server_round})
        self._last_sampled = self.sampling.select(grid, server_round=server_round)
        targets = self.targets_for(self._last_sampled)
        messages = []
        for node_id in self._last_sampled:
            content = RecordDict({TASK_KEY: task})
            if node_id in targets:
                logits, counts = targets[node_id]
                content[CLASS_LOGITS_KEY] = class_logits_record(logits, counts)
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed = triage(replies, lambda reply: parse_class_logit_reply(reply, num_classes=self.num_classes))
        parsed.log(logger, server_round)
        metrics: dict[str, MetricRecordValues] = {
            "clients": len(parsed.accepted),
            "failed": len(parsed.failed),
            "rejected": len(parsed.rejected),
        }
        if len(parsed.accepted) >= self.min_replies:
            # Summed in client-id order (triage sorts), so the targets ignore arrival order.
            self.contributions = {reply.node_id: reply for reply in parsed.payloads}
        return None, MetricRecord(metrics)

    def state_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """Last round's contributions, which the next round's targets come from, for checkpoints."""
        if not self.contributions:
            return {}
        replies = list(self.contributions.values())
        return {
            "contributions": arrays_record(
                {
                    "nodes": np.array([reply.node_id for reply in replies], dtype=np.int64),
                    "logits": np.stack([reply.logits for reply in replies]),
                    "counts": np.stack([reply.counts for reply in replies]),
                }
            )
        }

    def load_state_records(self, state: dict[str, ArrayRecord | ConfigRecord]) -> None:
        if "contributions" not in state:
            return
        record = stored(state, "contributions", ArrayRecord)
        nodes, logits, counts = (record[key].numpy() for key in ("nodes", "logits", "counts"))
        self.contributions = {
            int(node): ClassLogitReply(int(node), logits[i], counts[i]) for i, node in enumerate(nodes)
        }

    def privacy_state(self) -> None:
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The clients that trained this round evaluate their own models on the test split."""
        content = RecordDict({TASK_KEY: ConfigRecord({**config, "server-round": server_round})})
        return [
            Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE) for node_id in self._last_sampled
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Test accuracy and loss averaged over the clients, weighted by their training examples."""
        results = [metric_record(reply.content, METRICS_KEY) for reply in replies if not reply.has_error()]
        if not results:
            return None
        weights = np.array([number(r, NUM_EXAMPLES) for r in results])
        accuracy = float(np.average([number(r, "accuracy") for r in results], weights=weights))
        loss = float(np.average([number(r, "loss") for r in results], weights=weights))
        return MetricRecord({"accuracy": accuracy, "loss": loss, "evaluated": len(results)})


def build(context: BuildContext) -> FederatedDistillation:
    return FederatedDistillation(
        num_classes=context.info.num_classes,
        sampling=context.sampling,
        min_replies=context.config.strategy.min_replies,
    )


register(StrategySpec(name="fd", client_mode="class-logits", build=build))
