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


def central_table(root: Path) -> str:
    lines = [
        "| dataset | synthesizer | synthetic inputs | teacher (accuracy) | student (parameters) | data-free student accuracy | synthesis time |",
        "|---|---|---|---|---|---|---|",
    ]
    for summary_path in sorted(root.glob("central-*/summary.json")):
        summary = json.loads(summary_path.read_text())
        config = read_config(summary_path.parent)
        inputs = f"{summary['num_synthetic']:,}" + (
            " fresh per epoch" if summary.get("resample_every_epoch") else ", reused every epoch"
        )
        method = summary["method"].removeprefix("data-free centralized (").removesuffix(")")
        lines.append(
            f"| {config['dataset']} | {method}, {summary['synthesis_steps']} steps | {inputs} | {summary['teacher']} ({summary['teacher_accuracy']:.4f}) "
            f"| {config['student_model']} ({summary['student_parameters']:,}) "
            f"| **{summary['student_accuracy']:.4f}** | {summary['synthesis_seconds']:.1f} s |"
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
