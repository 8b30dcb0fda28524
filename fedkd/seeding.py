"""Explicit seeds derived from (run seed, round, client id, purpose).

Every random draw in a run comes from a generator made here, so the same seed gives the same
run whatever the execution engine or the order in which clients happen to run.
"""

from __future__ import annotations

from enum import IntEnum, unique

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


@unique
class SeedPurpose(IntEnum):
    """What a draw is for, so that two draws in the same round and client never share a stream.

    The value is part of the derived seed: a new purpose takes the next unused value, and an
    existing one never changes, or every run would draw differently from then on.
    """

    TEACHER_INIT = 0
    TEACHER_TRAIN = 1
    STUDENT_INIT = 2
    DISTILL = 3
    SAMPLE_CLIENTS = 4
    TEACHER_DIGEST = 5
    SYNTHESIS = 6
    PRIVACY_NOISE = 7
    PRIVACY_QUERIES = 8
    CLIENT_NOISE = 9
    FEATURE_NOISE = 10
    FEATURE_REFERENCE = 11
    ATTACK_SELECTION = 12
    ATTACK_NOISE = 13
    TEACHER_SHARDS = 14
    SEMI_SUPERVISED = 15
    ATTACK_COLLUSION = 16
    CRASHES = 17
    MIXUP_VIEWS = 18
    POOL_REPLAY = 19
    VALIDATION_SPLIT = 20
