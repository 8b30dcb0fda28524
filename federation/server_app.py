"""Flower ServerApp: reads the run config, then runs the federation on the Grid it is given.

Under ``flwr run`` the run config comes from ``[tool.flwr.app.config]`` in pyproject.toml
(overridable with ``--run-config``). Before round 1 it checks that the federation has
``num-clients`` nodes (:mod:`federation.nodes`) and fails with the fix if not. Engines that do
not pass a run config (the in-process engine, ``run_simulation``) build the app with
:func:`make_server_app` instead; they size the federation from the config themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedkd.config import RunConfig, run_config_from_flower
from federation.nodes import DEFAULT_NODE_WAIT_TIMEOUT, NODE_WAIT_TIMEOUT_KEY, await_nodes
from federation.run import print_progress, run_federation

app = ServerApp()

# Run-config keys about how this ServerApp runs rather than what it runs; RunConfig does not
# hold them, so they are taken out before the rest is parsed.
SERVER_APP_KEYS = (NODE_WAIT_TIMEOUT_KEY,)


def default_run_dir() -> Path:
    return Path("outputs") / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    values = dict(context.run_config)
    node_wait_timeout = float(values.pop(NODE_WAIT_TIMEOUT_KEY, DEFAULT_NODE_WAIT_TIMEOUT))
    config = run_config_from_flower(values)
    await_nodes(grid, needed=config.num_clients, timeout=node_wait_timeout)
    run_dir = str(context.run_config.get("output-dir", "")) or default_run_dir()
    print(f"fedkd: writing results to {Path(run_dir).resolve()}", flush=True)
    run_federation(grid, config, run_dir=run_dir, on_round=print_progress(config.rounds))


def make_server_app(config: RunConfig, *, run_dir: str | Path) -> ServerApp:
    """A ServerApp with the config bound in, for runtimes that drop the run config."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir=run_dir, on_round=print_progress(config.rounds))

    return bound
