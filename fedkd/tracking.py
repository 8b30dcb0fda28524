"""Experiment tracking: per-round rows into TensorBoard, beside ``metrics.jsonl``.

``fedkd-sim logger=tensorboard`` writes event files into the run folder's ``tensorboard/``; a
sweep's runs each write their own, so ``tensorboard --logdir multirun/<date>/<time>`` (or
``--logdir results/<sweep>``) shows them side by side, named by their folders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
# Row keys that are not per-round measurements.
_NOT_SCALARS = ("round",)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric measurements of a round row, by name (lists, strings and NaN left out)."""
    values: dict[str, float] = {}
    for key, value in row.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(value):
            continue
        values[key] = float(value)
    return values


class TensorBoardLogger:
    """Writes each round's row as scalars at step = round (callable as a round callback)."""

    def __init__(self, run_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def __call__(self, row: Mapping[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def round_callbacks(*callbacks: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """One round callback that calls each of ``callbacks`` in turn."""

    def each(row: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(row)

    return each
