import dataclasses

from fedkd.config import RunConfig
from fedkd.results import RunFolder, format_bytes, iter_run_folders, progress_line, read_metrics


def _finished_folder(tmp_path, config):
    folder = RunFolder(tmp_path)
    folder.write_config(config)
    folder.start_metrics()
    for round_number in range(1, config.rounds + 1):
        folder.append_metrics({"round": round_number, "student_accuracy": 0.5, "loss": float("nan")})
    return folder


def test_metrics_round_trip_and_nan_becomes_null(tmp_path):
    config = RunConfig(rounds=2)
    _finished_folder(tmp_path, config)
    rows = read_metrics(tmp_path)
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[0]["loss"] is None


def test_finished_rows_only_for_the_same_config_and_all_rounds(tmp_path):
    config = RunConfig(rounds=2)
    folder = _finished_folder(tmp_path, config)
    assert [row["round"] for row in folder.finished_rows(config)] == [1, 2]
    assert folder.finished_rows(dataclasses.replace(config, seed=1)) is None
    assert folder.finished_rows(dataclasses.replace(config, rounds=3)) is None
    assert RunFolder(tmp_path / "empty").finished_rows(config) is None


def test_a_finished_run_counts_from_another_checkout_engine_or_teacher_cache(tmp_path):
    config = RunConfig(rounds=2, data_root="/data/here")
    folder = _finished_folder(tmp_path, config)
    elsewhere = dataclasses.replace(config, data_root="../shared/data", engine="processes", teacher_cache="cache")
    assert folder.finished_rows(elsewhere) is not None
    assert folder.finished_rows(dataclasses.replace(elsewhere, local_epochs=1)) is None


def test_a_folder_written_before_a_setting_existed_still_matches_its_default(tmp_path):
    import yaml

    config = RunConfig(rounds=2)
    folder = _finished_folder(tmp_path, config)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["transfer"], stored["synthesis"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert folder.finished_rows(config) is not None
    assert folder.finished_rows(dataclasses.replace(config, transfer="synthetic")) is None


def test_a_folder_from_before_a_setting_whose_default_changed_reads_as_it_ran(tmp_path):
    import yaml

    from fedkd.config import SynthesisConfig

    config = RunConfig(rounds=2, transfer="synthetic", distill_schedule="constant")
    before = dataclasses.replace(config, synthesis=SynthesisConfig(warm_steps=0, replay_inputs=0), distill_ema=0.0)
    folder = _finished_folder(tmp_path, before)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["distill_schedule"], stored["synthesis"]["warm_steps"], stored["synthesis"]["replay_inputs"]
    del stored["distill_ema"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    # Those runs had a constant rate, fresh generators, every pool replayed and the student's last
    # weights, whatever today's defaults.
    # (The folder records the teachers and the student's shifts the defaults resolved to.)
    resolved = dataclasses.replace(before, client_models=before.teacher_models, student_shift=before.distill_shift)
    assert folder.stored_config() == resolved
    assert folder.finished_rows(before) is not None
    assert folder.finished_rows(dataclasses.replace(config, distill_schedule="cosine")) is None
    assert folder.finished_rows(RunConfig(rounds=2, transfer="synthetic")) is None  # today's defaults


def test_a_folder_from_before_co_distillation_is_no_co_distilling_run(tmp_path):
    import yaml

    from fedkd.config import StrategyConfig

    today = RunConfig(rounds=2)  # ensemble_distillation on public inputs: co-distills by default
    assert today.consensus_weight > 0
    before = dataclasses.replace(today, strategy=StrategyConfig(consensus_weight=0.0))
    folder = _finished_folder(tmp_path, before)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["strategy"]["consensus_weight"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert folder.finished_rows(before) is not None
    assert folder.finished_rows(today) is None  # a relaunch of today's defaults runs it again


def test_a_folder_from_before_squared_counts_weighed_by_the_counts(tmp_path):
    import yaml

    from fedkd.config import StrategyConfig

    today = RunConfig(rounds=2)  # class_weighted without privacy: squared counts by default
    assert today.class_weight_power == 2.0
    before = dataclasses.replace(today, strategy=StrategyConfig(class_weight_power=1.0))
    folder = _finished_folder(tmp_path, before)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["strategy"]["class_weight_power"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert folder.stored_config() == dataclasses.replace(
        before, client_models=before.teacher_models, student_shift=before.distill_shift
    )
    assert folder.finished_rows(before) is not None
    assert folder.finished_rows(today) is None  # a relaunch of today's defaults runs it again


def test_a_public_transfer_run_is_the_same_run_whatever_its_unread_synthesis_settings(tmp_path):
    from fedkd.config import SynthesisConfig

    config = RunConfig(rounds=2)
    folder = _finished_folder(tmp_path, dataclasses.replace(config, synthesis=SynthesisConfig(warm_steps=0)))
    assert folder.finished_rows(config) is not None
    synthetic = dataclasses.replace(config, transfer="synthetic")
    _finished_folder(tmp_path / "synthetic", dataclasses.replace(synthetic, synthesis=SynthesisConfig(warm_steps=0)))
    assert RunFolder(tmp_path / "synthetic").finished_rows(synthetic) is None  # there it is read


def test_a_folder_holding_something_else_is_not_a_finished_run(tmp_path):
    config = RunConfig(rounds=2)
    folder = _finished_folder(tmp_path, config)
    (tmp_path / "config.yaml").write_text("method: centralized\nepochs: 3\n")
    assert folder.finished_rows(config) is None


def test_iter_run_folders_yields_the_finished_runs_by_name(tmp_path):
    config = RunConfig(rounds=2)
    for name in ("b", "a"):
        _finished_folder(tmp_path / name, config)
    RunFolder(tmp_path / "a").write_config(config, extra={"method": "centralized"})
    unfinished = RunFolder(tmp_path / "c")
    unfinished.write_config(config)
    unfinished.start_metrics()
    unfinished.append_metrics({"round": 1})
    (tmp_path / "plots").mkdir()
    (tmp_path / "table.md").write_text("")

    runs = list(iter_run_folders(tmp_path))
    assert [run.path.name for run in runs] == ["a", "b"]
    assert runs[0].config["method"] == "centralized" and runs[0].config["rounds"] == 2
    assert [row["round"] for row in runs[1].rows] == [1, 2]
    assert [run.path.name for run in iter_run_folders(tmp_path, "b*")] == ["b"]


def test_progress_line_is_one_short_line():
    row = {
        "round": 3,
        "student_accuracy": 0.9,
        "student_loss": 0.3,
        "clients": 1000,
        "bytes_up": 80_152_000,
        "bytes_down": 8_300_000,
        "wall_seconds": 12.0,
        "failed": 2,
        "rejected": 0,
    }
    line = progress_line(row, total_rounds=10)
    assert "\n" not in line and "clients 1000" in line and "failed 2" in line
    assert " val " not in line
    assert "val 0.8812" in progress_line({**row, "validation_accuracy": 0.88118}, total_rounds=10)
    assert format_bytes(80_152_000) == "80.2 MB"
