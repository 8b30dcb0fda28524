"""FedDF: ensemble distillation for robust model fusion.

Clients share one architecture (the student's). Each round they start from the student's
weights, train locally and send their **weights** back. The server averages them (FedAvg) to
initialize the student. It then evaluates every client model on the transfer inputs, averages
their logits (AVGLOGITS) and distills that ensemble into the student, which is what goes down
next round.

Unlike the soft-label strategies, this one **sends model weights in both directions**; its
``bytes_up`` and ``bytes_down`` show it. It is here because it is the standard comparison point
for distillation-based fusion.

Reference
---------
Lin, Kong, Stich, Jaggi, "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedkd.distillation import predict_logits, soften
from fedkd.messages import WEIGHTS_KEY, array_record
from fedkd.models import build_model
from fedkd.student import Student
from strategies.fedavg import SeededFedAvg, client_order, fedavg_settings
from strategies.registry import BuildContext, StrategySpec, register
from strategies.transfer import PublicTransfer

logger = logging.getLogger(__name__)


class FedDF(SeededFedAvg):
    """FedAvg, then distillation of the clients' averaged logits into the averaged model.

    Parameters
    ----------
    student : Student
        The server-side student; its architecture is every client's.
    transfer : PublicTransfer
        The public inputs the client models are evaluated on.
    make_model : Callable[[], torch.nn.Module]
        Builds an empty model of the shared architecture (to load a client's weights into).
    """

    def __init__(
        self,
        *,
        student: Student,
        transfer: PublicTransfer,
        make_model: Callable[[], torch.nn.Module],
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(fraction_evaluate=0.0, **fedavg_kwargs)
        self.student = student
        self.transfer = transfer
        self.make_model = make_model

    def _ensemble_probs(self, replies: list[Message]) -> np.ndarray:
        logits = torch.zeros(0)
        model = self.make_model()
        for reply in replies:
            model.load_state_dict(array_record(reply.content, WEIGHTS_KEY).to_torch_state_dict())
            client_logits = predict_logits(model, self.transfer.inputs)
            logits = client_logits if logits.numel() == 0 else logits + client_logits
        return soften(logits / len(replies), self.student.temperature).numpy()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Sorted, so that float summation, hence the distilled student, ignores arrival order.
        replies = sorted(replies, key=client_order)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        usable = [reply for reply in replies if not reply.has_error()]
        self.student.model.load_state_dict(averaged.to_torch_state_dict())
        distill_loss = self.student.learn(
            self.transfer.inputs, self._ensemble_probs(usable), server_round=server_round, labels=self.transfer.labels
        )
        round_metrics = dict(metrics or {})
        round_metrics.update({"clients": len(usable), "distill-loss": distill_loss})
        return self.student.arrays(), MetricRecord(round_metrics)


def build(context: BuildContext) -> FedDF:
    config, info = context.config, context.info
    return FedDF(
        student=context.student(),
        transfer=context.public_transfer(),
        make_model=lambda: build_model(
            config.student_model, input_shape=info.input_shape, num_classes=info.num_classes
        ),
        **fedavg_settings(context),
    )


register(StrategySpec(name="feddf", client_mode="weights", build=build, needs_public_set=True))
