"""Private aggregation of what clients share: pure functions on arrays, tested without Flower.

Two mechanisms release the clients' soft labels on a batch of transfer inputs:

* :func:`gaussian_mean` — client-level DP (Geyer et al. 2017; McMahan et al. 2018's DP-FedAvg
  applied to soft labels): every row of a client's ``(N, C)`` matrix is clipped to L2 norm
  ``clip_norm``, so one client moves the sum by at most ``clip_norm · √N``; Gaussian noise of
  standard deviation ``noise_multiplier · clip_norm · √N`` is added to the sum, which is divided by
  the (public) expected number of clients and projected back onto the probability simplex.
  With ``noise_at="clients"`` each of ``K`` clients adds a ``1/√K`` share of that noise to its
  own matrix instead, and the server only sums (distributed DP: the total noise is the same if
  every sampled client follows the protocol).
* :func:`gnmax_labels` — PATE's GNMax (Papernot et al. 2018): clients vote with their argmax,
  the server adds ``N(0, σ²)`` to each class count and releases only the noisy argmax.
* :func:`confident_gnmax` — PATE's Confident-GNMax (same paper, Algorithm 1): a query is
  answered only if its noisy largest count, ``max(n) + N(0, σ₁²)``, reaches the threshold T;
  answered queries get GNMax at σ₂, refused ones release nothing but the refusal.

Accounting lives in :mod:`fedkd.privacy.accountant`; these functions only draw the noise.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray


def clip_rows(matrix: NDArray[np.floating], clip_norm: float) -> NDArray[np.float64]:
    """Scale every row whose L2 norm exceeds ``clip_norm`` down to that norm."""
    if clip_norm <= 0:
        raise ValueError(f"privacy.clip_norm must be > 0, got {clip_norm}.")
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))


def sum_sensitivity(num_inputs: int, clip_norm: float) -> float:
    """L2 sensitivity of a sum of row-clipped ``(num_inputs, C)`` matrices to one client."""
    return clip_norm * math.sqrt(num_inputs)


def to_simplex(rows: NDArray[np.floating]) -> NDArray[np.float32]:
    """Post-process noisy rows into probability vectors: negatives to 0, rows renormalized;
    a row with no positive mass becomes uniform (it carries no usable label information)."""
    rows = np.clip(np.asarray(rows, dtype=np.float64), 0.0, None)
    totals = rows.sum(axis=-1, keepdims=True)
    uniform = np.full_like(rows, 1.0 / rows.shape[-1])
    return np.divide(rows, totals, out=uniform, where=totals > 0).astype(np.float32)


def gaussian_noise_share(
    shape: tuple[int, ...], *, noise_std: float, num_shares: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """One client's share of distributed Gaussian noise: ``num_shares`` of them sum to ``N(0, noise_std²)``."""
    if num_shares < 1:
        raise ValueError(f"num_shares must be ≥ 1, got {num_shares}.")
    return rng.normal(0.0, noise_std / math.sqrt(num_shares), size=shape)


def gaussian_mean(
    soft_labels: NDArray[np.floating],
    *,
    clip_norm: float,
    noise_std: float,
    expected_clients: int,
    rng: np.random.Generator,
    noise_added_by_clients: bool = False,
) -> NDArray[np.float32]:
    """The private mean of ``(K, N, C)`` client matrices.

    ``noise_std`` is the total noise standard deviation on the sum (``noise multiplier ×``
    :func:`sum_sensitivity`). When ``noise_added_by_clients`` is true the matrices already carry
    their shares and are summed as they are (clipping happened on the clients, before the noise).
    """
    soft_labels = np.asarray(soft_labels, dtype=np.float64)
    if soft_labels.ndim != 3 or soft_labels.shape[0] == 0:
        raise ValueError(f"expected a non-empty (clients, inputs, classes) stack, got shape {soft_labels.shape}.")
    if expected_clients < 1:
        raise ValueError(f"expected_clients must be ≥ 1, got {expected_clients}.")
    if noise_added_by_clients:
        total = soft_labels.sum(axis=0)
    else:
        total = clip_rows(soft_labels, clip_norm).sum(axis=0)
        if noise_std > 0:
            total = total + rng.normal(0.0, noise_std, size=total.shape)
    # Dividing by the public expected count, not the actual one, keeps the count out of the release.
    return to_simplex(total / expected_clients)


def vote_counts(votes: NDArray[np.floating]) -> NDArray[np.int64]:
    """Per-input class counts from ``(K, N, C)`` one-hot (or soft) votes: each client's argmax."""
    votes = np.asarray(votes)
    if votes.ndim != 3 or votes.shape[0] == 0:
        raise ValueError(f"expected a non-empty (clients, inputs, classes) stack, got shape {votes.shape}.")
    choices = votes.argmax(axis=-1)  # (K, N)
    counts = np.zeros(votes.shape[1:], dtype=np.int64)
    for client_choices in choices:
        counts[np.arange(len(client_choices)), client_choices] += 1
    return counts


def gnmax_labels(counts: NDArray[np.integer], *, sigma: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """GNMax: ``argmax_c (counts[n, c] + N(0, σ²))`` for every input ``n``."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"vote counts must be (inputs, classes), got shape {counts.shape}.")
    if sigma < 0:
        raise ValueError(f"sigma must be ≥ 0, got {sigma}.")
    noisy = counts + rng.normal(0.0, sigma, size=counts.shape) if sigma > 0 else counts
    return noisy.argmax(axis=-1).astype(np.int64)


def is_vote_count_matrix(matrix: NDArray[np.floating], *, teachers_per_client: int) -> bool:
    """Whether a client's ``(N, C)`` reply holds non-negative whole votes, ``teachers_per_client``
    per row: one that does not could move the counts by more than one vote per record, which
    the privacy analysis assumes impossible."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return bool(
        matrix.ndim == 2
        and np.all(matrix >= 0)
        and np.all(matrix == np.round(matrix))
        and np.all(matrix.sum(axis=-1) == teachers_per_client)
    )


def summed_votes(counts: NDArray[np.floating], *, teachers_per_client: int) -> NDArray[np.int64]:
    """The per-input class counts of every teacher from the clients' ``(K, N, C)`` vote counts."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] == 0:
        raise ValueError(f"expected a non-empty (clients, inputs, classes) stack, got shape {counts.shape}.")
    for client, matrix in enumerate(counts):
        if not is_vote_count_matrix(matrix, teachers_per_client=teachers_per_client):
            raise ValueError(
                f"client {client}'s reply is not {teachers_per_client} whole vote(s) per input; "
                "drop it before summing (see is_vote_count_matrix)."
            )
    return counts.sum(axis=0).astype(np.int64)


def threshold_check(
    counts: NDArray[np.integer], *, threshold: float, sigma: float, rng: np.random.Generator
) -> NDArray[np.bool_]:
    """Confident-GNMax's first step: ``max_c counts[n, c] + N(0, σ²) ≥ threshold`` per input.

    Only this comparison is released; the largest count moves by at most one vote when one
    record changes (sensitivity 1).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"vote counts must be (inputs, classes), got shape {counts.shape}.")
    if sigma < 0:
        raise ValueError(f"sigma must be ≥ 0, got {sigma}.")
    noisy_max = counts.max(axis=-1) + rng.normal(0.0, sigma, size=len(counts))
    return noisy_max >= threshold


def confident_gnmax(
    counts: NDArray[np.integer],
    *,
    threshold: float,
    sigma_threshold: float,
    sigma_gnmax: float,
    rng: np.random.Generator,
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Which inputs are answered, and the GNMax label of each answered one (in input order).

    GNMax noise is drawn only for answered inputs: a refused query releases the refusal alone.
    """
    answered = threshold_check(counts, threshold=threshold, sigma=sigma_threshold, rng=rng)
    labels = gnmax_labels(np.asarray(counts)[answered], sigma=sigma_gnmax, rng=rng)
    return answered, labels


def one_hot(labels: NDArray[np.integer], num_classes: int) -> NDArray[np.float32]:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


# GNMax's L2 sensitivity under record-level adjacency: one teacher's vote moves between two classes.
GNMAX_SENSITIVITY = math.sqrt(2.0)
