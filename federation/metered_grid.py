"""A Grid wrapper that counts the payload bytes of every message, in both directions.

Wrapping the grid rather than the strategy means every strategy, Flower's own FedAvg
included, is measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedkd.messages import payload_bytes


@dataclass
class Traffic:
    """Counts since the last :meth:`MeteredGrid.take_traffic`."""

    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    replies: int = 0
    error_replies: int = 0
    # Nodes that answered with an error or not at all (crashed, timed out, disconnected).
    failed_nodes: list[int] = field(default_factory=list)


class MeteredGrid(Grid):
    """Forwards to ``inner`` and counts ``bytes_down`` (sent) and ``bytes_up`` (received)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self._traffic = Traffic()

    def take_traffic(self) -> Traffic:
        """Return the counts so far and start counting afresh."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic

    def _count_down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            self._traffic.bytes_down += payload_bytes(message.content)
        self._traffic.messages_down += len(messages)
        return messages

    def _count_up(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self._traffic.error_replies += 1
            else:
                self._traffic.bytes_up += payload_bytes(reply.content)
        self._traffic.replies += len(replies)
        return replies

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count_down(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_up(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = self._count_down(messages)
        replies = self._count_up(self.inner.send_and_receive(sent, timeout=timeout))
        answered = {reply.metadata.src_node_id for reply in replies if not reply.has_error()}
        self._traffic.failed_nodes.extend(sorted({message.metadata.dst_node_id for message in sent} - answered))
        return replies
