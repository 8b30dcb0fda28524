"""Privacy accounting: every private release is an event in an Opacus RDP accountant.

A :class:`PrivacyLedger` composes subsampled-Gaussian events ``(noise multiplier, sample rate,
steps)`` and reports ε at δ; the Rényi-DP arithmetic is Opacus's, not re-derived here. The
ledger is plain data (three lists), so a client keeps it in ``context.state`` across rounds and
the server writes it beside each checkpoint.

Mechanisms map onto events as follows:

* DP-SGD: one event per optimizer step, noise multiplier σ, sample rate ``1 / batches``
  (Opacus's Poisson sampling), recorded by Opacus's own optimizer hook.
* Gaussian noise on a sum of clipped client contributions: one event per round, noise
  multiplier ``noise std / L2 sensitivity``, sample rate 1 (no amplification is claimed for
  the server's fixed-size client sampling).
* Feature statistics for data-free synthesis (DP-SGD teachers): one event per round, noise
  multiplier σ on a sum of clipped per-example vectors, sample rate 1, composed in the same
  ledger as the client's DP-SGD steps.
* GNMax (noisy argmax over vote counts): one event per answered query, noise multiplier
  ``σ / √2`` (one changed record flips one teacher's vote: two counts move by one), sample rate 1.
  This is the data-independent bound of Papernot et al. (2018), Prop. 8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecordValues
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# Binary-search precision of the calibration (Opacus's epsilon_tolerance): the calibrated noise
# reaches between target − tolerance and target, never above.
CALIBRATION_TOLERANCE = 0.01
# Rényi orders searched when converting to (ε, δ): Opacus's defaults stop at 63, where the optimum
# sits for large noise (small ε); the longer tail gives a tighter, still valid, bound there.
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 256, 4), *range(256, 1025, 32)]


@dataclass
class PrivacyLedger:
    """The composed history of private releases, as Opacus's ``(σ, q, steps)`` tuples."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Compose ``steps`` releases of the subsampled Gaussian mechanism."""
        if noise_multiplier <= 0 or not math.isfinite(noise_multiplier):
            raise ValueError(
                f"a private release needs a finite noise multiplier > 0, got {noise_multiplier}; "
                "a release without noise has ε = ∞ and is not recorded."
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}.")
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}.")
        # Merged like Opacus's own RDPAccountant.step: consecutive identical releases share a row.
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, rate, count = self.history[-1]
            self.history[-1] = (sigma, rate, count + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any release)."""
        check_delta(delta)
        return float(self._accountant().get_epsilon(delta=delta, alphas=RDP_ORDERS))

    def _accountant(self) -> RDPAccountant:
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return accountant

    def to_record(self) -> dict[str, ConfigRecordValues]:
        """Flat lists that fit a Flower ``ConfigRecord`` or JSON."""
        return {
            "noise-multipliers": [float(sigma) for sigma, _, _ in self.history],
            "sample-rates": [float(rate) for _, rate, _ in self.history],
            "steps": [int(steps) for _, _, steps in self.history],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PrivacyLedger:
        sigmas, rates, steps = (list(record[key]) for key in ("noise-multipliers", "sample-rates", "steps"))
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError("a stored privacy ledger has lists of different lengths; it is corrupt.")
        return cls([(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)])


def check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy.delta must lie in (0, 1), got {delta}; 1e-5 is usual for MNIST-sized data.")


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus's search precision) that keeps ``steps``
    subsampled-Gaussian releases within ``target_epsilon`` at ``delta``.

    Returns 0 for ``target_epsilon = inf`` (no noise, no guarantee).
    """
    check_delta(delta)
    if math.isinf(target_epsilon) and target_epsilon > 0:
        return 0.0
    if not target_epsilon > 0:
        raise ValueError(f"privacy.epsilon must be > 0 (or inf for no noise), got {target_epsilon}.")
    if steps < 1:
        raise ValueError(f"the run must make at least one private release, got {steps} steps.")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=CALIBRATION_TOLERANCE,
                alphas=RDP_ORDERS,
            )
        )
    except ValueError as error:
        raise ValueError(
            f"no noise level reaches ε = {target_epsilon} at δ = {delta} over {steps} releases "
            f"({error}); raise privacy.epsilon or make fewer releases (rounds, queries, epochs)."
        ) from error


def calibrate_beside(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    fixed: Sequence[tuple[float, float, int]],
) -> float:
    """Like :func:`calibrate_noise_multiplier`, with the ``fixed`` events ``(σ, q, steps)``
    composed beside the calibrated ones: the smallest σ (to the same precision) for which the
    whole ledger stays within ``target_epsilon``.

    Opacus's search handles one kind of event; this is the same bisection over a ledger whose
    ε Opacus computes.
    """
    check_delta(delta)
    if steps < 1:
        raise ValueError(f"the run must make at least one private release, got {steps} steps.")

    def epsilon(sigma: float) -> float:
        ledger = PrivacyLedger(list(fixed))
        ledger.record(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return ledger.epsilon(delta)

    if PrivacyLedger(list(fixed)).epsilon(delta) >= target_epsilon:
        raise ValueError(
            f"the fixed releases alone spend ε ≥ {target_epsilon} at δ = {delta}; "
            "raise privacy.epsilon or make fewer releases."
        )
    low, high = 0.0, 10.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(
                f"no noise level reaches ε = {target_epsilon} at δ = {delta} over {steps} releases; "
                "raise privacy.epsilon or make fewer releases (rounds, epochs)."
            )
    while True:
        middle = (low + high) / 2
        spent = epsilon(middle)
        if spent > target_epsilon:
            low = middle
        else:
            high = middle
            if target_epsilon - spent <= CALIBRATION_TOLERANCE:
                return high
