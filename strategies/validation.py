"""Checks on what clients send back; a bad reply is rejected with a reason, never trusted.

:func:`triage` is the one place a strategy splits a round's replies into accepted payloads,
failures (the client raised or timed out) and rejections (the reply was malformed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from flwr.app import Message
from numpy.typing import NDArray

from fedkd.messages import CLIENT_ID, METRICS_KEY, metric_record, number

Payload = TypeVar("Payload")

# At hundreds of clients a bad round would otherwise print hundreds of lines.
MAX_REASONS_LOGGED = 5


def log_reasons(logger: logging.Logger, server_round: int, what: str, reasons: Sequence[str]) -> None:
    """Warn about the first few problems of a round and count the rest (all are in the metrics)."""
    for reason in reasons[:MAX_REASONS_LOGGED]:
        logger.warning("round %d: %s: %s", server_round, what, reason)
    if len(reasons) > MAX_REASONS_LOGGED:
        logger.warning("round %d: … and %d more %s", server_round, len(reasons) - MAX_REASONS_LOGGED, what)


class InvalidReply(ValueError):
    """A client reply that cannot be used; the message says why."""


def validate_soft_labels(
    probs: NDArray, *, num_inputs: int, num_classes: int, tolerance: float = 1e-3, probabilities: bool = True
) -> NDArray[np.float32]:
    """Return ``probs`` as float32 if it is an ``(num_inputs, num_classes)`` matrix of
    probability vectors; raise :class:`InvalidReply` naming the first problem otherwise.

    ``probabilities=False`` accepts any finite matrix of that shape: rows that carry a client's
    share of distributed DP noise are no longer probability vectors.
    """
    if not isinstance(probs, np.ndarray):
        raise InvalidReply(f"soft labels must be an array, got {type(probs).__name__}.")
    if probs.shape != (num_inputs, num_classes):
        raise InvalidReply(f"soft labels have shape {probs.shape}, expected ({num_inputs}, {num_classes}).")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InvalidReply(f"soft labels have dtype {probs.dtype}, expected a float type.")
    if not np.isfinite(probs).all():
        raise InvalidReply(f"soft labels hold {int((~np.isfinite(probs)).sum())} NaN/Inf values.")
    if not probabilities:
        return probs.astype(np.float32, copy=False)
    if (probs < 0).any():
        raise InvalidReply("soft labels hold negative probabilities.")
    row_sums = probs.sum(axis=1, dtype=np.float64)
    worst = float(np.abs(row_sums - 1.0).max(initial=0.0))
    if worst > tolerance:
        raise InvalidReply(f"soft-label rows must sum to 1; the worst row is off by {worst:.3g}.")
    return probs.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Triage(Generic[Payload]):
    """One round's replies, sorted out. ``accepted`` is in client-id order, so an aggregate does
    not depend on the order in which replies arrived."""

    accepted: list[tuple[int, Payload]]
    failed: list[str]
    rejected: list[str]
    rejected_nodes: list[int]

    @property
    def payloads(self) -> list[Payload]:
        return [payload for _, payload in self.accepted]

    @property
    def client_ids(self) -> list[int]:
        return [client for client, _ in self.accepted]

    def log(self, logger: logging.Logger, server_round: int, *, what: str = "reply") -> None:
        log_reasons(logger, server_round, "client failed", self.failed)
        log_reasons(logger, server_round, f"{what} rejected", self.rejected)


def triage(replies: Iterable[Message], parse: Callable[[Message], Payload]) -> Triage[Payload]:
    """Split ``replies`` into parsed payloads, failures and rejections.

    ``parse`` turns a reply's content into the strategy's payload and raises ``KeyError``,
    ``TypeError`` or ``ValueError`` (:class:`InvalidReply`) for a reply it cannot use; the client
    id is read from the reply's metrics.
    """
    accepted: list[tuple[int, Payload]] = []
    failed: list[str] = []
    rejected: list[str] = []
    rejected_nodes: list[int] = []
    for reply in replies:
        source = f"node {reply.metadata.src_node_id}"
        if reply.has_error():
            failed.append(f"{source}: {reply.error.reason}")
            continue
        try:
            client_id = int(number(metric_record(reply.content, METRICS_KEY), CLIENT_ID))
            accepted.append((client_id, parse(reply)))
        except (KeyError, TypeError, ValueError) as error:
            rejected.append(f"{source}: {error}")
            rejected_nodes.append(int(reply.metadata.src_node_id))
    accepted.sort(key=lambda item: item[0])
    return Triage(accepted, failed, rejected, sorted(rejected_nodes))
