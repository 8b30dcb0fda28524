"""Clients that crash or time out mid-round: the round goes on with the replies that arrived."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from baselines import untrained_student_accuracy
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federation import inprocess
from federation.client_app import app as honest_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.config import PartitionConfig, RunConfig, StrategyConfig

CRASHING_NODE, SLOW_NODE = 2, 3
# Far beyond what an honest client needs on any machine, however loaded: only the slow node is late.
TIMEOUT = 600.0


@pytest.fixture
def clock(monkeypatch):
    """The in-process grid's clock, which a test can move forward instead of sleeping."""
    fake = SimpleNamespace(offset=0.0)
    fake.perf_counter = lambda: time.perf_counter() + fake.offset
    fake.time = time.time
    monkeypatch.setattr(inprocess, "time", fake)
    return fake


def unreliable_app(clock) -> ClientApp:
    """The honest ClientApp, except that one node crashes and another answers after TIMEOUT + 1 s."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if context.node_id == CRASHING_NODE:
            raise RuntimeError("simulated crash")
        reply = honest_app(message, context)
        if context.node_id == SLOW_NODE:
            clock.offset += TIMEOUT + 1.0
        return reply

    return app


def _config(**changes):
    return RunConfig(
        dataset="digits",
        num_clients=4,
        rounds=2,
        public_size=300,
        local_epochs=2,
        distill_epochs=3,
        partition=PartitionConfig(scheme="iid"),
        client_models=("cnn_small",),
        student_model="cnn_small",
        **changes,
    )


@pytest.mark.slow
def test_crashed_and_late_clients_are_recorded_and_the_round_uses_the_rest(clock):
    config = _config(round_timeout=TIMEOUT)
    rows = run_federation(InProcessGrid(unreliable_app(clock), num_nodes=4), config, run_dir=None)
    assert [row["failed"] for row in rows] == [2, 2]
    assert [row["failed_nodes"] for row in rows] == [[CRASHING_NODE, SLOW_NODE]] * 2
    assert all(row["clients"] == 2 for row in rows)
    # the two clients that answered still teach: final − untrained was 0.41 (seed 0)
    assert rows[-1]["student_accuracy"] > untrained_student_accuracy(config) + 0.15


@pytest.mark.slow
def test_too_few_replies_leave_the_student_unchanged(clock):
    config = _config(round_timeout=TIMEOUT, strategy=StrategyConfig(min_replies=3))
    rows = run_federation(InProcessGrid(unreliable_app(clock), num_nodes=4), config, run_dir=None)
    assert all(row["clients"] == 2 for row in rows)
    assert (
        rows[0]["student_accuracy"] == rows[1]["student_accuracy"] == untrained_student_accuracy(config)
    )  # never distilled
