"""An in-process Grid: runs the unchanged ClientApp for each message, in this process.

Flower's Ray engine costs several milliseconds and a process hop per message and about 2 GiB
for its daemons; on one machine with small clients that overhead dominates. This grid keeps a
Flower ``Context`` per node, so client state persists between rounds exactly as on a
SuperNode, and turns a client exception into an error reply, as Flower does. Clients run one
after another, so a round's ``timeout`` applies to each client's own time: a reply that took
longer is dropped as late, as a deployment would drop it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

SERVER_NODE_ID = 0


class LocalGrid(Grid):
    """What the grids that run their clients themselves share: the run, message creation, and
    replies kept with the seconds their client took until the server pulls them. A reply that
    took longer than the round's timeout is dropped as late, as a deployment would drop it."""

    def __init__(self, *, run_id: int = 1) -> None:
        self._run = Run.create_empty(run_id=run_id)
        self._replies: dict[str, tuple[Message, float]] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [reply for reply, _ in self._take(message_ids)]

    def _take(self, message_ids: Iterable[str]) -> list[tuple[Message, float]]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for reply, seconds in self._take(list(self.push_messages(messages))):
            if timeout is not None and seconds > timeout:
                logger.debug(
                    "node %d answered after %.1f s > timeout %.1f s; dropped.",
                    reply.metadata.src_node_id,
                    seconds,
                    timeout,
                )
                continue
            replies.append(reply)
        return replies


class InProcessGrid(LocalGrid):
    """Deliver messages to ``client_app`` instances living in this process.

    Parameters
    ----------
    client_app : ClientApp
        The same ClientApp a SuperNode would run.
    num_nodes : int
        Node ``k`` (node id ``k + 1``) holds partition ``k`` of ``num_nodes``.
    run_id : int
        Identifier stamped on messages.
    node_config_extra : dict, optional
        Extra node-config keys for every node (``data-root``, …).
    node_ids : iterable of int, optional
        The nodes this grid holds (default: all ``num_nodes``); a worker process of
        :mod:`federation.processes` holds its shard only.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_id: int = 1,
        node_config_extra: dict[str, str | int | float | bool] | None = None,
        node_ids: Iterable[int] | None = None,
    ) -> None:
        self.client_app = client_app
        super().__init__(run_id=run_id)
        self._contexts = {
            node + 1: Context(
                run_id=run_id,
                node_id=node + 1,
                node_config={"partition-id": node, "num-partitions": num_nodes, **(node_config_extra or {})},
                state=RecordDict(),
                run_config={},
            )
            for node in (range(num_nodes) if node_ids is None else [node_id - 1 for node_id in node_ids])
        }
        # Instruction messages are stamped with the sender's identity (Flower's runtime sets it).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        """The node's Context (its persistent state), for inspection."""
        return self._contexts[node_id]

    def node_states(self) -> dict[int, RecordDict]:
        """Every node's persistent state (for checkpoints: these clients die with the process)."""
        return {node_id: context.state for node_id, context in self._contexts.items()}

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        """Give each node back the state :meth:`node_states` returned in an earlier process."""
        unknown = sorted(set(states) - set(self._contexts))
        if unknown:
            raise ValueError(f"the checkpoint holds nodes {unknown} that this grid does not have.")
        for node_id, state in states.items():
            self._contexts[node_id].state = state

    def _deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        if node_id not in self._contexts:
            raise ValueError(f"no node with id {node_id}; known ids are 1..{len(self._contexts)}.")
        threads = torch.get_num_threads()
        try:
            return self.client_app(message, self._contexts[node_id])
        except Exception as error:  # noqa: BLE001 - a failing client must not stop the run
            # The strategy reports failures (the first few per round, and a count in the metrics).
            logger.debug("node %d failed: %s: %s", node_id, type(error).__name__, error)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error).__name__}: {error}"),
                reply_to=message,
            )
        finally:
            # ClientApps pin torch to one thread; the server's own work should get them all back.
            torch.set_num_threads(threads)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            message.metadata.__dict__["_created_at"] = time.time()
            started = time.perf_counter()
            reply = self._deliver(message)
            self._replies[message.metadata.message_id] = (reply, time.perf_counter() - started)
            ids.append(message.metadata.message_id)
        return ids
