"""Render the ablation's run folders (``experiments.fd_ablation``) as the README's markdown table.

python -m experiments.fd_ablation_table results/fd_recipe/fashion_mnist-100
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.fd_ablation import VARIANTS, folder_name
from fedkd.results import FinishedRun, format_bytes, iter_run_folders


def row(variant: str, run: FinishedRun, baseline: float) -> str:
    rows = run.rows
    accuracy = rows[-1]["student_accuracy"]
    wire = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    seconds = sum(r["wall_seconds"] for r in rows)
    per_round = ", ".join(f"{r['student_accuracy']:.3f}" for r in rows)
    return (
        f"| {variant} | {per_round} | **{accuracy:.4f}** | {accuracy - baseline:+.4f} "
        f"| {format_bytes(wire)} | {seconds:.0f} s |"
    )


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/fd_recipe/fashion_mnist-100")
    runs = {run.path.name: run for run in iter_run_folders(root)}
    if "defaults" not in runs:
        raise SystemExit(f"no finished 'defaults' run under {root}; run experiments.fd_ablation first")
    baseline = runs["defaults"].rows[-1]["student_accuracy"]
    lines = [
        "| variant (one change from the defaults) | accuracy per round | final | vs defaults | bytes, all rounds | wall time |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        row(variant, runs[folder_name(variant)], baseline) for variant in VARIANTS if folder_name(variant) in runs
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
