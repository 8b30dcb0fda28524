import json

import pytest
import torch

from experiments import student_shift, transfer_ceiling
from fedkd.config import RunConfig
from fedkd.data.local import private_partition


def test_the_validation_hold_out_is_left_out_of_the_teachers_training(monkeypatch):
    config = RunConfig(dataset="digits", num_clients=4, public_size=64)
    trained_on = {}

    def record(model, images, labels, **_):
        trained_on["images"] = images

    monkeypatch.setattr(transfer_ceiling, "train_supervised", record)
    _, validation, _ = student_shift.held_out_teacher(config, architecture="lenet5_bn", epochs=1, validation_size=50)
    union = torch.cat([private_partition(config.split_spec(), k).images for k in range(4)])
    assert len(validation) == 50 and len(trained_on["images"]) == len(union) - 50
    flat = {tuple(row.tolist()) for row in trained_on["images"].flatten(1)[:, ::7]}
    assert not any(tuple(row.tolist()) in flat for row in validation.flatten(1)[:, ::7])


@pytest.mark.slow
def test_the_study_scores_every_shift_and_chooses_on_validation(tmp_path):
    out = tmp_path / "shift.json"
    student_shift.main(
        ["--num-clients", "4", "--public-size", "64", "--epochs", "1", "--teacher-epochs", "1"]
        + ["--validation-size", "100", "--shifts", "0", "0.05", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert [row["student_shift"] for row in result["students"]] == [0.0, 0.05]
    best = max(result["students"], key=lambda row: row["validation_accuracy"])
    assert result["chosen_on_validation"] == best["student_shift"]
