"""Per-round cost of the simulation against the compute floor, at many clients.

The *floor* is a plain in-process Python loop doing exactly the work of a federated-distillation
round: every client trains its persistent teacher on its partition and computes soft labels on
the transfer set, the server aggregates them (weighted by partition size), distills the student
and evaluates it on the test split — same models, data, seeds and settings, no Flower. The
*project* is ``run_federation`` on the in-process Grid with the unchanged ClientApp and strategy;
then the same on ``engine=processes`` (``--workers`` forked worker processes, one per available
core by default), and optionally Flower's Ray engine. They run in this process, alternating,
``--repeats`` times; the ratio of median per-round times cancels out the machine's speed and load.

    python benchmarks/scale.py --clients 300

Writes ``--out`` (JSON: clients, floor_seconds_per_round, project_seconds_per_round, ratio,
processes_ratio, peak_rss_mib, …); the last printed line is
``ratio=<value> processes=<value> peak_rss_mib=<value>`` (``processes`` is the processes
engine's per-round time over the same floor).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
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

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.processes import ProcessPoolGrid, available_cores
from federation.run import run_federation
from fedkd.config import PartitionConfig, RunConfig
from fedkd.data.local import evaluation_split, info_for, private_partition, public_inputs
from fedkd.distillation import OptimizerSettings, evaluate, predict_logits, soften, train_supervised
from fedkd.models import build_model, model_for_client
from fedkd.seeding import SeedPurpose, derive_seed, torch_generator
from fedkd.student import Student
from strategies.aggregation import get_aggregator


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def tree_memory_peak(peaks: list[float], interval: float = 0.1, *, proportional: bool = False) -> Iterator[None]:
    """Sample the resident memory of this process and all its descendants (Ray's workers
    included) while the block runs; append the peak, in MiB, to ``peaks``. ``proportional``
    sums PSS instead of RSS: a page shared by k processes counts 1/k in each."""
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
    aggregator = get_aggregator(config.strategy.aggregator)
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
        max_shift=config.augment_shift,
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
                    model_for_client(config.client_models, client),
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
            weights.append(len(partition))
        torch.set_num_threads(threads)
        targets = aggregator(np.stack(soft_labels), np.asarray(weights, dtype=np.float64))
        student.learn(transfer, targets, server_round=server_round)
        evaluate(student.model, test.images, test.labels)
        seconds.append(time.perf_counter() - started)
    return seconds


def project_run(config: RunConfig) -> list[float]:
    """The same rounds through Flower's ClientApp/Strategy on the configured engine."""
    if config.engine == "ray":
        import tempfile

        from federation.sim import simulate

        with tempfile.TemporaryDirectory() as run_dir:
            rows = simulate(config, run_dir=run_dir)
    elif config.engine == "processes":
        with ProcessPoolGrid(
            client_app, num_nodes=config.num_clients, workers=config.workers, split_spec=config.split_spec()
        ) as grid:
            rows = run_federation(grid, config, run_dir=None)
    else:
        rows = run_federation(InProcessGrid(client_app, num_nodes=config.num_clients), config, run_dir=None)
    return [row["wall_seconds"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--public-size", type=int, default=500)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="engine=processes workers (0: one per available core)")
    parser.add_argument("--ray", action="store_true", help="also time Flower's Ray engine on the same work")
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
    floor: list[float] = []
    project: list[float] = []
    processes: list[float] = []
    ray: list[float] = []
    memory: dict[str, list[float]] = {"floor": [], "project": [], "processes": [], "processes_pss": [], "ray": []}
    workers = args.workers or available_cores()
    for trial in range(1, args.repeats + 1):
        with tree_memory_peak(memory["floor"]):
            floor += floor_run(config)
        with tree_memory_peak(memory["project"]):
            project += project_run(config)
        with tree_memory_peak(memory["processes"]), tree_memory_peak(memory["processes_pss"], proportional=True):
            processes += project_run(dataclasses.replace(config, engine="processes", workers=workers))
        if args.ray:
            with tree_memory_peak(memory["ray"]):
                ray += project_run(dataclasses.replace(config, engine="ray"))
        print(
            f"trial {trial}/{args.repeats}: floor {statistics.median(floor):.2f} s/round, "
            f"in-process {statistics.median(project):.2f} s/round, "
            f"processes ({workers} workers) {statistics.median(processes):.2f} s/round"
            + (f", ray {statistics.median(ray):.2f} s/round" if ray else ""),
            flush=True,
        )
    floor_s, project_s = statistics.median(floor), statistics.median(project)
    result = {
        "clients": args.clients,
        "dataset": args.dataset,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "floor_seconds_per_round": floor_s,
        "project_seconds_per_round": project_s,
        "ratio": project_s / floor_s,
        # The whole process's peak: an upper bound for the project, since the floor ran here too.
        "peak_rss_mib": peak_rss_mib(),
        "floor_peak_tree_rss_mib": max(memory["floor"]),
        "project_peak_tree_rss_mib": max(memory["project"]),
        "processes_workers": min(workers, args.clients),
        "processes_seconds_per_round": statistics.median(processes),
        "processes_ratio": statistics.median(processes) / floor_s,
        # Summed RSS of the parent and its workers: pages they share (the dataset in shared
        # memory, the libraries, what fork left unwritten) count once per process here.
        "processes_peak_tree_rss_mib": max(memory["processes"]),
        "processes_peak_tree_pss_mib": max(memory["processes_pss"]),
    }
    if ray:
        result["ray_seconds_per_round"] = statistics.median(ray)
        result["ray_ratio"] = result["ray_seconds_per_round"] / floor_s
        # Ray's workers are separate processes: only the sampled sum over the tree counts them.
        result["ray_peak_tree_rss_mib"] = max(memory["ray"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
    print(
        f"ratio={result['ratio']:.3f} processes={result['processes_ratio']:.3f} "
        f"peak_rss_mib={result['peak_rss_mib']:.0f}"
    )


if __name__ == "__main__":
    main()
