"""The attack table's grid, summary and one-command sweep (on a tiny setting)."""

from __future__ import annotations

import json

import pytest

from experiments import attack_table
from experiments.attack_table import AGGREGATORS, KINDS, Cell, grid, summarize, table


def test_the_full_grid_is_the_issue_s_table():
    cells = grid()
    # per dataset: the honest baseline plus every attack at 10/30/45 %, times 4 aggregators and 3 seeds
    assert len(cells) == 2 * (1 + len(KINDS) * 3) * len(AGGREGATORS) * 3 == 456
    assert len({cell.folder for cell in cells}) == len(cells)
    assert {cell.dataset for cell in cells} == {"mnist", "fashion_mnist"}
    assert {cell.fraction for cell in cells} == {0.0, 0.1, 0.3, 0.45}
    assert set(AGGREGATORS) == {"weighted", "median", "trimmed_mean", "robust"}
    config = Cell("mnist", "flip", 0.3, "robust", 2).config(data_root="data", overrides={"rounds": 1})
    assert (config.num_clients, config.partition.scheme, config.partition.alpha) == (50, "dirichlet", 0.5)
    assert (config.attack.kind, config.attack.fraction, config.strategy.aggregator, config.seed) == (
        "flip",
        0.3,
        "robust",
        2,
    )
    assert config.rounds == 1
    nested = Cell("mnist", "none", 0.0, "weighted", 0).config(data_root="", overrides={"partition.alpha": 0.1})
    assert nested.partition.alpha == 0.1 and nested.partition.scheme == "dirichlet"


def test_the_summary_is_mean_and_std_over_seeds():
    runs = [
        {"dataset": "mnist", "kind": "flip", "fraction": 0.3, "aggregator": "robust", "seed": s, "accuracy": a}
        for s, a in enumerate([0.9, 0.8, 0.7])
    ]
    runs.append({"dataset": "mnist", "kind": "none", "fraction": 0.0, "aggregator": "robust", "seed": 0, "accuracy": 1})
    summary = summarize(runs)
    mean, std, seeds = summary[("mnist", "flip", 0.3, "robust")]
    assert (round(mean, 6), round(std, 6), seeds) == (0.8, round((0.02 / 3) ** 0.5, 6), 3)
    text = table(summary)
    assert text.index("| none | 0% |") < text.index("| flip | 30% |")
    assert "0.800 ± 0.082 (n=3)" in text


@pytest.mark.slow
def test_one_command_runs_the_missing_runs_then_keeps_them(tmp_path, capsys):
    command = [
        "run",
        "--out",
        str(tmp_path),
        "--data-root",
        "",
        "--datasets",
        "digits",
        "--kinds",
        "collude",
        "--fractions",
        "0.4",
        "--aggregators",
        "weighted,robust",
        "--seeds",
        "0",
        "num_clients=5",
        "rounds=1",
        "local_epochs=1",
        "distill_epochs=1",
        "public_size=100",
        "client_models=cnn_small",
        "student_model=cnn_small",
    ]
    attack_table.main(command)
    first = capsys.readouterr().out
    assert first.count("attack_table: run ") == 4  # none and collude, two aggregators each
    # The first run trained each client's teacher once; the other three found them in the cache.
    assert len(list((tmp_path / "teacher-cache").rglob("*.pt"))) == 5
    assert (tmp_path / "table.md").exists() and (tmp_path / "attacks.png").stat().st_size > 0
    runs = json.loads((tmp_path / "summary.json").read_text())
    assert {(run["kind"], run["aggregator"]) for run in runs} == {
        (kind, aggregator) for kind in ("none", "collude") for aggregator in ("weighted", "robust")
    }
    attack_table.main(command)  # again: nothing left to run
    assert "attack_table: run " not in capsys.readouterr().out
