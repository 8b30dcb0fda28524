"""A simulation's teacher cache: each client's trained teacher and its logits on a round's
transfer inputs, kept on disk, so that a sweep over what happens *after* the teachers (the
aggregator, an attack on the replies, the student) trains every teacher once.

An entry is found by a hash of everything a teacher's training and prediction depend on: every
setting of the run except those in :data:`AFTER_THE_TEACHER`, the round, the client, whether it
trains on flipped labels (``attack.kind=flip``), the teacher it starts the round from, the
transfer indices and any consensus the server sent down (with the temperature the teacher digests
it at). Mixup views of the public inputs stay out of the key: they change what a teacher is
asked, not how it trains, so the cached teacher labels them afresh. A hit puts the cached teacher
into the client's state, exactly as training would have left it, and returns its logits and
training loss; anything that changes the teacher misses and
trains afresh. A run with the cache therefore reports the same numbers as one without it, on the
same machine.

Simulation only, and only without privacy: a DP-SGD teacher must be charged to its ledger for
every round it trains (the run configuration refuses the combination).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedkd.config import EXECUTION_SETTINGS, RunConfig, SynthesisConfig

# Settings that act only on what the teachers already produced (or on how the run is executed),
# so that runs differing only in them share their teachers.
AFTER_THE_TEACHER: dict[str, tuple[str, ...]] = {
    "": (
        *EXECUTION_SETTINGS,
        "rounds",
        "distill_epochs",
        "distill_schedule",
        "distill_ema",
        "temperature",
        "kd_alpha",
        "student_model",
        "student_shift",
        "public_labels",
        "semi_supervised",
        # Views are labelled by the round's teacher, not learned from (see logits_of_the_round).
        "mixup_views",
        "round_timeout",
    ),
    # flip is a training-time attack; it enters the key per client (entry_key's ``flipped``).
    "attack": ("kind", "fraction", "scale", "lie_fraction"),
    "strategy": ("aggregator", "aggregate_temperature", "round_average", "min_replies", "class_weight_power"),
    "failure": ("crash_fraction",),
    # The cache serves public transfer only (RunConfig refuses it otherwise): no synthesis setting
    # reaches a cached teacher.
    "synthesis": tuple(field.name for field in dataclasses.fields(SynthesisConfig)),
}


@dataclass(frozen=True)
class CachedTeacher:
    """One client's teacher at the end of one round, with its logits and last training loss."""

    teacher: dict[str, torch.Tensor]
    logits: torch.Tensor
    train_loss: float


def teacher_settings(run: RunConfig) -> dict[str, Any]:
    """The run's settings that a teacher depends on (a nested dict, for the key)."""
    settings = dataclasses.asdict(run)
    for group, names in AFTER_THE_TEACHER.items():
        target = settings[group] if group else settings
        for name in names:
            target.pop(name, None)
    return settings


def _digest(hasher: Any, arrays: dict[str, np.ndarray]) -> None:
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        hasher.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        hasher.update(array.tobytes())


def entry_key(
    run: RunConfig,
    *,
    server_round: int,
    client_id: int,
    flipped: bool,
    start: ArrayRecord | None,
    received: dict[str, np.ndarray],
) -> str:
    """The hash that names one entry (see the module docstring for what goes into it)."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps(teacher_settings(run), sort_keys=True, default=str).encode())
    hasher.update(json.dumps({"round": server_round, "client": client_id, "flipped": flipped}).encode())
    if start is not None:
        _digest(hasher, {name: array.numpy() for name, array in start.items()})
    hasher.update(b"received")
    _digest(hasher, received)
    return hasher.hexdigest()


class TeacherCache:
    """Entries under ``folder``, one file each, written atomically (parallel sweeps may share it)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str) -> CachedTeacher | None:
        path = self.path(key)
        if not path.exists():
            return None
        stored = torch.load(path, weights_only=True)
        return CachedTeacher(stored["teacher"], stored["logits"], float(stored["train_loss"]))

    def store(self, key: str, entry: CachedTeacher) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save({"teacher": entry.teacher, "logits": entry.logits, "train_loss": entry.train_loss}, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
