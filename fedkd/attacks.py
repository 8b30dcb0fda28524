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
* ``nan`` — NaN logits, which the server's reply validation must reject;
* ``collude`` — a targeted attack: the malicious clients agree on a target class and a wrong
  class (a seeded choice, fixed for the run) and, wherever their teacher sees the target, all
  send the wrong class instead, with the teacher's own confidence (the two logits swap);
  elsewhere they answer honestly;
* ``adaptive`` — built against ``strategy.aggregator=robust``: on a share ``attack.lie_fraction``
  of the inputs (the same inputs for every attacker in a round, a seeded choice) the top two
  logits swap, so the argmax moves to the most plausible wrong class while confidence and
  entropy stay exactly the teacher's; on the rest the attacker answers honestly. The robust rule
  accepts a client fully while its precision on a class keeps at least ``TOLERANCE`` = 1/2 of the
  typical lift over chance, i.e. while it lies on at most about ``(1 − 1/2)·(1 − chance /
  precision)`` of its claims: about 0.45 for a teacher right 90 % of the time on ten balanced
  classes. The default 0.4 stays just inside.

All of these are pure functions of their inputs; the ClientApp applies them (see
``federation.client_app``), and nothing on the server knows who attacks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.seeding import SeedPurpose, derive_seed

ATTACK_KINDS = ("none", "random", "flip", "scale", "nan", "collude", "adaptive")
# Kinds that change the shared logits (``flip`` changes the training labels instead).
LOGIT_ATTACKS = ("random", "scale", "nan", "collude", "adaptive")


@functools.lru_cache(maxsize=64)
def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The ids of the ``round(fraction · num_clients)`` malicious clients of a run."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack.fraction must lie in [0, 1], got {fraction}.")
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, SeedPurpose.ATTACK_SELECTION))
    return frozenset(int(client) for client in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class Collusion:
    """What the malicious clients of a run agree on for one round (the same for all of them).

    ``target`` and ``wrong``: the class the colluders attack and the one they send instead
    (fixed for the run); ``lie_seed``: seeds the round's shared choice of inputs the adaptive
    attackers lie on; ``lie_fraction``: the share of inputs they lie on.
    """

    target: int
    wrong: int
    lie_seed: int
    lie_fraction: float

    def lies(self, num_inputs: int) -> torch.Tensor:
        """Boolean mask of the ``round(lie_fraction · num_inputs)`` inputs lied on this round."""
        count = int(round(self.lie_fraction * num_inputs))
        chosen = np.random.default_rng(self.lie_seed).choice(num_inputs, size=count, replace=False)
        mask = torch.zeros(num_inputs, dtype=torch.bool)
        mask[torch.from_numpy(chosen)] = True
        return mask


def collusion(num_classes: int, *, seed: int, server_round: int, lie_fraction: float) -> Collusion:
    """The run's agreed target and wrong class (seeded by ``seed`` alone) and this round's lies."""
    if num_classes < 2:
        raise ValueError(f"colluding attacks need at least 2 classes, got {num_classes}.")
    rng = np.random.default_rng(derive_seed(seed, SeedPurpose.ATTACK_COLLUSION))
    target, wrong = (int(c) for c in rng.choice(num_classes, size=2, replace=False))
    return Collusion(
        target=target,
        wrong=wrong,
        lie_seed=derive_seed(seed, server_round, SeedPurpose.ATTACK_COLLUSION),
        lie_fraction=lie_fraction,
    )


def _swap_columns(logits: torch.Tensor, rows: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``logits`` with, on each selected row, the entries at ``first`` and ``second`` exchanged."""
    swapped = logits.clone()
    index = torch.nonzero(rows).squeeze(1)
    a, b = first[index], second[index]
    swapped[index, a], swapped[index, b] = logits[index, b], logits[index, a]
    return swapped


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``y → C − 1 − y``: every label moved to another class (for C ≥ 2)."""
    return (num_classes - 1) - labels


def attacked_logits(
    logits: torch.Tensor,
    kind: str,
    *,
    scale: float,
    generator: torch.Generator,
    plan: Collusion | None = None,
) -> torch.Tensor:
    """What a malicious client of ``kind`` shares instead of its honest ``(N, C)`` ``logits``.

    ``collude`` and ``adaptive`` need the attackers' shared ``plan`` (:func:`collusion`).
    """
    if kind in ("collude", "adaptive"):
        if plan is None:
            raise ValueError(f"attack.kind={kind} needs the attackers' shared plan (fedkd.attacks.collusion).")
        if kind == "collude":
            on_target = logits.argmax(dim=1) == plan.target
            target = torch.full((len(logits),), plan.target)
            return _swap_columns(logits, on_target, target, torch.full((len(logits),), plan.wrong))
        top_two = logits.topk(2, dim=1).indices
        return _swap_columns(logits, plan.lies(len(logits)), top_two[:, 0], top_two[:, 1])
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
