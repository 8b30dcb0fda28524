"""PATE's Confident-GNMax on the server (``privacy=pate``), with data-dependent accounting.

Papernot et al., "Scalable Private Learning with PATE", ICLR 2018. Every teacher votes with its
argmax on each queried public input (a client trains ``privacy.teachers_per_client`` teachers on
disjoint shards of its partition and sends their ``(N, C)`` vote counts). For each query the
server releases whether ``max(n) + N(0, σ₁²) ≥ T``; only queries that pass get a label, GNMax's
``argmax(n + N(0, σ₂²))``. A refused query costs only the threshold check.

Accounting (:mod:`fedkd.privacy.pate_analysis`): the data-dependent RDP of every check and every
answered GNMax composes; it depends on the votes, so the ε the run reports is itself released
through smooth sensitivity (GNSS, the paper's appendix B) at an order λ and smoothness β fixed in
the configuration, before any vote is seen. Every round re-releases the run's ε so far, and each
release adds its own GNSS cost at λ. A row's ``epsilon`` is the smaller of

* the released data-dependent ε plus every release's cost, and
* the data-independent ε of the same outputs (checks, answers and the releases), public as is,

both valid bounds on the same outputs. The released value is a noisy estimate (as in the paper),
not a high-probability upper bound. The number of queries is fixed in advance
(``privacy.queries`` per round): the run does not look at its ε to decide whether to go on, so the
stopping rule leaks nothing; a row whose ε exceeds ``privacy.epsilon`` says so
(``epsilon_over_target``) and a warning is logged.

RDP converts to (ε, δ) by Balle et al. (2020, Thm. 21), the conversion the accountant of every
other mechanism gets from Opacus, so that ε's are comparable across mechanisms; the reference
code's (Mironov 2017, Prop. 3) is looser by log(λ)/(λ − 1) − log(1 − 1/λ), 0.28 at λ = 14.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.messages import TRANSFER_KEY, number, transfer_record
from fedkd.privacy.accountant import RDP_ORDERS
from fedkd.privacy.config import PrivacyConfig
from fedkd.privacy.mechanisms import confident_gnmax, is_vote_count_matrix, one_hot, summed_votes
from fedkd.privacy.pate_analysis import (
    confident_gnmax_cost,
    epsilon_from_rdp,
    rdp_smooth_sensitivity_gaussian,
    release_epsilon,
)
from fedkd.seeding import SeedPurpose, numpy_generator
from strategies.transfer import DistillationSet, RoundTransfer, StateRecords, stored, stored_count

logger = logging.getLogger(__name__)

# Balle et al.'s RDP → (ε, δ) conversion, as Opacus's accountant uses for every other mechanism.
IMPROVED_CONVERSION = True

# Separate streams: the mechanism's noise and the noise of each ε release.
_ANSWER_NOISE, _RELEASE_NOISE = 0, 1


@dataclass(frozen=True)
class PateEpsilon:
    """What a round reports about the run's privacy so far (every field is publishable)."""

    epsilon: float  # the claim: min(released data-dependent, data-independent), releases included
    released: float  # the smooth-sensitivity release plus the releases' own cost
    data_independent: float  # the data-independent bound of the same outputs
    answered: int
    queries: int


def pate_epsilon(
    votes: NDArray[np.integer],
    answered: NDArray[np.bool_],
    *,
    config: PrivacyConfig,
    num_teachers: int,
    releases: int,
    rng: np.random.Generator,
) -> PateEpsilon:
    """The run's ε after ``releases`` rounds of ε releases (this one included) on all ``votes``.

    ``votes`` are every query's ``(Q, C)`` counts so far and ``answered`` which passed the check.
    """
    if releases < 1:
        raise ValueError(f"releases must be ≥ 1 (this round's release counts), got {releases}.")
    order, beta, sigma_ss = config.release_order, config.release_beta, config.release_sigma
    threshold, sigma1, sigma2 = config.threshold, config.sigma_threshold, config.sigma_gnmax
    release = release_epsilon(
        votes,
        answered=answered,
        num_teachers=num_teachers,
        order=order,
        delta=config.delta,
        beta=beta,
        sigma_ss=sigma_ss,
        rng=rng,
        threshold=threshold,
        sigma1=sigma1,
        sigma2=sigma2,
        improved_conversion=IMPROVED_CONVERSION,
    )
    released = release.epsilon + releases * release.release_cost
    # The data-independent bound of the same outputs, at any order where GNSS's bound holds.
    orders = np.array([o for o in RDP_ORDERS if o < 1 / (2 * beta)], dtype=np.float64)
    cost = confident_gnmax_cost(
        votes, answered=answered, orders=orders, delta=config.delta, threshold=threshold, sigma1=sigma1, sigma2=sigma2
    )
    gnss = np.array([rdp_smooth_sensitivity_gaussian(beta=beta, sigma=sigma_ss, order=o) for o in orders])
    independent, _ = epsilon_from_rdp(
        cost.data_independent_rdp + releases * gnss,
        orders=orders,
        delta=config.delta,
        improved_conversion=IMPROVED_CONVERSION,
    )
    return PateEpsilon(
        epsilon=min(released, independent),
        released=released,
        data_independent=independent,
        answered=int(np.count_nonzero(answered)),
        queries=len(answered),
    )


class PATERelease:
    """Transfer source for ``privacy=pate``: Confident-GNMax on a fresh batch of public queries
    per round; the student learns from every answered query so far and, if the run is
    semi-supervised, from the remaining public inputs without labels (post-processing).

    Parameters
    ----------
    config : PrivacyConfig
        ``mechanism`` must be ``pate``.
    inputs : torch.Tensor
        The normalized public inputs.
    indices : np.ndarray
        Their positions in the public split.
    num_teachers : int
        Teachers in the federation (clients × teachers per client; public).
    seed : int
        Run seed: the query order and the noise are reproducible.
    """

    probabilities = False  # replies are vote counts, checked in summed_votes

    def __init__(
        self,
        *,
        config: PrivacyConfig,
        inputs: torch.Tensor,
        indices: NDArray[np.integer],
        num_teachers: int,
        seed: int,
    ) -> None:
        if config.mechanism != "pate":
            raise ValueError(f"PATERelease handles privacy=pate, not {config.mechanism!r}.")
        if config.queries > len(inputs):
            raise ValueError(f"privacy.queries={config.queries} exceeds the {len(inputs)} public inputs.")
        self.config = config
        self.inputs = inputs
        self.indices = np.asarray(indices)
        self.num_teachers = num_teachers
        self.seed = seed
        self._order = numpy_generator(seed, SeedPurpose.PRIVACY_QUERIES).permutation(len(inputs))
        self._round_positions: NDArray[np.int64] | None = None
        # Per round: queried positions, their vote counts, which were answered, the answers.
        self._batches: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_], NDArray[np.int64]]] = []
        self._epsilon: PateEpsilon | None = None

    def describe(self) -> str:
        c = self.config
        return (
            f"privacy=pate: Confident-GNMax, {c.queries} queries per round to {self.num_teachers} teachers, "
            f"T={c.threshold:g}, σ₁={c.sigma_threshold:g}, σ₂={c.sigma_gnmax:g}; ε released at λ={c.release_order:g} "
            f"(σ_ss={c.release_sigma:g}), target ε={c.epsilon} at δ={c.delta:g}"
        )

    def query_positions(self, server_round: int) -> NDArray[np.int64]:
        """This round's batch of public positions: the next slice of the seeded order."""
        start = ((server_round - 1) * self.config.queries) % len(self._order)
        return np.take(self._order, np.arange(start, start + self.config.queries), mode="wrap")

    def prepare(self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> RoundTransfer:
        self._round_positions = self.query_positions(server_round)
        return RoundTransfer(
            {TRANSFER_KEY: transfer_record(self.indices[self._round_positions])},
            num_inputs=len(self._round_positions),
        )

    def distillation_set(
        self,
        soft_labels: NDArray[np.float32],
        weights: NDArray[np.float64],
        *,
        server_round: int,
        client_ids: Sequence[int] = (),
    ) -> DistillationSet:
        if self._round_positions is None:
            raise RuntimeError("distillation_set() before the round's queries were chosen.")
        counts = summed_votes(self._valid_replies(soft_labels), teachers_per_client=self.config.teachers_per_client)
        answered, labels = confident_gnmax(
            counts,
            threshold=self.config.threshold,
            sigma_threshold=self.config.sigma_threshold,
            sigma_gnmax=self.config.sigma_gnmax,
            rng=numpy_generator(self.seed, server_round, SeedPurpose.PRIVACY_NOISE, _ANSWER_NOISE),
        )
        self._batches.append((self._round_positions, counts, answered, labels))
        self._epsilon = self._account(server_round)
        num_classes = soft_labels.shape[-1]
        targets = one_hot(np.concatenate([batch[3] for batch in self._batches]), num_classes)
        return DistillationSet(
            self._answered_inputs(),
            targets,
            aggregate=one_hot(labels, num_classes),
            unlabelled=self._unlabelled_inputs(),
        )

    def _valid_replies(self, replies: NDArray[np.float32]) -> NDArray[np.float32]:
        """The replies that are whole vote counts; any other would break the sensitivity bound."""
        per_client = self.config.teachers_per_client
        valid = [is_vote_count_matrix(matrix, teachers_per_client=per_client) for matrix in replies]
        if not all(valid):
            logger.warning(
                "privacy=pate: %d of %d replies are not %d whole vote(s) per input and are left out.",
                valid.count(False),
                len(valid),
                per_client,
            )
        if not any(valid):
            raise ValueError("privacy=pate: no reply holds valid vote counts; are the clients up to date?")
        return replies[np.array(valid)]

    def _account(self, server_round: int) -> PateEpsilon:
        votes = np.concatenate([batch[1] for batch in self._batches])
        answered = np.concatenate([batch[2] for batch in self._batches])
        result = pate_epsilon(
            votes,
            answered,
            config=self.config,
            num_teachers=self.num_teachers,
            releases=len(self._batches),
            rng=numpy_generator(self.seed, server_round, SeedPurpose.PRIVACY_NOISE, _RELEASE_NOISE),
        )
        if result.epsilon > self.config.epsilon:
            logger.warning(
                "privacy=pate: the run's ε is %.3f after %d answered of %d queries, above the target %g; "
                "lower privacy.queries or raise privacy.threshold.",
                result.epsilon,
                result.answered,
                result.queries,
                self.config.epsilon,
            )
        return result

    def _answered_positions(self) -> NDArray[np.int64]:
        return np.concatenate([positions[answered] for positions, _, answered, _ in self._batches])

    def _answered_inputs(self) -> torch.Tensor:
        return self.inputs[torch.from_numpy(self._answered_positions())]

    def _unlabelled_inputs(self) -> torch.Tensor:
        """Public inputs without a released label: refused, or never asked (public, unlabelled)."""
        unlabelled = np.setdiff1d(np.arange(len(self.inputs)), self._answered_positions())
        return self.inputs[torch.from_numpy(unlabelled)]

    def round_metrics(self) -> dict[str, Any]:
        if self._epsilon is None:
            return {}
        result = self._epsilon
        return {
            "distill-inputs": result.answered,
            "epsilon": result.epsilon,
            "epsilon-released": result.released,
            "epsilon-data-independent": result.data_independent,
            "epsilon-over-target": int(result.epsilon > self.config.epsilon),
            "queries": result.queries,
            "queries-answered": result.answered,
            "delta": self.config.delta,
        }

    def privacy_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the accounting (every value is publishable)."""
        c = self.config
        state: dict[str, Any] = {
            "mechanism": "pate",
            "threshold": c.threshold,
            "sigma_threshold": c.sigma_threshold,
            "sigma_gnmax": c.sigma_gnmax,
            "num_teachers": self.num_teachers,
            "release_order": c.release_order,
            "release_beta": c.release_beta,
            "release_sigma": c.release_sigma,
            "delta": c.delta,
        }
        if self._epsilon is not None:
            e = self._epsilon
            state.update(
                epsilon=e.epsilon,
                epsilon_released=e.released,
                epsilon_data_independent=e.data_independent,
                queries=e.queries,
                queries_answered=e.answered,
                releases=len(self._batches),
            )
        return state

    def state_records(self) -> StateRecords:
        arrays: dict[str, np.ndarray] = {}
        for index, (positions, counts, answered, labels) in enumerate(self._batches):
            arrays[f"positions-{index}"], arrays[f"counts-{index}"] = positions, counts
            arrays[f"answered-{index}"], arrays[f"labels-{index}"] = answered, labels
        state: StateRecords = {
            "pate": arrays_record(arrays),
            "pate-count": ConfigRecord({"batches": len(self._batches)}),
        }
        if self._epsilon is not None:
            e = self._epsilon
            state["pate-epsilon"] = ConfigRecord(
                {
                    "epsilon": e.epsilon,
                    "released": e.released,
                    "data-independent": e.data_independent,
                    "answered": e.answered,
                    "queries": e.queries,
                }
            )
        return state

    def load_state_records(self, state: StateRecords) -> None:
        batches = stored(state, "pate", ArrayRecord)
        count = stored_count(state, "pate-count", "batches")
        self._batches = [
            (
                batches[f"positions-{i}"].numpy(),
                batches[f"counts-{i}"].numpy(),
                batches[f"answered-{i}"].numpy(),
                batches[f"labels-{i}"].numpy(),
            )
            for i in range(count)
        ]
        record = state.get("pate-epsilon")
        if isinstance(record, ConfigRecord):
            self._epsilon = PateEpsilon(
                epsilon=number(record, "epsilon"),
                released=number(record, "released"),
                data_independent=number(record, "data-independent"),
                answered=int(number(record, "answered")),
                queries=int(number(record, "queries")),
            )
