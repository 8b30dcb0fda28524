"""Turn the run folders of the core comparison into the README's markdown table.

python -m experiments.core_table results/core
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedkd.results import FinishedRun, format_bytes, iter_run_folders

METHOD_NAMES = {
    "ensemble_distillation": "FD student (soft labels only)",
    "fedavg": "FedAvg (weights)",
    "centralized": "Same student, centralized",
}


def describe(run: FinishedRun) -> dict:
    config, rows = run.config, run.rows
    method = config.get("method") or config["strategy"]["name"]
    clients = max(rows[-1]["clients"], 1)
    return {
        "dataset": config["dataset"],
        "method": METHOD_NAMES.get(method, method),
        "clients": config["num_clients"],
        "rounds": len(rows),
        "accuracy": rows[-1]["student_accuracy"],
        "up_per_client": rows[-1]["bytes_up"] / clients,
        "down_per_client": rows[-1]["bytes_down"] / clients,
        "seconds": sum(row["wall_seconds"] for row in rows),
        "seed": config["seed"],
    }


def markdown(entries: list[dict]) -> str:
    lines = [
        "| dataset | method | final accuracy | up / client / round | down / client / round | wall time | seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        wire = e["method"].startswith("Same student")
        lines.append(
            f"| {e['dataset']} | {e['method']} | {e['accuracy']:.4f} "
            f"| {'—' if wire else format_bytes(e['up_per_client'])} "
            f"| {'—' if wire else format_bytes(e['down_per_client'])} "
            f"| {e['seconds']:.0f} s | {e['seed']} |"
        )
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/core")
    runs = list(iter_run_folders(root))
    if not runs:
        raise SystemExit(f"no finished run folders under {root}")
    order = list(METHOD_NAMES.values())

    def position(entry: dict) -> tuple:
        method = order.index(entry["method"]) if entry["method"] in order else len(order)
        return (entry["dataset"] != "mnist", entry["dataset"], method)

    print(markdown(sorted((describe(run) for run in runs), key=position)))


if __name__ == "__main__":
    main()
