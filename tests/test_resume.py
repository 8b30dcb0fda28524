"""Checkpoints and resume: a run that dies after a round continues to the same result."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from grids import RecordingGrid

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.checkpoint import CHECKPOINT_FILE, Checkpoint, ResumeError, arrays_record, load_checkpoint, save_checkpoint
from fedkd.config import PartitionConfig, PrivacyConfig, RunConfig, StrategyConfig, SynthesisConfig
from fedkd.results import METRICS_FILE, read_metrics

TINY = RunConfig(
    dataset="digits",
    num_clients=3,
    rounds=4,
    public_size=300,
    local_epochs=1,
    distill_epochs=1,
    partition=PartitionConfig(scheme="iid"),
    client_models=("cnn_small", "lenet5_bn"),
    student_model="cnn_small",
)


def test_a_checkpoint_round_trips_its_records_and_the_global_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    node_state = RecordDict({"teacher": ArrayRecord({"w": arrays_record({"w": np.arange(6.0)})["w"]})})
    save_checkpoint(
        tmp_path,
        Checkpoint(
            2,
            ArrayRecord(torch.nn.Linear(2, 2).state_dict()),
            {"counts": ConfigRecord({"bank": 1}), "arrays": arrays_record({"consensus": np.eye(3)})},
            {1: node_state, 2: RecordDict()},
        ),
    )
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(99)
    np.random.seed(99)
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 2 and sorted(loaded.nodes) == [1, 2]
    np.testing.assert_array_equal(loaded.strategy["arrays"]["consensus"].numpy(), np.eye(3))
    np.testing.assert_array_equal(loaded.nodes[1]["teacher"]["w"].numpy(), np.arange(6.0))
    assert loaded.strategy["counts"]["bank"] == 1
    torch.testing.assert_close(torch.rand(3), expected_torch)  # the streams continue where they were
    np.testing.assert_array_equal(np.random.rand(3), expected_numpy)


def test_no_checkpoint_means_none_and_a_corrupt_one_says_what_to_do(tmp_path):
    assert load_checkpoint(tmp_path) is None
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ResumeError, match="delete it"):
        load_checkpoint(tmp_path)


class Crash(Exception):
    pass


def _crash_after(round_number):
    def on_round(row):
        if row["round"] == round_number:
            raise Crash

    return on_round


def _final(rows):
    return [(row["round"], row["student_accuracy"], row["student_loss"], row.get("epsilon")) for row in rows]


def _messages_by_type(grid: RecordingGrid) -> Counter:
    return Counter(message.metadata.message_type for message, _ in grid.exchanges)


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"strategy": StrategyConfig(name="fedmd")},
        {"strategy": StrategyConfig(name="fd")},
        {"strategy": StrategyConfig(name="fedavg"), "client_models": ("cnn_small",)},
        {"privacy": PrivacyConfig(mechanism="gnmax", epsilon=4.0, queries=20)},
        {"privacy": PrivacyConfig(mechanism="dpsgd", epsilon=4.0, local_epochs=1)},
        {"transfer": "synthetic", "synthesis": SynthesisConfig(per_client=16, steps=5)},
    ],
    ids=["ensemble", "fedmd", "fd", "fedavg", "gnmax", "dpsgd", "synthetic"],
)
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, changes):
    config = dataclasses.replace(TINY, **changes)
    whole_grid = RecordingGrid(client_app, num_nodes=3)
    uninterrupted = run_federation(whole_grid, config, run_dir=tmp_path / "whole")
    cut_grid = RecordingGrid(client_app, num_nodes=3)
    with pytest.raises(Crash):
        run_federation(cut_grid, config, run_dir=tmp_path / "cut", on_round=_crash_after(2))
    rows_before = (tmp_path / "cut" / METRICS_FILE).read_text().splitlines()
    assert [row["round"] for row in read_metrics(tmp_path / "cut")] == [1, 2]
    resumed_grid = RecordingGrid(client_app, num_nodes=3)
    resumed = run_federation(resumed_grid, config, run_dir=tmp_path / "cut", resume=True)
    assert _final(resumed) == _final(uninterrupted)
    assert _final(read_metrics(tmp_path / "cut")) == _final(read_metrics(tmp_path / "whole"))
    # Only rounds 3 and 4 ran again: the clients got exactly the messages the cut run had not
    # sent yet, and the rows of rounds 1 and 2 (their wall_seconds included) are the old ones.
    remaining = _messages_by_type(whole_grid) - _messages_by_type(cut_grid)
    assert remaining[MessageType.TRAIN] == 2 * 3
    assert _messages_by_type(resumed_grid) == remaining
    rows_after = (tmp_path / "cut" / METRICS_FILE).read_text().splitlines()
    assert rows_after[:2] == rows_before and len(rows_after) == 4


@pytest.mark.slow
def test_resume_refuses_another_configuration_and_starts_afresh_without_a_checkpoint(tmp_path):
    with pytest.raises(Crash):
        run_federation(InProcessGrid(client_app, num_nodes=3), TINY, run_dir=tmp_path, on_round=_crash_after(1))
    with pytest.raises(ResumeError, match="different configuration"):
        run_federation(
            InProcessGrid(client_app, num_nodes=3), dataclasses.replace(TINY, seed=1), run_dir=tmp_path, resume=True
        )
    fresh = tmp_path / "fresh"
    rows = run_federation(
        InProcessGrid(client_app, num_nodes=3), dataclasses.replace(TINY, rounds=1), run_dir=fresh, resume=True
    )
    assert [row["round"] for row in rows] == [1]


def _fedkd_sim(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "federation.sim",
        "num_clients=3",
        "rounds=3",
        "local_epochs=1",
        "distill_epochs=1",
        "public_size=300",
        "partition=iid",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_fedkd_sim_killed_with_sigkill_after_round_2_resumes_to_the_same_final_accuracy(tmp_path):
    whole = _fedkd_sim(tmp_path / "whole")
    cut = _fedkd_sim(tmp_path / "cut")
    deadline = time.monotonic() + 300
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= 2:
            break
        if cut.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{cut.stdout.read()}")
        time.sleep(0.05)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    assert len(read_metrics(metrics)) == 2, "the kill came too late to interrupt the run"
    rows_before = metrics.read_text().splitlines()
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    resumed = _fedkd_sim(tmp_path / "cut", "resume=true")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    # The resumed process trains round 3 only: it reports no earlier round, and the rows of
    # rounds 1 and 2 (their wall_seconds included) are still the ones the killed process wrote.
    assert "round 3/3" in output and "round 1/3" not in output and "round 2/3" not in output, output
    rows_after = metrics.read_text().splitlines()
    assert rows_after[:2] == rows_before and len(rows_after) == 3
    final_whole, final_cut = read_metrics(tmp_path / "whole")[-1], read_metrics(metrics)[-1]
    assert final_cut["round"] == 3
    assert math.isclose(final_cut["student_accuracy"], final_whole["student_accuracy"], rel_tol=0, abs_tol=0)
