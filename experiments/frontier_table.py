"""Turn the privacy-frontier run folders into the README's table and plot.

    fedkd-sim -m --config-name frontier
    python -m experiments.frontier_table results/frontier

Writes ``table.md`` and ``frontier.png`` into the folder and prints the table. Every cell is the
final student accuracy of one run; the ε column is the target, and the spent ε the run reported
in its last round (the worst client's for DP-SGD).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from fedkd.results import iter_run_folders

MECHANISMS = ("dpsgd", "gaussian", "gnmax")
# Published MNIST results at δ = 1e-5, drawn beside the frontier for scale (centralized training
# on all 60,000 images, not federated): label → [(ε, accuracy)].
ANCHORS = {
    "Opacus DP-SGD example (central)": [(1.16, 0.9463), (2.91, 0.9678)],
    "PATE, Papernot et al. 2017 (250 teachers)": [(2.04, 0.9800), (8.03, 0.9810)],
}
LABELS = {
    "dpsgd": "DP-SGD teachers (record-level)",
    "gaussian": "Gaussian aggregate (client-level)",
    "gnmax": "GNMax votes (record-level)",
}


def collect(root: Path) -> dict[str, dict[float, tuple[float, float | None]]]:
    """mechanism → target ε → (final accuracy, spent ε); unfinished runs are left out."""
    found: dict[str, dict[float, tuple[float, float | None]]] = {}
    for run in iter_run_folders(root):
        config, rows = run.config, run.rows
        privacy = config.get("privacy") or {}
        mechanism = privacy.get("mechanism")
        if mechanism not in MECHANISMS:
            continue
        target = float(privacy["epsilon"])
        spent = rows[-1].get("epsilon")
        found.setdefault(mechanism, {})[target] = (rows[-1]["student_accuracy"], spent)
    return found


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:g}"


def table(found: dict[str, dict[float, tuple[float, float | None]]]) -> str:
    targets = sorted({eps for runs in found.values() for eps in runs})
    lines = [
        "| mechanism | " + " | ".join(f"ε = {_eps(eps)}" for eps in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for mechanism in MECHANISMS:
        runs = found.get(mechanism, {})
        cells = []
        for eps in targets:
            if eps not in runs:
                cells.append("—")
                continue
            accuracy, spent = runs[eps]
            cells.append(f"{accuracy:.4f}" + (f" (ε̂ {spent:.2f})" if spent is not None else ""))
        lines.append(f"| {LABELS[mechanism]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(found: dict[str, dict[float, tuple[float, float | None]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({eps for runs in found.values() for eps in runs if math.isfinite(eps)})
    no_noise_at = (finite[-1] * 2) if finite else 16.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for mechanism in MECHANISMS:
        runs = found.get(mechanism, {})
        if not runs:
            continue
        points = sorted((eps if math.isfinite(eps) else no_noise_at, acc) for eps, (acc, _) in runs.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS[mechanism])
    for (label, points), marker in zip(ANCHORS.items(), ("*", "P"), strict=True):
        ax.scatter([e for e, _ in points], [a for _, a in points], marker=marker, s=70, color="grey", label=label)
    ax.set_xscale("log", base=2)
    ticks = [*finite, no_noise_at]
    ax.set_xticks(ticks, [*(f"{t:g}" for t in finite), "∞"])
    ax.set_xlabel("target ε (δ = 1e-5)")
    ax.set_ylabel("student accuracy (MNIST test)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Privacy/accuracy frontier: 50 clients, Dirichlet α = 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/frontier")
    found = collect(root)
    if not found:
        raise SystemExit(f"no finished frontier runs under {root}; run `fedkd-sim -m --config-name frontier` first.")
    text = table(found)
    (root / "table.md").write_text(text + "\n")
    plot(found, root / "frontier.png")
    print(text)


if __name__ == "__main__":
    main()
