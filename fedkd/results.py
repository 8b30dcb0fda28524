"""The run folder: resolved config, per-round metrics (JSON lines) and the student checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from fedkd.config import RunConfig, stored_run_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STUDENT_FILE = "student.pt"
PRIVACY_FILE = "privacy.json"


def _config_values(config: RunConfig, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    values["client_models"] = list(config.teacher_models)
    values["student_shift"] = config.distill_shift
    values.update(extra or {})
    return values


class RunFolder:
    """Writes a run's artefacts under ``path``; every write is complete when it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def write_config(self, config: RunConfig, *, extra: Mapping[str, Any] | None = None) -> None:
        (self.path / CONFIG_FILE).write_text(yaml.safe_dump(_config_values(config, extra), sort_keys=False))

    def finished_rows(self, config: RunConfig) -> list[dict[str, Any]] | None:
        """The rows of a finished run of exactly ``config`` in this folder, else ``None``.

        Lets an interrupted sweep be relaunched without redoing the runs it had finished, also
        from another checkout, data folder or engine (``RunConfig.same_run``). The
        stored config is read back through the same adapter as a new one, so a folder written
        before a setting existed still matches when the setting keeps the value runs had before
        it existed (its default, or :data:`fedkd.config.BEFORE_THE_SETTING`'s).
        """
        stored = self.stored_config() if self.metrics_path.exists() else None
        if stored is None or not config.same_run(stored):
            return None
        rows = read_metrics(self.metrics_path)
        if [row.get("round") for row in rows] != list(range(1, config.rounds + 1)):
            return None
        return rows

    def start_metrics(self) -> None:
        """Begin a fresh metrics file (a rerun into the same folder replaces it)."""
        self.metrics_path.write_text("")

    def stored_config(self) -> RunConfig | None:
        """The config this folder's run was started with, if it holds one this version can read."""
        config_path = self.path / CONFIG_FILE
        if not config_path.exists():
            return None
        try:
            return stored_run_config(read_config(self.path))
        except (TypeError, ValueError):
            return None

    def keep_metrics_through(self, server_round: int) -> list[dict[str, Any]]:
        """Drop rows after ``server_round`` (written after the last checkpoint); returns the rest."""
        rows = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        kept = [row for row in rows if row["round"] <= server_round]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        return kept

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        clean = {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in row.items()}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")

    def save_student(self, state_dict: Mapping[str, torch.Tensor], *, architecture: str, server_round: int) -> Path:
        path = self.path / STUDENT_FILE
        partial = path.with_suffix(".pt.partial")
        torch.save({"architecture": architecture, "round": server_round, "state_dict": dict(state_dict)}, partial)
        partial.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind
        return path

    def save_privacy(self, state: Mapping[str, Any], *, server_round: int) -> Path:
        """The accountant's state after ``server_round``, beside the student checkpoint."""
        path = self.path / PRIVACY_FILE
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"round": server_round, **state}, indent=1) + "\n")
        partial.replace(path)
        return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file (or of the one inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_config(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml`` as written: the resolved settings and any extras (``method``...)."""
    return yaml.safe_load((Path(folder) / CONFIG_FILE).read_text()) or {}


@dataclass(frozen=True)
class FinishedRun:
    """One finished run read back from its folder, for the result tables."""

    path: Path
    config: dict[str, Any]  # as in read_config
    rows: list[dict[str, Any]]  # every round's metrics, in order


def iter_run_folders(root: str | Path, pattern: str = "*") -> Iterator[FinishedRun]:
    """The finished runs in the folders under ``root`` whose names match ``pattern``, sorted by name.

    A folder counts when it holds a ``config.yaml`` and a ``metrics.jsonl`` with at least
    ``rounds`` rows; folders without them (plots, other outputs) and unfinished runs are skipped.
    """
    for folder in sorted(Path(root).glob(pattern)):
        if not (folder / CONFIG_FILE).is_file() or not (folder / METRICS_FILE).is_file():
            continue
        config = read_config(folder)
        rows = read_metrics(folder)
        if len(rows) >= config["rounds"]:
            yield FinishedRun(path=folder, config=config, rows=rows)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def progress_line(row: Mapping[str, Any], *, total_rounds: int) -> str:
    """One readable line per round, whatever the number of clients."""
    held_out = f"  val {row['validation_accuracy']:.4f}" if "validation_accuracy" in row else ""
    failures = ""
    if row.get("failed") or row.get("rejected"):
        failures = f"  failed {row.get('failed', 0)}  rejected {row.get('rejected', 0)}"
    return (
        f"round {row['round']:>{len(str(total_rounds))}}/{total_rounds}"
        f"  acc {row['student_accuracy']:.4f}  loss {row['student_loss']:.4f}"
        f"{held_out}"
        f"  clients {row['clients']}{failures}"
        f"  up {format_bytes(row['bytes_up'])}  down {format_bytes(row['bytes_down'])}"
        f"  {row['wall_seconds']:.1f} s"
    )
