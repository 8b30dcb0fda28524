"""Time and memory per round for a large population of which each round samples a fraction.

    python benchmarks/population.py --clients 10000 --fraction-train 0.1 --engine processes \\
        --out results/scale/population-10000.json

The run is ``scale.py``'s (IID MNIST, ``cnn_small`` teachers and student, one local epoch, one
distillation epoch), with ``strategy.fraction_train`` of the clients training each round, so
10,000 clients at 0.1 do the client work of 1,000 per round while the grid holds 10,000 nodes
(their Flower ``Context``s, the split's 10,000 partitions). Each round's time is the run's own
``wall_seconds`` (the engine's start is reported apart, as in ``scale.py``); memory is the peak
resident set of this process and all its descendants, sampled every 0.1 s, as RSS (shared pages
counted per process) and PSS (shared pages shared out); CPU seconds are this process's and its
waited-for descendants' user + system time.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from scale import ENGINES, project_run, tree_memory_peak

from federation.shards import available_cores
from fedkd.config import PartitionConfig, RunConfig, StrategyConfig


def cpu_seconds() -> float:
    """User + system seconds of this process and its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--fraction-train", type=float, default=0.1)
    parser.add_argument("--engine", default="processes", choices=ENGINES)
    parser.add_argument("--workers", type=int, default=0, help="processes and ray workers (0: one per available core)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--public-size", type=int, default=500)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    config = RunConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        num_clients=args.clients,
        partition=PartitionConfig(scheme="iid"),
        strategy=StrategyConfig(fraction_train=args.fraction_train),
        rounds=args.rounds,
        public_size=args.public_size,
        local_epochs=args.local_epochs,
        distill_epochs=1,
        client_models=("cnn_small",),
        student_model="cnn_small",
        engine=args.engine,
        workers=args.workers,
    )
    rss: list[float] = []
    pss: list[float] = []
    load_before = psutil.getloadavg()[0]
    started, cpu_started = time.perf_counter(), cpu_seconds()
    with tree_memory_peak(rss), tree_memory_peak(pss, proportional=True):
        seconds, startup = project_run(config)
    result = {
        "clients": args.clients,
        "fraction_train": args.fraction_train,
        "clients_per_round": max(1, round(args.clients * args.fraction_train)),
        "engine": args.engine,
        "workers": min(args.workers or available_cores(), args.clients) if args.engine != "inprocess" else 1,
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "dataset": args.dataset,
        "public_size": args.public_size,
        "rounds": args.rounds,
        "seconds_per_round": seconds,
        "median_seconds_per_round": statistics.median(seconds),
        "startup_seconds": startup,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu_started,
        "peak_tree_rss_mib": rss[0],
        "peak_tree_pss_mib": pss[0],
        "load_average": f"{load_before:.1f}, {psutil.getloadavg()[0]:.1f}",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
    print(
        f"clients={args.clients} per_round={result['clients_per_round']} engine={args.engine} "
        f"seconds_per_round={result['median_seconds_per_round']:.1f} peak_pss_mib={pss[0]:.0f} peak_rss_mib={rss[0]:.0f}"
    )


if __name__ == "__main__":
    main()
