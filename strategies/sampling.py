"""Which clients a round asks: wait for enough to connect, then a seeded sample."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from fedkd.seeding import SeedPurpose, numpy_generator

logger = logging.getLogger(__name__)


def sample_size(num_nodes: int, fraction: float) -> int:
    """How many of ``num_nodes`` a round asks: ``ceil(fraction · n)``, at least one."""
    return max(1, int(np.ceil(fraction * num_nodes)))


def sample_node_ids(node_ids: Iterable[int], *, fraction: float, seed: int, server_round: int) -> list[int]:
    """A seeded sample of :func:`sample_size` nodes, in sorted order."""
    ordered = sorted(node_ids)
    if not ordered:
        return []
    size = sample_size(len(ordered), fraction)
    if size >= len(ordered):
        return ordered
    rng = numpy_generator(seed, server_round, SeedPurpose.SAMPLE_CLIENTS)
    return sorted(rng.choice(ordered, size=size, replace=False).tolist())


def wait_for_nodes(grid: Grid, *, minimum: int, timeout: float) -> list[int]:
    """Node ids once at least ``minimum`` are connected (a deployment's nodes join over time).

    After ``timeout`` seconds the round goes ahead with whoever is connected.
    """
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < minimum and time.monotonic() < deadline:
        logger.info("waiting for nodes: %d of %d connected", len(node_ids), minimum)
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    return node_ids


@dataclass(frozen=True)
class ClientSampling:
    """Client selection shared by the strategies that do their own sampling.

    Parameters
    ----------
    fraction : float
        Share of connected clients asked each round.
    min_available_nodes : int
        Wait (up to ``wait_timeout`` seconds) for this many clients before a round.
    seed : int
        Seeds the sample; the same seed and round give the same clients.
    """

    fraction: float = 1.0
    min_available_nodes: int = 1
    wait_timeout: float = 600.0
    seed: int = 0

    def select(self, grid: Grid, *, server_round: int) -> list[int]:
        connected = wait_for_nodes(grid, minimum=self.min_available_nodes, timeout=self.wait_timeout)
        return sample_node_ids(connected, fraction=self.fraction, seed=self.seed, server_round=server_round)
