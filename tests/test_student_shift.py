"""The student's own random shifts (student_shift; RunConfig.distill_shift): resolved by setting,
built into the server's student, recorded in the run folder."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fedkd.config import (
    DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
)
from fedkd.data.local import info_for
from fedkd.models import build_model
from fedkd.results import RunFolder, read_config
from strategies.registry import BuildContext

PUBLIC_FASHION = RunConfig(dataset="fashion_mnist", num_clients=4, public_size=200, rounds=2)


def test_the_student_shifts_on_public_fashion_mnist_without_privacy_and_follows_the_teachers_elsewhere():
    assert PUBLIC_FASHION.augment_shift == 0.0  # the teachers learn from unmoved garments
    assert PUBLIC_FASHION.distill_shift == DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT["fashion_mnist"] > 0
    for run in (
        dataclasses.replace(PUBLIC_FASHION, transfer="synthetic"),
        # Resolved on use: a copy with a privacy mechanism gets the teachers' shifts.
        dataclasses.replace(
            PUBLIC_FASHION,
            privacy=PrivacyConfig(mechanism="gaussian"),
            strategy=StrategyConfig(aggregator="weighted"),
        ),
        dataclasses.replace(PUBLIC_FASHION, dataset="mnist"),
        dataclasses.replace(PUBLIC_FASHION, dataset="digits"),
    ):
        assert run.distill_shift == run.augment_shift
    assert dataclasses.replace(PUBLIC_FASHION, student_shift=0.0).distill_shift == 0.0
    assert RunConfig(dataset="mnist", student_shift=0.02).distill_shift == 0.02


@pytest.mark.parametrize("bad", [0.5, -0.2, 2.0])
def test_a_student_shift_outside_its_range_is_refused_with_the_range(bad):
    with pytest.raises(ValueError, match=r"student_shift must lie in \[0, 0.5\)"):
        RunConfig(student_shift=bad)


def test_the_servers_student_distills_with_the_resolved_shift():
    # (Fashion-MNIST's files are not read by the unit tests: the digits' shape stands in.)
    info = info_for(RunConfig(dataset="digits").split_spec())
    for run, shift in ((PUBLIC_FASHION, PUBLIC_FASHION.distill_shift), (RunConfig(dataset="digits"), 0.1)):
        model = build_model(run.student_model, input_shape=info.input_shape, num_classes=info.num_classes, seed=0)
        student = BuildContext(config=run, info=info, student_model=model).student()
        assert student.max_shift == shift > 0


def test_the_run_folder_records_the_resolved_shift_and_a_folder_from_before_reads_as_the_teachers(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_config(PUBLIC_FASHION)
    assert read_config(tmp_path)["student_shift"] == PUBLIC_FASHION.distill_shift
    assert PUBLIC_FASHION.same_run(folder.stored_config())
    assert not dataclasses.replace(PUBLIC_FASHION, student_shift=0.0).same_run(folder.stored_config())
    # Written before student_shift existed: that student moved its inputs as the teachers did
    # (not at all on Fashion-MNIST), so today's default is another run.
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["student_shift"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    before = folder.stored_config()
    assert before.distill_shift == 0.0
    assert not PUBLIC_FASHION.same_run(before)
    assert dataclasses.replace(PUBLIC_FASHION, student_shift=0.0).same_run(before)
