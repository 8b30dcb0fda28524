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
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.messages import (
    CLASS_LOGITS_KEY,
    CLIENT_ID,
    COUNTS,
    LOGITS,
    METRICS_KEY,
    NUM_EXAMPLES,
    TASK_KEY,
    class_logits_record,
)
from strategies.sampling import ClientSampling

logger = logging.getLogger(__name__)

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
    if class_logits.ndim != 3 or class_logits.shape[1] != class_logits.shape[2]:
        raise ValueError(f"class logits must be (clients, C, C), got shape {class_logits.shape}.")
    if counts.shape != class_logits.shape[:2]:
        raise ValueError(f"counts must be (clients, C) = {class_logits.shape[:2]}, got {counts.shape}.")
    if (counts < 0).any():
        raise ValueError("class counts must be non-negative.")
    totals = counts.sum(axis=0).astype(np.int64)
    weighted = np.einsum("kc,kcd->cd", counts.astype(np.float64), class_logits.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        global_logits = weighted / totals[:, None]
    global_logits[totals == 0] = np.nan
    return global_logits.astype(np.float32), totals


@dataclass(frozen=True)
class ClassLogitReply:
    client_id: int
    logits: np.ndarray
    counts: np.ndarray


def parse_class_logit_reply(reply: Message, *, num_classes: int) -> ClassLogitReply:
    """The reply's matrix and counts, or a ``ValueError`` saying what is wrong with them."""
    record = reply.content[CLASS_LOGITS_KEY]
    logits = record[LOGITS].numpy()
    counts = record[COUNTS].numpy()
    if logits.shape != (num_classes, num_classes) or not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"class logits have shape {logits.shape} and dtype {logits.dtype}, expected float ({num_classes}, {num_classes}).")
    if not np.isfinite(logits).all():
        raise ValueError("class logits hold NaN/Inf values.")
    if counts.shape != (num_classes,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"class counts must be {num_classes} non-negative integers, got {counts!r}.")
    return ClassLogitReply(int(reply.content[METRICS_KEY][CLIENT_ID]), logits, counts)


class FederatedDistillation(Strategy):
    """Jeong et al.'s FD: per-class average logits up, their global average down."""

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
        self.global_logits: np.ndarray | None = None
        self.global_counts: np.ndarray | None = None
        self._last_sampled: list[int] = []

    def summary(self) -> None:
        logger.info("FederatedDistillation: %d classes, fraction_train=%.2f", self.num_classes, self.sampling.fraction)

    def _messages(self, node_ids: list[int], content: RecordDict, message_type: str) -> list[Message]:
        return [Message(content, dst_node_id=node_id, message_type=message_type) for node_id in node_ids]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        content = RecordDict({TASK_KEY: ConfigRecord({**config, "server-round": server_round})})
        if self.global_logits is not None:
            content[CLASS_LOGITS_KEY] = class_logits_record(self.global_logits, self.global_counts)
        self._last_sampled = self.sampling.select(grid, server_round=server_round)
        return self._messages(self._last_sampled, content, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[ClassLogitReply] = []
        failed = rejected = 0
        for reply in replies:
            if reply.has_error():
                failed += 1
                logger.warning("round %d: client failed: %s", server_round, reply.error.reason)
                continue
            try:
                accepted.append(parse_class_logit_reply(reply, num_classes=self.num_classes))
            except (KeyError, TypeError, ValueError) as error:
                rejected += 1
                logger.warning("round %d: reply rejected: %s", server_round, error)
        metrics = {"clients": len(accepted), "failed": failed, "rejected": rejected}
        if len(accepted) < self.min_replies:
            return None, MetricRecord(metrics)
        accepted.sort(key=lambda reply: reply.client_id)
        self.global_logits, self.global_counts = average_class_logits(
            np.stack([reply.logits for reply in accepted]), np.stack([reply.counts for reply in accepted])
        )
        return None, MetricRecord(metrics)

    def state_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """The global per-class logits the next round sends down, for checkpoints."""
        if self.global_logits is None:
            return {}
        return {"global": arrays_record({"logits": self.global_logits, "counts": self.global_counts})}

    def load_state_records(self, state: dict[str, ArrayRecord | ConfigRecord]) -> None:
        if "global" in state:
            self.global_logits = state["global"]["logits"].numpy()
            self.global_counts = state["global"]["counts"].numpy()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The clients that trained this round evaluate their own models on the test split."""
        content = RecordDict({TASK_KEY: ConfigRecord({**config, "server-round": server_round})})
        return self._messages(self._last_sampled, content, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = [reply.content[METRICS_KEY] for reply in replies if not reply.has_error()]
        if not results:
            return None
        weights = np.array([float(r[NUM_EXAMPLES]) for r in results])
        accuracy = float(np.average([float(r["accuracy"]) for r in results], weights=weights))
        loss = float(np.average([float(r["loss"]) for r in results], weights=weights))
        return MetricRecord({"accuracy": accuracy, "loss": loss, "evaluated": len(results)})
