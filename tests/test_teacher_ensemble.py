"""experiments.teacher_ensemble: the checkpointed teachers of a simulated run, scored together."""

from __future__ import annotations

import pytest

from experiments.teacher_ensemble import teacher_ensemble
from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.config import PartitionConfig, RunConfig
from fedkd.results import RunFolder

RUN = RunConfig(
    dataset="digits",
    num_clients=3,
    rounds=1,
    public_size=300,
    validation_size=200,
    local_epochs=3,
    distill_epochs=1,
    partition=PartitionConfig(scheme="dirichlet", alpha=0.5),
    client_models=("cnn_small", "lenet5_bn"),
    student_model="cnn_small",
)


def test_the_checkpointed_teachers_are_scored_alone_and_together(tmp_path):
    run_federation(InProcessGrid(client_app, num_nodes=RUN.num_clients), RUN, run_dir=tmp_path)
    result = teacher_ensemble(tmp_path, powers=(1.0, 2.0))
    assert (result["round"], result["teachers"]) == (1, RUN.num_clients)
    assert [row["class_weight_power"] for row in result["ensembles"]] == [1.0, 2.0]
    # Trained teachers, not fresh ones (a fresh ten-class network is near 0.1): the three
    # teachers of three epochs on the digits together label most of the test and public inputs.
    assert result["validation_size"] == 200
    for row in result["ensembles"]:
        assert row["test"] > 0.5 and row["public"] > 0.5 and row["validation"] > 0.5
    assert 0.1 < result["mean_teacher_test"] < 1.0


def test_a_folder_without_teachers_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no config.yaml"):
        teacher_ensemble(tmp_path)
    RunFolder(tmp_path).write_config(RUN)
    with pytest.raises(ValueError, match="only simulated runs"):
        teacher_ensemble(tmp_path)
