"""Aggregation of the clients' soft labels: pure functions on arrays.

Every aggregator takes a stack of per-client soft-label matrices, shape ``(K, N, C)`` (K clients,
N transfer inputs, C classes, rows are probability vectors), and per-client weights of shape
``(K,)``, and returns one ``(N, C)`` matrix of probability vectors. None of them mutates its
inputs or knows about Flower.

The aggregators fall into three families:

* averages with one weight per client: :func:`weighted_mean`, :func:`mean`;
* averages whose weights also depend on the input, so that a client counts more where it is
  sure: :func:`confidence_weighted`, :func:`entropy_weighted`;
* :func:`class_weighted`: one weight per client *and class*, its count of that class, so that a
  client's probability of class c counts as much as the examples of c it learned from (its
  ``weights`` are then ``(K, C)`` class counts, see :data:`PER_CLASS_WEIGHTS`);
* robust, coordinate-wise statistics that bound the influence of a few bad clients:
  :func:`median`, :func:`trimmed_mean`;
* :func:`robust`: per-class trust that keeps non-IID knowledge (:mod:`strategies.robust_aggregation`;
  a run adds reputation across rounds and, with public labels, a root set).

:func:`entropy_reduce` and :func:`sharpen` are post-steps on one ``(N, C)`` matrix:
:func:`entropy_reduction` (DS-FL's entropy reduction aggregation, ``"era"``) is the weighted
mean followed by the first, ``softmax(p̄ / T)``; :func:`power_sharpened` by the second,
``softmax(log p̄ / T)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from strategies.robust_aggregation import trust_weighted

Aggregator = Callable[[NDArray[np.floating], NDArray[np.floating]], NDArray[np.float32]]

# Smallest positive normal float64. Zero probabilities are clipped to it before taking logs:
# log stays finite (about -708), and the clipped entries end up as far below the rest as float64
# allows, so sharpening keeps them at (numerically) zero instead of inventing mass for them.
_TINY = float(np.finfo(np.float64).tiny)


def _check_soft_labels(soft_labels: NDArray[np.floating]) -> None:
    if soft_labels.ndim != 3:
        raise ValueError(f"soft labels must be stacked as (clients, inputs, classes), got shape {soft_labels.shape}.")
    if soft_labels.shape[0] == 0:
        raise ValueError("no client soft labels to aggregate.")


def _check_stack(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> None:
    _check_soft_labels(soft_labels)
    if weights.shape != (soft_labels.shape[0],):
        raise ValueError(f"need one weight per client: {soft_labels.shape[0]} clients, weights shape {weights.shape}.")
    if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}.")


def _per_input_weighted_mean(stack: NDArray[np.float64], input_weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Row n is ``sum_k input_weights[k, n] * stack[k, n] / sum_k input_weights[k, n]``.

    The caller guarantees that no column of ``input_weights`` sums to zero.
    """
    totals = input_weights.sum(axis=0)
    return np.einsum("kn,knc->nc", input_weights, stack) / totals[:, None]


def _renormalize_rows(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Scale each non-negative row to sum to 1; a row of zeros becomes the uniform distribution.

    A coordinate-wise median or trimmed mean sums to 0 only when, for every class, most clients
    put (exactly) zero mass on it, i.e. the clients disagree so completely that no class has
    robust support. Such a row carries no information about the label, and the uniform
    distribution says exactly that (it is the maximum-entropy target, and distilling towards it
    does not favour any class), where dividing by the zero sum would produce NaNs.
    """
    totals = rows.sum(axis=1, keepdims=True)
    uniform = np.full_like(rows, 1.0 / rows.shape[1])
    return np.divide(rows, totals, out=uniform, where=totals > 0)


def weighted_mean(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Average of the clients' probability vectors, client k weighted by ``weights[k]``.

    With weights equal to partition sizes this is the ensemble prediction of FedDF/FedED.
    """
    _check_stack(soft_labels, weights)
    normalized = weights.astype(np.float64) / weights.sum(dtype=np.float64)
    return np.tensordot(normalized, soft_labels.astype(np.float64), axes=1).astype(np.float32)


def mean(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Unweighted average: every client counts the same, whatever its data size.

    The weights are still validated, as by every aggregator, so that a bad weight vector is
    reported whichever aggregator is configured.
    """
    _check_stack(soft_labels, weights)
    return weighted_mean(soft_labels, np.ones_like(weights, dtype=np.float64))


def confidence_weighted(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Weighted mean in which client k's row for input n counts ``weights[k] * max_c p[k, n, c]``.

    Confidence is measured per input, not per client: on non-IID data a client is sure on the
    classes it has seen and unsure elsewhere, so its vote should count where it is sure.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Non-negative per-client weights (e.g. partition sizes), not all zero.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Convex combinations of the clients' rows.

    Notes
    -----
    The per-input weights never all vanish: a probability row's largest entry is at least
    ``1 / C``, so the clients with a positive ``weights[k]`` keep a positive weight.
    """
    _check_stack(soft_labels, weights)
    stack = soft_labels.astype(np.float64)
    input_weights = weights.astype(np.float64)[:, None] * stack.max(axis=2)
    return _per_input_weighted_mean(stack, input_weights).astype(np.float32)


def entropy_weighted(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Weighted mean in which client k's row for input n counts ``weights[k] * (1 - H(p_kn)/log C)``.

    ``H(p) / log C`` is the entropy normalized to [0, 1]: a one-hot row gets its full
    ``weights[k]``, a uniform row gets nothing. Unlike :func:`confidence_weighted`, this looks
    at the whole row, so a client torn between two classes counts less than one that is sure.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Non-negative per-client weights (e.g. partition sizes), not all zero.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Convex combinations of the clients' rows.

    Notes
    -----
    Where every client with a positive weight is uniform on an input, all its per-input weights
    are 0; that input falls back to the plain :func:`weighted_mean` (which is then uniform too).
    With a single class every row is ``[1]`` and the result is the weighted mean.
    """
    _check_stack(soft_labels, weights)
    stack = soft_labels.astype(np.float64)
    client_weights = weights.astype(np.float64)[:, None]
    num_classes = stack.shape[2]
    if num_classes == 1:
        # log C = 0 leaves the normalized entropy undefined; with one class there is nothing to weigh.
        return weighted_mean(soft_labels, weights)
    # 0 · log 0 = 0; taking log of 1 where p = 0 gives exactly that term without a warning.
    entropy = -np.sum(stack * np.log(np.where(stack > 0, stack, 1.0)), axis=2)
    # Clipped at 0 because rows that sum to 1 only up to rounding (the reply validator allows
    # 1e-3) can have an entropy a hair above log C, and a negative weight would break convexity.
    certainty = np.clip(1.0 - entropy / math.log(num_classes), 0.0, None)
    input_weights = client_weights * certainty
    uninformative = input_weights.sum(axis=0) <= 0
    input_weights[:, uninformative] = client_weights
    return _per_input_weighted_mean(stack, input_weights).astype(np.float32)


def class_weighted(
    soft_labels: NDArray[np.floating], class_counts: NDArray[np.floating], *, power: float = 1.0
) -> NDArray[np.float32]:
    """Per-class weighted mean: entry ``(n, c)`` is ``sum_k w[k, c] p[k, n, c] / sum_k w[k, c]`` with
    ``w = counts ** power``, and each row is then renormalized.

    On non-IID partitions a teacher that saw few or no examples of class c still assigns it
    some probability, and in a plain average those uninformed entries drown the few clients
    that know c. Weighting every class column by who learned that class is FedFTG's class-level
    ensemble (Zhang et al., "Fine-tuning Global Model via Data-Free Knowledge Distillation for
    Non-IID Federated Learning", CVPR 2022), applied here to every class column of an
    unlabelled input rather than to the one class a synthetic input was generated for.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    class_counts : ndarray, shape (K, C)
        Each client's number of training examples per class (non-negative).
    power : float
        Exponent on the counts (``strategy.class_weight_power``). 1 is FedFTG's weighting; above 1
        a class column leans on the clients that hold many examples of that class, whose teachers
        know it best, over the many that hold a few.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Probability rows.

    Notes
    -----
    A class that no client reports gets probability 0 (no one can vouch for it); a row whose
    every class is unreported cannot occur, since at least one count must be positive.
    """
    _check_soft_labels(soft_labels)
    num_clients, _, num_classes = soft_labels.shape
    if class_counts.shape != (num_clients, num_classes):
        raise ValueError(
            f"class_weighted needs each client's class counts, shape ({num_clients}, {num_classes}), "
            f"got {class_counts.shape}; it is chosen with strategy.aggregator=class_weighted, which makes "
            "the clients send them."
        )
    counts = class_counts.astype(np.float64)
    if np.any(counts < 0) or not np.isfinite(counts).all() or counts.sum() <= 0:
        raise ValueError(f"class counts must be finite, non-negative and not all zero, got {class_counts}.")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite number > 0, got {power}.")
    counts = counts**power
    totals = counts.sum(axis=0)
    known = totals > 0
    per_class = np.einsum("kc,knc->nc", counts, soft_labels.astype(np.float64))
    per_class[:, known] /= totals[known]
    return _renormalize_rows(per_class).astype(np.float32)


def coordinatewise_median(soft_labels: NDArray[np.floating]) -> NDArray[np.float64]:
    """Median over clients of every (input, class) entry, before renormalization.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.

    Returns
    -------
    ndarray of float64, shape (N, C)
        Entry-wise medians; rows need not sum to 1. With an even K the median is the mean of
        the two middle values.
    """
    _check_soft_labels(soft_labels)
    return np.median(soft_labels.astype(np.float64), axis=0)


def coordinatewise_trimmed_mean(soft_labels: NDArray[np.floating], *, trim_fraction: float) -> NDArray[np.float64]:
    """Trimmed mean over clients of every (input, class) entry, before renormalization.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    trim_fraction : float
        In [0, 0.5). For every entry, the ``floor(trim_fraction * K)`` smallest and as many
        largest client values are dropped and the rest averaged (the semantics of
        :func:`scipy.stats.trim_mean`, which Flower's ``FedTrimmedAvg`` copies).

    Returns
    -------
    ndarray of float64, shape (N, C)
        Entry-wise trimmed means; rows need not sum to 1.

    Raises
    ------
    ValueError
        If ``trim_fraction`` is outside [0, 0.5).
    """
    _check_soft_labels(soft_labels)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(
            f"trim_fraction must be in [0, 0.5), got {trim_fraction}; at 0.5 or more nothing "
            "would be left to average (use the median for the most trimming)."
        )
    # Imported here because scipy.stats takes about a second to import and only this
    # aggregator needs it; every run imports this module.
    from scipy.stats import trim_mean

    return np.asarray(trim_mean(soft_labels.astype(np.float64), trim_fraction, axis=0))


def median(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Coordinate-wise median over clients, each row renormalized to sum to 1.

    The weights are checked but otherwise ignored: a robust aggregator treats clients equally,
    since a client could claim a large data size to buy influence. A row whose medians are all
    zero becomes uniform (see :func:`coordinatewise_median` for the statistic itself).

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Per-client weights; validated like everywhere else, not used.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Probability rows; fewer than half of the clients cannot move an entry outside the
        range of the others' values (before renormalization).
    """
    _check_stack(soft_labels, weights)
    return _renormalize_rows(coordinatewise_median(soft_labels)).astype(np.float32)


def trimmed_mean(
    soft_labels: NDArray[np.floating],
    weights: NDArray[np.floating],
    *,
    trim_fraction: float = 0.1,
) -> NDArray[np.float32]:
    """Coordinate-wise trimmed mean over clients, each row renormalized to sum to 1.

    Like :func:`median`, the weights are checked but ignored, and a row of zeros becomes
    uniform.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Per-client weights; validated like everywhere else, not used.
    trim_fraction : float, default 0.1
        In [0, 0.5): ``floor(trim_fraction * K)`` values are dropped at each end of every
        entry. The default trims nothing with fewer than 10 clients (it is then the
        unweighted :func:`mean`); use e.g. 0.2 to drop one value per end out of 5.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Probability rows.

    Raises
    ------
    ValueError
        If ``trim_fraction`` is outside [0, 0.5).
    """
    _check_stack(soft_labels, weights)
    trimmed = coordinatewise_trimmed_mean(soft_labels, trim_fraction=trim_fraction)
    return _renormalize_rows(trimmed).astype(np.float32)


def robust(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float32]:
    """Per-class trust-weighted mean, one round on its own (no reputation, no root set).

    Each client's row on an input counts by how much better than chance its claims of the
    classes it puts mass on agree with a robust reference; see
    :func:`strategies.robust_aggregation.trust_weighted`. A run with ``strategy.aggregator=robust``
    also carries each client's evidence across rounds (:class:`strategies.transfer.RobustAggregation`).
    """
    _check_stack(soft_labels, weights)
    return trust_weighted(soft_labels, weights).targets


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a positive finite number, got {temperature}; use T < 1 to sharpen (DS-FL uses 0.1)."
        )


def entropy_reduce(probs: NDArray[np.floating], *, temperature: float) -> NDArray[np.float32]:
    """DS-FL's entropy reduction of averaged probabilities: ``softmax(p̄ / T)``.

    Itahara et al. (2021), Eq. (9): the averaged soft labels themselves are the logits of a
    temperature softmax; T < 1 lowers their entropy. Since rows lie in [0, 1], the largest
    possible ratio between two outputs is ``exp(1 / T)`` (e^10 at DS-FL's T = 0.1), which keeps
    every class alive, unlike :func:`sharpen`.

    Parameters
    ----------
    probs : ndarray, shape (N, C)
        Probability rows (the aggregate).
    temperature : float
        Positive and finite; DS-FL uses 0.1.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Probability rows with the same argmax.
    """
    if probs.ndim != 2:
        raise ValueError(f"entropy_reduce takes one (inputs, classes) matrix, got shape {probs.shape}.")
    _check_temperature(temperature)
    scaled = probs.astype(np.float64) / temperature
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def sharpen(probs: NDArray[np.floating], *, temperature: float) -> NDArray[np.float32]:
    """Raise each row to the power ``1 / temperature`` and renormalize: ``softmax(log(p) / T)``.

    A much harsher sharpening than DS-FL's :func:`entropy_reduce`: at T = 0.1 a class with a
    tenth of the top probability keeps 1e-10 of it. Offered as the ``power_sharpened``
    aggregator; T = 1 leaves rows unchanged (up to renormalization), T > 1 softens them.

    Parameters
    ----------
    probs : ndarray, shape (N, C)
        Probability rows; zeros are allowed.
    temperature : float
        Positive and finite. DS-FL uses 0.1.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Probability rows with the same argmax; for T < 1 none has more entropy than its input.

    Raises
    ------
    ValueError
        If ``probs`` is not 2-D or ``temperature`` is not a positive finite number.
    """
    if probs.ndim != 2:
        raise ValueError(f"sharpen takes one (inputs, classes) matrix, got shape {probs.shape}.")
    _check_temperature(temperature)
    logits = np.log(np.clip(probs.astype(np.float64), _TINY, None))
    # Shifting by the row maximum before dividing by T keeps every exponent ≤ 0 even for tiny T,
    # so nothing overflows to inf (which would turn into NaN on renormalization).
    scaled = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def retemper(probs: NDArray[np.floating], *, from_temperature: float, to_temperature: float) -> NDArray[np.float32]:
    """Rows ``softmax(z / T_from)`` turned into ``softmax(z / T_to)`` of the same logits ``z``.

    ``log p`` equals ``z / T_from`` up to a per-row constant, so ``softmax(log p · T_from / T_to)``
    recovers the rows at another temperature without the logits: the server can combine the
    clients' soft labels at one temperature and distill at another. Works on any leading shape.

    Parameters
    ----------
    probs : ndarray, shape (..., C)
        Probability rows at ``from_temperature``; zeros are allowed.
    from_temperature, to_temperature : float
        Positive and finite.

    Returns
    -------
    ndarray of float32, shape (..., C)
        Probability rows with the same argmax.
    """
    _check_temperature(from_temperature)
    _check_temperature(to_temperature)
    logits = np.log(np.clip(probs.astype(np.float64), _TINY, None)) * (from_temperature / to_temperature)
    scaled = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def running_average(
    previous: NDArray[np.floating] | None, current: NDArray[np.floating], *, decay: float
) -> NDArray[np.float64]:
    """``decay · previous + (1 − decay) · current`` of two ``(N, C)`` matrices of probability rows,
    rows renormalized; ``current`` itself when there is no ``previous``.

    Laine & Aila's temporal ensembling ("Temporal Ensembling for Semi-Supervised Learning", ICLR
    2017) applied to the server's targets: the average spans the teachers of about the last
    ``1 / (1 − decay)`` rounds, an ensemble over rounds as well as over clients.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the rounds' average needs a decay in [0, 1), got {decay}.")
    if previous is None:
        return current.astype(np.float64)
    if previous.shape != current.shape:
        raise ValueError(
            f"cannot average targets of shape {current.shape} with earlier ones of shape {previous.shape}."
        )
    mixed = decay * previous.astype(np.float64) + (1.0 - decay) * current.astype(np.float64)
    return mixed / mixed.sum(axis=-1, keepdims=True)


def entropy_reduction(
    soft_labels: NDArray[np.floating],
    weights: NDArray[np.floating],
    *,
    temperature: float = 0.1,
) -> NDArray[np.float32]:
    """DS-FL's entropy reduction aggregation (ERA): :func:`weighted_mean`, then :func:`entropy_reduce`.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Non-negative per-client weights (e.g. partition sizes), not all zero.
    temperature : float, default 0.1
        Entropy-reduction temperature; DS-FL's value is the default.

    Returns
    -------
    ndarray of float32, shape (N, C)
        Entropy-reduced probability rows.
    """
    return entropy_reduce(_float64_mean(soft_labels, weights), temperature=temperature)


def power_sharpened(
    soft_labels: NDArray[np.floating],
    weights: NDArray[np.floating],
    *,
    temperature: float = 0.1,
) -> NDArray[np.float32]:
    """:func:`weighted_mean`, then :func:`sharpen` (``softmax(log p̄ / T)``): a harsher variant of ERA."""
    return sharpen(_float64_mean(soft_labels, weights), temperature=temperature)


def _float64_mean(soft_labels: NDArray[np.floating], weights: NDArray[np.floating]) -> NDArray[np.float64]:
    # Sharpened from float64, not from weighted_mean's float32 output, so that a small T does
    # not amplify float32 rounding.
    _check_stack(soft_labels, weights)
    normalized = weights.astype(np.float64) / weights.sum(dtype=np.float64)
    return np.tensordot(normalized, soft_labels.astype(np.float64), axes=1)


AGGREGATORS: dict[str, Aggregator] = {
    "weighted": weighted_mean,
    "mean": mean,
    "confidence_weighted": confidence_weighted,
    "entropy_weighted": entropy_weighted,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "era": entropy_reduction,
    "power_sharpened": power_sharpened,
    "robust": robust,
    "class_weighted": class_weighted,
}
# Aggregators whose weights are (K, C) per-client class counts instead of (K,) partition sizes.
PER_CLASS_WEIGHTS = ("class_weighted",)


def class_counts(labels: Any, num_classes: int) -> NDArray[np.int64]:
    """A client's examples per class (what it sends for :data:`PER_CLASS_WEIGHTS` aggregators)."""
    return np.bincount(np.asarray(labels), minlength=num_classes).astype(np.int64)


# Aggregators that already reduce entropy: DS-FL would reduce it a second time.
ENTROPY_REDUCING = ("era", "power_sharpened")


def get_aggregator(name: str) -> Aggregator:
    """Look an aggregator up by name; unknown names raise a ``ValueError`` listing the choices."""
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}.")
    return AGGREGATORS[name]
