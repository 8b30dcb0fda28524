"""engine=processes: worker processes holding fixed shards of the clients give the in-process
engine's numbers bit for bit, and a worker that dies becomes failed replies, not a failed run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from multiprocessing.connection import wait

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from sharded import TINY, ask, dying_app, echo_app, numbers, teacher_bytes

from federation.client_app import app as client_app
from federation.processes import ProcessPoolGrid, _pack, _unpack
from federation.run import run_federation
from federation.shards import assign_shards
from fedkd.config import RunConfig, run_config_to_flower

# --- fast: the shards, the framing, the config key ---


@pytest.mark.parametrize("num_nodes, workers", [(1, 1), (1, 4), (4, 2), (10, 3), (7, 7), (300, 2), (5, 16)])
def test_shards_cover_every_node_once_and_differ_by_at_most_one(num_nodes, workers):
    shards = assign_shards(num_nodes, workers)
    assert len(shards) == min(num_nodes, workers)
    assert sorted(node for shard in shards for node in shard) == list(range(1, num_nodes + 1))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(list(shard) == sorted(shard) for shard in shards)
    assert assign_shards(num_nodes, workers) == shards  # a pure function of the two counts


def test_shards_are_dealt_one_turn_at_a_time_from_a_moving_start():
    assert assign_shards(7, 3) == [(1, 6), (2, 4), (3, 5, 7)]
    assert assign_shards(2, 5) == [(1,), (2,)]


@pytest.mark.parametrize("num_nodes, workers, architectures", [(100, 2, 2), (20, 2, 2), (30, 3, 3), (40, 4, 2)])
def test_every_shard_holds_each_round_robin_architecture_about_equally(num_nodes, workers, architectures):
    # client_models go round-robin over client ids (node id - 1); a shard of only one of them
    # leaves the workers with the cheaper teachers idle.
    for shard in assign_shards(num_nodes, workers):
        counts = [sum((node - 1) % architectures == a for node in shard) for a in range(architectures)]
        assert max(counts) - min(counts) <= 1, (shard, counts)


FREE_AND_MEASURE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from federation.shards import keep_freed_memory

    def resident_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    if sys.argv[1] == "keep":
        keep_freed_memory()
    before = resident_mib()
    buffer = np.ones(16 * 2**20, dtype=np.uint8)  # 16 MiB, written, so resident
    del buffer
    print(resident_mib() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_keeps_the_memory_its_last_client_freed():
    """With glibc's defaults a 16 MiB buffer is unmapped when freed and faulted in again by the
    next client; a worker keeps it (the kernel time this saves is measured in benchmarks/scale)."""

    def retained_mib(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True, check=True
        )
        return float(done.stdout)

    assert retained_mib("default") < 4
    assert retained_mib("keep") > 12


@pytest.mark.parametrize("num_nodes, workers", [(0, 2), (3, 0), (3, -1)])
def test_shards_refuse_empty_counts(num_nodes, workers):
    with pytest.raises(ValueError):
        assign_shards(num_nodes, workers)


def test_frames_round_trip_headers_and_byte_strings():
    blobs = [b"", b"\x00\x01", bytes(range(256)) * 3]
    header, back = _unpack(_pack({"op": "deliver", "nodes": [3, 1]}, blobs))
    assert header == {"op": "deliver", "nodes": [3, 1]} and back == blobs


def test_workers_is_a_runtime_key_not_part_of_flowers_run_config():
    assert "workers" not in run_config_to_flower(RunConfig(engine="processes", workers=3))
    with pytest.raises(ValueError, match="workers"):
        RunConfig(workers=-1)


# --- the pool itself, with a ClientApp that does no training ---


def test_each_worker_serves_its_own_shard_and_keeps_its_nodes_state():
    with ProcessPoolGrid(echo_app(), num_nodes=5, workers=2, progress=False) as grid:
        for _ in range(2):
            replies = ask(grid, [5, 1, 2, 3, 4])
        assert [reply.metadata.src_node_id for reply in replies] == [5, 1, 2, 3, 4]  # the order sent
        pids = {reply.content["m"]["node"]: reply.content["m"]["pid"] for reply in replies}
        assert pids[1] == pids[4] == pids[5] != pids[2] == pids[3] != os.getpid()  # shards (1, 4, 5), (2, 3)
        states = grid.node_states()
        assert {node: state["seen"]["count"] for node, state in states.items()} == {n: 2 for n in range(1, 6)}
        states[3]["seen"] = MetricRecord({"count": 40})
        grid.restore_node_states({3: states[3]})
        ask(grid, [3])
        assert grid.node_states()[3]["seen"]["count"] == 41


def test_a_worker_that_dies_becomes_error_replies_and_is_forked_again_with_empty_state(monkeypatch):
    # workers=2 deals nodes (1, 4) and (2, 3): node 4 runs after node 1 in the worker it kills.
    # The server looks late, when node 1's reply waits in the pipe of a process already dead.
    import federation.processes

    def late_wait(handles, timeout=None):
        time.sleep(0.5)
        return wait(handles, timeout)

    monkeypatch.setattr(federation.processes, "wait", late_wait)
    with ProcessPoolGrid(echo_app(dies=4), num_nodes=4, workers=2, progress=False) as grid:
        replies = ask(grid, [1, 2, 3, 4])
        assert [reply.has_error() for reply in replies] == [False, False, False, True]
        assert replies[3].error.code == ErrorCode.CLIENT_APP_CRASHED and "died" in replies[3].error.reason
        assert grid.restarts == 0
        states = grid.node_states()  # forks the new worker first
        assert grid.restarts == 1
        assert states[1] == RecordDict() and states[2]["seen"]["count"] == 1  # node 1's state died with it
        states[4]["died"] = MetricRecord({"once": 1})  # tell the new worker's node 4 not to die again
        grid.restore_node_states({4: states[4]})
        assert not any(reply.has_error() for reply in ask(grid, [1, 2, 3, 4]))


def test_the_timeout_applies_to_each_clients_own_time():
    with ProcessPoolGrid(echo_app(sleeps=1), num_nodes=4, workers=2, progress=False) as grid:
        replies = ask(grid, [1, 2, 3, 4], timeout=1.0)
    assert [reply.metadata.src_node_id for reply in replies] == [2, 3, 4]  # node 3 waited for node 1, in time


# --- slow: whole runs ---


@pytest.mark.slow
def test_processes_give_the_in_process_numbers_bit_for_bit(inprocess_reference):
    rows, states = inprocess_reference
    with ProcessPoolGrid(client_app, num_nodes=TINY.num_clients, workers=2, split_spec=TINY.split_spec()) as grid:
        assert len({*grid.worker_pids(), os.getpid()}) == 3
        got = run_federation(grid, TINY, run_dir=None)
        got_states = grid.node_states()
    assert numbers(got) == numbers(rows)
    assert got[-1]["failed"] == 0 and got[-1]["clients"] == TINY.num_clients
    assert teacher_bytes(got_states) == teacher_bytes(states)  # every teacher, to the bit


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_processes_run_ends_where_the_uninterrupted_one_does(inprocess_reference, tmp_path):
    rows, _ = inprocess_reference

    def crash_after_round_1(row):
        if row["round"] == 1:
            raise Crash

    with pytest.raises(Crash), ProcessPoolGrid(client_app, num_nodes=TINY.num_clients, workers=2) as grid:
        run_federation(grid, TINY, run_dir=tmp_path, on_round=crash_after_round_1)
    with ProcessPoolGrid(client_app, num_nodes=TINY.num_clients, workers=3) as grid:  # other shards
        resumed = run_federation(grid, TINY, run_dir=tmp_path, resume=True)
    assert numbers(resumed) == numbers(rows)


@pytest.mark.slow
def test_a_killed_worker_fails_its_unanswered_clients_and_the_run_goes_on():
    # workers=2 deals nodes (1, 4) and (2, 3); node 4 runs after node 1 in its worker.
    config = TINY
    with ProcessPoolGrid(
        dying_app(node_id=4, in_round=1), num_nodes=4, workers=2, split_spec=config.split_spec()
    ) as grid:
        rows = run_federation(grid, config, run_dir=None)
        assert grid.restarts == 1
        states = grid.node_states()
    assert [row["round"] for row in rows] == [1, 2]
    # Round 1: node 1 answered before its worker died, node 4 did not; the round used the rest.
    assert rows[0]["failed_nodes"] == [4] and rows[0]["clients"] == 3
    # Round 2: a fresh worker serves the shard; node 4 trained again from an empty state.
    assert rows[1]["failed"] == 0 and rows[1]["clients"] == 4
    assert all("teacher" in states[node] for node in (1, 2, 3, 4))
