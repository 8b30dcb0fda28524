"""The ServerApp's federation-size check (federation/nodes.py), without a Flower runtime."""

from __future__ import annotations

import pytest

from federation.nodes import FederationSizeError, await_nodes, registers_nodes_at_once


class JoiningGrid:
    """A grid whose nodes connect over time: ``arrivals[k]`` is when node k connects."""

    def __init__(self, arrivals: list[float]) -> None:
        self.arrivals = arrivals
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get_node_ids(self) -> list[int]:
        return [k + 1 for k, at in enumerate(self.arrivals) if at <= self.now]


def _await(grid: JoiningGrid, **kwargs):
    return await_nodes(grid, clock=grid.clock, sleep=grid.sleep, **kwargs)  # type: ignore[arg-type]


def test_a_simulation_with_too_few_nodes_fails_at_once_naming_both_fixes():
    grid = JoiningGrid([0.0, 0.0])
    with pytest.raises(FederationSizeError) as raised:
        _await(grid, needed=10, timeout=60.0, all_at_once=True)
    message = str(raised.value)
    assert 'flwr run . --stream --federation-config "num-supernodes=10"' in message
    assert 'flwr run . --stream --run-config "num-clients=2"' in message
    assert grid.now == 0.0  # no waiting


def test_a_simulation_with_too_many_nodes_fails_too():
    # each simulated node holds num-partitions=3, so every client would refuse num-clients=2
    with pytest.raises(FederationSizeError, match='num-clients=3"'):
        _await(JoiningGrid([0.0] * 3), needed=2, timeout=60.0, all_at_once=True)


def test_a_simulation_waits_for_its_nodes_to_be_registered():
    grid = JoiningGrid([2.0, 2.0])
    assert _await(grid, needed=2, timeout=60.0, all_at_once=True) == [1, 2]
    assert 2.0 <= grid.now < 3.0


def test_a_deployment_waits_for_late_nodes():
    grid = JoiningGrid([0.0, 5.0, 30.0])
    assert _await(grid, needed=3, timeout=60.0, all_at_once=False) == [1, 2, 3]
    assert 30.0 <= grid.now < 31.0


def test_a_deployment_that_stays_short_fails_after_the_timeout():
    grid = JoiningGrid([0.0, 1.0, 1000.0])
    with pytest.raises(FederationSizeError, match="has 2 .*checked after 60 s"):
        _await(grid, needed=3, timeout=60.0, all_at_once=False)
    assert grid.now == pytest.approx(60.0)


def test_a_deployment_may_have_more_nodes_than_clients():
    assert len(_await(JoiningGrid([0.0] * 4), needed=3, timeout=60.0, all_at_once=False)) == 4


def test_flowers_simulation_grid_registers_nodes_at_once():
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    assert registers_nodes_at_once(InMemoryGrid(state_factory=state))
    assert not registers_nodes_at_once(JoiningGrid([]))  # type: ignore[arg-type]
