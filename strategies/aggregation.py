"""Aggregation of the clients' soft labels: pure functions on arrays.

Every aggregator takes a stack of per-client soft-label matrices, shape ``(K, N, C)`` (K clients,
N transfer inputs, C classes, rows are probability vectors), and per-client weights of shape
``(K,)``, and returns one ``(N, C)`` matrix of probability vectors. None of them mutates its
inputs or knows about Flower.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

Aggregator = Callable[[NDArray[np.floating], NDArray[np.floating]], NDArray[np.float32]]


def _check_stack(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> None:
    if soft_labels.ndim != 3:
        raise ValueError(
            f"soft labels must be stacked as (clients, inputs, classes), got shape {soft_labels.shape}."
        )
    if soft_labels.shape[0] == 0:
        raise ValueError("no client soft labels to aggregate.")
    if weights.shape != (soft_labels.shape[0],):
        raise ValueError(
            f"need one weight per client: {soft_labels.shape[0]} clients, weights shape {weights.shape}."
        )
    if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}.")


def weighted_mean(
    soft_labels: NDArray[np.floating], weights: NDArray[np.floating]
) -> NDArray[np.float32]:
    """Average of the clients' probability vectors, client k weighted by ``weights[k]``.

    With weights equal to partition sizes this is the ensemble prediction of FedDF/FedED.
    """
    _check_stack(soft_labels, weights)
    normalized = weights.astype(np.float64) / weights.sum(dtype=np.float64)
    return np.tensordot(normalized, soft_labels.astype(np.float64), axes=1).astype(np.float32)


def mean(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Unweighted average: every client counts the same, whatever its data size."""
    return weighted_mean(soft_labels, np.ones_like(weights, dtype=np.float64))


AGGREGATORS: dict[str, Aggregator] = {"weighted": weighted_mean, "mean": mean}


def get_aggregator(name: str) -> Aggregator:
    """Look an aggregator up by name; unknown names raise a ``ValueError`` listing the choices."""
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}.")
    return AGGREGATORS[name]
