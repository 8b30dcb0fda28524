"""Turn the data-free run folders into the README's tables.

Federated runs (``federated-*``, from ``fedkd-sim -m --config-name datafree``) give one row each:
transfer mode, accuracy per round, bytes per client per round. Centralized runs (``central-*``,
from ``python -m experiments.datafree_central``) give teacher and student accuracy.

    python -m experiments.datafree_table results/datafree
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedkd.results import format_bytes, iter_run_folders, read_config


def federated_table(root: Path) -> str:
    lines = [
        "| dataset | transfer | accuracy per round | final | up / client / round | down / client / round | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in iter_run_folders(root, "federated-*"):
        config, rows = run.config, run.rows
        clients = max(rows[-1]["clients"], 1)
        per_round = ", ".join(f"{row['student_accuracy']:.4f}" for row in rows)
        lines.append(
            f"| {config['dataset']} | {config.get('transfer', 'public')} "
            f"| {per_round} "
            f"| **{rows[-1]['student_accuracy']:.4f}** "
            f"| {format_bytes(rows[-1]['bytes_up'] / clients)} | {format_bytes(rows[-1]['bytes_down'] / clients)} "
            f"| {sum(row['wall_seconds'] for row in rows):.0f} s |"
        )
    return "\n".join(lines)


SOURCE_ORDER = ("noise", "generator", "deepinversion", "adversarial", "real")


def _central_label(summary: dict) -> str:
    source = summary["synthesizer"]
    if source == "adversarial":
        weights = summary["adversarial"]
        off = [name for name in ("adversarial_weight", "bn_weight", "ce_weight") if weights.get(name, 0) == 0]
        on = [name for name in ("one_hot_weight", "activation_weight", "entropy_weight") if weights.get(name, 0) > 0]
        changes = [f"no {name.removesuffix('_weight')}" for name in off] + [name.removesuffix("_weight") for name in on]
        count = weights.get("num_generators", 1)
        name = "adversarial generator" if count == 1 else f"{count} adversarial generators"
        return name + (f" ({', '.join(changes)})" if changes else "")
    if source in ("generator", "deepinversion"):
        return f"{source}, {summary['num_synthetic']:,} inputs, {summary['synthesis_steps']} steps"
    return {"noise": "Gaussian noise (control)", "real": "real training inputs (upper bound)"}[source]


def central_table(root: Path) -> str:
    """One row per ``central-*`` run: the same student and student steps, different input sources."""
    lines = [
        "| run folder | dataset | teacher → student | student inputs | teacher accuracy | student accuracy (last) | best "
        "| student steps | CPU time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs = []
    for summary_path in sorted(root.glob("central-*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if "synthesizer" not in summary:
            continue  # written by an older version of the script
        rows = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines() if line]
        config = read_config(summary_path.parent)
        order = SOURCE_ORDER.index(summary["synthesizer"]) if summary["synthesizer"] in SOURCE_ORDER else 99
        runs.append(((config["dataset"], order, summary_path.parent.name), summary, rows, config))
    for (_, _, folder), summary, rows, config in sorted(runs, key=lambda run: run[0]):
        best = max(row["student_accuracy"] for row in rows)
        lines.append(
            f"| `{folder}` | {config['dataset']} | {summary['teacher']} → {config['student_model']} "
            f"| {_central_label(summary)} | {summary['teacher_accuracy']:.4f} "
            f"| **{rows[-1]['student_accuracy']:.4f}** | {best:.4f} "
            f"| {summary['iterations'] * summary['student_steps']:,} × {summary['batch_size']} "
            f"| {summary['cpu_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/datafree")
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder; run the data-free experiments first (see README).")
    print(federated_table(root))
    print()
    print(central_table(root))


if __name__ == "__main__":
    main()
