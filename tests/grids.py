"""A grid for tests that keeps what crossed it."""

from __future__ import annotations

from flwr.app import Message

from federation.inprocess import InProcessGrid


class RecordingGrid(InProcessGrid):
    """Keeps every (message, reply) pair that crossed the grid."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchanges: list[tuple[Message, Message]] = []

    def _deliver(self, message):
        reply = super()._deliver(message)
        self.exchanges.append((message, reply))
        return reply
