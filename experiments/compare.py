"""Summarize a strategy sweep: a markdown table (mean ± std over seeds) and two plots.

    python -m experiments.compare results/comparison [--out results/comparison]

Reads every ``*/config.yaml`` + ``*/metrics.jsonl`` under the sweep folder and writes
``summary.json`` (the per-round data the table and plots come from), ``table.md``,
``accuracy_per_round.png`` and ``accuracy_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedkd.results import format_bytes, iter_run_folders

STRATEGY_ORDER = ["ensemble_distillation", "fedmd", "dsfl", "fd", "feddf", "fedavg"]


def collect(sweep: Path) -> list[dict]:
    """One entry per finished run: its settings and its per-round series."""
    runs = []
    for run in iter_run_folders(sweep):
        config, rows = run.config, run.rows
        runs.append(
            {
                "dataset": config["dataset"],
                "alpha": config["partition"]["alpha"],
                "strategy": config["strategy"]["name"],
                "seed": config["seed"],
                "num_clients": config["num_clients"],
                "accuracy": [row["student_accuracy"] for row in rows],
                "cumulative_bytes": np.cumsum([row["bytes_up"] + row["bytes_down"] for row in rows]).tolist(),
                "bytes_up_per_round": rows[-1]["bytes_up"],
            }
        )
    return runs


def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        grouped[(run["dataset"], run["alpha"], run["strategy"])].append(run)
    return grouped


def _strategy_rank(name: str) -> int:
    return STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER)


def table(runs: list[dict]) -> str:
    lines = [
        "| dataset | α | strategy | final accuracy (mean ± std) | seeds | bytes on the wire, all rounds |",
        "|---|---|---|---|---|---|",
    ]
    for (dataset, alpha, strategy), group in sorted(
        _groups(runs).items(), key=lambda item: (item[0][0], item[0][1], _strategy_rank(item[0][2]))
    ):
        finals = np.array([run["accuracy"][-1] for run in group])
        total = np.mean([run["cumulative_bytes"][-1] for run in group])
        lines.append(
            f"| {dataset} | {alpha} | {strategy} | {finals.mean():.4f} ± {finals.std():.4f} "
            f"| {len(group)} | {format_bytes(total)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(run["dataset"], run["alpha"]) for run in runs})
    grouped = _groups(runs)
    strategies = sorted({run["strategy"] for run in runs}, key=_strategy_rank)
    for name, x_of in (("accuracy_per_round", None), ("accuracy_vs_bytes", "cumulative_bytes")):
        figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for axis, (dataset, alpha) in zip(axes[0], panels, strict=True):
            for strategy in strategies:
                group = grouped.get((dataset, alpha, strategy))
                if not group:
                    continue
                accuracy = np.array([run["accuracy"] for run in group])
                mean, std = accuracy.mean(axis=0), accuracy.std(axis=0)
                x = (
                    np.arange(1, accuracy.shape[1] + 1)
                    if x_of is None
                    else np.mean([run[x_of] for run in group], axis=0)
                )
                axis.plot(x, mean, marker="o", markersize=3, label=strategy)
                axis.fill_between(x, mean - std, mean + std, alpha=0.2)
            axis.set_title(f"{dataset}, Dirichlet α={alpha}")
            axis.set_xlabel("round" if x_of is None else "cumulative bytes on the wire (up + down)")
            if x_of is not None:
                axis.set_xscale("log")
            axis.set_ylabel("student accuracy")
            axis.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=110)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or args.sweep
    runs = collect(args.sweep)
    if not runs:
        raise SystemExit(f"no finished runs under {args.sweep}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(runs, indent=1))
    markdown = table(runs)
    (out / "table.md").write_text(markdown + "\n")
    plot(runs, out)
    print(markdown)


if __name__ == "__main__":
    main()
