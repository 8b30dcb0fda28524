"""``fedkd-sim``: the Hydra entry point that runs the Flower apps in simulation.

Four engines run the same ServerApp logic and the same ClientApp (``engine=auto``, the default,
picks ``processes`` where this process may use more than one core, else ``inprocess``):

* ``engine=inprocess`` delivers each message to the ClientApp in this process;
* ``engine=processes`` runs the ClientApp in ``workers`` forked processes, a fixed shard of the
  clients each (:mod:`federation.processes`);
* ``engine=ray`` runs it in ``workers`` Ray actors, a fixed shard each, on this machine or a Ray
  cluster at ``ray.address`` (:mod:`federation.ray_grid`);
* ``engine=flower-ray`` uses Flower's own Ray simulation engine (one task per message; GPUs).

The run folder is Hydra's output directory (``hydra.run.dir=…``; ``-m`` sweeps get one each).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

# Idle OpenMP threads sleep instead of spinning: on a few cores shared with other work, spinning
# threads starve the busy ones (see experiments/dpsgd_central.py). Read when torch first loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from federation.hydra_schema import register_configs, sim_config_from_hydra
from federation.shards import available_cores
from fedkd.checkpoint import ResumeError
from fedkd.config import RunConfig
from fedkd.results import RunFolder, format_bytes
from fedkd.tracking import TensorBoardLogger, round_callbacks


def simulate(
    config: RunConfig,
    *,
    run_dir: str | Path,
    verbose: bool = False,
    resume: bool = False,
    logger: str = "jsonl",
    ray_address: str = "",
) -> list[dict[str, Any]]:
    """Run ``config`` with its engine and write the run folder; returns the per-round rows.

    ``resume`` continues an interrupted run in ``run_dir`` from its last checkpoint (every engine
    but ``flower-ray``, whose simulated clients cannot be given their state back).
    ``logger="tensorboard"`` also writes each round into TensorBoard event files in the run
    folder. ``ray_address`` is the Ray cluster ``engine=ray`` joins (empty: a private Ray here).
    """
    tensorboard = TensorBoardLogger(run_dir) if logger == "tensorboard" else None
    try:
        return _simulate(
            config, run_dir=run_dir, verbose=verbose, resume=resume, tensorboard=tensorboard, ray_address=ray_address
        )
    finally:
        if tensorboard is not None:
            tensorboard.close()


def chosen_engine(config: RunConfig) -> str:
    """The engine a run uses: ``engine=auto`` is ``processes`` when this process may use more than
    one core and there is more than one client (clients then train side by side, one per core),
    and ``inprocess`` otherwise; any other setting is itself."""
    if config.engine != "auto":
        return config.engine
    return "processes" if config.num_clients > 1 and available_cores() > 1 else "inprocess"


def _simulate(
    config: RunConfig,
    *,
    run_dir: str | Path,
    verbose: bool,
    resume: bool,
    tensorboard: TensorBoardLogger | None,
    ray_address: str,
) -> list[dict[str, Any]]:
    from federation.client_app import app as client_app
    from federation.run import print_progress, run_federation

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    progress = print_progress(config.rounds)
    on_round = progress if tensorboard is None else round_callbacks(progress, tensorboard)
    transfer = (
        f", data-free ({config.synthesis.method}, {config.synthesis.per_client} synthetic inputs per client)"
        if config.transfer == "synthetic"
        else ""
    )
    engine = chosen_engine(config)
    chosen = f"engine={engine}" if engine == config.engine else f"engine={engine} (auto, {available_cores()} cores)"
    config = dataclasses.replace(config, engine=engine)
    print(
        f"fedkd: {config.strategy.name}{transfer} on {config.dataset}, {config.num_clients} clients "
        f"({config.partition.scheme}), {config.rounds} rounds, {chosen} → {run_dir}",
        flush=True,
    )
    if config.engine == "inprocess":
        from federation.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, num_nodes=config.num_clients)
        return run_federation(grid, config, run_dir=run_dir, on_round=on_round, resume=resume)
    if config.engine == "processes":
        from federation.processes import ProcessPoolGrid

        with ProcessPoolGrid(
            client_app, num_nodes=config.num_clients, workers=config.workers, split_spec=config.split_spec()
        ) as pool:
            return run_federation(pool, config, run_dir=run_dir, on_round=on_round, resume=resume)
    if config.engine == "ray":
        from federation.ray_grid import RayGrid  # imports Ray: only this engine pays for it

        with RayGrid(
            client_app,
            num_nodes=config.num_clients,
            workers=config.workers,
            address=ray_address,
            split_spec=config.split_spec(),
        ) as actors:
            return run_federation(actors, config, run_dir=run_dir, on_round=on_round, resume=resume)
    if resume:
        raise ResumeError(
            "resume=true needs engine=inprocess, processes or ray: Flower's Ray engine (engine=flower-ray) "
            "cannot give its simulated clients their checkpointed state back."
        )

    from flwr.simulation import run_simulation

    from federation.server_app import make_server_app
    from fedkd.results import read_metrics

    run_simulation(
        server_app=make_server_app(config, run_dir=run_dir, on_round=on_round),
        client_app=client_app,
        num_supernodes=config.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    return read_metrics(run_dir)


register_configs()


@hydra.main(version_base=None, config_path="pkg://experiments.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from federation.run import check_data

    try:
        sim = sim_config_from_hydra(cfg)
        config = sim.run_config()
        check_data(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        fail(f"invalid configuration: {error}")
    run_dir = HydraConfig.get().runtime.output_dir
    started = time.perf_counter()
    finished = None if sim.rerun else RunFolder(run_dir).finished_rows(config)
    if finished is not None:
        print(f"fedkd: {run_dir} already holds this finished run; kept it (rerun=true redoes it).", flush=True)
    try:
        rows = (
            finished
            if finished is not None
            else simulate(
                config,
                run_dir=run_dir,
                verbose=sim.verbose,
                resume=sim.resume,
                logger=sim.logger,
                ray_address=sim.ray.address,
            )
        )
    except ResumeError as error:
        fail(f"cannot resume: {error}")
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


def fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2: the command line asked for something invalid."""
    print(f"fedkd-sim: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def check_overrides(argv: list[str]) -> None:
    """Compose the config the command line asks for, before Hydra runs it, so that a bad key or
    value (``rounds=abc``) ends in one line and exit code 2 rather than Hydra's traceback.

    Sweeps (``-m``) are checked by Hydra itself, job by job.
    """
    if any(arg in ("-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg") for arg in argv):
        return
    config_name, overrides, args = "config", [], iter(argv)
    for arg in args:
        if arg in ("--config-name", "-cn"):
            config_name = next(args, config_name)
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--config-path", "-cp", "--config-dir", "-cd"):
            next(args, None)
        elif not arg.startswith("-") and not arg.startswith("hydra.") and not arg.startswith("hydra/"):
            overrides.append(arg)
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="experiments.conf", version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
        sim_config_from_hydra(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        fail(f"invalid configuration: {_first_line(error)}")
    except ValueError as error:
        fail(f"invalid configuration: {error}")


def _first_line(error: BaseException) -> str:
    """Hydra's error and its cause, each cut to its first line ("Error merging override
    rounds=abc: Value 'abc' of type 'str' could not be converted to Integer")."""
    parts: list[str] = []
    cause: BaseException | None = error
    while cause is not None and len(parts) < 2:
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        if lines and lines[0] not in parts:
            parts.append(lines[0])
        cause = cause.__cause__
    return ": ".join(parts) or type(error).__name__


def main() -> None:
    """Console-script entry point."""
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
