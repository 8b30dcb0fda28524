"""The global student held by the server: learns from aggregated soft labels each round."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedkd.distillation import OptimizerSettings, distill
from fedkd.seeding import SeedPurpose, torch_generator


class Student:
    """A student model, its transfer inputs and its optimizer, kept across rounds.

    Parameters
    ----------
    model : nn.Module
        The student network; trained in place.
    transfer_inputs : torch.Tensor
        Normalized transfer inputs, in the order the clients label them.
    transfer_labels : torch.Tensor, optional
        Public labels; only given when the run allows the server to use them.
    """

    def __init__(
        self,
        model: nn.Module,
        transfer_inputs: torch.Tensor,
        *,
        temperature: float,
        epochs: int,
        settings: OptimizerSettings,
        seed: int,
        alpha: float = 1.0,
        transfer_labels: torch.Tensor | None = None,
        max_shift: float = 0.0,
    ) -> None:
        self.model = model
        self.transfer_inputs = transfer_inputs
        self.transfer_labels = transfer_labels
        self.temperature = temperature
        self.epochs = epochs
        self.settings = settings
        self.seed = seed
        self.alpha = alpha
        self.max_shift = max_shift

    def learn(self, soft_labels: np.ndarray, *, server_round: int) -> float:
        """Distill the aggregated soft labels into the student; returns the last epoch's loss."""
        return distill(
            self.model,
            self.transfer_inputs,
            torch.from_numpy(np.ascontiguousarray(soft_labels, dtype=np.float32)),
            epochs=self.epochs,
            temperature=self.temperature,
            settings=self.settings,
            generator=torch_generator(self.seed, server_round, SeedPurpose.DISTILL),
            alpha=self.alpha,
            labels=self.transfer_labels,
            max_shift=self.max_shift,
            # A fresh Adam each round: the targets change between rounds, and second moments
            # estimated on round 1's near-uniform soft labels make later steps far too large.
            optimizer=None,
        )

    def arrays(self) -> ArrayRecord:
        """The student's weights, for checkpoints and evaluation (never sent to clients)."""
        return ArrayRecord(self.model.state_dict())
