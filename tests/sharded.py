"""What the tests of the sharded engines (processes, ray) share: a tiny run, ClientApps that
echo, sleep or die, and the numbers a run records."""

from __future__ import annotations

import os
import signal
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.client_app import app as client_app
from fedkd.config import PartitionConfig, RunConfig
from fedkd.messages import TASK_KEY

TINY = RunConfig(
    dataset="digits",
    num_clients=4,
    rounds=2,
    public_size=200,
    local_epochs=1,
    distill_epochs=1,
    partition=PartitionConfig(scheme="iid"),
    client_models=("cnn_small", "lenet5_bn"),
    student_model="cnn_small",
)


def echo_app(*, dies: int = 0, sleeps: int = 0) -> ClientApp:
    """Answers a query with its node id and pid; node ``dies`` kills its own process the first time
    (a fresh worker has no note in its state), node ``sleeps`` takes a second and a half."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        if context.node_id == dies and "died" not in context.state:
            os.kill(os.getpid(), signal.SIGKILL)
        if context.node_id == sleeps:
            time.sleep(1.5)
        context.state["seen"] = MetricRecord({"count": int(context.state.get("seen", {"count": 0})["count"]) + 1})
        return Message(RecordDict({"m": MetricRecord({"node": context.node_id, "pid": os.getpid()})}), reply_to=message)

    return app


def ask(grid, nodes, *, timeout=None):
    messages = [grid.create_message(RecordDict(), "query", node, "g") for node in nodes]
    return list(grid.send_and_receive(messages, timeout=timeout))


def dying_app(*, node_id: int, in_round: int) -> ClientApp:
    """The honest ClientApp, except that node ``node_id`` kills its own process in ``in_round``."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.node_id == node_id and int(message.content[TASK_KEY]["server-round"]) == in_round:
            os.kill(os.getpid(), signal.SIGKILL)
        return client_app(message, context)

    return app


def numbers(rows):
    """Every recorded value except the wall time."""
    return [{key: value for key, value in row.items() if key != "wall_seconds"} for row in rows]


def teacher_bytes(states):
    """Every node's arrays, as bytes: equal only if every teacher is equal to the bit."""
    return {
        node: {
            name: {key: array.numpy().tobytes() for key, array in record.items()}
            for name, record in state.array_records.items()
        }
        for node, state in states.items()
    }
