"""engine=ray: one Ray actor per shard gives the in-process engine's numbers bit for bit, resumes
from a checkpoint, and an actor that dies becomes failed replies, not a failed run. The other
engines never import Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sharded import TINY, ask, dying_app, echo_app, numbers, teacher_bytes

from federation.client_app import app as client_app
from federation.run import run_federation

ROOT = Path(__file__).resolve().parents[1]

# --- fast: nothing here starts Ray ---


def test_the_other_engines_never_import_ray():
    script = (
        "import sys\n"
        "from federation.client_app import app\n"
        "from federation.inprocess import InProcessGrid\n"
        "from federation.processes import ProcessPoolGrid\n"
        "from federation.run import run_federation\n"
        "from federation.sim import simulate, main\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ray_address_is_a_launcher_key_not_part_of_the_run():
    from hydra import compose, initialize_config_module

    from federation.hydra_schema import register_configs, sim_config_from_hydra

    register_configs()
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["engine=ray", "ray.address=10.0.0.1:6379", "workers=3"])
    sim = sim_config_from_hydra(cfg)
    assert sim.ray.address == "10.0.0.1:6379" and sim.engine == "ray" and sim.workers == 3
    assert "ray" not in {field for field in sim.run_config().__dataclass_fields__}
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        assert compose(config_name="config", overrides=["engine=flower-ray"]).engine == "flower-ray"


# --- slow: a private Ray on this machine, started once for the module ---


@pytest.fixture(scope="module")
def local_ray():
    pytest.importorskip("ray")
    import ray

    import federation.ray_grid  # noqa: F401 - sets Ray's environment before it starts

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_each_actor_serves_its_own_shard_and_keeps_its_nodes_state(local_ray):
    from flwr.app import MetricRecord

    from federation.ray_grid import RayGrid

    with RayGrid(echo_app(), num_nodes=5, workers=2, progress=False) as grid:
        for _ in range(2):
            replies = ask(grid, [5, 1, 2, 3, 4])
        assert [reply.metadata.src_node_id for reply in replies] == [5, 1, 2, 3, 4]  # the order sent
        pids = {reply.content["m"]["node"]: reply.content["m"]["pid"] for reply in replies}
        assert pids[1] == pids[4] == pids[5] != pids[2] == pids[3] != os.getpid()  # shards (1, 4, 5), (2, 3)
        assert sorted(pid for _, pid in grid.actor_locations()) == sorted({pids[1], pids[2]})
        states = grid.node_states()
        assert {node: state["seen"]["count"] for node, state in states.items()} == {n: 2 for n in range(1, 6)}
        states[3]["seen"] = MetricRecord({"count": 40})
        grid.restore_node_states({3: states[3]})
        ask(grid, [3])
        assert grid.node_states()[3]["seen"]["count"] == 41
    assert local_ray.is_initialized()  # a Ray the grid did not start stays up


@pytest.mark.slow
def test_an_actor_that_dies_becomes_error_replies_and_is_started_again_with_empty_state(local_ray):
    from flwr.app import MetricRecord
    from flwr.common.constant import ErrorCode

    from federation.ray_grid import RayGrid

    # workers=2 deals nodes (1, 4) and (2, 3): node 4 kills the actor that also serves node 1.
    with RayGrid(echo_app(dies=4), num_nodes=4, workers=2, progress=False) as grid:
        replies = ask(grid, [1, 2, 3, 4])
        errors = [reply.has_error() for reply in replies]
        assert errors[1] is False and errors[2] is False and errors[3] is True  # node 1's reply may be lost too
        assert replies[3].error.code == ErrorCode.CLIENT_APP_CRASHED and "died" in replies[3].error.reason
        assert grid.restarts == 0
        states = grid.node_states()  # starts the new actor first
        assert grid.restarts == 1
        assert states[1] == states[4] and "seen" not in states[4] and states[2]["seen"]["count"] == 1
        states[4]["died"] = MetricRecord({"once": 1})  # tell the new actor's node 4 not to die again
        grid.restore_node_states({4: states[4]})
        assert not any(reply.has_error() for reply in ask(grid, [1, 2, 3, 4]))


@pytest.mark.slow
def test_ray_gives_the_in_process_numbers_bit_for_bit(local_ray, inprocess_reference):
    from federation.ray_grid import RayGrid

    rows, states = inprocess_reference
    with RayGrid(client_app, num_nodes=TINY.num_clients, workers=2, split_spec=TINY.split_spec()) as grid:
        assert len({pid for _, pid in grid.actor_locations()} | {os.getpid()}) == 3
        got = run_federation(grid, TINY, run_dir=None)
        got_states = grid.node_states()
    assert numbers(got) == numbers(rows)
    assert got[-1]["failed"] == 0 and got[-1]["clients"] == TINY.num_clients
    assert teacher_bytes(got_states) == teacher_bytes(states)  # every teacher, to the bit


class Crash(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_ray_run_ends_where_the_uninterrupted_one_does(local_ray, inprocess_reference, tmp_path):
    from federation.ray_grid import RayGrid

    rows, _ = inprocess_reference

    def crash_after_round_1(row):
        if row["round"] == 1:
            raise Crash

    with pytest.raises(Crash), RayGrid(client_app, num_nodes=TINY.num_clients, workers=2) as grid:
        run_federation(grid, TINY, run_dir=tmp_path, on_round=crash_after_round_1)
    with RayGrid(client_app, num_nodes=TINY.num_clients, workers=1) as grid:  # other shards
        resumed = run_federation(grid, TINY, run_dir=tmp_path, resume=True)
    assert numbers(resumed) == numbers(rows)


@pytest.mark.slow
def test_a_killed_actor_fails_its_unanswered_clients_and_the_run_goes_on(local_ray):
    from federation.ray_grid import RayGrid

    # workers=2 deals nodes (1, 4) and (2, 3); node 4 runs after node 1 in its actor.
    with RayGrid(
        dying_app(node_id=4, in_round=1), num_nodes=4, workers=2, split_spec=TINY.split_spec(), progress=False
    ) as grid:
        rows = run_federation(grid, TINY, run_dir=None)
        assert grid.restarts == 1
        states = grid.node_states()
    assert [row["round"] for row in rows] == [1, 2]
    # Round 1: node 4 failed (and node 1 if its reply had not reached the server); 2 and 3 count.
    assert 4 in rows[0]["failed_nodes"] and set(rows[0]["failed_nodes"]) <= {1, 4}
    assert rows[0]["clients"] == 4 - rows[0]["failed"]
    # Round 2: a fresh actor serves the shard; its nodes trained again from an empty state.
    assert rows[1]["failed"] == 0 and rows[1]["clients"] == 4
    assert all("teacher" in states[node] for node in (1, 2, 3, 4))
