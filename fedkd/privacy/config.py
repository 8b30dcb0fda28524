"""Privacy settings of a run (``privacy=<mechanism>``); ε and δ bound the whole run.

Which strategies accept which mechanism is declared by each strategy (``strategies.registry``);
this module only checks the values themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedkd.models import check_model_name

PRIVACY_MECHANISMS = ("none", "dpsgd", "gaussian", "gnmax", "pate")
NOISE_LOCATIONS = ("server", "clients")
# privacy.teacher_model's value for "the run's client_models" (the architectures without privacy).
CLIENT_MODELS = "client_models"
# Mechanisms the server applies to a fresh batch of ``queries`` public inputs per round.
SERVER_MECHANISMS = ("gaussian", "gnmax", "pate")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for the run; the defaults are the ``privacy=none`` group."""

    # none | dpsgd (teachers) | gaussian (aggregate) | gnmax (noisy votes) | pate (Confident-GNMax)
    mechanism: str = "none"
    epsilon: float = 2.0  # target ε at the end of the run; inf trains the same way without noise
    delta: float = 1e-5
    # dpsgd: every client's teacher is this architecture (it replaces client_models; "client_models"
    # keeps them, BatchNorm made GroupNorm) trained with DP-SGD for local_epochs per round:
    # per-example gradients clipped to max_grad_norm, Gaussian noise, then SGD with momentum, on
    # Poisson-sampled batches of batch_size examples in expectation, images shifted by up to
    # augment_shift. The run's local_epochs, lr, batch_size and augment_shift are for non-private training.
    teacher_model: str = "tanh_cnn"
    local_epochs: int = 6
    batch_size: int = 128
    lr: float = 0.5
    momentum: float = 0.9
    max_grad_norm: float = 0.1
    augment_shift: float = 0.0
    clip_norm: float = 1.0  # gaussian: L2 bound on each soft-label row (≥ 1 leaves probabilities as they are)
    noise_at: str = "server"  # gaussian: server (central DP) | clients (each adds its share)
    queries: int = 100  # gaussian, gnmax, pate: public inputs queried per round
    # pate (Confident-GNMax, Papernot et al. 2018; their MNIST settings): a query is answered
    # only if max vote + N(0, sigma_threshold²) ≥ threshold, then with GNMax at sigma_gnmax.
    threshold: float = 200.0
    sigma_threshold: float = 150.0
    sigma_gnmax: float = 40.0
    # pate: teachers each client trains on disjoint shards of its partition (one vote each).
    teachers_per_client: int = 1
    # pate: the Rényi order (fixed before looking at the votes) at which the data-dependent ε is
    # released through smooth sensitivity, and the release's noise scale σ_ss; β = 0.4 / order.
    release_order: float = 14.0
    release_sigma: float = 8.0
    # dpsgd with transfer=synthetic: L2 bound on each example's feature moments, in units of
    # each layer's data-independent reference scale (see fedkd.privacy.feature_statistics)
    feature_clip_norm: float = 3.0
    # Whether a client's partition size (num-examples, its aggregation weight) is sent. It is not
    # noised: sent, it is public, and the guarantees hold for neighbours that differ in one record
    # with the sizes known; false sends 1 and the server weighs every client alike.
    public_sizes: bool = True

    def __post_init__(self) -> None:
        if self.mechanism not in PRIVACY_MECHANISMS:
            raise ValueError(f"Unknown privacy mechanism {self.mechanism!r}; choose one of {list(PRIVACY_MECHANISMS)}.")
        if self.noise_at not in NOISE_LOCATIONS:
            raise ValueError(f"Unknown privacy.noise_at {self.noise_at!r}; choose one of {list(NOISE_LOCATIONS)}.")
        if not self.epsilon > 0 or math.isnan(self.epsilon):
            raise ValueError(f"privacy.epsilon must be > 0 (inf for no noise), got {self.epsilon}.")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"privacy.delta must lie in (0, 1), got {self.delta}; 1e-5 is usual for MNIST.")
        positive = {
            "max_grad_norm": self.max_grad_norm,
            "clip_norm": self.clip_norm,
            "feature_clip_norm": self.feature_clip_norm,
            "sigma_threshold": self.sigma_threshold,
            "sigma_gnmax": self.sigma_gnmax,
            "release_sigma": self.release_sigma,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"privacy.{name} must be > 0, got {value}.")
        if self.queries < 1:
            raise ValueError(f"privacy.queries must be ≥ 1, got {self.queries}.")
        if self.threshold < 0:
            raise ValueError(f"privacy.threshold must be ≥ 0 (a vote count), got {self.threshold}.")
        if self.teachers_per_client < 1:
            raise ValueError(f"privacy.teachers_per_client must be ≥ 1, got {self.teachers_per_client}.")
        if self.teachers_per_client > 1 and self.mechanism != "pate":
            raise ValueError(
                f"privacy.teachers_per_client={self.teachers_per_client} needs privacy=pate (only PATE's "
                "vote counts keep one record to one vote); set privacy.teachers_per_client=1."
            )
        if not (math.isfinite(self.release_order) and self.release_order > 1):
            raise ValueError(f"privacy.release_order must be a finite Rényi order > 1, got {self.release_order}.")
        self._check_dpsgd_recipe()

    @property
    def release_beta(self) -> float:
        """pate: smoothness β of the ε release; 0.4/λ keeps the GNSS bound's λ < 1/(2β) with margin."""
        return 0.4 / self.release_order

    def _check_dpsgd_recipe(self) -> None:
        if self.teacher_model != CLIENT_MODELS:
            try:
                check_model_name(self.teacher_model)
            except ValueError as error:
                raise ValueError(f"privacy.teacher_model: {error} ({CLIENT_MODELS!r} keeps client_models)") from None
        for name in ("local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"privacy.{name} must be ≥ 1, got {getattr(self, name)}.")
        if not 0.0 <= self.augment_shift < 0.5:
            raise ValueError(f"privacy.augment_shift must lie in [0, 0.5), got {self.augment_shift}.")
        if not self.lr > 0:
            raise ValueError(f"privacy.lr must be > 0, got {self.lr}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"privacy.momentum must lie in [0, 1), got {self.momentum}.")

    @property
    def adjacency(self) -> str:
        """What the run's ε protects against, in words (written into privacy.json)."""
        unit = {
            "dpsgd": "one training record of one client",
            "gnmax": "one training record of one client (it changes one teacher's vote)",
            "pate": "one training record of one client (it changes one teacher's vote)",
            "gaussian": "one client's whole contribution",
        }.get(self.mechanism, "nothing (no privacy)")
        sizes = (
            "; partition sizes (num-examples) are sent unnoised and treated as public"
            if self.public_sizes
            else "; partition sizes are not sent (every client weighs the same)"
        )
        return f"add or remove {unit}{sizes}"

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"

    @property
    def on_server(self) -> bool:
        """Mechanisms that release the aggregate of a fresh batch of ``queries`` inputs per round."""
        return self.mechanism in SERVER_MECHANISMS
