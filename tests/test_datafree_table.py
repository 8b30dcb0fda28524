"""The central data-free table: one row per run, controls and synthesizers side by side."""

import json

from experiments.datafree_table import central_table
from fedkd.config import RunConfig
from fedkd.results import RunFolder


def _run(root, name, synthesizer, accuracies, **weights):
    folder = RunFolder(root / name)
    extra = {
        "synthesizer": synthesizer,
        "teacher": "lenet5_bn4",
        "teacher_accuracy": 0.99,
        "iterations": 100,
        "student_steps": 10,
        "batch_size": 128,
        "num_synthetic": 0,
        "synthesis_steps": 0,
        "adversarial": {"adversarial_weight": 1.0, "bn_weight": 1.0, "ce_weight": 1.0, **weights},
    }
    folder.write_config(RunConfig(dataset="mnist", student_model="lenet5_half"), extra=extra)
    folder.start_metrics()
    for index, accuracy in enumerate(accuracies, start=1):
        folder.append_metrics({"round": index, "student_accuracy": accuracy, "teacher_accuracy": 0.99})
    (root / name / "summary.json").write_text(json.dumps({**extra, "cpu_seconds": 12.0}))


def test_rows_show_last_and_best_accuracy_with_controls_first_and_upper_bound_last(tmp_path):
    _run(tmp_path, "central-mnist-real", "real", [0.9, 0.985])
    _run(tmp_path, "central-mnist-adversarial", "adversarial", [0.97, 0.981, 0.980])
    _run(tmp_path, "central-mnist-noise", "noise", [0.8, 0.85])
    _run(tmp_path, "central-mnist-ablation", "adversarial", [0.9], adversarial_weight=0.0)
    _run(tmp_path, "central-mnist-ensemble", "adversarial", [0.98], num_generators=4)
    lines = central_table(tmp_path).splitlines()[2:]
    assert {line.split(" | ")[2] for line in lines} == {"lenet5_bn4 → lenet5_half"}
    assert [line.split(" | ")[3] for line in lines] == [
        "Gaussian noise (control)",
        "adversarial generator (no adversarial)",
        "adversarial generator",
        "4 adversarial generators",
        "real training inputs (upper bound)",
    ]
    assert "| **0.9800** | 0.9810 | 1,000 × 128 | 12 s |" in lines[2]
