"""Private release of the aggregated soft labels on the server (``privacy=gaussian|gnmax``).

:class:`PrivateRelease` is a transfer source (``strategies.transfer``). Each round the server asks for labels on a fresh batch of ``privacy.queries`` public inputs (a
seeded permutation of the public set, cycled), releases their aggregate through the mechanism,
and records the release in its :class:`~fedkd.privacy.accountant.PrivacyLedger`. The noise
multiplier is calibrated once, for every release of the run, so the ledger ends within the
target ε. The student learns from every batch released so far.

DP-SGD (``privacy=dpsgd``) needs nothing here: clients account for themselves and report their
ε, and :class:`WorstClientEpsilon` keeps the largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedkd.checkpoint import arrays_record
from fedkd.messages import TRANSFER_KEY, transfer_record
from fedkd.privacy.accountant import PrivacyLedger, calibrate_noise_multiplier
from fedkd.privacy.config import PrivacyConfig
from fedkd.privacy.mechanisms import (
    GNMAX_SENSITIVITY,
    gaussian_mean,
    gnmax_labels,
    one_hot,
    sum_sensitivity,
    vote_counts,
)
from fedkd.seeding import SeedPurpose, numpy_generator
from strategies.transfer import DistillationSet, RoundTransfer, StateRecords, stored, stored_count


class ServerPrivacy:
    """Calibrated noise, the per-round query batches and the ledger of a server-side mechanism.

    Parameters
    ----------
    config : PrivacyConfig
        ``mechanism`` must be ``gaussian`` or ``gnmax``.
    rounds : int
        Rounds in the run; the noise is calibrated for all of them.
    num_public : int
        Size of the public set the queries are drawn from.
    expected_clients : int
        Clients sampled per round (public); the Gaussian mean divides by it.
    min_replies : int
        The fewest replies a round accepts (``strategy.min_replies``). With the noise added by
        the clients, each adds a share sized for this many, so any round that is released
        carries at least the calibrated noise, however many clients drop out.
    seed : int
        Run seed: the query order and the noise are reproducible.
    """

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        rounds: int,
        num_public: int,
        expected_clients: int,
        seed: int,
        min_replies: int = 1,
    ) -> None:
        if not config.on_server:
            raise ValueError(f"ServerPrivacy handles gaussian and gnmax, not {config.mechanism!r}.")
        if config.queries > num_public:
            raise ValueError(f"privacy.queries={config.queries} exceeds the {num_public} public inputs.")
        self.config = config
        self.expected_clients = expected_clients
        self.min_replies = max(1, min(min_replies, expected_clients))
        self.seed = seed
        releases = rounds if config.mechanism == "gaussian" else rounds * config.queries
        self.noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=config.epsilon, delta=config.delta, sample_rate=1.0, steps=releases
        )
        self.ledger = PrivacyLedger()
        self._order = numpy_generator(seed, SeedPurpose.PRIVACY_QUERIES).permutation(num_public)

    @property
    def queries(self) -> int:
        return self.config.queries

    def query_positions(self, server_round: int) -> NDArray[np.int64]:
        """This round's batch of public positions: the next slice of the seeded order."""
        start = ((server_round - 1) * self.queries) % len(self._order)
        return np.take(self._order, np.arange(start, start + self.queries), mode="wrap")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the released sum (gaussian) or on each count (gnmax)."""
        if self.config.mechanism == "gnmax":
            return self.noise_multiplier * GNMAX_SENSITIVITY
        return self.noise_multiplier * sum_sensitivity(self.queries, self.config.clip_norm)

    @property
    def noise_at_clients(self) -> bool:
        return self.config.mechanism == "gaussian" and self.config.noise_at == "clients"

    def client_task(self) -> dict[str, Any]:
        """Task keys the clients need: their noise share in the distributed Gaussian variant."""
        if not self.noise_at_clients:
            return {}
        # Shares sized for the fewest replies a released round can have: K ≥ min_replies shares of
        # σ/√min_replies sum to σ·√(K/min_replies) ≥ σ. Sized for the expected count instead,
        # every client that drops out would take its share of the noise with it.
        return {"privacy-noise-std": self.noise_std, "privacy-noise-shares": self.min_replies}

    def release(self, shared: NDArray[np.floating], *, server_round: int) -> NDArray[np.float32]:
        """The private ``(N, C)`` targets from the clients' ``(K, N, C)`` shares; records the release."""
        rng = numpy_generator(self.seed, server_round, SeedPurpose.PRIVACY_NOISE)
        if self.config.mechanism == "gnmax":
            labels = gnmax_labels(vote_counts(shared), sigma=self.noise_std, rng=rng)
            targets = one_hot(labels, shared.shape[-1])
            releases = len(labels)
        else:
            targets = gaussian_mean(
                shared,
                clip_norm=self.config.clip_norm,
                noise_std=self.noise_std,
                expected_clients=self.expected_clients,
                rng=rng,
                noise_added_by_clients=self.noise_at_clients,
            )
            releases = 1
        if self.noise_multiplier > 0:
            self.ledger.record(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=releases)
        return targets

    def epsilon(self) -> float:
        """ε spent so far (inf when the run adds no noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        return self.ledger.epsilon(self.config.delta)


class PrivateRelease:
    """Transfer source for server-side DP: each round a fresh batch of public inputs is labelled
    and its aggregate released through the mechanism; the student learns from every released
    batch so far (post-processing costs no privacy).

    Parameters
    ----------
    privacy : ServerPrivacy
        The mechanism, its calibrated noise, the query order and the ledger.
    inputs : torch.Tensor
        The normalized public inputs the queries are drawn from.
    indices : np.ndarray
        Their positions in the public split.
    """

    def __init__(self, *, privacy: ServerPrivacy, inputs: torch.Tensor, indices: NDArray[np.integer]) -> None:
        self.privacy = privacy
        self.inputs = inputs
        self.indices = np.asarray(indices)
        self._round_positions: NDArray[np.int64] | None = None
        self._released: list[tuple[NDArray[np.int64], NDArray[np.float32]]] = []

    @property
    def probabilities(self) -> bool:
        # Clients that add their own noise share send rows that are no longer probabilities.
        return not self.privacy.noise_at_clients

    def describe(self) -> str:
        privacy = self.privacy
        return (
            f"privacy={privacy.config.mechanism}: {privacy.queries} queries per round, noise multiplier "
            f"{privacy.noise_multiplier:.4g} (noise std {privacy.noise_std:.4g}) for ε={privacy.config.epsilon} "
            f"at δ={privacy.config.delta:g} over the run"
        )

    def prepare(self, server_round: int, grid: Grid, node_ids: Sequence[int], task: ConfigRecord) -> RoundTransfer:
        self._round_positions = self.privacy.query_positions(server_round)
        return RoundTransfer(
            {TRANSFER_KEY: transfer_record(self.indices[self._round_positions])},
            num_inputs=len(self._round_positions),
            task=self.privacy.client_task(),
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
        released = self.privacy.release(soft_labels, server_round=server_round)
        self._released.append((self._round_positions, released))
        return DistillationSet(
            self._released_inputs(),
            np.concatenate([labels for _, labels in self._released]),
            released,
            unlabelled=self._unlabelled_inputs(),
        )

    def _released_positions(self) -> NDArray[np.int64]:
        return np.concatenate([batch for batch, _ in self._released])

    def _released_inputs(self) -> torch.Tensor:
        return self.inputs[torch.from_numpy(self._released_positions())]

    def _unlabelled_inputs(self) -> torch.Tensor:
        """Public inputs not released yet: unlabelled, free for a semi-supervised student."""
        unlabelled = np.setdiff1d(np.arange(len(self.inputs)), self._released_positions())
        return self.inputs[torch.from_numpy(unlabelled)]

    def round_metrics(self) -> dict[str, Any]:
        released = sum(len(batch) for batch, _ in self._released)
        return {"distill-inputs": released, "epsilon": self.privacy.epsilon(), "delta": self.privacy.config.delta}

    def privacy_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the accounting."""
        return {
            "mechanism": self.privacy.config.mechanism,
            "noise_multiplier": self.privacy.noise_multiplier,
            "ledger": self.privacy.ledger.to_record(),
            "delta": self.privacy.config.delta,
            "adjacency": self.privacy.config.adjacency,
        }

    def state_records(self) -> StateRecords:
        arrays: dict[str, np.ndarray] = {}
        for index, (positions, labels) in enumerate(self._released):
            arrays[f"released-positions-{index}"], arrays[f"released-labels-{index}"] = positions, labels
        return {
            "released": arrays_record(arrays),
            "released-count": ConfigRecord({"batches": len(self._released)}),
            "server-ledger": ConfigRecord(self.privacy.ledger.to_record()),
        }

    def load_state_records(self, state: StateRecords) -> None:
        released = stored(state, "released", ArrayRecord)
        count = stored_count(state, "released-count", "batches")
        self._released = [
            (released[f"released-positions-{i}"].numpy(), released[f"released-labels-{i}"].numpy())
            for i in range(count)
        ]
        self.privacy.ledger = PrivacyLedger.from_record(stored(state, "server-ledger", ConfigRecord))


class WorstClientEpsilon:
    """Record-level DP (DP-SGD): the largest ε any client has reported so far."""

    def __init__(self) -> None:
        self.by_client: dict[int, float] = {}

    def update(self, client_id: int, epsilon: float) -> None:
        self.by_client[client_id] = float(epsilon)

    def epsilon(self) -> float:
        return max(self.by_client.values(), default=0.0)
