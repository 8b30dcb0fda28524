"""Every privacy mechanism through the unchanged ClientApp and strategy, on the embedded digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from grids import RecordingGrid

from federation.client_app import app as client_app
from federation.run import run_federation
from fedkd.config import PartitionConfig, PrivacyConfig, RunConfig, SynthesisConfig
from fedkd.data.local import private_partition
from fedkd.messages import SOFT_LABELS_ARRAY, SOFT_LABELS_KEY, TRANSFER_INDICES, TRANSFER_KEY
from fedkd.privacy.accountant import PrivacyLedger
from fedkd.privacy.client import LEDGER_STATE as PRIVACY_LEDGER_STATE
from fedkd.privacy.dpsgd import batches_per_epoch


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _config(run=None, **privacy):
    return RunConfig(
        dataset="digits",
        num_clients=3,
        rounds=2,
        local_epochs=1,
        distill_epochs=1,
        public_size=300,
        partition=PartitionConfig(scheme="iid"),
        client_models=("cnn_small",),
        student_model="cnn_small",
        privacy=PrivacyConfig(**privacy),
        **(run or {}),
    )


def _run(config, run_dir=None):
    grid = RecordingGrid(client_app, num_nodes=config.num_clients)
    rows = run_federation(grid, config, run_dir=run_dir)
    return grid, rows


def _check_budget(rows, target):
    spent = [row["epsilon"] for row in rows]
    assert all(row["delta"] == 1e-5 for row in rows)
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] <= target


@pytest.mark.slow
def test_dpsgd_clients_account_for_every_step_of_the_run():
    config = _config(mechanism="dpsgd", epsilon=3.0, queries=10, local_epochs=1)
    grid, rows = _run(config)
    _check_budget(rows, 3.0)
    for node in (1, 2, 3):
        ledger = PrivacyLedger.from_record(grid.context(node).state[PRIVACY_LEDGER_STATE])
        batches = batches_per_epoch(len(private_partition(config.split_spec(), node - 1)), config.privacy.batch_size)
        assert sum(steps for _, _, steps in ledger.history) == config.rounds * config.privacy.local_epochs * batches
        assert ledger.epsilon(1e-5) <= 3.0
    assert rows[-1]["epsilon"] == pytest.approx(
        max(PrivacyLedger.from_record(grid.context(n).state[PRIVACY_LEDGER_STATE]).epsilon(1e-5) for n in (1, 2, 3))
    )


@pytest.mark.slow
def test_gnmax_clients_share_only_votes_on_fresh_queries(tmp_path):
    grid, rows = _run(_config(mechanism="gnmax", epsilon=2.0, queries=20), run_dir=tmp_path)
    _check_budget(rows, 2.0)
    checkpoint = json.loads((tmp_path / "privacy.json").read_text())
    assert checkpoint["round"] == 2 and checkpoint["ledger"]["steps"] == [40]
    assert PrivacyLedger.from_record(checkpoint["ledger"]).epsilon(1e-5) == pytest.approx(rows[-1]["epsilon"])
    trains = [(m, r) for m, r in grid.exchanges if m.metadata.message_type == MessageType.TRAIN]
    for _, reply in trains:
        votes = reply.content[SOFT_LABELS_KEY][SOFT_LABELS_ARRAY].numpy()
        assert votes.shape == (20, 10) and set(np.unique(votes)) <= {0.0, 1.0} and (votes.sum(axis=1) == 1).all()
    asked = [set(m.content[TRANSFER_KEY][TRANSFER_INDICES].numpy().tolist()) for m, _ in trains]
    assert asked[0] == asked[1] == asked[2] and not asked[0] & asked[3]  # round 2 asks about new inputs
    assert [row["distill_inputs"] for row in rows] == [20, 40]


@pytest.mark.slow
@pytest.mark.parametrize("noise_at", ["server", "clients"])
def test_gaussian_release_composes_over_rounds(noise_at):
    grid, rows = _run(_config(mechanism="gaussian", epsilon=4.0, queries=20, noise_at=noise_at))
    _check_budget(rows, 4.0)
    shares = [r.content[SOFT_LABELS_KEY][SOFT_LABELS_ARRAY].numpy() for m, r in grid.exchanges]
    noisy = [not np.allclose(share.sum(axis=1), 1.0, atol=1e-3) for share in shares]
    assert all(noisy) if noise_at == "clients" else not any(noisy)
    assert all(row["rejected"] == 0 for row in rows)


@pytest.mark.slow
def test_infinite_epsilon_runs_without_noise_and_says_so():
    _, rows = _run(_config(mechanism="gnmax", epsilon=math.inf, queries=20))
    assert all(row["epsilon"] == math.inf for row in rows)


@pytest.mark.slow
def test_dpsgd_teachers_synthesize_from_privately_released_feature_statistics():
    synthetic = dict(transfer="synthetic", synthesis=SynthesisConfig(per_client=16, steps=5))
    config = _config(synthetic, mechanism="dpsgd", epsilon=4.0, teacher_model="client_models", local_epochs=1)
    grid, rows = _run(config)
    _check_budget(rows, 4.0)
    assert all(row["synthetic_inputs"] > 0 for row in rows)
    for node in (1, 2, 3):
        ledger = PrivacyLedger.from_record(grid.context(node).state[PRIVACY_LEDGER_STATE])
        releases = [steps for _, rate, steps in ledger.history if rate == 1.0]
        assert sum(releases) == config.rounds  # one feature release per round, beside the DP-SGD steps
        assert len(ledger.history) == 2 * config.rounds
