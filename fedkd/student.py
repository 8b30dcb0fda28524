"""The global student held by the server: learns from aggregated soft labels each round."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedkd.distillation import OptimizerSettings, SemiSupervision, distill, train_semi_supervised
from fedkd.seeding import SeedPurpose, torch_generator


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Let torch use every core while the student trains. Simulated clients in this process set
    one thread each (they share the cores); the server's student has the machine to itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Student:
    """A student model and how it distills, kept across rounds.

    What it learns from each round (inputs and targets) comes from the strategy's transfer
    source (``strategies.transfer``); the student holds no data of its own.

    Parameters
    ----------
    model : nn.Module
        The student network; trained in place.
    alpha : float
        Weight of the distillation term; ``1 - alpha`` weighs cross-entropy on ``labels``.
    average_decay : float
        Decay of the moving average of the weights the student keeps at the end of each round
        (0 = the last step's weights; see :func:`fedkd.distillation.distill`).
    semi : SemiSupervision, optional
        Learn also from unlabelled public inputs (FixMatch) when the source offers them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float,
        epochs: int,
        settings: OptimizerSettings,
        seed: int,
        alpha: float = 1.0,
        max_shift: float = 0.0,
        schedule: str = "constant",
        average_decay: float = 0.0,
        semi: SemiSupervision | None = None,
    ) -> None:
        self.model = model
        self.temperature = temperature
        self.epochs = epochs
        self.settings = settings
        self.seed = seed
        self.alpha = alpha
        self.max_shift = max_shift
        self.schedule = schedule
        self.average_decay = average_decay
        self.semi = semi

    def learn(
        self,
        inputs: torch.Tensor,
        soft_labels: np.ndarray,
        *,
        server_round: int,
        labels: torch.Tensor | None = None,
        unlabelled: torch.Tensor | None = None,
    ) -> float:
        """Distill the soft labels on ``inputs`` into the student; returns the last epoch's loss.

        ``labels`` (public labels, only where the run allows the server to use them) add the
        ``1 - alpha`` cross-entropy term. ``unlabelled`` inputs add FixMatch's consistency term
        if the student is semi-supervised (post-processing of public data: no privacy cost).
        """
        targets = torch.from_numpy(np.ascontiguousarray(soft_labels, dtype=np.float32))
        if self.semi is not None and unlabelled is not None:
            with all_cores():
                return train_semi_supervised(
                    self.model,
                    inputs,
                    targets,
                    unlabelled,
                    epochs=self.epochs,
                    temperature=self.temperature,
                    settings=self.settings,
                    generator=torch_generator(self.seed, server_round, SeedPurpose.SEMI_SUPERVISED),
                    semi=self.semi,
                    max_shift=self.max_shift,
                )
        return distill(
            self.model,
            inputs,
            targets,
            epochs=self.epochs,
            temperature=self.temperature,
            settings=self.settings,
            generator=torch_generator(self.seed, server_round, SeedPurpose.DISTILL),
            alpha=self.alpha,
            labels=labels,
            max_shift=self.max_shift,
            # A fresh Adam each round: the targets change between rounds, and second moments
            # estimated on round 1's near-uniform soft labels make later steps far too large.
            optimizer=None,
            schedule=self.schedule,
            average_decay=self.average_decay,
        )

    def arrays(self) -> ArrayRecord:
        """The student's weights, for checkpoints and evaluation (never sent to clients)."""
        return ArrayRecord(self.model.state_dict())
