"""Simulated malicious clients: which clients attack, and what their attack does to a reply.

A share ``attack.fraction`` of the simulated clients (a seeded choice, the same every round) is
malicious. Each kind corrupts what a soft-label client shares:

* ``random`` — logits drawn at random (Gaussian, with the spread of the honest logits), so the
  reply is a valid but meaningless probability matrix;
* ``flip`` — the teacher trains on flipped labels (``y → C − 1 − y``), a data-poisoning attack
  whose replies are valid and confidently wrong;
* ``scale`` — the logits are multiplied by ``attack.scale`` before softening: a negative factor
  (the default −4) inverts the teacher's ranking with high confidence, a factor above one only
  sharpens it;
* ``nan`` — NaN logits, which the server's reply validation must reject.

All of these are pure functions of their inputs; the ClientApp applies them (see
``federation.client_app``), and nothing on the server knows who attacks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedkd.seeding import SeedPurpose, derive_seed

ATTACK_KINDS = ("none", "random", "flip", "scale", "nan")
# Kinds that change the shared logits (``flip`` changes the training labels instead).
LOGIT_ATTACKS = ("random", "scale", "nan")


@functools.lru_cache(maxsize=64)
def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The ids of the ``round(fraction · num_clients)`` malicious clients of a run."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack.fraction must lie in [0, 1], got {fraction}.")
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, SeedPurpose.ATTACK_SELECTION))
    return frozenset(int(client) for client in rng.choice(num_clients, size=count, replace=False))


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``y → C − 1 − y``: every label moved to another class (for C ≥ 2)."""
    return (num_classes - 1) - labels


def attacked_logits(logits: torch.Tensor, kind: str, *, scale: float, generator: torch.Generator) -> torch.Tensor:
    """What a malicious client of ``kind`` shares instead of its honest ``logits``."""
    if kind == "random":
        spread = float(logits.std()) if logits.numel() > 1 else 1.0
        noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype)
        return noise * max(spread, 1e-6)
    if kind == "scale":
        return logits * scale
    if kind == "nan":
        return torch.full_like(logits, float("nan"))
    if kind in ("none", "flip"):
        return logits
    raise ValueError(f"Unknown attack kind {kind!r}; choose one of {list(ATTACK_KINDS)}.")
