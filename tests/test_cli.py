"""The `fedkd-sim` command line: overrides, sweeps and errors, as a user meets them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedkd.results import read_metrics

QUICK = ["rounds=1", "num_clients=2", "public_size=100", "local_epochs=1", "distill_epochs=1", "partition=iid"]


def fedkd_sim(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "federation.sim", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def fedkd_sim_here(capsys, monkeypatch, *args: str) -> Finished:
    """``fedkd-sim *args`` through the same Hydra entry point, in this process (no interpreter
    start-up per case); Hydra is told to leave the logging configuration alone."""
    from federation import sim

    argv = ["fedkd-sim", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sim.main()
    captured = capsys.readouterr()
    return Finished(exit_info.value.code, captured.out, captured.err)


BAD_INPUTS = [
    ("dataset=nope", "Unknown dataset 'nope'"),
    ("num_clients=5000", "lower num_clients"),
    ("partition.alpha=0", "partition.alpha must be > 0"),
    ("temperature=-1", "temperature must be > 0"),
    ("student_model=vgg99", "Unknown model 'vgg99'"),
    ("public_size=4000", "public_size"),
]


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_bad_input_fails_before_training_with_a_message(tmp_path, capsys, monkeypatch, override, message):
    finished = fedkd_sim_here(capsys, monkeypatch, override, f"hydra.run.dir={tmp_path}")
    assert finished.returncode == 2
    assert message in finished.stderr
    assert "round 1" not in finished.stdout


def test_missing_data_root_says_where_to_point(tmp_path, capsys, monkeypatch):
    finished = fedkd_sim_here(
        capsys, monkeypatch, "dataset=mnist", f"data_root={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert finished.returncode == 2
    assert "data_root" in finished.stderr and "mnist" in finished.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override, message", BAD_INPUTS[:1])
def test_the_command_exits_2_on_bad_input_in_its_own_process(tmp_path, override, message):
    finished = fedkd_sim(override, f"hydra.run.dir={tmp_path}")
    assert finished.returncode == 2
    assert message in finished.stderr
    assert "round 1" not in finished.stdout


@pytest.mark.slow
def test_run_and_multirun_write_one_run_folder_per_job(tmp_path):
    single = fedkd_sim(*QUICK, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    assert "round 1/1" in single.stdout and "final student_accuracy" in single.stdout
    assert len(read_metrics(tmp_path / "single")) == 1
    again = fedkd_sim(*QUICK, f"hydra.run.dir={tmp_path / 'single'}")
    assert again.returncode == 0 and "already holds this finished run" in again.stdout
    forced = fedkd_sim(*QUICK, "rerun=true", f"hydra.run.dir={tmp_path / 'single'}")
    assert forced.returncode == 0 and "round 1/1" in forced.stdout

    sweep = fedkd_sim("-m", *QUICK, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    folders = sorted(path.parent.name for path in Path(tmp_path / "sweep").glob("*/metrics.jsonl"))
    assert folders == ["0", "1"]
