"""The README's scale table from the JSON files ``benchmarks/scale.py --out`` wrote.

python benchmarks/scale_table.py results/scale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/scale")
    results = sorted((json.loads(path.read_text()) for path in root.glob("clients-*.json")), key=lambda r: r["clients"])
    if not results:
        raise SystemExit(f"no clients-*.json under {root}; run benchmarks/scale.py --clients N --out ... first.")
    print(
        "| clients | floor s/round | fedkd in-process s/round | ratio | Flower Ray s/round | Ray ratio "
        "| peak RSS, this process | peak RSS, Ray tree |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ray = "ray_seconds_per_round" in r
        cells = [
            f"{r['clients']:,}",
            f"{r['floor_seconds_per_round']:.1f}",
            f"{r['project_seconds_per_round']:.1f}",
            f"**{r['ratio']:.3f}**",
            f"{r['ray_seconds_per_round']:.1f}" if ray else "—",
            f"{r['ray_ratio']:.2f}" if ray else "—",
            f"{r['peak_rss_mib']:,.0f} MiB",
            f"{r['ray_peak_tree_rss_mib']:,.0f} MiB" if ray else "—",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
