"""FedAvg, Flower's own, made reproducible: the weight-sharing baseline every FD method is
measured against (same data, same metrics, many more bytes).

Reference
---------
McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd.messages import CLIENT_ID, METRICS_KEY, metric_record, number
from fedkd.seeding import SeedPurpose, derive_seed
from strategies.registry import BuildContext, StateRecords, StrategySpec, register


def client_order(reply: Message) -> tuple[int, int]:
    """Sort key: client id, with error and malformed replies last."""
    try:
        return (0, int(number(metric_record(reply.content, METRICS_KEY), CLIENT_ID)))
    except (KeyError, TypeError, ValueError):
        return (1, reply.metadata.src_node_id)


class SeededFedAvg(FedAvg):
    """Flower's FedAvg, made reproducible: the same seed samples the same clients and sums their
    weights in the same order, so a run (and a resumed run) gives the same model bit for bit.

    Flower samples with the unseeded global ``random`` module and averages replies in arrival
    order; float addition is not associative, so either changes the result in the last digits.
    """

    evaluates_on_clients = False

    def __init__(self, *, seed: int = 0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(derive_seed(self.seed, server_round, SeedPurpose.SAMPLE_CLIENTS))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, sorted(replies, key=client_order))

    def state_records(self) -> StateRecords:
        return {}  # the global model is the checkpoint's arrays

    def load_state_records(self, state: StateRecords) -> None:
        return None

    def privacy_state(self) -> None:
        return None


def fedavg_settings(context: BuildContext) -> dict[str, Any]:
    """Flower FedAvg's sampling settings for a run."""
    config = context.config
    return {
        "fraction_train": config.strategy.fraction_train,
        "min_train_nodes": config.strategy.min_replies,
        "min_available_nodes": config.num_clients,
        "seed": config.seed,
    }


def build(context: BuildContext) -> SeededFedAvg:
    return SeededFedAvg(fraction_evaluate=0.0, **fedavg_settings(context))


register(StrategySpec(name="fedavg", client_mode="weights", build=build))
