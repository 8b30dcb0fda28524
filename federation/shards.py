"""What the sharded engines share: clients dealt into fixed shards, each shard served by one
long-lived worker that holds its nodes' Flower ``Context``s for the whole run.

``engine=processes`` (:mod:`federation.processes`) serves a shard from a forked process and
``engine=ray`` (:mod:`federation.ray_grid`) from a Ray actor; both are a :class:`ShardHost` on
the worker's side and a :class:`ShardedGrid` on the server's. A round sends each shard its
messages in one batch; messages, replies and node states cross as Flower's protobuf encoding.
The grids differ only in how a batch travels and how a dead worker is seen and replaced.

Clients draw every random number from (seed, round, client, purpose) and run on one torch
thread, and the server aggregates in client-id order, so a sharded run gives bit for bit the
metrics of ``engine=inprocess`` on the same machine, whatever the number of shards.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation.inprocess import SERVER_NODE_ID, InProcessGrid, LocalGrid

logger = logging.getLogger(__name__)

# A round that takes longer than this shows "clients done / total" on a terminal.
PROGRESS_AFTER_SECONDS = 2.0

NodeConfigExtra = dict[str, str | int | float | bool]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def assign_shards(num_nodes: int, workers: int) -> list[tuple[int, ...]]:
    """Node ids ``1..num_nodes`` dealt to ``min(workers, num_nodes)`` workers, one turn at a time.

    Each turn deals the next ``n`` ids, one to every worker, starting one worker further on than
    the turn before (turn 0: workers ``0, 1, …``; turn 1: ``1, 2, …, 0``). Dealing rather than
    cutting blocks keeps the shards within one client of each other for any sampled subset that
    is spread over the ids; moving the start keeps a shard from holding only every n-th client,
    which with ``client_models`` assigned round-robin would give one worker all the clients of
    one architecture (two workers, two architectures: one worker with every costly teacher while
    the other waits). A shard depends only on the two counts.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be ≥ 1, got {num_nodes}.")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}.")
    count = min(workers, num_nodes)
    shards: list[list[int]] = [[] for _ in range(count)]
    for position in range(num_nodes):
        turn, offset = divmod(position, count)
        shards[(offset + turn) % count].append(position + 1)
    return [tuple(shard) for shard in shards]


def message_bytes(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def message_from_bytes(blob: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(blob))


def state_bytes(state: RecordDict) -> bytes:
    return recorddict_to_proto(state).SerializeToString()


def state_from_bytes(blob: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(blob))


def keep_freed_memory() -> None:
    """Keep the memory a worker frees for its next client instead of returning it to the kernel.

    A worker trains one client's model after another. With glibc's defaults each client's large
    buffers are trimmed off the heap or unmapped when freed, and faulted in again by the next
    client: at 300 clients a fifth of the workers' CPU time went to the kernel (``brk`` and page
    faults) and a round took 30 s instead of 26 s. Called once in each worker process, never in
    the server's. A no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest: buffers up to 32 MiB come from the heap
    mallopt(m_trim_threshold, 2**30)  # give the heap's free top back only past 1 GiB


class ShardHost:
    """The worker's side: the unchanged ClientApp for one shard of nodes, bytes in, bytes out."""

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        shard: tuple[int, ...],
        run_id: int,
        node_config_extra: NodeConfigExtra | None,
    ) -> None:
        torch.set_num_threads(1)  # as the ClientApp does; also keeps a forked OpenMP pool unused
        keep_freed_memory()  # the host owns its worker process
        self.grid = InProcessGrid(
            client_app, num_nodes=num_nodes, run_id=run_id, node_config_extra=node_config_extra, node_ids=shard
        )

    def deliver(self, blob: bytes) -> tuple[bytes, float]:
        """One message's reply and the seconds its client took."""
        message = message_from_bytes(blob)
        started = time.perf_counter()
        reply = self.grid._deliver(message)
        return message_bytes(reply), time.perf_counter() - started

    def states(self) -> tuple[list[int], list[bytes]]:
        states = self.grid.node_states()
        return list(states), [state_bytes(state) for state in states.values()]

    def restore(self, nodes: Sequence[int], blobs: Sequence[bytes]) -> None:
        self.grid.restore_node_states(
            {int(node): state_from_bytes(blob) for node, blob in zip(nodes, blobs, strict=True)}
        )


class ShardDied(Exception):
    """The worker serving a shard is gone."""


class Progress:
    """``clients done / total`` on one terminal line once an exchange has run a few seconds."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = time.perf_counter()
        self.shown = 0.0

    def tick(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self.started > PROGRESS_AFTER_SECONDS and now - self.shown > 0.2:
            self.shown = now
            sys.stderr.write(f"\r  clients {self.done}/{self.total} ({now - self.started:.0f} s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 40 + "\r")
            sys.stderr.flush()


# Callbacks a grid's transport calls while a round's batches run: a reply (shard, reply bytes,
# the client's seconds), and a shard whose worker died (shard, why).
OnReply = Callable[[int, bytes, float], None]
OnDeath = Callable[[int, str], None]


class ShardedGrid(LocalGrid):
    """The server's side of a sharded engine: routes each message to its node's shard, one batch
    per shard, and turns the messages a dead worker left unanswered into error replies
    (``CLIENT_APP_CRASHED``). A subclass moves the bytes: :meth:`_run_batches`,
    :meth:`_shard_states`, :meth:`_shard_restore`, and :meth:`_revive` (a fresh worker, with
    empty node state, for each shard whose worker died)."""

    def __init__(
        self,
        *,
        num_nodes: int,
        shards: list[tuple[int, ...]],
        run_id: int = 1,
        node_config_extra: NodeConfigExtra | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__(run_id=run_id)
        self.num_nodes = num_nodes
        self.run_id = run_id
        self.node_config_extra = node_config_extra
        self.progress = sys.stdout.isatty() if progress is None else progress
        self.shards = shards
        self._owner = {node: index for index, shard in enumerate(shards) for node in shard}
        self.restarts = 0  # workers started again after one died
        # Instruction messages are stamped with the sender's identity (Flower's runtime sets it).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    # --- what a transport provides ---

    def _revive(self) -> None:
        raise NotImplementedError

    def _run_batches(self, batches: dict[int, list[bytes]], on_reply: OnReply, on_death: OnDeath) -> None:
        """Deliver each shard its batch; call ``on_reply`` for each reply as it arrives and
        ``on_death`` once for a shard whose worker died. Returns when every shard is done or dead."""
        raise NotImplementedError

    def _shard_states(self, index: int) -> tuple[list[int], list[bytes]]:
        """The shard's node ids and their states' bytes; :class:`ShardDied` if its worker is gone."""
        raise NotImplementedError

    def _shard_restore(self, index: int, nodes: list[int], blobs: list[bytes]) -> None:
        raise NotImplementedError

    # --- Grid ---

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.num_nodes + 1))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            if message.metadata.dst_node_id not in self._owner:
                raise ValueError(f"no node with id {message.metadata.dst_node_id}; known ids are 1..{self.num_nodes}.")
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            message.metadata.__dict__["_created_at"] = time.time()
        for message, answer in zip(messages, self._exchange(messages), strict=True):
            self._replies[message.metadata.message_id] = answer
        return [message.metadata.message_id for message in messages]

    def _exchange(self, messages: list[Message]) -> list[tuple[Message, float]]:
        """Each shard gets its messages in one batch; returns (reply, the client's own seconds)
        per message, in the order of ``messages``."""
        if not messages:
            return []
        self._revive()
        answers: list[tuple[Message, float] | None] = [None] * len(messages)
        positions: dict[int, list[int]] = {}
        for position, message in enumerate(messages):
            positions.setdefault(self._owner[message.metadata.dst_node_id], []).append(position)
        pending = {
            index: {messages[p].metadata.message_id: p for p in shard_positions}
            for index, shard_positions in positions.items()
        }
        progress = Progress(len(messages), enabled=self.progress)

        def on_reply(index: int, blob: bytes, seconds: float) -> None:
            reply = message_from_bytes(blob)
            answers[pending[index].pop(reply.metadata.reply_to_message_id)] = (reply, seconds)
            progress.tick()

        def on_death(index: int, reason: str) -> None:
            logger.warning("%s; %d of its messages fail.", reason, len(pending[index]))
            for position in pending[index].values():
                answers[position] = (
                    Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=messages[position]),
                    0.0,
                )
            pending[index] = {}

        try:
            self._run_batches(
                {
                    index: [message_bytes(messages[p]) for p in shard_positions]
                    for index, shard_positions in positions.items()
                },
                on_reply,
                on_death,
            )
        finally:
            progress.close()
        missing = [index for index, left in pending.items() if left]
        if missing:
            raise RuntimeError(f"shards {missing} ended their batch without answering every message.")
        return [answer for answer in answers if answer is not None]

    # --- node state, for checkpoints ---

    def node_states(self) -> dict[int, RecordDict]:
        """Every node's persistent state, asked of the workers (a node whose worker died and
        was not yet replaced has none to give)."""
        self._revive()
        states: dict[int, RecordDict] = {}
        for index in range(len(self.shards)):
            try:
                nodes, blobs = self._shard_states(index)
            except ShardDied:
                logger.warning("worker %d died while handing over its nodes' state.", index)
                continue
            for node, blob in zip(nodes, blobs, strict=True):
                states[int(node)] = state_from_bytes(blob)
        return dict(sorted(states.items()))

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        """Give each node back the state :meth:`node_states` returned in an earlier process."""
        unknown = sorted(set(states) - set(self._owner))
        if unknown:
            raise ValueError(f"the checkpoint holds nodes {unknown} that this grid does not have.")
        self._revive()
        for index in range(len(self.shards)):
            nodes = [node for node in states if self._owner[node] == index]
            if nodes:
                self._shard_restore(index, nodes, [state_bytes(states[node]) for node in nodes])

    def context(self, node_id: int) -> Context:
        """A copy of the node's Context as its worker holds it, for inspection."""
        state = self.node_states().get(node_id, RecordDict())
        return Context(
            run_id=self.run_id,
            node_id=node_id,
            node_config={
                "partition-id": node_id - 1,
                "num-partitions": self.num_nodes,
                **(self.node_config_extra or {}),
            },
            state=state,
            run_config={},
        )


def describe_shard(shard: tuple[int, ...]) -> str:
    """A shard's node ids for a log line (the first eight and a count)."""
    return (
        ", ".join(map(str, shard)) if len(shard) <= 8 else f"{', '.join(map(str, shard[:8]))}, … ({len(shard)} in all)"
    )
