"""One contract every server strategy honours, checked on fabricated Flower replies.

Empty replies and error replies never crash a round; the order in which replies arrive does
not change the result; the same seed gives the same result; replies are not mutated.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from fedkd.distillation import OptimizerSettings
from fedkd.messages import CLIENT_ID, METRICS_KEY, NUM_EXAMPLES, WEIGHTS_KEY, class_logits_record, soft_label_reply
from fedkd.models import build_model
from fedkd.student import Student
from strategies.aggregation import get_aggregator
from strategies.dsfl import DSFL, entropy_reduced
from strategies.ensemble_distillation import EnsembleDistillation
from strategies.fd import FederatedDistillation
from strategies.fedavg import SeededFedAvg
from strategies.feddf import FedDF
from strategies.fedmd import FedMD
from strategies.registry import CheckpointableStrategy, strategy_names
from strategies.transfer import PublicTransfer

NUM_INPUTS, NUM_CLASSES, SHAPE = 12, 10, (1, 28, 28)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a Flower runtime need the sender's identity set."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model("lenet5_bn", input_shape=SHAPE, num_classes=NUM_CLASSES, seed=seed)


def _student() -> Student:
    return Student(_model(), temperature=1.0, epochs=1, settings=OptimizerSettings(batch_size=4), seed=0)


def _public(aggregator: str = "weighted") -> PublicTransfer:
    inputs = torch.randn(NUM_INPUTS, *SHAPE, generator=torch.Generator().manual_seed(0))
    return PublicTransfer(inputs=inputs, indices=np.arange(NUM_INPUTS), aggregator=get_aggregator(aggregator))


def _soft_label_content(client_id: int) -> RecordDict:
    rng = np.random.default_rng(client_id)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=NUM_INPUTS).astype(np.float32)
    return soft_label_reply(probs, num_examples=10 + client_id, client_id=client_id, train_loss=0.5)


def _class_logit_content(client_id: int) -> RecordDict:
    rng = np.random.default_rng(client_id)
    metrics = MetricRecord({NUM_EXAMPLES: 10, CLIENT_ID: client_id, "train-loss": 0.5})
    record = class_logits_record(rng.normal(size=(NUM_CLASSES, NUM_CLASSES)), rng.integers(0, 5, size=NUM_CLASSES))
    return RecordDict({"class-logits": record, METRICS_KEY: metrics})


def _weights_content(client_id: int) -> RecordDict:
    metrics = MetricRecord({NUM_EXAMPLES: 10 + client_id, CLIENT_ID: client_id, "train-loss": 0.5})
    return RecordDict({WEIGHTS_KEY: ArrayRecord(_model(seed=client_id).state_dict()), METRICS_KEY: metrics})


@dataclass(frozen=True)
class Case:
    build: Callable[[], Strategy]
    content: Callable[[int], RecordDict]


CASES = {
    "ensemble_distillation": Case(
        lambda: EnsembleDistillation(student=_student(), source=_public(), num_classes=NUM_CLASSES),
        _soft_label_content,
    ),
    "fedmd": Case(
        lambda: FedMD(student=_student(), source=_public("mean"), num_classes=NUM_CLASSES), _soft_label_content
    ),
    "dsfl": Case(
        lambda: DSFL(
            student=_student(),
            source=PublicTransfer(
                inputs=_public().inputs,
                indices=np.arange(NUM_INPUTS),
                aggregator=entropy_reduced(get_aggregator("weighted"), temperature=0.1),
            ),
            num_classes=NUM_CLASSES,
        ),
        _soft_label_content,
    ),
    "fd": Case(lambda: FederatedDistillation(num_classes=NUM_CLASSES), _class_logit_content),
    "feddf": Case(
        lambda: FedDF(
            student=_student(), transfer=_public(), make_model=_model, min_train_nodes=1, min_available_nodes=1
        ),
        _weights_content,
    ),
    "fedavg": Case(lambda: SeededFedAvg(min_train_nodes=1, min_available_nodes=1), _weights_content),
}


def test_every_registered_strategy_honours_the_contract():
    assert sorted(CASES) == strategy_names()
    for case in CASES.values():
        assert isinstance(case.build(), CheckpointableStrategy)


def _reply(content: RecordDict | None, node_id: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"m{node_id}"
    if content is None:
        return Message(Error(code=2, reason="client crashed"), reply_to=instruction)
    return Message(content, reply_to=instruction)


def _replies(case: Case, client_ids: list[int]) -> list[Message]:
    return [_reply(case.content(client_id), node_id=client_id + 1) for client_id in client_ids]


class _Grid:
    """Just enough of a Flower Grid for a strategy to configure a round (ten connected nodes)."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, 11))


def _aggregate(strategy: Strategy, replies: list[Message]) -> tuple:
    """One round as Flower runs it: configure, then aggregate the replies."""
    strategy.configure_train(1, ArrayRecord(_model().state_dict()), ConfigRecord(), _Grid())
    return strategy.aggregate_train(1, replies)


def _outcome(strategy: Strategy, result: tuple) -> list[np.ndarray]:
    """The comparable result of a round: returned arrays, or the strategy's aggregate state."""
    arrays, _ = result
    if arrays is not None:
        return [array.numpy() for array in arrays.values()]
    # FD keeps its aggregate and returns no arrays: compare the targets it would send down.
    assert isinstance(strategy, FederatedDistillation)
    targets = strategy.targets_for(sorted(strategy.contributions))
    return [np.nan_to_num(logits) for logits, _ in targets.values()]


def _snapshot(replies: list[Message]) -> list[bytes]:
    return [
        b"".join(
            array.data
            for record in reply.content.values()
            if isinstance(record, ArrayRecord)
            for array in record.values()
        )
        for reply in replies
    ]


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def test_no_replies_leave_the_round_without_a_result(case):
    arrays, _ = _aggregate(case.build(), [])
    assert arrays is None


def test_error_replies_are_skipped(case):
    strategy = case.build()
    arrays, _ = _aggregate(strategy, [_reply(None, 1), _reply(None, 2)])
    assert arrays is None
    mixed = _replies(case, [0, 1]) + [_reply(None, 9)]
    assert _outcome(strategy, _aggregate(strategy, mixed))


def test_client_order_does_not_change_the_result(case):
    replies = _replies(case, [0, 1, 2, 3])
    shuffled = replies[:]
    random.Random(3).shuffle(shuffled)
    first, second = case.build(), case.build()
    for a, b in zip(
        _outcome(first, _aggregate(first, replies)), _outcome(second, _aggregate(second, shuffled)), strict=False
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_same_seed_same_result(case):
    first, second = case.build(), case.build()
    for a, b in zip(
        _outcome(first, _aggregate(first, _replies(case, [0, 1, 2]))),
        _outcome(second, _aggregate(second, _replies(case, [0, 1, 2]))),
        strict=False,
    ):
        np.testing.assert_array_equal(a, b)


def test_replies_are_not_mutated(case):
    replies = _replies(case, [0, 1, 2])
    before = _snapshot(replies)
    _aggregate(case.build(), replies)
    assert _snapshot(replies) == before
