"""The attack table: every attack against every aggregator, run and summarized by one command.

    python -m experiments.attack_table run --data-root ../shared/data --out results/attack-table
    python -m experiments.attack_table table results/attack-table

``run`` works through the grid below, one run at a time, and then writes the table and the plot.
It is resumable: a finished run folder is kept as it is, an interrupted one continues from its
last checkpoint, so the same command picks up where a killed sweep stopped. ``table`` only
summarizes the finished runs under a folder (this sweep's, or an older one such as
``results/attacks``) into ``table.md``, ``summary.json`` and ``attacks.png``.

The grid: MNIST and Fashion-MNIST, 50 clients, Dirichlet α = 0.5, attack fractions 10 / 30 /
45 % for every attack kind and 0 % once (the honest baseline), aggregators weighted, median,
trimmed_mean and robust, seeds 0–2; every other setting is the run's default. Extra
``key=value`` arguments after ``run`` override settings of every run in the grid (e.g.
``rounds=1`` for a quick look); ``--datasets``, ``--kinds``, ``--fractions``, ``--aggregators``
and ``--seeds`` shrink it.

Every run of a (dataset, seed) trains the same honest teachers (and a ``flip`` attacker the same
flipped ones): the attacks act on the replies and the aggregators on the server. The sweep
therefore keeps the teachers in a cache (``<out>/teacher-cache``, see
``federation.teacher_cache``) and trains each once; a run reports the same numbers with or without
it. ``--teacher-cache none`` trains every run's teachers afresh.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import RunConfig, run_config_from_mapping
from fedkd.results import RunFolder, iter_run_folders

DATASETS = ("mnist", "fashion_mnist")
KINDS = ("random", "flip", "scale", "nan", "collude", "adaptive")
FRACTIONS = (0.1, 0.3, 0.45)
AGGREGATORS = ("weighted", "median", "trimmed_mean", "robust")
SEEDS = (0, 1, 2)
# What every run of the table shares beyond the defaults. The student settings are those the table
# was measured with (the defaults before the federated-distillation recipe changed them, and no
# co-distillation); pinned, so that the committed runs stay finished and the table reproduces as
# it stands.
BASE = {
    "num_clients": 50,
    "partition": {"scheme": "dirichlet", "alpha": 0.5},
    "temperature": 1.0,
    "distill_epochs": 5,
    "augment_shift": 0.1,
    "student_shift": 0.1,
    "distill_ema": 0.0,
    "rounds": 10,
}
CHECKPOINT = "checkpoint.fkd"
# Table columns and plot lines, older sweeps' aggregators included.
COLUMN_ORDER = ("weighted", "mean", "median", "trimmed_mean", "robust")


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    kind: str
    fraction: float
    aggregator: str
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.dataset}/{self.kind}-{self.fraction}-{self.aggregator}-seed{self.seed}"

    def config(self, *, data_root: str, overrides: dict[str, Any]) -> RunConfig:
        values: dict[str, Any] = {
            **BASE,
            "dataset": self.dataset,
            "data_root": data_root,
            "seed": self.seed,
            "strategy": {"aggregator": self.aggregator, "consensus_weight": 0.0},
            "client_models": ["cnn_small", "lenet5_bn"],
            "attack": {"kind": self.kind, "fraction": self.fraction},
        }
        for key, value in overrides.items():
            *groups, name = key.split(".")
            target = values
            for group in groups:
                target = target.setdefault(group, {})
            target[name] = value
        return run_config_from_mapping(values)


def grid(
    *,
    datasets: Sequence[str] = DATASETS,
    kinds: Sequence[str] = KINDS,
    fractions: Sequence[float] = FRACTIONS,
    aggregators: Sequence[str] = AGGREGATORS,
    seeds: Sequence[int] = SEEDS,
) -> list[Cell]:
    """The honest baseline (``none``, 0 %) and every attack at every fraction, per aggregator and seed."""
    attacks = [("none", 0.0)] + [(kind, fraction) for kind in kinds for fraction in fractions]
    return [
        Cell(dataset, kind, fraction, aggregator, seed)
        for dataset, (kind, fraction), aggregator, seed in itertools.product(datasets, attacks, aggregators, seeds)
    ]


def _parse_value(text: str) -> Any:
    """A command-line value as YAML reads it (numbers, booleans, lists), else the string."""
    import yaml

    return yaml.safe_load(text)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"attack_table: override {pair!r} is not key=value (e.g. rounds=1).")
        overrides[key] = _parse_value(value)
    return overrides


def run_grid(cells: Sequence[Cell], *, out: Path, data_root: str, overrides: dict[str, Any]) -> None:
    """Run every cell not yet finished under ``out``; continue interrupted ones from their checkpoint."""
    from federation.sim import simulate

    configs = [(cell, cell.config(data_root=data_root, overrides=overrides)) for cell in cells]  # bad input first
    for index, (cell, config) in enumerate(configs, start=1):
        run_dir = out / cell.folder
        if RunFolder(run_dir).finished_rows(config) is not None:
            continue
        resume = (run_dir / CHECKPOINT).exists()
        print(f"attack_table: run {index}/{len(configs)} {cell.folder}{' (resumed)' if resume else ''}", flush=True)
        started = time.perf_counter()
        simulate(config, run_dir=run_dir, resume=resume)
        print(f"attack_table: {cell.folder} took {time.perf_counter() - started:.0f} s", flush=True)


def collect(root: Path) -> list[dict[str, Any]]:
    """One entry per finished run under ``root``: its grid coordinates and final accuracy."""
    runs = []
    for run in iter_run_folders(root, "**"):
        config = run.config
        attack = config.get("attack") or {"kind": "none", "fraction": 0.0}
        runs.append(
            {
                "dataset": str(config["dataset"]),
                "kind": str(attack["kind"]),
                "fraction": float(attack["fraction"]),
                "aggregator": str(config["strategy"]["aggregator"]),
                "seed": int(config["seed"]),
                "accuracy": float(run.rows[-1]["student_accuracy"]),
            }
        )
    return runs


def summarize(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str, float, str], tuple[float, float, int]]:
    """(dataset, kind, fraction, aggregator) → (mean, std, number of seeds) of the final accuracy."""
    grouped: dict[tuple[str, str, float, str], list[float]] = defaultdict(list)
    for run in runs:
        grouped[(run["dataset"], run["kind"], run["fraction"], run["aggregator"])].append(run["accuracy"])
    return {key: (float(np.mean(v)), float(np.std(v)), len(v)) for key, v in grouped.items()}


def _ordered(values: Iterator[str] | set[str], order: Sequence[str]) -> list[str]:
    return sorted(values, key=lambda name: (order.index(name) if name in order else len(order), name))


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f}" if seeds == 1 else f"{mean:.3f} ± {std:.3f} (n={seeds})"


def _row_order(row: tuple[str, float]) -> tuple[int, float]:
    """The honest baseline first, then the attacks in KINDS order, each by fraction."""
    kind, fraction = row
    rank = 0 if kind == "none" else (KINDS.index(kind) + 1 if kind in KINDS else len(KINDS) + 1)
    return rank, fraction


def table(summary: dict[tuple[str, str, float, str], tuple[float, float, int]]) -> str:
    """Markdown: per dataset, one row per (attack, fraction), one column per aggregator."""
    aggregators = _ordered({key[3] for key in summary}, COLUMN_ORDER)
    lines = []
    for dataset in _ordered({key[0] for key in summary}, DATASETS):
        lines += [
            f"**{dataset}** (final student accuracy; mean ± std over n seeds where there are several)",
            "",
            "| attack | fraction | " + " | ".join(aggregators) + " |",
            "|---|---|" + "---|" * len(aggregators),
        ]
        rows = sorted({(key[1], key[2]) for key in summary if key[0] == dataset}, key=_row_order)
        for kind, fraction in rows:
            cells = []
            for aggregator in aggregators:
                found = summary.get((dataset, kind, fraction, aggregator))
                cells.append("—" if found is None else _cell(*found))
            lines.append(f"| {kind} | {fraction:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[tuple[str, str, float, str], tuple[float, float, int]], path: Path) -> None:
    """One panel per (dataset, attack): accuracy against the attackers' share, a line per aggregator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = _ordered({key[0] for key in summary}, DATASETS)
    kinds = _ordered({key[1] for key in summary if key[1] != "none"}, KINDS)
    aggregators = _ordered({key[3] for key in summary}, COLUMN_ORDER)
    if not kinds:
        kinds = ["none"]
    figure, axes = plt.subplots(
        len(datasets), len(kinds), figsize=(3 * len(kinds), 2.6 * len(datasets)), squeeze=False, sharey="row"
    )
    for row, dataset in enumerate(datasets):
        for column, kind in enumerate(kinds):
            axis = axes[row][column]
            for aggregator in aggregators:
                points = sorted(
                    (fraction, *summary[(dataset, found_kind, fraction, aggregator)][:2])
                    for (d, found_kind, fraction, a) in summary
                    if d == dataset and a == aggregator and found_kind in (kind, "none")
                )
                if points:
                    x, mean, std = (np.array(values) for values in zip(*points, strict=True))
                    axis.errorbar(100 * x, mean, yerr=std, marker="o", capsize=2, label=aggregator)
            axis.set_title(f"{dataset} · {kind}", fontsize=9)
            axis.set_xlabel("malicious clients (%)", fontsize=8)
            if column == 0:
                axis.set_ylabel("final student accuracy", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_summary(root: Path) -> str:
    """``table.md``, ``summary.json`` and ``attacks.png`` from the finished runs under ``root``."""
    runs = collect(root)
    if not runs:
        raise SystemExit(
            f"attack_table: no finished runs under {root}; run `python -m experiments.attack_table run` first."
        )
    summary = summarize(runs)
    text = table(summary)
    (root / "table.md").write_text(text)
    (root / "summary.json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(summary, root / "attacks.png")
    return text


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.attack_table", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the grid's missing runs (resumable), then summarize")
    run.add_argument("--out", type=Path, default=Path("results/attack-table"))
    run.add_argument("--data-root", default="../shared/data")
    run.add_argument("--datasets", type=_names, default=list(DATASETS))
    run.add_argument("--kinds", type=_names, default=list(KINDS))
    run.add_argument("--fractions", type=lambda text: [float(x) for x in _names(text)], default=list(FRACTIONS))
    run.add_argument("--aggregators", type=_names, default=list(AGGREGATORS))
    run.add_argument("--seeds", type=lambda text: [int(x) for x in _names(text)], default=list(SEEDS))
    run.add_argument(
        "--teacher-cache",
        default="",
        help="folder of the shared teacher cache (default: <out>/teacher-cache; none: no cache)",
    )
    run.add_argument("overrides", nargs="*", help="key=value settings for every run (e.g. rounds=1)")
    summary = commands.add_parser("table", help="summarize the finished runs under a folder")
    summary.add_argument("root", type=Path, nargs="?", default=Path("results/attack-table"))
    args = parser.parse_args(argv)
    if args.command == "run":
        cells = grid(
            datasets=args.datasets,
            kinds=args.kinds,
            fractions=args.fractions,
            aggregators=args.aggregators,
            seeds=args.seeds,
        )
        overrides = parse_overrides(args.overrides)
        if args.teacher_cache != "none":
            overrides.setdefault("teacher_cache", args.teacher_cache or str(args.out / "teacher-cache"))
        try:
            run_grid(cells, out=args.out, data_root=args.data_root, overrides=overrides)
        except ValueError as error:
            raise SystemExit(f"attack_table: invalid configuration: {error}") from error
        root = args.out
    else:
        root = args.root
    print(write_summary(root))


if __name__ == "__main__":
    main()
