"""Record-level DP for a client's teacher: DP-SGD through Opacus (Abadi et al. 2016).

Opacus computes per-sample gradients, clips each to ``max_grad_norm``, adds Gaussian noise and
records every step in the client's :class:`~fedkd.privacy.accountant.PrivacyLedger`, which the
client keeps across rounds. The noise multiplier is calibrated once, before training, for the
steps the *whole run* will take, so the ledger ends at or below the target ε.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedkd.distillation import OptimizerSettings, random_translate
from fedkd.models import with_layout
from fedkd.privacy.accountant import PrivacyLedger, calibrate_beside, calibrate_noise_multiplier

# Opacus logs every BatchNorm it replaces, per client and round: noise at hundreds of clients.
logging.getLogger("opacus.validators").setLevel(logging.WARNING)


def make_private_compatible(model: nn.Module) -> nn.Module:
    """The same architecture with every layer Opacus can train privately.

    BatchNorm mixes examples within a batch, which breaks per-sample gradients; Opacus's
    validator swaps it for GroupNorm (which keeps no running statistics).
    """
    fixed = model if ModuleValidator.is_valid(model) else ModuleValidator.fix(model)
    ModuleValidator.validate(fixed, strict=True)
    for module in fixed.modules():
        # Opacus's backward hooks cannot see through in-place activations.
        if hasattr(module, "inplace"):
            module.inplace = False
    # Per-sample gradients are computed in the standard layout (build_model's channels-last
    # weights are a speed choice Opacus's hooks were not written for).
    return with_layout(fixed, torch.contiguous_format)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Noisy steps per epoch, and ``1 / sample rate``, exactly as Opacus's Poisson loader takes
    them. Asked of Opacus rather than computed: it derives them through a float round trip
    (``int(1 / (1 / 210)) == 209``), and calibrating for 210 steps at rate 1/210 while the
    accountant records 209 at 1/209 overshot the target ε by 0.01 on a 6,700-example client."""
    stand_in = TensorDataset(torch.empty(max(num_examples, 1), 0))  # only its length matters
    return max(1, len(DPDataLoader.from_data_loader(DataLoader(stand_in, batch_size=batch_size))))


# With feature statistics released for synthesis, this share of ε is theirs: each release averages
# hundreds of examples, so a little budget buys a faithful copy, and DP-SGD keeps the rest.
FEATURE_BUDGET_SHARE = 0.1


@dataclass(frozen=True)
class NoisePlan:
    """Noise multipliers a DP-SGD client uses for the whole run (0 = no noise, ε = ∞)."""

    training: float
    features: float = 0.0


@functools.lru_cache(maxsize=4096)
def calibrate_for_run(
    *,
    target_epsilon: float,
    delta: float,
    num_examples: int,
    batch_size: int,
    epochs_in_run: int,
    feature_releases: int = 0,
) -> NoisePlan:
    """Noise for ``epochs_in_run`` epochs of Poisson-sampled DP-SGD on ``num_examples``, and for
    ``feature_releases`` Gaussian releases of feature statistics beside them.

    The feature releases get :data:`FEATURE_BUDGET_SHARE` of ε on their own; DP-SGD's noise is
    then the least that keeps both, composed, within ``target_epsilon``. The binary searches take
    most of a second; cached, each partition size is searched once per process instead of once
    per client and round.
    """
    batches = batches_per_epoch(num_examples, batch_size)
    sample_rate, steps = 1.0 / batches, epochs_in_run * batches
    if feature_releases == 0:
        return NoisePlan(
            calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps)
        )
    if math.isinf(target_epsilon):
        return NoisePlan(0.0, 0.0)
    features = calibrate_noise_multiplier(
        target_epsilon=FEATURE_BUDGET_SHARE * target_epsilon, delta=delta, sample_rate=1.0, steps=feature_releases
    )
    training = calibrate_beside(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        fixed=[(features, 1.0, feature_releases)],
    )
    return NoisePlan(training, features)


def train_dp_sgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    settings: OptimizerSettings,
    generator: torch.Generator,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: PrivacyLedger,
    max_shift: float = 0.0,
    momentum: float | None = None,
) -> float:
    """Cross-entropy training with DP-SGD; appends every step to ``ledger``.

    ``settings.batch_size`` is the logical batch: the expected size of each Poisson-sampled
    batch (sample rate ``1 / batches_per_epoch``). The noisy, clipped gradient is followed by
    SGD with ``momentum`` (``privacy=dpsgd``'s recipe), or by Adam when ``momentum`` is ``None``.
    ``model`` must already be :func:`make_private_compatible`; it is trained in place and left
    without Opacus hooks. Returns the mean loss of the last epoch. ``noise_multiplier = 0``
    trains with clipping only (no guarantee; nothing is recorded).
    """
    if max_grad_norm <= 0:
        raise ValueError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}.")
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=settings.batch_size, shuffle=True, generator=generator
    )
    optimizer: torch.optim.Optimizer
    if momentum is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=momentum, weight_decay=settings.weight_decay
        )
    accountant = RDPAccountant()
    accountant.history = list(ledger.history)
    with warnings.catch_warnings():
        # Seeded (not cryptographically secure) noise is the point of a reproducible simulation;
        # a deployment would enable Opacus's secure_mode. The backward-hook notice concerns the
        # first layer, whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = accountant
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
        try:
            last_epoch_loss = _private_epochs(
                private_model,
                private_optimizer,
                private_loader,
                epochs=epochs,
                generator=generator,
                max_shift=max_shift,
            )
        finally:
            private_model._close()  # removes the per-sample-gradient hooks from ``model``
    if noise_multiplier > 0:
        ledger.history = list(engine.accountant.history)
    return last_epoch_loss


def _private_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    generator: torch.Generator,
    max_shift: float,
) -> float:
    model.train()
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(targets) == 0:
                # Poisson sampling can draw an empty batch. Its noisy step must still be taken
                # (skipping it would reveal that the batch was empty); the update is all noise.
                model(inputs).sum().backward()
                optimizer.step()
                continue
            inputs = random_translate(inputs, max_shift=max_shift, generator=generator)
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(targets)
            count += len(targets)
        last_epoch_loss = total / max(count, 1)
    return last_epoch_loss
