"""Fixtures more than one test module uses."""

from __future__ import annotations

import pytest
from sharded import TINY

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation


@pytest.fixture(scope="session")
def inprocess_reference():
    """The tiny run on the in-process engine: its rows and every node's final state, which the
    sharded engines must reproduce to the bit."""
    grid = InProcessGrid(client_app, num_nodes=TINY.num_clients)
    rows = run_federation(grid, TINY, run_dir=None)
    return rows, grid.node_states()
