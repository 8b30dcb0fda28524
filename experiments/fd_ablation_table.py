"""Render the ablation's run folders (``experiments.fd_ablation``) as the README's markdown table.

python -m experiments.fd_ablation_table results/fd_recipe/fashion_mnist-100
python -m experiments.fd_ablation_table results/fd_recipe/fashion_mnist-100-steps --baseline recipe

Rows follow the ablation's variants; any other run folder under the root follows, by name.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="results/fd_recipe/fashion_mnist-100")
    parser.add_argument(
        "--baseline", default=folder_name("defaults"), help="the run folder the 'vs' column compares with"
    )
    args = parser.parse_args()
    root = Path(args.root)
    runs = {run.path.name: run for run in iter_run_folders(root)}
    if args.baseline not in runs:
        raise SystemExit(f"no finished {args.baseline!r} run under {root}; run experiments.fd_ablation first")
    baseline = runs[args.baseline].rows[-1]["student_accuracy"]
    lines = [
        "| variant | accuracy per round | final | vs baseline | bytes, all rounds | wall time |",
        "|---|---|---|---|---|---|",
    ]
    # The ablation's variants in their order, then any other run folder under the root by name.
    named = {folder_name(variant): variant for variant in VARIANTS}
    order = [name for name in named if name in runs] + sorted(name for name in runs if name not in named)
    lines += [row(named.get(name, name), runs[name], baseline) for name in order]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
