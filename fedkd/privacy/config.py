"""Privacy settings of a run (``privacy=<mechanism>``); ε and δ bound the whole run.

Which strategies accept which mechanism is declared by each strategy (``strategies.registry``);
this module only checks the values themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedkd.models import check_model_name

PRIVACY_MECHANISMS = ("none", "dpsgd", "gaussian", "gnmax")
NOISE_LOCATIONS = ("server", "clients")
# privacy.teacher_model's value for "the run's client_models" (the architectures without privacy).
CLIENT_MODELS = "client_models"
# Mechanisms the server applies to a fresh batch of ``queries`` public inputs per round.
SERVER_MECHANISMS = ("gaussian", "gnmax")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for the run; the defaults are the ``privacy=none`` group."""

    mechanism: str = "none"  # none | dpsgd (teachers) | gaussian (aggregate) | gnmax (noisy votes)
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
    queries: int = 100  # gaussian, gnmax: transfer inputs released per round
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
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"privacy.{name} must be > 0, got {value}.")
        if self.queries < 1:
            raise ValueError(f"privacy.queries must be ≥ 1, got {self.queries}.")
        self._check_dpsgd_recipe()

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
