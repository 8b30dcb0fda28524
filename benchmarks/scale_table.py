"""The README's scale table from the JSON files ``benchmarks/scale.py --out`` wrote.

python benchmarks/scale_table.py results/scale

Each engine's cell is its seconds per round and, in bold, its ratio to the single-threaded floor
measured in the same run; an engine the run did not time shows "—". Memory is each engine's
peak over its process tree: PSS where the run sampled it (shared pages shared out), else RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# (column title, key prefix in the JSON, key of the ratio)
ENGINES = (
    ("in-process", "project", "ratio"),
    ("processes", "processes", "processes_ratio"),
    ("ray", "ray", "ray_ratio"),
    ("Flower's Ray", "flower_ray", "flower_ray_ratio"),
)


def _time(result: dict[str, Any], prefix: str, ratio: str) -> str:
    if f"{prefix}_seconds_per_round" not in result:
        return "—"
    return f"{result[f'{prefix}_seconds_per_round']:.1f} (**{result[ratio]:.2f}**)"


def _memory(result: dict[str, Any], prefix: str) -> str:
    for kind in ("pss", "rss"):
        value = result.get(f"{prefix}_peak_tree_{kind}_mib")
        if value is not None:
            return f"{value:,.0f} {kind.upper()}"
    return "—"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/scale")
    results = sorted((json.loads(path.read_text()) for path in root.glob("clients-*.json")), key=lambda r: r["clients"])
    if not results:
        raise SystemExit(f"no clients-*.json under {root}; run benchmarks/scale.py --clients N --out ... first.")
    titles = [title for title, _, _ in ENGINES]
    print(
        "| clients | floor s/round | "
        + " | ".join(f"{title} s/round (ratio)" for title in titles)
        + " | "
        + " | ".join(f"{title} peak MiB" for title in titles)
        + " | load average |"
    )
    print("|---" * (3 + 2 * len(ENGINES)) + "|")
    for r in results:
        cells = [
            f"{r['clients']:,}",
            f"{r['floor_seconds_per_round']:.1f}",
            *(_time(r, prefix, ratio) for _, prefix, ratio in ENGINES),
            *(_memory(r, prefix) for _, prefix, _ in ENGINES),
            str(r.get("load_average", "—")),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
