"""A worker-pool Grid: long-lived worker processes, each running the unchanged ClientApp for a
fixed shard of the clients (``engine=processes``).

The in-process engine runs every client on one core. This grid forks ``workers`` processes
after the parent has loaded the dataset into shared memory, so they all read one copy of it.
Worker ``w`` holds the Flower ``Context`` of every node in its shard (:func:`assign_shards`) for
the whole run, so client state persists between rounds exactly as on a SuperNode. Each
``send_and_receive`` sends every worker its shard's messages in one batch; a worker runs them
one after another on one torch thread and streams each reply back as it finishes. Messages,
replies and node states cross the pipes as Flower's protobuf encoding (no pickle).

Clients draw every random number from (seed, round, client, purpose) and run on one torch
thread, and the server aggregates in client-id order, so a run gives bit for bit the metrics
of ``engine=inprocess`` on the same machine, whatever the number of workers.

Failures: a client that raises becomes an error reply, as in-process. A worker process that
dies (killed, out of memory, a segfault in native code) turns the messages it had not answered
into error replies (``CLIENT_APP_CRASHED``), and the round goes on. Before the next exchange
the grid forks a fresh worker for that shard, **with empty state for its clients**: like a
restarted SuperNode, they start again from an untrained teacher (the run goes on; their
replies rejoin the aggregate at once). ``round_timeout`` applies to each client's own time, as
in-process: a reply that took longer is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import struct
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation.inprocess import SERVER_NODE_ID, InProcessGrid, LocalGrid
from fedkd.config import SplitSpec

logger = logging.getLogger(__name__)

# A round that takes longer than this shows "clients done / total" on a terminal.
PROGRESS_AFTER_SECONDS = 2.0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def assign_shards(num_nodes: int, workers: int) -> list[tuple[int, ...]]:
    """Node ids ``1..num_nodes`` dealt round-robin to ``min(workers, num_nodes)`` workers.

    Worker ``w`` holds the ids ``k`` with ``(k - 1) % n == w``. Dealing rather than cutting
    blocks keeps the shards within one client of each other for any sampled subset that is
    spread over the ids, and a shard depends only on the two counts (never on data or timing).
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be ≥ 1, got {num_nodes}.")
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}.")
    count = min(workers, num_nodes)
    return [tuple(range(w + 1, num_nodes + 1, count)) for w in range(count)]


# --- framing: one pipe message = a small JSON header and a list of protobuf byte strings ---


def _pack(header: dict[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    head = json.dumps({**header, "sizes": [len(blob) for blob in blobs]}).encode()
    return b"".join([struct.pack("<I", len(head)), head, *blobs])


def _unpack(frame: bytes) -> tuple[dict[str, Any], list[bytes]]:
    (length,) = struct.unpack_from("<I", frame)
    header = json.loads(frame[4 : 4 + length])
    view, offset, blobs = memoryview(frame), 4 + length, []
    for size in header.pop("sizes"):
        blobs.append(bytes(view[offset : offset + size]))
        offset += size
    return header, blobs


def _message_bytes(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def _message(blob: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(blob))


# --- the worker process ---


def _serve(
    conn: Connection,
    inherited: list[Connection],
    parent_pid: int,
    client_app: ClientApp,
    num_nodes: int,
    shard: tuple[int, ...],
    run_id: int,
    node_config_extra: dict[str, str | int | float | bool] | None,
) -> None:
    """A worker's loop: run its shard's messages, hand over and take back its nodes' state."""
    for other in inherited:  # the parent's ends of earlier workers' pipes, copied by fork
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops the workers
    torch.set_num_threads(1)  # as the ClientApp does; a forked OpenMP pool must not be used
    grid = InProcessGrid(
        client_app, num_nodes=num_nodes, run_id=run_id, node_config_extra=node_config_extra, node_ids=shard
    )
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent_pid:  # the parent died without closing the pipe
                return
        try:
            header, blobs = _unpack(conn.recv_bytes())
        except EOFError:
            return
        op = header["op"]
        if op == "deliver":
            for blob in blobs:
                message = _message(blob)
                started = time.perf_counter()
                reply = grid._deliver(message)
                seconds = time.perf_counter() - started
                conn.send_bytes(_pack({"op": "reply", "seconds": seconds}, [_message_bytes(reply)]))
        elif op == "states":
            states = grid.node_states()
            conn.send_bytes(
                _pack(
                    {"op": "states", "nodes": list(states)},
                    [recorddict_to_proto(state).SerializeToString() for state in states.values()],
                )
            )
        elif op == "restore":
            grid.restore_node_states(
                {
                    int(node): recorddict_from_proto(ProtoRecordDict.FromString(blob))
                    for node, blob in zip(header["nodes"], blobs, strict=True)
                }
            )
            conn.send_bytes(_pack({"op": "restored"}))
        elif op == "stop":
            return


@dataclass
class _Worker:
    index: int
    shard: tuple[int, ...]
    process: Any  # multiprocessing's fork Process
    conn: Connection
    pending: dict[str, int] = field(default_factory=dict)  # message id → its position in the batch

    @property
    def alive(self) -> bool:
        return self.process.is_alive()


class _WorkerDied(Exception):
    pass


class _Progress:
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


class ProcessPoolGrid(LocalGrid):
    """Deliver messages to ``client_app`` in ``workers`` forked processes, one shard of nodes each.

    Parameters
    ----------
    client_app : ClientApp
        The same ClientApp a SuperNode would run.
    num_nodes : int
        Node ``k`` (node id ``k + 1``) holds partition ``k`` of ``num_nodes``.
    workers : int
        Worker processes (0: one per available core); never more than ``num_nodes``.
    split_spec : SplitSpec, optional
        The run's data: loaded into shared memory before the workers fork, so they share one copy
        (without it each worker loads the data it needs itself).
    run_id : int
        Identifier stamped on messages.
    node_config_extra : dict, optional
        Extra node-config keys for every node (``data-root``, …).
    progress : bool, optional
        Show ``clients done / total`` during long exchanges (default: when stdout is a terminal).
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        workers: int = 0,
        split_spec: SplitSpec | None = None,
        run_id: int = 1,
        node_config_extra: dict[str, str | int | float | bool] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_id = run_id
        self.node_config_extra = node_config_extra
        self.progress = sys.stdout.isatty() if progress is None else progress
        self.shards = assign_shards(num_nodes, workers or available_cores())
        self._owner = {node: index for index, shard in enumerate(self.shards) for node in shard}
        super().__init__(run_id=run_id)
        self.restarts = 0  # workers forked again after one died
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        if split_spec is not None:
            from fedkd.data.local import share_loaded_data

            share_loaded_data(split_spec)
        self._workers: list[_Worker] = []
        for index in range(len(self.shards)):
            self._workers.append(self._fork(index))

    # --- worker life cycle ---

    def _fork(self, index: int) -> _Worker:
        context = multiprocessing.get_context("fork")
        parent_end, child_end = context.Pipe()
        inherited = [worker.conn for worker in self._workers if worker.index != index]
        process = context.Process(
            target=_serve,
            args=(
                child_end,
                inherited,
                os.getpid(),
                self.client_app,
                self.num_nodes,
                self.shards[index],
                self.run_id,
                self.node_config_extra,
            ),
            name=f"fedkd-worker-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Worker(index, self.shards[index], process, parent_end)

    def _revive(self) -> None:
        """Fork a fresh worker, with empty node state, for every shard whose worker died."""
        for index, worker in enumerate(self._workers):
            if not worker.alive:
                worker.process.join()
                worker.conn.close()
                logger.warning(
                    "worker %d (pid %s) exited with code %s; forked a new one: nodes %s start again with empty state.",
                    index,
                    worker.process.pid,
                    worker.process.exitcode,
                    _ids(worker.shard),
                )
                self._workers[index] = self._fork(index)
                self.restarts += 1

    def close(self) -> None:
        """Stop the workers (their clients' state goes with them)."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(_pack({"op": "stop"}))
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> ProcessPoolGrid:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

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
        """Each worker gets its shard's messages in one batch; returns (reply, the client's own
        seconds) per message, in the order of ``messages``."""
        if not messages:
            return []
        self._revive()
        answers: list[tuple[Message, float] | None] = [None] * len(messages)
        batches: dict[int, list[int]] = {}
        for position, message in enumerate(messages):
            batches.setdefault(self._owner[message.metadata.dst_node_id], []).append(position)
        busy: dict[int, _Worker] = {}
        for index, positions in batches.items():
            worker = self._workers[index]
            worker.pending = {messages[p].metadata.message_id: p for p in positions}
            with contextlib.suppress(OSError):  # it died since _revive looked: its sentinel says so
                worker.conn.send_bytes(_pack({"op": "deliver"}, [_message_bytes(messages[p]) for p in positions]))
            busy[index] = worker
        progress = _Progress(len(messages), enabled=self.progress)
        try:
            while busy:
                by_handle: dict[Any, _Worker] = {}
                for worker in busy.values():  # a death is seen first, then what it sent before it
                    by_handle[worker.process.sentinel] = worker
                    by_handle[worker.conn] = worker
                for handle in wait(list(by_handle), timeout=1.0):
                    worker = by_handle[handle]
                    if worker.index not in busy:
                        continue
                    try:
                        if handle is worker.conn:
                            self._receive(worker, messages, answers, progress)
                        else:  # the process ended: take what it sent before it died
                            while worker.conn.poll():
                                self._receive(worker, messages, answers, progress)
                            raise _WorkerDied
                    except (_WorkerDied, EOFError, OSError):
                        self._fail_pending(worker, messages, answers)
                    if not worker.pending:
                        del busy[worker.index]
        finally:
            progress.close()
        return [answer for answer in answers if answer is not None]

    def _receive(
        self, worker: _Worker, messages: list[Message], answers: list[tuple[Message, float] | None], progress: _Progress
    ) -> None:
        header, blobs = _unpack(worker.conn.recv_bytes())
        if header["op"] == "reply":
            reply = _message(blobs[0])
            position = worker.pending.pop(reply.metadata.reply_to_message_id)
            answers[position] = (reply, float(header["seconds"]))
            progress.tick()

    def _fail_pending(
        self, worker: _Worker, messages: list[Message], answers: list[tuple[Message, float] | None]
    ) -> None:
        worker.process.join(timeout=5)
        reason = f"worker process {worker.index} (pid {worker.process.pid}) died, exit code {worker.process.exitcode}"
        logger.warning("%s; %d of its messages fail.", reason, len(worker.pending))
        for position in worker.pending.values():
            answers[position] = (
                Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=messages[position]),
                0.0,
            )
        worker.pending = {}

    # --- node state, for checkpoints ---

    def _request(self, worker: _Worker, frame: bytes) -> tuple[dict[str, Any], list[bytes]]:
        try:
            worker.conn.send_bytes(frame)
            return _unpack(worker.conn.recv_bytes())
        except (EOFError, OSError) as error:
            raise _WorkerDied from error

    def node_states(self) -> dict[int, RecordDict]:
        """Every node's persistent state, asked of the workers (a node whose worker died and
        was not yet replaced has none to give)."""
        self._revive()
        states: dict[int, RecordDict] = {}
        for worker in self._workers:
            try:
                header, blobs = self._request(worker, _pack({"op": "states"}))
            except _WorkerDied:
                logger.warning("worker %d died while handing over its nodes' state.", worker.index)
                continue
            for node, blob in zip(header["nodes"], blobs, strict=True):
                states[int(node)] = recorddict_from_proto(ProtoRecordDict.FromString(blob))
        return dict(sorted(states.items()))

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        """Give each node back the state :meth:`node_states` returned in an earlier process."""
        unknown = sorted(set(states) - set(self._owner))
        if unknown:
            raise ValueError(f"the checkpoint holds nodes {unknown} that this grid does not have.")
        self._revive()
        for worker in self._workers:
            nodes = [node for node in states if self._owner[node] == worker.index]
            if not nodes:
                continue
            blobs = [recorddict_to_proto(states[node]).SerializeToString() for node in nodes]
            header, _ = self._request(worker, _pack({"op": "restore", "nodes": nodes}, blobs))
            if header["op"] != "restored":
                raise RuntimeError(f"worker {worker.index} did not take its nodes' state: {header}")

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


def _ids(shard: tuple[int, ...]) -> str:
    return (
        ", ".join(map(str, shard)) if len(shard) <= 8 else f"{', '.join(map(str, shard[:8]))}, … ({len(shard)} in all)"
    )
