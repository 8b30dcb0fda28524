"""Clients that crash or time out mid-round: the round goes on with the replies that arrived."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from baselines import untrained_student_accuracy
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from hypothesis import given
from hypothesis import strategies as st

from federation import inprocess
from federation.client_app import app as honest_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.config import FailureConfig, PartitionConfig, RunConfig, StrategyConfig
from fedkd.faults import crashed_clients

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


@given(num_clients=st.integers(1, 300), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_the_crashing_share_is_a_seeded_choice_of_the_right_size_drawn_afresh_each_round(num_clients, fraction, seed):
    first = crashed_clients(num_clients, fraction, seed, 1)
    assert len(first) == round(fraction * num_clients)
    assert first <= set(range(num_clients))
    assert first == crashed_clients(num_clients, fraction, seed, 1)


def test_crashes_change_from_round_to_round_and_bad_fractions_name_the_key():
    assert crashed_clients(100, 0.3, 0, 1) != crashed_clients(100, 0.3, 0, 2)
    with pytest.raises(ValueError, match="failure.crash_fraction"):
        FailureConfig(crash_fraction=1.5)


@pytest.mark.slow
def test_a_hundred_clients_with_thirty_percent_crashing_every_round_lose_nothing():
    config = RunConfig(
        dataset="digits",
        num_clients=100,
        rounds=2,
        public_size=100,
        local_epochs=1,
        distill_epochs=1,
        partition=PartitionConfig(scheme="iid"),
        client_models=("cnn_small",),
        student_model="cnn_small",
        failure=FailureConfig(crash_fraction=0.3),
    )
    rows = run_federation(InProcessGrid(honest_app, num_nodes=100), config, run_dir=None)
    assert len(rows) == 2
    for server_round, row in enumerate(rows, start=1):
        crashed = crashed_clients(100, 0.3, config.seed, server_round)
        assert row["failed"] == 30 and row["clients"] == 70 and row["rejected"] == 0
        assert row["failed_nodes"] == sorted(client + 1 for client in crashed)  # node k + 1 holds partition k
    assert rows[0]["failed_nodes"] != rows[1]["failed_nodes"]
