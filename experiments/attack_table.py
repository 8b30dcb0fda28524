"""Turn the attack sweep's run folders into the README's table.

    fedkd-sim -m --config-name attacks
    fedkd-sim -m --config-name attacks attack.kind=none attack.fraction=0.0
    python -m experiments.attack_table results/attacks

Prints a Markdown table (and writes ``table.md`` beside the runs): one row per attack kind, one
column per (share of malicious clients, aggregator); each cell is the final student accuracy of
one run. Unfinished runs are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedkd.results import iter_run_folders

AGGREGATORS = ("mean", "median", "trimmed_mean")
KINDS = ("random", "flip", "scale", "nan")


def collect(root: Path) -> dict[tuple[str, float, str], float]:
    """(kind, fraction, aggregator) → final student accuracy."""
    found = {}
    for run in iter_run_folders(root):
        config, rows = run.config, run.rows
        attack = config.get("attack") or {"kind": "none", "fraction": 0.0}
        key = (str(attack["kind"]), float(attack["fraction"]), config["strategy"]["aggregator"])
        found[key] = rows[-1]["student_accuracy"]
    return found


def table(found: dict[tuple[str, float, str], float]) -> str:
    fractions = sorted({fraction for _, fraction, _ in found if fraction > 0})
    columns = [(0.0, aggregator) for aggregator in AGGREGATORS] + [
        (fraction, aggregator) for fraction in fractions for aggregator in AGGREGATORS
    ]
    header = " | ".join(f"{fraction:.0%} · {aggregator}" for fraction, aggregator in columns)
    lines = [f"| attack | {header} |", "|---|" + "---|" * len(columns)]
    for kind in KINDS:
        cells = []
        for fraction, aggregator in columns:
            accuracy = found.get(("none" if fraction == 0 else kind, fraction, aggregator))
            cells.append("—" if accuracy is None else f"{accuracy:.3f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/attacks")
    found = collect(root)
    if not found:
        raise SystemExit(f"no finished runs under {root}; run `fedkd-sim -m --config-name attacks` first.")
    text = table(found)
    (root / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
