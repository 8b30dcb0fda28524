"""``fedkd-sim``: the Hydra entry point that runs the Flower apps in simulation.

Two engines run the same ServerApp logic and the same ClientApp:

* ``engine=inprocess`` (default) delivers each message to the ClientApp in this process;
* ``engine=ray`` uses Flower's Ray simulation engine (many cores, GPUs, Ray clusters).

The run folder is Hydra's output directory (``hydra.run.dir=…``; ``-m`` sweeps get one each).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedkd.checkpoint import ResumeError
from fedkd.config import RunConfig, run_config_from_mapping
from fedkd.results import RunFolder, format_bytes

logger = logging.getLogger("fedkd")

# Keys of the Hydra config that steer this entry point rather than the run.
LAUNCHER_KEYS = ("verbose", "rerun", "resume")


def simulate(
    config: RunConfig, *, run_dir: str | Path, verbose: bool = False, resume: bool = False
) -> list[dict[str, Any]]:
    """Run ``config`` with its engine and write the run folder; returns the per-round rows.

    ``resume`` continues an interrupted run in ``run_dir`` from its last checkpoint (in-process
    engine: Ray's simulated clients cannot be given their state back).
    """
    from federation.client_app import app as client_app
    from federation.run import print_progress, run_federation

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    transfer = (
        f", data-free ({config.synthesis.method}, {config.synthesis.per_client} synthetic inputs per client)"
        if config.transfer == "synthetic"
        else ""
    )
    print(
        f"fedkd: {config.strategy.name}{transfer} on {config.dataset}, {config.num_clients} clients "
        f"({config.partition.scheme}), {config.rounds} rounds, engine={config.engine} → {run_dir}",
        flush=True,
    )
    if config.engine == "inprocess":
        from federation.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, num_nodes=config.num_clients)
        return run_federation(grid, config, run_dir=run_dir, on_round=print_progress(config.rounds), resume=resume)
    if resume:
        raise ResumeError(
            "resume=true needs engine=inprocess: Flower's Ray engine cannot give its simulated clients "
            "their checkpointed state back."
        )

    from flwr.simulation import run_simulation

    from fedkd.results import read_metrics
    from federation.server_app import make_server_app

    run_simulation(
        server_app=make_server_app(config, run_dir=run_dir),
        client_app=client_app,
        num_supernodes=config.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    return read_metrics(run_dir)


@hydra.main(version_base=None, config_path="pkg://experiments.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    verbose = bool(values.pop("verbose", False))
    rerun = bool(values.pop("rerun", False))
    resume = bool(values.pop("resume", False))
    for key in LAUNCHER_KEYS:
        values.pop(key, None)
    from federation.run import check_data

    try:
        config = run_config_from_mapping(values)
        check_data(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"fedkd-sim: invalid configuration: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    run_dir = HydraConfig.get().runtime.output_dir
    started = time.perf_counter()
    finished = None if rerun else RunFolder(run_dir).finished_rows(config)
    if finished is not None:
        print(f"fedkd: {run_dir} already holds this finished run; kept it (rerun=true redoes it).", flush=True)
    try:
        rows = finished if finished is not None else simulate(config, run_dir=run_dir, verbose=verbose, resume=resume)
    except ResumeError as error:
        print(f"fedkd-sim: cannot resume: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if not rows:
        print("fedkd-sim: no round finished.", file=sys.stderr)
        raise SystemExit(1)
    last = rows[-1]
    print(
        f"fedkd: final student_accuracy {last['student_accuracy']:.4f} after {last['round']} rounds, "
        f"{format_bytes(sum(r['bytes_up'] for r in rows))} up / "
        f"{format_bytes(sum(r['bytes_down'] for r in rows))} down, "
        f"{time.perf_counter() - started:.1f} s; results in {run_dir}",
        flush=True,
    )
    return float(last["student_accuracy"])


def main() -> None:
    """Console-script entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
