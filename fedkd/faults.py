"""Simulated client crashes: which clients fail in a round.

With ``failure.crash_fraction = f`` a fresh, seeded share ``round(f · num_clients)`` of the
clients crashes in every round (the ClientApp raises before doing any work), so the server sees
errors instead of replies, exactly as when a node dies mid-round. The choice depends only on the
run seed and the round, so every engine crashes the same clients. Simulation only: a real node
crashes by itself.
"""

from __future__ import annotations

import functools

import numpy as np

from fedkd.seeding import SeedPurpose, derive_seed


class SimulatedCrash(RuntimeError):
    """Raised by a client that ``failure.crash_fraction`` makes crash this round."""


@functools.lru_cache(maxsize=256)
def crashed_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> frozenset[int]:
    """The ids of the ``round(fraction · num_clients)`` clients that crash in ``server_round``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"failure.crash_fraction must lie in [0, 1], got {fraction}.")
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, server_round, SeedPurpose.CRASHES))
    return frozenset(int(client) for client in rng.choice(num_clients, size=count, replace=False))
