"""engine=ray across a two-node Ray cluster on loopback, as a user runs it (``ray.address``): the
actors, and so the clients, land on both nodes, the run gives the in-process numbers, and the
test stops exactly the Ray processes it started (never ``ray stop``, which would stop everyone's)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from sharded import TINY, numbers

from federation.client_app import app as client_app
from federation.run import run_federation


def _pids(node) -> set[int]:
    """The processes Ray started for one node (gcs, raylet, log monitor, …)."""
    return {info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None}


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


@pytest.mark.slow
def test_a_two_node_cluster_runs_the_shards_on_both_nodes_and_is_stopped_exactly(inprocess_reference):
    pytest.importorskip("ray")
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from federation.ray_grid import RayGrid

    # Cluster records its address in Ray's default temp dir (for address="auto"); put back what
    # was there, so that a Ray someone else runs on this machine keeps its entry.
    address_file = Path(get_ray_address_file(None))
    previous_address = address_file.read_text() if address_file.exists() else None
    temp_dir = tempfile.mkdtemp(prefix="fedkd-ray-")  # short: Ray's socket paths must stay < 108 bytes
    started = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False},
        shutdown_at_exit=True,
    )
    ours: set[int] = set()
    actor_pids: set[int] = set()
    try:
        worker = cluster.add_node(num_cpus=1)
        ours = _pids(cluster.head_node) | _pids(worker)
        assert len(ours) >= 4  # at least a gcs and a raylet per node, and the head's helpers
        cluster.wait_for_nodes()
        node_ids = {cluster.head_node.node_id, worker.node_id}
        assert len(node_ids) == 2
        # workers=0: one actor per CPU of the cluster, 2 here, one on each node.
        with RayGrid(
            client_app, num_nodes=TINY.num_clients, address=cluster.address, split_spec=TINY.split_spec()
        ) as grid:
            locations = grid.actor_locations()
            assert {node for node, _ in locations} == node_ids
            actor_pids = {pid for _, pid in locations}
            rows = run_federation(grid, TINY, run_dir=None)
        assert not ray.is_initialized()  # the grid disconnected; the cluster is still ours to stop
        assert numbers(rows) == numbers(inprocess_reference[0])
        assert all(row["failed"] == 0 and row["clients"] == TINY.num_clients for row in rows)
    finally:
        cluster.shutdown()
        deadline = time.monotonic() + 20
        while _alive(ours | actor_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(ours | actor_pids)
        if previous_address is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous_address)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes this test started are still running: {sorted(left)}"
    assert time.perf_counter() - started < 120  # about 30 s on 2 idle cores
