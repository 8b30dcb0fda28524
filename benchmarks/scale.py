"""Per-round cost of the simulation against the compute floor, at many clients.

The *floor* is a plain in-process Python loop doing exactly the work of a federated-distillation
round: every client trains its persistent teacher on its partition and computes soft labels on
the transfer set, the server aggregates them (weighted by partition size), distills the student
and evaluates it on the test split — same models, data, seeds and settings, no Flower, one
thread. The *project* is ``run_federation`` on the in-process Grid with the unchanged ClientApp
and strategy; then the same on ``engine=processes`` (``--workers`` forked worker processes, one
per available core by default), on ``engine=ray`` (as many Ray actors, on a private Ray started
here) and on Flower's own Ray simulation (``engine=flower-ray``). They run in this process,
alternating, ``--repeats`` times; the ratio of median per-round times cancels out the machine's
speed and load.

    python benchmarks/scale.py --clients 300

A round's time is the run's own ``wall_seconds``: from the end of the previous round's
evaluation (round 1: from the start of the federation) to the end of this round's evaluation.
An engine's one-off start — forking the workers, starting Ray and the actors, putting the data
into the object store — happens before the federation starts, so it is not in any round; it
is reported on its own as ``<engine>_startup_seconds`` (for flower-ray: the whole simulation's
wall time minus its rounds).

Writes ``--out`` (JSON: clients, floor_seconds_per_round, project_seconds_per_round, ratio,
processes_ratio, ray_ratio, flower_ray_ratio, memory peaks, …); the last printed line is
``ratio=<r> processes=<p> ray=<q> flower_ray=<f> peak_rss_mib=<m>`` (each engine's per-round
time over the same floor).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch

# Ray lowers its workers' priority (niceness +15) by default; on a machine shared with other jobs
# that would time the scheduler, not the engine. Both Ray engines here run their workers at this
# process's priority, as the other engines do.
os.environ.setdefault("RAY_worker_niceness", "0")

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.processes import ProcessPoolGrid
from federation.run import run_federation
from federation.shards import available_cores
from fedkd.config import PartitionConfig, RunConfig
from fedkd.data.local import evaluation_split, info_for, private_partition, public_inputs
from fedkd.distillation import OptimizerSettings, evaluate, predict_logits, soften, train_supervised
from fedkd.models import build_model, model_for_client
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator
from fedkd.student import Student
from strategies.aggregation import PER_CLASS_WEIGHTS, class_counts, get_aggregator


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# PSS comes from walking each process's page tables (/proc/<pid>/smaps_rollup), which also holds
# the process's memory map lock; sampled every 0.1 s over a 4 GiB process tree it slowed the
# processes engine's round from 27 s to 37 s. RSS is a counter read and costs nothing.
RSS_INTERVAL_SECONDS = 0.1
PSS_INTERVAL_SECONDS = 2.0


@contextmanager
def tree_memory_peak(
    peaks: list[float], interval: float | None = None, *, proportional: bool = False
) -> Iterator[None]:
    """Sample the resident memory of this process and all its descendants (Ray's workers
    included) while the block runs; append the peak, in MiB, to ``peaks``. ``proportional``
    sums PSS instead of RSS: a page shared by k processes counts 1/k in each. The default
    interval is 0.1 s for RSS and 2 s for PSS (see ``PSS_INTERVAL_SECONDS``)."""
    if interval is None:
        interval = PSS_INTERVAL_SECONDS if proportional else RSS_INTERVAL_SECONDS
    me = psutil.Process()
    highest = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal highest
        while not done.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker that exited between listing and reading
                    total += process.memory_full_info().pss if proportional else process.memory_info().rss
            highest = max(highest, total)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        peaks.append(highest / 2**20)


def floor_run(config: RunConfig) -> list[float]:
    """The same rounds as the project, as a plain loop; returns seconds per round."""
    spec = config.split_spec()
    info = info_for(spec)
    transfer = public_inputs(spec).images
    test = evaluation_split(spec)
    settings = OptimizerSettings(lr=config.lr, batch_size=config.batch_size)
    aggregator = get_aggregator(config.aggregator)
    per_class = config.aggregator in PER_CLASS_WEIGHTS
    student_model = build_model(
        config.student_model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(config.seed, SeedPurpose.STUDENT_INIT),
    )
    student = Student(  # as strategies.registry builds the server's student
        student_model,
        temperature=config.temperature,
        epochs=config.distill_epochs,
        settings=settings,
        seed=config.seed,
        alpha=config.kd_alpha,
        max_shift=config.distill_shift,
    )
    teachers: dict[int, torch.nn.Module] = {}
    # The floor converts every partition to tensors once; it is the least work a round needs.
    partitions = [private_partition(spec, client) for client in range(config.num_clients)]
    seconds = []
    for server_round in range(1, config.rounds + 1):
        started = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ClientApp does
        soft_labels, weights = [], []
        for client in range(config.num_clients):
            partition = partitions[client]
            if len(partition) == 0:
                continue
            teacher = teachers.get(client)
            if teacher is None:
                teacher = build_model(
                    model_for_client(config.teacher_models, client),
                    input_shape=info.input_shape,
                    num_classes=info.num_classes,
                    seed=derive_seed(config.seed, client, SeedPurpose.TEACHER_INIT),
                )
                teachers[client] = teacher
            torch.manual_seed(derive_seed(config.seed, server_round, client, SeedPurpose.TEACHER_TRAIN))
            train_supervised(
                teacher,
                partition.images,
                partition.labels,
                epochs=config.local_epochs,
                settings=settings,
                generator=torch_generator(config.seed, server_round, client, SeedPurpose.TEACHER_TRAIN),
                max_shift=config.augment_shift,
            )
            soft_labels.append(soften(predict_logits(teacher, transfer), config.temperature).numpy())
            # Class counts where the aggregator weighs per class (as the clients send them then).
            weights.append(class_counts(partition.labels, info.num_classes) if per_class else len(partition))
        torch.set_num_threads(threads)
        targets = aggregator(np.stack(soft_labels), np.stack(weights).astype(np.float64))
        student.learn(transfer, targets, server_round=server_round)
        evaluate(student.model, test.images, test.labels)
        seconds.append(time.perf_counter() - started)
    return seconds


ENGINES = ("inprocess", "processes", "ray", "flower-ray")
# How the last line names each engine's ratio to the floor.
LAST_LINE_NAMES = {"inprocess": "ratio", "processes": "processes", "ray": "ray", "flower-ray": "flower_ray"}


def result_key(engine: str) -> str:
    """The prefix of an engine's keys in the JSON (the in-process engine keeps its old name)."""
    return "project" if engine == "inprocess" else engine.replace("-", "_")


def ratio_key(engine: str) -> str:
    return "ratio" if engine == "inprocess" else f"{result_key(engine)}_ratio"


def project_run(config: RunConfig) -> tuple[list[float], float]:
    """The same rounds through Flower's ClientApp/Strategy on the configured engine; returns the
    seconds of each round and the engine's one-off start."""
    started = time.perf_counter()
    if config.engine == "flower-ray":
        import tempfile

        from federation.sim import simulate

        with tempfile.TemporaryDirectory() as run_dir:
            rows = simulate(config, run_dir=run_dir)
        rounds = [row["wall_seconds"] for row in rows]
        return rounds, time.perf_counter() - started - sum(rounds)
    if config.engine == "processes":
        with ProcessPoolGrid(
            client_app, num_nodes=config.num_clients, workers=config.workers, split_spec=config.split_spec()
        ) as grid:
            startup = time.perf_counter() - started
            rows = run_federation(grid, config, run_dir=None)
    elif config.engine == "ray":
        from federation.ray_grid import RayGrid

        with RayGrid(
            client_app, num_nodes=config.num_clients, workers=config.workers, split_spec=config.split_spec()
        ) as actors:
            startup = time.perf_counter() - started
            rows = run_federation(actors, config, run_dir=None)
    else:
        grid = InProcessGrid(client_app, num_nodes=config.num_clients)
        startup = time.perf_counter() - started
        rows = run_federation(grid, config, run_dir=None)
    return [row["wall_seconds"] for row in rows], startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--public-size", type=int, default=500)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="processes and ray workers (0: one per available core)")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated engines to time against the floor (default: all of {', '.join(ENGINES)})",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--clients, --rounds and --repeats must be ≥ 1.")

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per trial, not per round
    config = RunConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        num_clients=args.clients,
        partition=PartitionConfig(scheme="iid"),
        rounds=args.rounds,
        public_size=args.public_size,
        local_epochs=args.local_epochs,
        distill_epochs=1,
        client_models=("cnn_small",),
        student_model="cnn_small",
    )
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}.")
    workers = min(args.workers or available_cores(), args.clients)
    floor: list[float] = []
    rounds: dict[str, list[float]] = {engine: [] for engine in engines}
    startup: dict[str, list[float]] = {engine: [] for engine in engines}
    rss: dict[str, list[float]] = {engine: [] for engine in ["floor", *engines]}
    pss: dict[str, list[float]] = {engine: [] for engine in engines}
    load = [psutil.getloadavg()[0]]
    for trial in range(1, args.repeats + 1):
        with tree_memory_peak(rss["floor"]):
            floor += floor_run(config)
        print(f"  trial {trial}: floor rounds {', '.join(f'{x:.2f}' for x in floor[-args.rounds :])} s", flush=True)
        for engine in engines:
            with tree_memory_peak(rss[engine]), tree_memory_peak(pss[engine], proportional=True):
                seconds, start = project_run(dataclasses.replace(config, engine=engine, workers=workers))
            rounds[engine] += seconds
            startup[engine].append(start)
            load.append(psutil.getloadavg()[0])
            # One line per engine as it finishes, so that a run cut short still leaves its figures.
            print(
                f"  trial {trial}: {engine} rounds {', '.join(f'{x:.2f}' for x in seconds)} s, start {start:.1f} s, "
                f"floor so far {statistics.median(floor):.2f} s/round, load average {load[-1]:.1f}",
                flush=True,
            )
        print(
            f"trial {trial}/{args.repeats}: floor {statistics.median(floor):.2f} s/round, "
            + ", ".join(f"{engine} {statistics.median(rounds[engine]):.2f}" for engine in engines)
            + f" s/round ({workers} workers); load average {load[-1]:.1f}",
            flush=True,
        )
    floor_s = statistics.median(floor)
    result: dict[str, float | int | str] = {
        "clients": args.clients,
        "dataset": args.dataset,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "workers": workers,
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average before the run and after each engine's run (other jobs on the machine).
        "load_average": ", ".join(f"{value:.1f}" for value in load),
        "floor_seconds_per_round": floor_s,
        # The whole process's peak: an upper bound for each engine, since the floor ran here too.
        "peak_rss_mib": peak_rss_mib(),
        "floor_peak_tree_rss_mib": max(rss["floor"]),
    }
    for engine in engines:
        key = result_key(engine)
        result[f"{key}_seconds_per_round"] = statistics.median(rounds[engine])
        result[f"{key}_startup_seconds"] = statistics.median(startup[engine])
        result[ratio_key(engine)] = statistics.median(rounds[engine]) / floor_s
        # Sampled over this process and all its descendants (workers, Ray's daemons and actors).
        # RSS counts shared pages (the dataset in shared memory or Ray's object store, the
        # libraries, what fork left unwritten) once per process; PSS shares them out.
        result[f"{key}_peak_tree_rss_mib"] = max(rss[engine])
        result[f"{key}_peak_tree_pss_mib"] = max(pss[engine])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
    print(
        " ".join(f"{LAST_LINE_NAMES[e]}={result[ratio_key(e)]:.3f}" for e in engines)
        + f" peak_rss_mib={result['peak_rss_mib']:.0f}"
    )


if __name__ == "__main__":
    main()
