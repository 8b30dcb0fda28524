"""The FD-recipe ablation: folder names Hydra accepts, and a table measured against the defaults row."""

import subprocess
import sys

from experiments.fd_ablation import VARIANTS, folder_name
from fedkd.config import RunConfig
from fedkd.results import RunFolder


def test_variant_folders_are_distinct_and_hydra_safe():
    names = [folder_name(variant) for variant in VARIANTS]
    assert len(set(names)) == len(names)
    # Hydra's override grammar rejects '=' (and spaces, parentheses) inside hydra.run.dir.
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for name in names)


def _run(folder, accuracies, bytes_per_round=100):
    run = RunFolder(folder)
    run.write_config(RunConfig(rounds=len(accuracies)))
    run.start_metrics()
    for number, accuracy in enumerate(accuracies, start=1):
        run.append_metrics(
            {
                "round": number,
                "student_accuracy": accuracy,
                "bytes_up": bytes_per_round,
                "bytes_down": bytes_per_round,
                "wall_seconds": 1.0,
            }
        )


def test_table_reports_each_variant_against_the_defaults(tmp_path):
    _run(tmp_path / folder_name("defaults"), [0.5, 0.6])
    _run(tmp_path / folder_name("rounds=5"), [0.5, 0.6, 0.7, 0.8])
    table = subprocess.run(
        [sys.executable, "-m", "experiments.fd_ablation_table", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = table.strip().splitlines()
    assert lines[2].startswith("| defaults | 0.500, 0.600 | **0.6000** | +0.0000 | 400 B |")
    assert lines[3].startswith("| rounds=5 | 0.500, 0.600, 0.700, 0.800 | **0.8000** | +0.2000 | 800 B |")


def test_other_run_folders_follow_and_any_folder_can_be_the_baseline(tmp_path):
    _run(tmp_path / "recipe", [0.7])
    _run(tmp_path / "a-step", [0.5])
    _run(tmp_path / folder_name("rounds=5"), [0.6])
    table = subprocess.run(
        [sys.executable, "-m", "experiments.fd_ablation_table", str(tmp_path), "--baseline", "recipe"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = table.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| rounds=5", "| a-step", "| recipe"]
    assert " | -0.2000 | " in lines[3] and " | +0.0000 | " in lines[4]
