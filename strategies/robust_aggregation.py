"""Robust aggregation of soft labels that keeps non-IID knowledge: per-class trust with reputation.

On non-IID data a class is known well by a few clients, so statistics that look at every client
on every entry (the coordinate-wise median, the trimmed mean) vote that knowledge away. Here a
client is judged instead on the classes it claims: for every client ``k`` and class ``c`` the
server estimates the client's *precision* ``τ[k, c]`` — of the probability mass ``k`` puts on
``c``, the share that falls on inputs a robust reference also assigns to ``c``. A client's row on
input ``n`` then counts by how much better than chance its claims there are::

    lift[k, c]   = τ[k, c] − base[c]          base[c]: share of inputs the reference puts in c
    accept[k, c] = clip(lift[k, c] / (TOLERANCE · typical lift of c), 0, 1)
    trust[k, n]  = Σ_c p[k, n, c] · accept[k, c]
    target[n]    = Σ_k weights[k] · trust[k, n] · p[k, n] / Σ_k weights[k] · trust[k, n]

A client that knows digit 4 counts on the inputs it calls 4, however little it knows of the
rest; a client whose claims are no better than chance (random replies) or worse (flipped or
inverted ones) gets no weight at all (``class_acceptance`` turns lifts into weights in [0, 1];
honest clients are all accepted alike, so among them the result is the weighted mean). The
reference and the precisions are refined together, a few times per round (truth discovery, as in
Dawid & Skene's estimation of labeller accuracy from their agreement). The reference is a vote:
per input, each client votes for its argmax class with the weight it is accepted with on that
class, so no client moves it more by being more confident or by claiming more data. Before any
evidence exists (a client's first round) the first reference is the argmax of the
coordinate-wise median, as FedRAD scores clients by agreement with the median's prediction.

Reputation: the evidence behind ``τ`` (mass claimed per class, and the part of it the reference
confirmed) is carried across rounds, decayed by ``REPUTATION_DECAY`` per round, because the
malicious nodes of a federation are the same every round. A round in which sampling hands the
attackers a majority then starts from the trust they lost earlier, instead of from scratch.

Root set: where the server may use public labels (``public_labels=true``), the labels are the
reference, as FLTrust scores clients against a small trusted root dataset at the server.

Without an attacker and with honest clients that all agree, every client gets the same trust
and the result is the weighted mean.

References
----------
Sturluson, Trew, Muñoz-González, Grama, Passerat-Palmbach, Rueckert, Alansary, "FedRAD:
Federated Robust Adaptive Distillation", NeurIPS 2021 Workshop on New Frontiers in Federated
Learning (median-based scoring of clients' logits). Cao, Fang, Liu, Gong, "FLTrust: Byzantine-
robust Federated Learning via Trust Bootstrapping", NDSS 2021 (a trusted root set at the server).
Dawid & Skene, "Maximum Likelihood Estimation of Observer Error-Rates Using the EM Algorithm",
Applied Statistics 1979 (estimating labellers' per-class accuracy without ground truth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# A client with no evidence yet is taken to be right half the time on every class: between an
# oracle (1) and chance (about 1 / C); a hundred inputs' worth of claims outweigh this guess.
PRIOR_PRECISION = 0.5
PRIOR_STRENGTH = 10.0
# Share of the evidence kept from one round to the next: the last round counts as much as all
# earlier ones together, so honest teachers that improve are re-judged quickly, and so is a
# client that turns malicious late.
REPUTATION_DECAY = 0.5
# Reference/precision refinements per round; the weights settle after two or three.
PASSES = 3
# A client is fully believed on a class once its lift over chance there is at least this share of
# the typical client's (see class_acceptance).
TOLERANCE = 0.5


@dataclass(frozen=True)
class Evidence:
    """Per-client, per-class claims and confirmations, shape ``(K, C)`` each.

    ``claimed[k, c]``: probability mass client ``k`` put on class ``c``; ``confirmed[k, c]``: the
    part of it on inputs whose reference class is ``c``. Always ``0 ≤ confirmed ≤ claimed``.
    """

    claimed: NDArray[np.float64]
    confirmed: NDArray[np.float64]

    @staticmethod
    def none(num_clients: int, num_classes: int) -> Evidence:
        zeros = np.zeros((num_clients, num_classes))
        return Evidence(zeros, zeros.copy())

    def __add__(self, other: Evidence) -> Evidence:
        return Evidence(self.claimed + other.claimed, self.confirmed + other.confirmed)

    def scaled(self, factor: float) -> Evidence:
        return Evidence(self.claimed * factor, self.confirmed * factor)


@dataclass(frozen=True)
class RobustRound:
    """What one round of :func:`trust_weighted` produced.

    ``targets``: ``(N, C)`` aggregate; ``evidence``: this round's evidence alone (to be added to
    the reputation); ``trust``: ``(K, N)`` per-input trust of each client, for inspection.
    """

    targets: NDArray[np.float32]
    evidence: Evidence
    trust: NDArray[np.float64]


def claim_evidence(soft_labels: NDArray[np.floating], reference: NDArray[np.integer]) -> Evidence:
    """How much mass each client put on each class, and how much of it the reference confirms.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    reference : ndarray of int, shape (N,)
        The reference class of every input.

    Returns
    -------
    Evidence
        ``claimed[k, c] = Σ_n p[k, n, c]``, ``confirmed[k, c] = Σ_n p[k, n, c] · [reference[n] = c]``.
    """
    stack = soft_labels.astype(np.float64)
    one_hot = np.eye(stack.shape[2])[reference]
    return Evidence(claimed=stack.sum(axis=1), confirmed=np.einsum("knc,nc->kc", stack, one_hot))


def class_precision(
    evidence: Evidence, *, prior_precision: float = PRIOR_PRECISION, prior_strength: float = PRIOR_STRENGTH
) -> NDArray[np.float64]:
    """Per-client, per-class precision with a Beta prior: ``(confirmed + s·π) / (claimed + s)``."""
    return (evidence.confirmed + prior_strength * prior_precision) / (evidence.claimed + prior_strength)


def chance_precision(reference: NDArray[np.integer], num_classes: int) -> NDArray[np.float64]:
    """``base[c]``: the precision of claims made at random, the share of inputs the reference puts in ``c``."""
    return np.bincount(reference, minlength=num_classes) / max(len(reference), 1)


def weighted_quantile(
    values: NDArray[np.float64], weights: NDArray[np.float64], quantile: float
) -> NDArray[np.float64]:
    """Per column, the weighted ``quantile`` of ``values`` ``(K, C)`` under ``weights`` ``(K, C)``.

    The smallest value whose cumulative weight reaches ``quantile`` of the column's total (0.5:
    the lower weighted median); a column with no weight gets NaN.
    """
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    cumulative = np.cumsum(np.take_along_axis(weights, order, axis=0), axis=0)
    totals = cumulative[-1]
    first = (cumulative >= quantile * totals[None, :]).argmax(axis=0)
    medians = sorted_values[first, np.arange(values.shape[1])]
    return np.where(totals > 0, medians, np.nan)


def typical_precision(precision: NDArray[np.float64], claims: NDArray[np.float64]) -> NDArray[np.float64]:
    """``(C,)``: per class, the median precision of the mass claimed as that class.

    Weighted by ``claims`` ``(K, C)``, so that the claims decide, not the clients that barely
    claim the class; the caller zeroes the claims of clients not in good standing. NaN where
    nobody claims the class.
    """
    return weighted_quantile(precision, claims, 0.5)


def class_acceptance(
    precision: NDArray[np.float64],
    typical: NDArray[np.float64],
    chance: NDArray[np.float64],
    *,
    tolerance: float = TOLERANCE,
) -> NDArray[np.float64]:
    """``accept[k, c]`` in [0, 1]: how far client k's claims of class c are to be believed.

    A client at least ``tolerance`` of the typical lift over chance (``typical − chance``) is
    fully accepted, one at chance or below not at all, linearly in between. Honest clients are
    accepted alike whatever their precision, so among them the result stays the weighted mean.
    Where the typical claim of c is no better than chance (or nobody claims c), c carries no
    signal and every client is accepted on it.

    Parameters
    ----------
    precision : ndarray, shape (K, C)
        Per-client, per-class precision (:func:`class_precision`).
    typical : ndarray, shape (C,)
        What a client in good standing achieves (:func:`typical_precision`).
    chance : ndarray, shape (C,)
        Precision of random claims (:func:`chance_precision`).
    tolerance : float
        In (0, 1].
    """
    typical_lift = np.nan_to_num(typical - chance, nan=0.0)
    informative = typical_lift > 0
    scale = np.where(informative, tolerance * typical_lift, 1.0)
    accept = np.clip((precision - chance[None, :]) / scale[None, :], 0.0, 1.0)
    return np.where(informative[None, :], accept, 1.0)


def input_trust(soft_labels: NDArray[np.floating], accept: NDArray[np.float64]) -> NDArray[np.float64]:
    """``trust[k, n] = Σ_c p[k, n, c] · accept[k, c]``: how far client k is believed on the classes it claims on input n."""
    return np.einsum("knc,kc->kn", soft_labels.astype(np.float64), accept)


def trust_weighted_mean(
    soft_labels: NDArray[np.floating], weights: NDArray[np.floating], trust: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Per input, the mean of the clients' rows weighted by ``weights[k] · trust[k, n]``.

    An input on which no client has any trust falls back to the plain weighted mean: no
    client's claim there is better than chance, so none deserves more say than another.
    """
    stack = soft_labels.astype(np.float64)
    client_weights = weights.astype(np.float64)[:, None]
    input_weights = client_weights * trust
    untrusted = input_weights.sum(axis=0) <= 0
    input_weights[:, untrusted] = client_weights
    totals = input_weights.sum(axis=0)
    return np.einsum("kn,knc->nc", input_weights, stack) / totals[:, None]


def trusted_vote(soft_labels: NDArray[np.floating], accept: NDArray[np.float64]) -> NDArray[np.int64]:
    """``(N,)`` reference classes: per input, the class with the most votes, a client's vote for
    its argmax class c counting ``accept[k, c]``.

    One vote per client, whatever its confidence or claimed data size: a client that sends
    one-hot rows, or reports a huge partition, moves the reference no more than an unsure
    honest one (the weighted mean would follow it). Where no vote counts, a plain vote decides.
    """
    stack = soft_labels.astype(np.float64)
    votes = np.eye(stack.shape[2])[stack.argmax(axis=2)]
    tally = trust_weighted_mean(votes, np.ones(stack.shape[0]), input_trust(votes, accept))
    return tally.argmax(axis=1)


def trust_weighted(
    soft_labels: NDArray[np.floating],
    weights: NDArray[np.floating],
    *,
    reputation: Evidence | None = None,
    population: Evidence | None = None,
    labels: NDArray[np.integer] | None = None,
    passes: int = PASSES,
) -> RobustRound:
    """One round of robust aggregation; see the module docstring for the rule.

    Parameters
    ----------
    soft_labels : ndarray, shape (K, N, C)
        Per-client probability rows.
    weights : ndarray, shape (K,)
        Non-negative per-client weights (e.g. partition sizes), not all zero.
    reputation : Evidence, optional
        Evidence carried over from earlier rounds for these K clients, in the same order (none:
        every client starts at the prior).
    population : Evidence, optional
        Evidence of every client known so far (default: ``reputation``). What a client in good
        standing achieves is judged on it, so that a round in which sampling gathered the
        attackers does not lower the bar.
    labels : ndarray of int, shape (N,), optional
        True classes of the inputs (a root set the server may use): then they are the reference.
    passes : int
        Reference/precision refinements (≥ 1).

    Returns
    -------
    RobustRound
        The aggregate, this round's evidence and the per-input trust.
    """
    num_clients, num_inputs, num_classes = soft_labels.shape
    if passes < 1:
        raise ValueError(f"passes must be ≥ 1, got {passes}.")
    if labels is not None and labels.shape != (num_inputs,):
        raise ValueError(f"need one label per input: {num_inputs} inputs, labels shape {labels.shape}.")
    prior = Evidence.none(num_clients, num_classes) if reputation is None else reputation
    if prior.claimed.shape != (num_clients, num_classes):
        raise ValueError(
            f"reputation holds {prior.claimed.shape} evidence for {num_clients} clients and {num_classes} classes."
        )
    known = prior if population is None or len(population.claimed) == 0 else population
    # Standing: what the reputation alone says, against uniform chance. It decides the first
    # reference, and whose claims set the bar in every later pass.
    uniform = np.full(num_classes, 1.0 / num_classes)
    typical = typical_precision(class_precision(known), known.claimed + PRIOR_STRENGTH)
    standing = class_acceptance(class_precision(prior), typical, uniform)
    accept = standing
    evidence = Evidence.none(num_clients, num_classes)
    for index in range(1 if labels is not None else passes):
        if labels is not None:
            reference = labels
        elif index == 0 and not prior.claimed.any():
            reference = np.median(soft_labels.astype(np.float64), axis=0).argmax(axis=1)
        else:
            reference = trusted_vote(soft_labels, accept)
        evidence = claim_evidence(soft_labels, reference)
        total = prior + evidence
        precision = class_precision(total)
        typical = typical_precision(precision, (total.claimed + PRIOR_STRENGTH) * standing)
        accept = class_acceptance(precision, typical, chance_precision(reference, num_classes))
    trust = input_trust(soft_labels, accept)
    targets = trust_weighted_mean(soft_labels, weights, trust)
    return RobustRound(targets.astype(np.float32), evidence, trust)


class Reputation:
    """Each client's evidence so far, decayed by ``decay`` per round; keyed by client id."""

    def __init__(self, num_classes: int, *, decay: float = REPUTATION_DECAY) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"reputation decay must lie in [0, 1], got {decay}.")
        self.num_classes = num_classes
        self.decay = decay
        self.by_client: dict[int, Evidence] = {}

    def of(self, client_ids: Sequence[int]) -> Evidence:
        """The evidence of ``client_ids``, stacked in that order (zeros for a new client)."""
        empty = Evidence.none(1, self.num_classes)
        rows = [self.by_client.get(int(client), empty) for client in client_ids]
        return Evidence(
            np.concatenate([row.claimed for row in rows]) if rows else np.zeros((0, self.num_classes)),
            np.concatenate([row.confirmed for row in rows]) if rows else np.zeros((0, self.num_classes)),
        )

    def everyone(self) -> Evidence:
        """The evidence of every client seen so far (the population the bar is set on)."""
        return self.of(sorted(self.by_client))

    def update(self, client_ids: Sequence[int], evidence: Evidence) -> None:
        """Decay everyone's evidence by one round, then add this round's for ``client_ids``."""
        self.by_client = {client: old.scaled(self.decay) for client, old in self.by_client.items()}
        empty = Evidence.none(1, self.num_classes)
        for index, client in enumerate(client_ids):
            row = Evidence(evidence.claimed[index : index + 1], evidence.confirmed[index : index + 1])
            self.by_client[int(client)] = self.by_client.get(int(client), empty) + row

    def precision(self, client_id: int) -> NDArray[np.float64]:
        """``(C,)`` current precision estimate of one client (the prior for a stranger)."""
        return class_precision(self.of([client_id]))[0]

    def arrays(self) -> dict[str, NDArray[np.float64]]:
        clients = sorted(self.by_client)
        evidence = self.of(clients)
        return {
            "clients": np.asarray(clients, dtype=np.int64),
            "claimed": evidence.claimed,
            "confirmed": evidence.confirmed,
        }

    def load_arrays(self, arrays: Mapping[str, NDArray[np.generic]]) -> None:
        clients = np.asarray(arrays["clients"]).astype(np.int64)
        claimed = np.asarray(arrays["claimed"], dtype=np.float64).reshape(len(clients), self.num_classes)
        confirmed = np.asarray(arrays["confirmed"], dtype=np.float64).reshape(len(clients), self.num_classes)
        self.by_client = {
            int(client): Evidence(claimed[i : i + 1].copy(), confirmed[i : i + 1].copy())
            for i, client in enumerate(clients)
        }
