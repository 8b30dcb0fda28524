"""Privacy analysis of PATE's Confident-GNMax (Papernot et al., "Scalable Private Learning
with PATE", ICLR 2018): pure numpy/scipy functions, tested against the paper's reference code.

Confident-GNMax answers a query with vote histogram ``n`` (one vote per teacher) in two steps:

1. the threshold check ``max(n) + N(0, σ₁²) ≥ T`` — released for every query;
2. if it passes, GNMax ``argmax_j (n_j + N(0, σ₂²))`` — released only for answered queries.

Every quantity is a Rényi-DP (RDP) curve over a list of orders λ > 1 and composes by addition.
Two bounds exist for each step:

* data-independent: λ/σ₂² for GNMax (one changed record moves one teacher's vote, so two counts
  move by one: L2 sensitivity √2, Prop. 8) and λ/(2σ₁²) for the threshold check (``max(n)``
  moves by at most one: sensitivity 1);
* data-dependent (Theorem 6): much smaller when the outcome is nearly certain, i.e. when
  ``q = Pr[outcome ≠ the likely one]`` is small. It depends on the data, so the ε it gives is
  itself private; releasing it needs smooth sensitivity (Section B of the appendix): the
  functions at the end of this module compute it and release a noised ε.

(ε, δ) follows from RDP through ε = min_λ RDP(λ) + log(1/δ)/(λ − 1) (Mironov 2017, Prop. 3),
the conversion of the reference code; the tighter one of Balle et al. (2020), which Opacus
uses, is available with ``improved_conversion=True``.

Where this code departs from the reference implementation, a comment says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special, stats

# --- input checks ----------------------------------------------------------------------------


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"{name} must be a finite noise standard deviation > 0, got {sigma}; "
            "a mechanism without noise has no finite RDP bound."
        )
    return float(sigma)


def _check_orders(orders: ArrayLike) -> NDArray[np.float64]:
    orders_array = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if orders_array.ndim != 1 or orders_array.size == 0:
        raise ValueError(f"orders must be a non-empty list of Rényi orders, got {orders!r}.")
    if not (np.all(np.isfinite(orders_array)) and np.all(orders_array > 1)):
        raise ValueError(f"every Rényi order must be finite and > 1 (RDP is undefined at 1), got {orders!r}.")
    return orders_array


def _check_order(order: float) -> float:
    if not (math.isfinite(order) and order > 1):
        raise ValueError(f"the Rényi order must be finite and > 1, got {order}.")
    return float(order)


def _check_votes(votes: ArrayLike, *, min_classes: int = 1) -> NDArray[np.float64]:
    votes_array = np.asarray(votes, dtype=np.float64)
    if votes_array.ndim != 1 or votes_array.size < min_classes:
        raise ValueError(
            f"votes must be a 1-D histogram with at least {min_classes} class(es), "
            f"got shape {votes_array.shape}; pass one query's per-class vote counts."
        )
    if not np.all(np.isfinite(votes_array)):
        raise ValueError("votes must be finite numbers (per-class vote counts).")
    return votes_array


def _check_vote_matrix(votes: ArrayLike) -> NDArray[np.float64]:
    matrix = np.asarray(votes, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] < 2:
        raise ValueError(
            f"votes must be a (queries, classes) matrix with ≥ 1 query and ≥ 2 classes, got shape {matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("votes must be finite numbers (per-class vote counts).")
    return matrix


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}; 1e-5 or below is usual.")
    return float(delta)


def _check_num_teachers(num_teachers: int) -> int:
    if int(num_teachers) != num_teachers or num_teachers < 1:
        raise ValueError(f"num_teachers must be an integer ≥ 1, got {num_teachers}.")
    return int(num_teachers)


def _check_answered(answered: ArrayLike, num_queries: int) -> NDArray[np.bool_]:
    mask = np.asarray(answered)
    if mask.shape != (num_queries,) or mask.dtype != np.bool_:
        raise ValueError(
            f"answered must be a boolean array with one entry per query ({num_queries}), "
            f"got dtype {mask.dtype} and shape {mask.shape}."
        )
    return mask


def _log1mexp(x: float) -> float:
    """log(1 − eˣ) for x ≤ 0, without the cancellation of the naive formula."""
    if x > 0:
        raise ValueError(f"log(1 − exp(x)) needs x ≤ 0, got {x}.")
    if x == 0:
        return -math.inf
    # Two branches: log1p is exact for small eˣ, log(−expm1) for eˣ close to 1.
    return math.log1p(-math.exp(x)) if x < -math.log(2) else math.log(-math.expm1(x))


# --- RDP → (ε, δ) ----------------------------------------------------------------------------


def epsilon_from_rdp(
    rdp: ArrayLike,
    *,
    orders: ArrayLike,
    delta: float,
    improved_conversion: bool = False,
) -> tuple[float, float]:
    """Convert an RDP curve to (ε, δ)-DP at the best order.

    Parameters
    ----------
    rdp : array_like
        RDP guarantee at each order.
    orders : array_like
        The Rényi orders λ > 1, same length as ``rdp``.
    delta : float
        Target δ in (0, 1).
    improved_conversion : bool, default False
        False: ε = RDP(λ) + log(1/δ)/(λ − 1) (Mironov 2017, Prop. 3; the reference's
        ``compute_eps_from_delta``). True: Balle et al. (2020, Thm. 21), as in Opacus's
        ``get_privacy_spent``, smaller by ``log(λ)/(λ − 1) − log(1 − 1/λ)``.

    Returns
    -------
    (epsilon, order)
        The smallest ε over the orders and the order that attains it.
    """
    orders_array = _check_orders(orders)
    rdp_array = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if rdp_array.shape != orders_array.shape:
        raise ValueError(f"rdp and orders must have the same length, got {rdp_array.shape} and {orders_array.shape}.")
    _check_delta(delta)
    epsilons = rdp_array - math.log(delta) / (orders_array - 1)
    if improved_conversion:
        epsilons = epsilons - np.log(orders_array) / (orders_array - 1) + np.log((orders_array - 1) / orders_array)
    best = int(np.argmin(epsilons))
    return float(epsilons[best]), float(orders_array[best])


# --- GNMax -----------------------------------------------------------------------------------


def rdp_gnmax_data_independent(*, sigma: float, orders: ArrayLike) -> NDArray[np.float64]:
    """Data-independent RDP of GNMax: λ/σ² at every order (Prop. 8).

    One changed record changes one teacher's vote, moving two counts by one: L2 sensitivity √2,
    so the Gaussian mechanism's λΔ²/(2σ²) becomes λ/σ² (the reference's
    ``rdp_data_independent_gaussian``).
    """
    sigma = _check_sigma(sigma)
    return _check_orders(orders) / sigma**2


def compute_logq_gnmax(votes: ArrayLike, *, sigma: float) -> float:
    """log of an upper bound on q = Pr[GNMax's outcome ≠ argmax(votes)] (Prop. 7).

    A union bound over the other classes: class j beats the argmax i* only if the difference of
    two N(0, σ²) draws, an N(0, 2σ²) variable, exceeds the gap ``n_{i*} − n_j``. Capped at
    1 − 1/m (m classes), which a uniform outcome attains. Summed in log space so that a clear
    majority (q ~ 1e-100) does not underflow (the reference's ``compute_logq_gaussian``).
    """
    sigma = _check_sigma(sigma)
    counts = _check_votes(votes, min_classes=2)
    top = int(np.argmax(counts))
    gaps = counts[top] - np.delete(counts, top)
    logq = float(special.logsumexp(stats.norm.logsf(gaps, scale=math.sqrt(2.0) * sigma)))
    return min(logq, math.log(1.0 - 1.0 / counts.size))


def compute_q_gnmax(votes: ArrayLike, *, sigma: float) -> float:
    """The bound of :func:`compute_logq_gnmax` as a probability (it may underflow to 0)."""
    return math.exp(compute_logq_gnmax(votes, sigma=sigma))


def _mu_gnmax(logq: float, sigma: float) -> tuple[float, float]:
    # Prop. 10's choice of the two higher orders that Theorem 6 needs: μ₂ = σ·√log(1/q),
    # μ₁ = μ₂ + 1.
    mu2 = sigma * math.sqrt(-logq)
    return mu2 + 1.0, mu2


def _theorem6_bound(logq: float, sigma: float, orders: NDArray[np.float64]) -> NDArray[np.float64]:
    """Theorem 6's expression, without its validity conditions (callers check them).

    RDP(λ) ≤ log((1 − q)·A^(λ−1) + q·B^(λ−1)) / (λ − 1) with
    A = (1 − q) / (1 − (q·e^{ε₂})^{(μ₂−1)/μ₂}) and B = e^{ε₁} / q^{1/(μ₁−1)},
    εᵢ = μᵢ/σ² the data-independent RDP at μᵢ; evaluated in log space.
    """
    mu1, mu2 = _mu_gnmax(logq, sigma)
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    log1q = _log1mexp(logq)
    log_a = (orders - 1) * (log1q - _log1mexp((logq + eps2) * (1 - 1 / mu2)))
    log_b = (orders - 1) * (eps1 - logq / (mu1 - 1))
    return np.logaddexp(log1q + log_a, logq + log_b) / (orders - 1)


def rdp_gnmax_data_dependent(logq: float, *, sigma: float, orders: ArrayLike) -> NDArray[np.float64]:
    """Data-dependent RDP of GNMax given log q, an upper bound on Pr[outcome ≠ argmax]
    (Theorem 6 with Prop. 10's μ₁, μ₂; the reference's ``rdp_gaussian``).

    Theorem 6 holds where μ₁ > λ and μ₂ > 1, and only while q is small enough that the bound
    is increasing in q (Lemma 9's condition ``q ≤ e^{(μ₂−1)ε₂} / (μ₁/(μ₁−1) · μ₂/(μ₂−1))^{μ₂}``)
    and ``q·e^{ε₂} < 1``; elsewhere, and wherever it is larger, the data-independent λ/σ²
    applies. A certain outcome (q = 0) costs nothing.
    """
    sigma = _check_sigma(sigma)
    orders_array = _check_orders(orders)
    if not logq <= 0:
        raise ValueError(f"logq must be the log of a probability (≤ 0), got {logq}.")
    if logq == -math.inf:
        return np.zeros_like(orders_array)
    independent = orders_array / sigma**2
    mu1, mu2 = _mu_gnmax(logq, sigma)
    applies = (mu1 > orders_array) & (mu2 > 1)
    eps2 = mu2 / sigma**2
    # Both global conditions are evaluated only once μ₂ > 1, where log(1 + 1/(μ₂ − 1)) exists.
    if not (
        np.any(applies)
        and logq <= (mu2 - 1) * eps2 - mu2 * (math.log(1 + 1 / (mu1 - 1)) + math.log(1 + 1 / (mu2 - 1)))
        and -logq > eps2
    ):
        return independent
    dependent = _theorem6_bound(logq, sigma, orders_array)
    return np.where(applies, np.minimum(independent, dependent), independent)


# --- the threshold check ---------------------------------------------------------------------


def compute_logpr_answered(votes: ArrayLike, *, threshold: float, sigma: float) -> float:
    """log Pr[max(votes) + N(0, σ₁²) ≥ T]: the chance that Confident-GNMax answers.

    ``max(votes)`` is rounded to the nearest integer as in the reference
    (``compute_logpr_answered``), which keeps the smooth-sensitivity analysis on an integer
    grid of maxima when votes are fractional (Interactive GNMax's votes minus a baseline).
    """
    sigma = _check_sigma(sigma, "sigma1")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}.")
    counts = _check_votes(votes)
    return float(stats.norm.logsf(threshold - round(float(np.max(counts))), scale=sigma))


def rdp_threshold_data_independent(*, sigma: float, orders: ArrayLike) -> NDArray[np.float64]:
    """Data-independent RDP of the threshold check: λ/(2σ₁²) (sensitivity 1 of max(votes))."""
    sigma = _check_sigma(sigma, "sigma1")
    return _check_orders(orders) / (2 * sigma**2)


def rdp_threshold_data_dependent(log_pr_answered: float, *, sigma: float, orders: ArrayLike) -> NDArray[np.float64]:
    """Data-dependent RDP of the threshold check (the reference's ``compute_rdp_threshold``).

    The check releases one bit; Theorem 6 applies with q the probability of the less likely
    bit, min(p, 1 − p), and with GNMax's σ replaced by √2·σ₁, because the checked quantity has
    sensitivity 1 instead of GNMax's √2 (so that λ/(√2σ₁)² is the λ/(2σ₁²) above).
    """
    sigma = _check_sigma(sigma, "sigma1")
    if not log_pr_answered <= 0:
        raise ValueError(f"log_pr_answered must be ≤ 0, got {log_pr_answered}.")
    logq = min(log_pr_answered, _log1mexp(log_pr_answered))
    return rdp_gnmax_data_dependent(logq, sigma=math.sqrt(2.0) * sigma, orders=orders)


# --- a whole run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PateCost:
    """The privacy cost of a Confident-GNMax run.

    ``epsilon``/``order``: data-dependent ε and its best order (private until sanitized, see
    :func:`release_epsilon`); ``data_independent_*``: the same with the data-independent bounds
    (publishable as is); ``answered``: the number of answered queries (expected number when no
    realized outcome was given); ``rdp``/``data_independent_rdp``: the composed curves.
    """

    epsilon: float
    order: float
    data_independent_epsilon: float
    data_independent_order: float
    answered: float
    rdp: NDArray[np.float64]
    data_independent_rdp: NDArray[np.float64]


def confident_gnmax_cost(
    votes: ArrayLike,
    *,
    answered: ArrayLike | None,
    threshold: float,
    sigma1: float,
    sigma2: float,
    orders: ArrayLike,
    delta: float,
    improved_conversion: bool = False,
) -> PateCost:
    """Compose the RDP of every query of a Confident-GNMax run and convert it to (ε, δ).

    Parameters
    ----------
    votes : array_like, shape (queries, classes)
        Per-query vote histograms.
    answered : array_like of bool, shape (queries,), or None
        Which queries passed the noisy threshold check. A refused query costs only the check;
        an answered one the check plus GNMax (adaptive composition: whether GNMax runs depends
        only on the check's released outcome). None gives the expected cost over the check's
        noise, check + Pr[answered]·GNMax per query, the curves of the paper's figures
        (reference ``rdp_cumulative.run_analysis``); ``answered`` is then the expected count.
    threshold, sigma1 : float
        T and σ₁ of the threshold check.
    sigma2 : float
        σ₂ of GNMax.
    orders : array_like
        Rényi orders λ > 1 to search.
    delta : float
        Target δ.
    improved_conversion : bool, default False
        See :func:`epsilon_from_rdp`; False matches the reference.

    Returns
    -------
    PateCost
    """
    matrix = _check_vote_matrix(votes)
    orders_array = _check_orders(orders)
    _check_sigma(sigma2, "sigma2")
    if answered is None:
        weights = None
    else:
        weights = _check_answered(answered, matrix.shape[0]).astype(np.float64)
    threshold_independent = rdp_threshold_data_independent(sigma=sigma1, orders=orders_array)
    gnmax_independent = rdp_gnmax_data_independent(sigma=sigma2, orders=orders_array)
    rdp = np.zeros_like(orders_array)
    independent = np.zeros_like(orders_array)
    total_answered = 0.0
    for index, histogram in enumerate(matrix):
        log_pr = compute_logpr_answered(histogram, threshold=threshold, sigma=sigma1)
        weight = math.exp(log_pr) if weights is None else weights[index]
        total_answered += weight
        rdp += rdp_threshold_data_dependent(log_pr, sigma=sigma1, orders=orders_array)
        independent += threshold_independent
        if weight > 0:
            logq = compute_logq_gnmax(histogram, sigma=sigma2)
            rdp += weight * rdp_gnmax_data_dependent(logq, sigma=sigma2, orders=orders_array)
            independent += weight * gnmax_independent
    epsilon, order = epsilon_from_rdp(rdp, orders=orders_array, delta=delta, improved_conversion=improved_conversion)
    independent_epsilon, independent_order = epsilon_from_rdp(
        independent,
        orders=orders_array,
        delta=delta,
        improved_conversion=improved_conversion,
    )
    return PateCost(
        epsilon=epsilon,
        order=order,
        data_independent_epsilon=independent_epsilon,
        data_independent_order=independent_order,
        answered=float(total_answered),
        rdp=rdp,
        data_independent_rdp=independent,
    )


# --- smooth sensitivity of the data-dependent RDP (appendix, Section B) ------------------------
#
# The data-dependent RDP at a fixed order λ is a function β(q) of q. Its local sensitivity at
# distance d bounds how much it changes between neighbouring vote histograms anywhere within d
# changed votes of the actual ones; the β-smooth sensitivity max_d e^{−βd}·LS(d) then calibrates
# the Gaussian noise that sanitizes the data-dependent ε (the GNSS mechanism).


def _rdp_gnmax_by_q0(logq: float, sigma: float, order: float) -> float:
    # The data-dependent RDP as the smooth-sensitivity analysis defines it: Theorem 6 below q₀,
    # λ/σ² above. It agrees with rdp_gnmax_data_dependent where Theorem 6's bound increases
    # with q up to q₀ (Condition C5), and makes the shape the analysis relies on explicit.
    if logq == -math.inf:
        return 0.0
    if logq >= logq0_gnmax(sigma=sigma, order=order):
        return order / sigma**2
    return float(_theorem6_bound(logq, sigma, np.array([order]))[0])


@functools.lru_cache(maxsize=4096)
def logq0_gnmax(*, sigma: float, order: float) -> float:
    """log q₀: above q₀ the data-independent bound is the smaller one (the reference's
    ``compute_logq0_gnmax``).

    Found by root finding between a natural upper bound, where Theorem 6's conditions hold, and
    a lower bound grown until the data-dependent bound wins there. If it already wins at the
    upper bound, that bound is returned (q₀ is then conservative, which only costs tightness).
    Cached: the local-sensitivity walk asks for it at every step.
    """
    sigma = _check_sigma(sigma)
    order = _check_order(order)

    def theorem6_valid(logq: float) -> bool:
        mu1, mu2 = _mu_gnmax(logq, sigma)
        if mu1 < order:
            return False
        eps2 = mu2 / sigma**2
        return logq <= (mu2 - 1) * eps2 - mu2 * math.log(mu1 / (mu1 - 1) * mu2 / (mu2 - 1))

    def dependent_minus_independent(logq: float) -> float:
        return float(_theorem6_bound(logq, sigma, np.array([order]))[0]) - order / sigma**2

    log_upper = min(-((1 + 1 / sigma) ** 2), -(((order - 0.99) / sigma) ** 2), -1 / sigma**2)
    if not theorem6_valid(log_upper):
        raise ValueError(f"Theorem 6 does not hold at the starting point for σ={sigma}, λ={order}.")
    if dependent_minus_independent(log_upper) < 0:
        return log_upper
    log_lower = 2 * log_upper
    while dependent_minus_independent(log_lower) > 0:
        if log_lower < -10_000:
            raise ValueError(f"no q₀ above e^-10000 for σ={sigma}, λ={order}; use a lower order.")
        log_lower *= 1.5
    root, result = optimize.brentq(dependent_minus_independent, log_lower, log_upper, full_output=True)
    if not (result.converged and theorem6_valid(root)):
        raise ValueError(f"the search for q₀ failed for σ={sigma}, λ={order}.")
    return float(root)


def _neighbour_q_bounds(q: float, sigma: float, num_classes: int) -> tuple[float, float]:
    # How far Prop. 7's q can move when one vote changes (Prop. 13): each gap moves by at most 2,
    # which shifts every term's Gaussian quantile by 1/σ: the bounds b_l(q) ≤ q' ≤ b_u(q).
    quantile = special.erfcinv(2 * q / (num_classes - 1))
    scale = (num_classes - 1) / 2
    lower = scale * special.erfc(1 / sigma + quantile)
    upper = min(1.0, scale * special.erfc(-1 / sigma + quantile))
    return float(lower), float(upper)


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _logq1_gnmax(sigma: float, order: float, num_classes: int) -> float:
    # q₁ = b_l(q₀): below q₀ but within one vote of it; between q₁ and q₀ the local sensitivity
    # is at its maximum (the "plateau").
    q0 = math.exp(logq0_gnmax(sigma=sigma, order=order))
    return _safe_log(_neighbour_q_bounds(q0, sigma, num_classes)[0])


def _local_sensitivity_at_logq(logq: float, sigma: float, num_classes: int, order: float) -> float:
    # Algorithm 3: the larger of the RDP's rise to b_u(q) and its fall to b_l(q). Between q₁ and
    # q₀ the value at q₁ is an upper bound (Prop. 13).
    logq0 = logq0_gnmax(sigma=sigma, order=order)
    logq1 = _logq1_gnmax(sigma, order, num_classes)
    if logq1 <= logq <= logq0:
        logq = logq1
    q = math.exp(logq)
    lower, upper = _neighbour_q_bounds(q, sigma, num_classes)
    here = _rdp_gnmax_by_q0(logq, sigma, order)
    rise = _rdp_gnmax_by_q0(_safe_log(upper), sigma, order) - here
    fall = here - _rdp_gnmax_by_q0(_safe_log(lower), sigma, order)
    return max(rise, fall)


def local_sensitivity_gnmax(votes: ArrayLike, *, num_teachers: int, sigma: float, order: float) -> NDArray[np.float64]:
    """Upper bounds on the local sensitivity of GNMax's data-dependent RDP at order λ, at
    distance d = 0, …, num_teachers − 1 from ``votes`` (Algorithms 3–5; the reference's
    ``compute_local_sensitivity_bounds_gnmax``).

    The bound depends on the histogram only through q, and is largest on the plateau
    [q₁, q₀]. Starting from the actual q, each extra changed vote moves q one step towards the
    plateau (widening the lead when q > q₀, narrowing it when q < q₁); once there, every
    further distance has the plateau value. O(teachers × classes).
    """
    num_teachers = _check_num_teachers(num_teachers)
    sigma = _check_sigma(sigma)
    order = _check_order(order)
    counts = _check_votes(votes, min_classes=2)
    num_classes = counts.size
    logq0 = logq0_gnmax(sigma=sigma, order=order)
    logq1 = _logq1_gnmax(sigma, order, num_classes)
    logq = compute_logq_gnmax(counts, sigma=sigma)
    result = np.full(num_teachers, _local_sensitivity_at_logq(logq1, sigma, num_classes, order))
    if logq1 <= logq <= logq0:
        return result
    ranked = np.sort(counts)[::-1].copy()  # kept non-increasing throughout
    result[0] = _local_sensitivity_at_logq(logq, sigma, num_classes, order)
    widen = logq > logq0  # otherwise logq < logq1 and the lead narrows
    distance = 0
    while distance < num_teachers - 1 and ((widen and logq > logq0 and ranked[1] > 0) or (not widen and logq < logq1)):
        distance += 1
        if widen:
            # One vote from the runner-up to the leader; bubble the runner-up down so the
            # histogram stays sorted and ranked[1] is again the runner-up.
            ranked[0] += 1
            ranked[1] -= 1
            position = 1
            while position < num_classes - 1 and ranked[position] < ranked[position + 1]:
                ranked[[position, position + 1]] = ranked[[position + 1, position]]
                position += 1
        else:
            # One vote from the leader to the runner-up; it cannot overtake, since a tie
            # would already put q above q₁.
            ranked[0] -= 1
            ranked[1] += 1
        logq = compute_logq_gnmax(ranked, sigma=sigma)
        result[distance] = _local_sensitivity_at_logq(logq, sigma, num_classes, order)
    return result


def local_sensitivity_threshold(
    votes: ArrayLike, *, num_teachers: int, threshold: float, sigma: float, order: float
) -> NDArray[np.float64]:
    """Local sensitivity of the threshold check's data-dependent RDP at order λ, at distance
    d = 0, …, num_teachers − 1 (the reference's ``compute_local_sensitivity_bounds_threshold``).

    The RDP depends only on the (rounded) maximum vote v ∈ [0, num_teachers], and d changed
    votes move v by at most d: the bound at distance d is the largest one-step change of the
    RDP curve at v ± d.

    Differs from the reference at one distance: the reference stops one distance short of the
    far end of [0, num_teachers] and leaves 0 there (e.g. the unanimous histogram, reachable
    from max = 100 of 250 at d = 150, is skipped); here that distance is filled in.
    """
    num_teachers = _check_num_teachers(num_teachers)
    sigma = _check_sigma(sigma, "sigma1")
    order = _check_order(order)
    current = round(float(np.max(_check_votes(votes))))
    if not 0 <= current <= num_teachers:
        raise ValueError(
            f"the maximum vote {current} lies outside [0, num_teachers={num_teachers}]; "
            "pass the histogram of num_teachers teachers' votes."
        )
    rdp_by_max = _threshold_rdp_by_max(num_teachers, float(threshold), sigma, order)
    steps = np.abs(np.diff(rdp_by_max))  # steps[v] = |RDP(v + 1) − RDP(v)|

    def at_max(v: int) -> float:
        below = steps[v - 1] if v > 0 else -math.inf
        above = steps[v] if v < num_teachers else -math.inf
        return float(max(below, above))

    result = np.zeros(num_teachers)
    for distance in range(min(num_teachers, max(current, num_teachers - current) + 1)):
        candidates = [current + distance, current - distance]
        result[distance] = max(at_max(v) for v in candidates if 0 <= v <= num_teachers)
    return result


@functools.lru_cache(maxsize=256)
def _threshold_rdp_by_max(num_teachers: int, threshold: float, sigma: float, order: float) -> NDArray[np.float64]:
    # The threshold check's data-dependent RDP for every possible maximum vote 0..num_teachers.
    curve = np.array(
        [
            rdp_threshold_data_dependent(
                float(stats.norm.logsf(threshold - v, scale=sigma)),
                sigma=sigma,
                orders=[order],
            )[0]
            for v in range(num_teachers + 1)
        ]
    )
    curve.setflags(write=False)  # shared through the cache
    return curve


def smooth_sensitivity(local_sensitivities: ArrayLike, *, beta: float) -> float:
    """β-smooth sensitivity from local sensitivities at distance d = 0, 1, …:
    max_d e^{−βd}·LS(d) (Nissim et al. 2007; the reference's ``compute_discounted_max``)."""
    values = np.asarray(local_sensitivities, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("local_sensitivities must be a non-empty 1-D array (index = distance).")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and ≥ 0, got {beta}.")
    return float(np.max(values * np.exp(-beta * np.arange(values.size))))


def rdp_smooth_sensitivity_gaussian(*, beta: float, sigma: float, order: float) -> float:
    """RDP at order λ of GNSS, f(D) + SS_β(D)·N(0, σ²) (Theorem 23 of the arXiv version;
    the reference's ``compute_rdp_of_smooth_sensitivity_gaussian``):
    λe^{2β}/σ² + (βλ − ½·log(1 − 2λβ))/(λ − 1), valid for 1 < λ < 1/(2β)."""
    sigma = _check_sigma(sigma, "sigma_ss")
    order = _check_order(order)
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and ≥ 0, got {beta}.")
    if beta > 0 and not order < 1 / (2 * beta):
        raise ValueError(f"GNSS needs λ < 1/(2β): λ={order}, β={beta}; lower beta below {1 / (2 * order)}.")
    return order * math.exp(2 * beta) / sigma**2 + (-0.5 * math.log(1 - 2 * order * beta) + beta * order) / (order - 1)


def smooth_sensitivity_parameters(*, epsilon: float, delta: float) -> tuple[float, float]:
    """(α, β) for an (ε, δ)-DP release f(D) + SS_β(D)/α·N(0, 1) (Nissim et al. 2007, Lemma
    2.6, with α from the sufficient condition in the proof of their Lemma 2.10; the reference's
    ``compute_params_for_ss_release``).

    With a = Φ⁻¹(1 − δ/2): α solves 2αa + α² = ε/2, and β = ε / (2·χ²₁⁻¹(1 − δ/2)). The
    reference keeps this for comparison and sanitizes through RDP instead
    (:func:`rdp_smooth_sensitivity_gaussian`), as :func:`release_epsilon` does.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}.")
    _check_delta(delta)
    a = float(special.ndtri(1 - delta / 2))
    alpha = math.sqrt(a**2 + epsilon / 2) - a
    beta = epsilon / (2 * float(special.chdtri(1, delta / 2)))
    return alpha, beta


def gnmax_always_data_independent(
    *, num_teachers: int, num_classes: int, sigma: float, orders: ArrayLike
) -> NDArray[np.bool_]:
    """Whether, at each order, GNMax's data-dependent bound equals the data-independent one
    for every histogram (the reference's ``is_data_independent_always_opt_gaussian``).

    q is smallest for a unanimous vote; if even that gives λ/σ², the data-dependent RDP is a
    constant and has local sensitivity 0.
    """
    num_teachers = _check_num_teachers(num_teachers)
    if num_classes < 2:
        raise ValueError(f"num_classes must be ≥ 2, got {num_classes}.")
    unanimous = np.zeros(num_classes)
    unanimous[0] = num_teachers
    logq = compute_logq_gnmax(unanimous, sigma=sigma)
    return np.isclose(
        rdp_gnmax_data_dependent(logq, sigma=sigma, orders=orders),
        rdp_gnmax_data_independent(sigma=sigma, orders=orders),
    )


def threshold_always_data_independent(*, num_teachers: int, threshold: float, sigma: float, orders: ArrayLike) -> bool:
    """Whether the threshold check's data-dependent bound equals the data-independent one for
    every maximum vote in [0, num_teachers] (the reference's
    ``is_data_independent_always_opt_threshold``). The bound depends only on the maximum
    vote and grows with the probability of the less likely outcome, which is smallest at
    one of the two ends: if both ends give λ/(2σ₁²), every maximum does."""
    num_teachers = _check_num_teachers(num_teachers)
    independent = rdp_threshold_data_independent(sigma=sigma, orders=orders)
    return all(
        bool(
            np.all(
                np.isclose(
                    rdp_threshold_data_dependent(
                        compute_logpr_answered([v], threshold=threshold, sigma=sigma),
                        sigma=sigma,
                        orders=orders,
                    ),
                    independent,
                )
            )
        )
        for v in (0, num_teachers)
    )


def run_local_sensitivity(
    votes: ArrayLike,
    *,
    answered: ArrayLike,
    num_teachers: int,
    threshold: float,
    sigma1: float,
    sigma2: float,
    order: float,
) -> NDArray[np.float64]:
    """Local sensitivity at distance d of a run's data-dependent RDP at order λ.

    The run's RDP is a sum over queries (every threshold check, GNMax for answered queries),
    so the sum of the queries' local sensitivities at distance d bounds it. A step whose
    data-dependent bound can never beat the data-independent one at this order contributes
    a constant, hence 0 (as the reference's table script does).
    """
    matrix = _check_vote_matrix(votes)
    mask = _check_answered(answered, matrix.shape[0])
    num_teachers = _check_num_teachers(num_teachers)
    order = _check_order(order)
    num_classes = matrix.shape[1]
    threshold_constant = threshold_always_data_independent(
        num_teachers=num_teachers, threshold=threshold, sigma=sigma1, orders=[order]
    )
    gnmax_constant = bool(
        gnmax_always_data_independent(
            num_teachers=num_teachers,
            num_classes=num_classes,
            sigma=sigma2,
            orders=[order],
        )[0]
    )
    total = np.zeros(num_teachers)
    for histogram, was_answered in zip(matrix, mask, strict=True):
        if not threshold_constant:
            total += local_sensitivity_threshold(
                histogram,
                num_teachers=num_teachers,
                threshold=threshold,
                sigma=sigma1,
                order=order,
            )
        if was_answered and not gnmax_constant:
            total += local_sensitivity_gnmax(histogram, num_teachers=num_teachers, sigma=sigma2, order=order)
    return total


@dataclass(frozen=True)
class EpsilonRelease:
    """A sanitized data-dependent ε.

    ``epsilon``: the noised data-dependent ε at ``order`` (RDP of the run + SS_β·N(0, σ_ss²),
    converted with log(1/δ)/(λ − 1)). It is an estimate, not an upper bound: the noise is
    symmetric (a one-sided confidence bound adds a few SS_β·σ_ss, which is itself private).
    ``release_cost``: the RDP, at the same order, of publishing that number (GNSS), which adds
    to the run's cost; ``total_epsilon`` = epsilon + release_cost is what the run may claim.
    """

    epsilon: float
    release_cost: float
    order: float

    @property
    def total_epsilon(self) -> float:
        return self.epsilon + self.release_cost


def release_epsilon(
    votes: ArrayLike,
    *,
    answered: ArrayLike,
    num_teachers: int,
    threshold: float,
    sigma1: float,
    sigma2: float,
    order: float,
    delta: float,
    beta: float,
    sigma_ss: float,
    rng: np.random.Generator,
    improved_conversion: bool = False,
) -> EpsilonRelease:
    """Publish a run's data-dependent ε through the GNSS mechanism (appendix, Section B).

    The run's data-dependent RDP at ``order`` gets Gaussian noise of standard deviation
    SS_β·σ_ss, SS_β the β-smooth sensitivity of :func:`run_local_sensitivity`, drawn from
    ``rng``; the release itself costs :func:`rdp_smooth_sensitivity_gaussian` at that order.

    ``order``, ``beta`` and ``sigma_ss`` must be chosen without looking at the votes (e.g. from
    public or synthetic histograms) for the release to be private; neither the exact RDP nor
    SS_β is returned, since both are data-dependent. ``answered`` is the realized outcome of the
    threshold checks (public once released). ``improved_conversion``: see :func:`epsilon_from_rdp`.
    """
    _check_delta(delta)
    release_cost = rdp_smooth_sensitivity_gaussian(beta=beta, sigma=sigma_ss, order=order)
    matrix = _check_vote_matrix(votes)
    cost = confident_gnmax_cost(
        matrix,
        answered=answered,
        threshold=threshold,
        sigma1=sigma1,
        sigma2=sigma2,
        orders=[order],
        delta=delta,
    )
    sensitivity = smooth_sensitivity(
        run_local_sensitivity(
            matrix,
            answered=answered,
            num_teachers=num_teachers,
            threshold=threshold,
            sigma1=sigma1,
            sigma2=sigma2,
            order=order,
        ),
        beta=beta,
    )
    noisy_rdp = float(cost.rdp[0]) + sensitivity * sigma_ss * float(rng.standard_normal())
    epsilon, _ = epsilon_from_rdp([noisy_rdp], orders=[order], delta=delta, improved_conversion=improved_conversion)
    return EpsilonRelease(
        epsilon=epsilon,
        release_cost=release_cost,
        order=float(order),
    )


__all__: Sequence[str] = (
    "EpsilonRelease",
    "PateCost",
    "compute_logpr_answered",
    "compute_logq_gnmax",
    "compute_q_gnmax",
    "confident_gnmax_cost",
    "epsilon_from_rdp",
    "gnmax_always_data_independent",
    "local_sensitivity_gnmax",
    "local_sensitivity_threshold",
    "logq0_gnmax",
    "rdp_gnmax_data_dependent",
    "rdp_gnmax_data_independent",
    "rdp_smooth_sensitivity_gaussian",
    "rdp_threshold_data_dependent",
    "rdp_threshold_data_independent",
    "release_epsilon",
    "run_local_sensitivity",
    "smooth_sensitivity",
    "smooth_sensitivity_parameters",
    "threshold_always_data_independent",
)
