"""A Ray Grid: one long-lived Ray actor per shard of the clients (``engine=ray``), on one machine
or across a Ray cluster.

Flower's own Ray engine (``engine=flower-ray``) runs each message as a task on a pool of
actors, rebuilding the client's context per message; at hundreds of clients that costs several
times the work itself. This grid deals the clients into the same fixed shards as
``engine=processes`` (:func:`federation.shards.assign_shards`): actor ``w`` holds the Flower
``Context`` of every node in its shard for the whole run and runs the unchanged ClientApp
(:class:`federation.shards.ShardHost`). Each exchange sends every actor its shard's messages in
one call; the actor streams each reply back as it finishes (a Ray streaming generator), as
Flower protobuf bytes. So a study that outgrows one machine runs on a Ray cluster
(``ray start --head`` on one machine, ``ray start --address=…`` on the others, then
``fedkd-sim engine=ray ray.address=…``), and on one machine gives bit for bit the metrics of
``engine=inprocess``.

The run's data goes into Ray's object store once: the driver puts the normalized train and
test tensors, the split and the dataset's description there, and every actor on a node maps
that node's one copy (zero copy, read only) instead of loading its own, so only the driver
reads the dataset's files.

Failures: a client that raises becomes an error reply. An actor that dies (killed, out of
memory, its node lost) turns the messages it had not answered into error replies
(``CLIENT_APP_CRASHED``) and the round goes on; before the next exchange a fresh actor takes
over its shard **with empty node state**, as ``engine=processes`` does.

Ray is imported only here, so the other engines never pay for it.
"""

from __future__ import annotations

import logging
import os
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

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a simulation
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # and skip its warning about GPUs
# Ray lowers its workers' priority by 15 below the raylet's; here the actors are the work, so they
# run at this process's priority (a Ray started here reads this; a cluster keeps its own setting).
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402
from ray.exceptions import RayActorError  # noqa: E402

logger = logging.getLogger(__name__)

# An actor that does not answer a state request in this long counts as dead.
STATE_TIMEOUT_SECONDS = 600.0


class ShardActor:
    """A Ray actor's body: one :class:`ShardHost` (constructed in the actor's own process)."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        shard: tuple[int, ...],
        run_id: int,
        node_config_extra: NodeConfigExtra | None,
        shared_data: dict[str, Any] | None,
    ) -> None:
        if shared_data is not None:
            from fedkd.data.local import adopt_shared_data

            # Ray resolves only top-level arguments; the arrays come back mapped, not copied.
            adopt_shared_data(
                **{
                    key: ray.get(value) if isinstance(value, ray.ObjectRef) else value
                    for key, value in shared_data.items()
                }
            )
        self.host = ShardHost(
            client_app, num_nodes=num_nodes, shard=shard, run_id=run_id, node_config_extra=node_config_extra
        )

    def deliver(self, blobs: list[bytes]) -> Any:
        """Each message's reply and the client's seconds, streamed as they finish."""
        for blob in blobs:
            yield self.host.deliver(blob)

    def states(self) -> tuple[list[int], list[bytes]]:
        return self.host.states()

    def restore(self, nodes: list[int], blobs: list[bytes]) -> None:
        self.host.restore(nodes, blobs)

    def where(self) -> tuple[str, int]:
        """The Ray node this actor runs on, and its process id."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


class RayGrid(ShardedGrid):
    """Deliver messages to ``client_app`` in Ray actors, one shard of nodes each.

    Parameters
    ----------
    client_app : ClientApp
        The same ClientApp a SuperNode would run (sent to each actor once, with cloudpickle).
    num_nodes : int
        Node ``k`` (node id ``k + 1``) holds partition ``k`` of ``num_nodes``.
    workers : int
        Actors, one CPU each (0: one per CPU of the cluster, or of this machine when Ray is
        started here); never more than ``num_nodes``.
    address : str
        A running Ray cluster's address (``ray start --head`` prints it; ``"auto"`` finds a local
        one). Empty: use the Ray this process already joined, or else start a private Ray here,
        stopped again by :meth:`close`.
    split_spec : SplitSpec, optional
        The run's data, put into the object store once for every actor to map.
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
        address: str = "",
        split_spec: SplitSpec | None = None,
        run_id: int = 1,
        node_config_extra: NodeConfigExtra | None = None,
        progress: bool | None = None,
    ) -> None:
        self._started_ray = False
        if address:
            ray.init(address=address, configure_logging=False, log_to_driver=True)
            self._joined_ray = True
        elif ray.is_initialized():
            self._joined_ray = False  # someone else's: leave it running
        else:
            ray.init(
                num_cpus=workers or available_cores(),
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
            )
            self._started_ray = self._joined_ray = True
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if workers > cpus:
                raise ValueError(
                    f"workers={workers} needs {workers} CPUs but the Ray cluster has {cpus}; "
                    f"set workers ≤ {cpus} (or 0 for one per CPU) or add nodes to the cluster."
                )
            super().__init__(
                num_nodes=num_nodes,
                shards=assign_shards(num_nodes, workers or max(cpus, 1)),
                run_id=run_id,
                node_config_extra=node_config_extra,
                progress=progress,
            )
            self.client_app = client_app
            self._shared_data = _put_shared_data(split_spec) if split_spec is not None else None
            self._actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(ShardActor)
            self._actors: list[Any] = [self._start(index) for index in range(len(self.shards))]
            self._dead: set[int] = set()
            ray.get([actor.where.remote() for actor in self._actors])  # wait until every actor is up
        except BaseException:
            self.close()
            raise

    # --- actor life cycle ---

    def _start(self, index: int) -> Any:
        # SPREAD places the shards over the cluster's nodes rather than filling one node first.
        return self._actor_class.options(scheduling_strategy="SPREAD", name=None).remote(
            self.client_app, self.num_nodes, self.shards[index], self.run_id, self.node_config_extra, self._shared_data
        )

    def _revive(self) -> None:
        """A fresh actor, with empty node state, for every shard whose actor died."""
        for index in sorted(self._dead):
            ray.kill(self._actors[index], no_restart=True)
            logger.warning(
                "actor %d died; started a new one: nodes %s start again with empty state.",
                index,
                describe_shard(self.shards[index]),
            )
            self._actors[index] = self._start(index)
            self.restarts += 1
        self._dead.clear()

    def actor_locations(self) -> list[tuple[str, int]]:
        """(Ray node id, process id) of each shard's actor."""
        return list(ray.get([actor.where.remote() for actor in self._actors]))

    def close(self) -> None:
        """Stop the actors (their clients' state goes with them), and the Ray this grid started."""
        for actor in getattr(self, "_actors", []):
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._started_ray or getattr(self, "_joined_ray", False):
            ray.shutdown()  # stops a Ray started here; only disconnects from a cluster
        self._started_ray = self._joined_ray = False

    def __enter__(self) -> RayGrid:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- the transport ---

    def _run_batches(self, batches: dict[int, list[bytes]], on_reply: OnReply, on_death: OnDeath) -> None:
        streams: dict[int, Any] = {
            index: self._actors[index].deliver.options(num_returns="streaming").remote(blobs)
            for index, blobs in batches.items()
        }
        index_of = {id(stream): index for index, stream in streams.items()}
        while streams:
            ready: list[Any] = ray.wait(list(streams.values()), num_returns=1, timeout=1.0)[0]
            for stream in ready:
                index = index_of[id(stream)]
                try:
                    reply, seconds = ray.get(next(stream))
                except StopIteration:
                    del streams[index]
                except RayActorError as error:
                    self._dead.add(index)
                    on_death(index, f"Ray actor {index} died: {_first_line(error)}")
                    del streams[index]
                else:
                    on_reply(index, reply, seconds)

    def _shard_states(self, index: int) -> tuple[list[int], list[bytes]]:
        try:
            nodes, blobs = ray.get(self._actors[index].states.remote(), timeout=STATE_TIMEOUT_SECONDS)
        except RayActorError as error:
            self._dead.add(index)
            raise ShardDied from error
        return list(nodes), list(blobs)

    def _shard_restore(self, index: int, nodes: list[int], blobs: list[bytes]) -> None:
        ray.get(self._actors[index].restore.remote(nodes, blobs))


def _put_shared_data(spec: SplitSpec) -> dict[str, Any]:
    """The run's converted tensors and split, put into the object store once; the actors map them."""
    from fedkd.data.local import shared_data_for

    return {key: ray.put(value) if key != "spec" else value for key, value in shared_data_for(spec).items()}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
