"""Flower ServerApp: reads the run config, then runs the federation on the Grid it is given.

Under ``flwr run`` the run config comes from ``[tool.flwr.app.config]`` in pyproject.toml
(overridable with ``--run-config``). Before round 1 it checks that the federation has
``num-clients`` nodes (:mod:`federation.nodes`): a simulation with another number of nodes
runs with one client per node when ``num-clients`` is left at its default, and otherwise the
run fails with the fix. Engines that do
not pass a run config (the in-process engine, ``run_simulation``) build the app with
:func:`make_server_app` instead; they size the federation from the config themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federation.nodes import await_nodes, fit_to_simulation
from federation.run import print_progress, run_federation
from fedkd.config import RunConfig, run_config_from_flower

app = ServerApp()


def default_run_dir() -> Path:
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = fit_to_simulation(grid, run_config_from_flower(context.run_config), timeout=30.0)
    await_nodes(grid, needed=config.num_clients, timeout=config.node_wait_timeout)
    run_dir = str(context.run_config.get("output-dir", "")) or default_run_dir()
    print(f"fedkd: writing results to {Path(run_dir).resolve()}", flush=True)
    run_federation(grid, config, run_dir=run_dir, on_round=print_progress(config.rounds))


def make_server_app(
    config: RunConfig, *, run_dir: str | Path, on_round: Callable[[dict[str, Any]], None] | None = None
) -> ServerApp:
    """A ServerApp with the config bound in, for runtimes that drop the run config."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir=run_dir, on_round=on_round or print_progress(config.rounds))

    return bound
