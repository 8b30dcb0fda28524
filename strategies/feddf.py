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
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd.distillation import predict_logits, soften
from fedkd.messages import CLIENT_ID, METRICS_KEY, WEIGHTS_KEY
from fedkd.seeding import SAMPLE_CLIENTS, derive_seed
from fedkd.student import Student

logger = logging.getLogger(__name__)


def _client_order(reply: Message) -> tuple[int, int]:
    try:
        return (0, int(reply.content[METRICS_KEY][CLIENT_ID]))
    except (KeyError, TypeError, ValueError):  # error replies and malformed ones go last
        return (1, reply.metadata.src_node_id)


class SeededFedAvg(FedAvg):
    """Flower's FedAvg, made reproducible: the same seed samples the same clients and sums their
    weights in the same order, so a run (and a resumed run) gives the same model bit for bit.

    Flower samples with the unseeded global ``random`` module and averages replies in arrival
    order; float addition is not associative, so either changes the result in the last digits.
    """

    def __init__(self, *, seed: int = 0, **fedavg_kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**fedavg_kwargs)
        self.seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(derive_seed(self.seed, server_round, SAMPLE_CLIENTS))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, sorted(replies, key=_client_order))


class FedDF(SeededFedAvg):
    """FedAvg, then distillation of the clients' averaged logits into the averaged model.

    Parameters
    ----------
    student : Student
        Server-side student and transfer inputs; its architecture is every client's.
    make_model : Callable[[], torch.nn.Module]
        Builds an empty model of the shared architecture (to load a client's weights into).
    """

    def __init__(self, *, student: Student, make_model: Callable[[], torch.nn.Module], **fedavg_kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(fraction_evaluate=0.0, **fedavg_kwargs)
        self.student = student
        self.make_model = make_model

    def _ensemble_probs(self, replies: list[Message]) -> np.ndarray:
        logits = torch.zeros(0)
        model = self.make_model()
        for reply in replies:
            model.load_state_dict(reply.content[WEIGHTS_KEY].to_torch_state_dict())
            client_logits = predict_logits(model, self.student.transfer_inputs)
            logits = client_logits if logits.numel() == 0 else logits + client_logits
        return soften(logits / len(replies), self.student.temperature).numpy()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Sorted, so that float summation, hence the distilled student, ignores arrival order.
        replies = sorted(replies, key=_client_order)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        usable = [reply for reply in replies if not reply.has_error()]
        self.student.model.load_state_dict(averaged.to_torch_state_dict())
        distill_loss = self.student.learn(self._ensemble_probs(usable), server_round=server_round)
        round_metrics = dict(metrics or {})
        round_metrics.update({"clients": len(usable), "distill-loss": distill_loss})
        return self.student.arrays(), MetricRecord(round_metrics)
