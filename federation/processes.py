"""A worker-pool Grid: long-lived worker processes, each running the unchanged ClientApp for a
fixed shard of the clients (``engine=processes``).

The in-process engine runs every client on one core. This grid forks ``workers`` processes
after the parent has loaded the dataset into shared memory, so they all read one copy of it.
Worker ``w`` holds the Flower ``Context`` of every node in its shard (:func:`assign_shards`) for
the whole run, so client state persists between rounds exactly as on a SuperNode. Each
``send_and_receive`` sends every worker its shard's messages in one batch; a worker runs them
one after another on one torch thread and streams each reply back as it finishes. Messages,
replies and node states cross the pipes as Flower's protobuf encoding (no pickle).

The shards, the worker's side and the server's routing are :mod:`federation.shards`, shared
with ``engine=ray``; a run gives bit for bit the metrics of ``engine=inprocess`` on the same
machine, whatever the number of workers.

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
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

from flwr.clientapp import ClientApp

from federation.shards import (
    NodeConfigExtra,
    OnDeath,
    OnReply,
    ShardDied,
    ShardedGrid,
    ShardHost,
    assign_shards,
    available_cores,
    describe_shard,
)
from fedkd.config import SplitSpec

logger = logging.getLogger(__name__)


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


# --- the worker process ---


def _serve(
    conn: Connection,
    inherited: list[Connection],
    parent_pid: int,
    client_app: ClientApp,
    num_nodes: int,
    shard: tuple[int, ...],
    run_id: int,
    node_config_extra: NodeConfigExtra | None,
) -> None:
    """A worker's loop: run its shard's messages, hand over and take back its nodes' state."""
    for other in inherited:  # the parent's ends of earlier workers' pipes, copied by fork
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops the workers
    host = ShardHost(client_app, num_nodes=num_nodes, shard=shard, run_id=run_id, node_config_extra=node_config_extra)
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
                reply, seconds = host.deliver(blob)
                conn.send_bytes(_pack({"op": "reply", "seconds": seconds}, [reply]))
        elif op == "states":
            nodes, states = host.states()
            conn.send_bytes(_pack({"op": "states", "nodes": nodes}, states))
        elif op == "restore":
            host.restore(header["nodes"], blobs)
            conn.send_bytes(_pack({"op": "restored"}))
        elif op == "stop":
            return


@dataclass
class _Worker:
    index: int
    shard: tuple[int, ...]
    process: Any  # multiprocessing's fork Process
    conn: Connection

    @property
    def alive(self) -> bool:
        return self.process.is_alive()


class ProcessPoolGrid(ShardedGrid):
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
        node_config_extra: NodeConfigExtra | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__(
            num_nodes=num_nodes,
            shards=assign_shards(num_nodes, workers or available_cores()),
            run_id=run_id,
            node_config_extra=node_config_extra,
            progress=progress,
        )
        self.client_app = client_app
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
                    describe_shard(worker.shard),
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

    # --- the transport ---

    def _run_batches(self, batches: dict[int, list[bytes]], on_reply: OnReply, on_death: OnDeath) -> None:
        expected: dict[int, int] = {}
        for index, blobs in batches.items():
            with contextlib.suppress(OSError):  # it died since _revive looked: its sentinel says so
                self._workers[index].conn.send_bytes(_pack({"op": "deliver"}, blobs))
            expected[index] = len(blobs)

        def receive(worker: _Worker) -> None:
            header, blobs = _unpack(worker.conn.recv_bytes())
            if header["op"] == "reply":
                on_reply(worker.index, blobs[0], float(header["seconds"]))
                expected[worker.index] -= 1

        while expected:
            by_handle: dict[Any, _Worker] = {}
            for index in expected:  # a death is seen first, then what it sent before it
                worker = self._workers[index]
                by_handle[worker.process.sentinel] = worker
                by_handle[worker.conn] = worker
            for handle in wait(list(by_handle), timeout=1.0):
                worker = by_handle[handle]
                if worker.index not in expected:
                    continue
                try:
                    if handle is worker.conn:
                        receive(worker)
                    else:  # the process ended: take what it sent before it died
                        while worker.conn.poll():
                            receive(worker)
                        raise ShardDied
                except (ShardDied, EOFError, OSError):
                    worker.process.join(timeout=5)
                    on_death(
                        worker.index,
                        f"worker process {worker.index} (pid {worker.process.pid}) died, "
                        f"exit code {worker.process.exitcode}",
                    )
                    expected[worker.index] = 0
                if expected[worker.index] == 0:
                    del expected[worker.index]

    def _request(self, index: int, frame: bytes) -> tuple[dict[str, Any], list[bytes]]:
        worker = self._workers[index]
        try:
            worker.conn.send_bytes(frame)
            return _unpack(worker.conn.recv_bytes())
        except (EOFError, OSError) as error:
            raise ShardDied from error

    def _shard_states(self, index: int) -> tuple[list[int], list[bytes]]:
        header, blobs = self._request(index, _pack({"op": "states"}))
        return [int(node) for node in header["nodes"]], blobs

    def _shard_restore(self, index: int, nodes: list[int], blobs: list[bytes]) -> None:
        header, _ = self._request(index, _pack({"op": "restore", "nodes": nodes}, blobs))
        if header["op"] != "restored":
            raise RuntimeError(f"worker {index} did not take its nodes' state: {header}")
