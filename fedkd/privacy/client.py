"""A client's side of differential privacy: its ledger, its DP-SGD training, its private feature
statistics, and what leaves it under each mechanism.

The ClientApp calls these; every noisy step or release is recorded in the client's
:class:`~fedkd.privacy.accountant.PrivacyLedger`, which persists in the node's state across
rounds, so its ε accumulates over the run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from numpy.typing import NDArray
from torch import nn

from fedkd.config import RunConfig
from fedkd.data import DatasetInfo
from fedkd.data.local import LabeledTensors
from fedkd.distillation import OptimizerSettings
from fedkd.models import model_for_client
from fedkd.privacy.accountant import PrivacyLedger
from fedkd.privacy.config import CLIENT_MODELS
from fedkd.privacy.dpsgd import NoisePlan, calibrate_for_run, train_dp_sgd
from fedkd.privacy.feature_statistics import (
    per_sample_moments,
    reference_scales,
    release_feature_statistics,
    statistics_layout,
)
from fedkd.privacy.mechanisms import clip_rows, gaussian_noise_share, one_hot
from generators.hooks import SuppliedStatistics

# The client's ledger in its node state: every noisy step of every round so far.
LEDGER_STATE = "privacy-ledger"


def client_ledger(state: RecordDict) -> PrivacyLedger:
    """This node's ledger (empty before its first private round)."""
    record = state.get(LEDGER_STATE)
    if not isinstance(record, ConfigRecord):
        return PrivacyLedger()
    return PrivacyLedger.from_record(record)


def store_ledger(state: RecordDict, ledger: PrivacyLedger) -> None:
    state[LEDGER_STATE] = ConfigRecord(ledger.to_record())


def reported_epsilon(run: RunConfig, state: RecordDict) -> float:
    """The ε this client has spent so far; training without noise (ε = inf) records nothing:
    its guarantee is none, not zero."""
    if math.isinf(run.privacy.epsilon):
        return math.inf
    return client_ledger(state).epsilon(run.privacy.delta)


def teacher_architecture(run: RunConfig, client_id: int) -> str:
    """The architecture of a DP-SGD client's teacher: ``privacy.teacher_model`` for every
    client, or the run's ``client_models`` (round-robin) when it says ``client_models``."""
    if run.privacy.teacher_model == CLIENT_MODELS:
        return model_for_client(run.teacher_models, client_id)
    return run.privacy.teacher_model


def noise_plan(run: RunConfig, *, num_examples: int, feature_releases: int) -> NoisePlan:
    """Noise for every epoch of the whole run (and its feature releases), calibrated once."""
    return calibrate_for_run(
        target_epsilon=run.privacy.epsilon,
        delta=run.privacy.delta,
        num_examples=num_examples,
        batch_size=run.privacy.batch_size,
        epochs_in_run=run.rounds * run.privacy.local_epochs,
        feature_releases=feature_releases,
    )


def train_privately(
    model: nn.Module,
    partition: LabeledTensors,
    run: RunConfig,
    state: RecordDict,
    *,
    feature_releases: int,
    generator: torch.Generator,
) -> float:
    """DP-SGD for this round with the privacy group's recipe (local epochs, logical batch,
    momentum SGD, learning rate, clip, augmentation); the steps go into the node's ledger."""
    ledger = client_ledger(state)
    privacy = run.privacy
    loss = train_dp_sgd(
        model,
        partition.images,
        partition.labels,
        epochs=privacy.local_epochs,
        settings=OptimizerSettings(lr=privacy.lr, batch_size=privacy.batch_size),
        generator=generator,
        noise_multiplier=noise_plan(run, num_examples=len(partition), feature_releases=feature_releases).training,
        max_grad_norm=privacy.max_grad_norm,
        ledger=ledger,
        max_shift=privacy.augment_shift,
        momentum=privacy.momentum,
    )
    store_ledger(state, ledger)
    return loss


def private_feature_statistics(
    teacher: nn.Module,
    partition: LabeledTensors,
    run: RunConfig,
    state: RecordDict,
    *,
    info: DatasetInfo,
    feature_releases: int,
    reference_generator: torch.Generator,
    noise_rng: np.random.Generator,
) -> SuppliedStatistics:
    """This round's feature statistics of the private partition, released under the Gaussian
    mechanism and recorded in the ledger beside the DP-SGD steps."""
    noise_multiplier = noise_plan(run, num_examples=len(partition), feature_releases=feature_releases).features
    statistics = release_feature_statistics(
        per_sample_moments(teacher, partition.images),
        statistics_layout(teacher),
        scales=reference_scales(
            teacher,
            input_shape=info.input_shape,
            pixel_mean=info.mean,
            pixel_std=info.std,
            generator=reference_generator,
        ),
        clip_norm=run.privacy.feature_clip_norm,
        noise_multiplier=noise_multiplier,
        rng=noise_rng,
    )
    if noise_multiplier > 0:
        ledger = client_ledger(state)
        ledger.record(noise_multiplier=noise_multiplier, sample_rate=1.0)
        store_ledger(state, ledger)
    return statistics


def teacher_shards(num_examples: int, teachers: int, *, rng: np.random.Generator) -> list[NDArray[np.int64]]:
    """Disjoint, near-equal shards of a partition's positions, one per teacher (PATE).

    Each record lies in exactly one shard, so it can change only one teacher's vote: the vote
    counts keep sensitivity one however many teachers a client trains. ``rng`` must not depend
    on the round, or a record would reach a second teacher in a later round.
    """
    if teachers < 1:
        raise ValueError(f"teachers must be ≥ 1, got {teachers}.")
    if num_examples < teachers:
        raise ValueError(
            f"{num_examples} private examples cannot give {teachers} teachers one each; "
            "lower privacy.teachers_per_client or num_clients."
        )
    return [np.sort(shard) for shard in np.array_split(rng.permutation(num_examples), teachers)]


def shared_rows(
    probs: NDArray[np.floating],
    run: RunConfig,
    *,
    noise_std: float,
    noise_shares: int,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """What leaves the client for the transfer inputs under the run's privacy mechanism."""
    mechanism = run.privacy.mechanism
    if mechanism in ("gnmax", "pate"):
        return one_hot(np.asarray(probs).argmax(axis=-1), probs.shape[-1])  # a vote, nothing more
    if mechanism == "gaussian" and noise_std > 0:
        clipped = clip_rows(probs, run.privacy.clip_norm)
        noise = gaussian_noise_share(clipped.shape, noise_std=noise_std, num_shares=noise_shares, rng=rng)
        return (clipped + noise).astype(np.float32)
    return np.asarray(probs, dtype=np.float32)
