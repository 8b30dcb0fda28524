"""Explicit seeds derived from (run seed, round, client id, purpose).

Every random draw in a run comes from a generator made here, so the same seed gives the same
run whatever the execution engine or the order in which clients happen to run.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed that depends on ``seed`` and every part, order included."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def torch_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def numpy_generator(seed: int, *parts: int) -> np.random.Generator:
    """A NumPy ``Generator`` seeded with :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(seed, *parts))


# Purposes, so that two draws in the same round and client never share a stream.
(
    TEACHER_INIT, TEACHER_TRAIN, STUDENT_INIT, DISTILL, SAMPLE_CLIENTS, TEACHER_DIGEST, SYNTHESIS,
    PRIVACY_NOISE, PRIVACY_QUERIES, CLIENT_NOISE, FEATURE_NOISE, FEATURE_REFERENCE, ATTACK_SELECTION,
    ATTACK_NOISE, TEACHER_SHARDS, SEMI_SUPERVISED,
) = range(16)
