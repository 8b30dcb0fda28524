"""TensorBoard tracking: each round's numeric measurements become scalars at step = round."""

from __future__ import annotations

import math

from fedkd.tracking import TENSORBOARD_DIR, TensorBoardLogger, scalars


def test_scalars_keep_the_numbers_of_a_row_and_drop_the_rest():
    row = {"round": 3, "student_accuracy": 0.9, "clients": 10, "failed_nodes": [4], "epsilon": math.nan, "ok": True}
    assert scalars(row) == {"student_accuracy": 0.9, "clients": 10.0}


def test_the_logger_writes_event_files_into_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    for round_ in (1, 2):
        logger({"round": round_, "student_accuracy": 0.5 + round_ / 10})
    logger.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    written = [(event.step, round(event.value, 6)) for event in events.Scalars("student_accuracy")]
    assert written == [(1, 0.6), (2, 0.7)]
