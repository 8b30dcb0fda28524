"""strategy.aggregator=class_weighted end to end: clients send their class counts, the server
weighs each class column by them, and no privacy mechanism may be combined with it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from fedkd.config import ClientTask, PartitionConfig, RunConfig, StrategyConfig
from fedkd.data.local import info_for, private_partition
from fedkd.distillation import OptimizerSettings
from fedkd.messages import (
    CLASS_COUNTS,
    CLIENT_ID,
    METRICS_KEY,
    NUM_EXAMPLES,
    SOFT_LABELS_ARRAY,
    SOFT_LABELS_KEY,
    TASK_KEY,
    TRANSFER_KEY,
    soft_label_reply,
    transfer_record,
)
from fedkd.models import build_model
from fedkd.privacy.config import PrivacyConfig
from fedkd.student import Student
from strategies.aggregation import class_weighted
from strategies.ensemble_distillation import EnsembleDistillation, parse_soft_label_replies
from strategies.registry import BuildContext, check_run
from strategies.transfer import PublicTransfer

CLASS_WEIGHTED = RunConfig(
    dataset="digits",
    num_clients=3,
    rounds=1,
    public_size=200,
    local_epochs=1,
    partition=PartitionConfig(scheme="dirichlet", alpha=0.3),
    strategy=StrategyConfig(aggregator="class_weighted"),
)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply_of(config: RunConfig, node_id: int) -> tuple[Message, int]:
    """Node ``node_id``'s reply to a round-1 soft-label task, and the partition it holds."""
    grid = InProcessGrid(client_app, num_nodes=config.num_clients)
    task = ClientTask(mode="soft-labels", server_round=1, run=config).to_record()
    message = Message(
        RecordDict({TASK_KEY: ConfigRecord(task), TRANSFER_KEY: transfer_record(np.arange(5))}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply, int(grid.context(node_id).node_config["partition-id"])


def test_a_client_sends_its_class_counts_only_when_the_aggregator_needs_them():
    reply, partition_id = _reply_of(CLASS_WEIGHTED, node_id=1)
    counts = reply.content[METRICS_KEY][CLASS_COUNTS]
    labels = private_partition(CLASS_WEIGHTED.split_spec(), partition_id).labels.numpy()
    assert counts == np.bincount(labels, minlength=10).tolist()
    plain = dataclasses.replace(CLASS_WEIGHTED, strategy=StrategyConfig(aggregator="weighted"))
    assert CLASS_COUNTS not in _reply_of(plain, node_id=1)[0].content[METRICS_KEY]


def _soft_label_reply(metrics: dict, node_id: int = 7) -> Message:
    content = RecordDict(
        {
            SOFT_LABELS_KEY: ArrayRecord({SOFT_LABELS_ARRAY: Array(np.full((2, 3), 1 / 3, dtype=np.float32))}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: 10, CLIENT_ID: 0, **metrics}),
        }
    )
    reply = Message(content, dst_node_id=0, message_type="train")
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def test_the_server_parses_class_counts_and_rejects_replies_without_valid_ones():
    good = parse_soft_label_replies(
        [_soft_label_reply({CLASS_COUNTS: [4, 0, 6]})], num_inputs=2, num_classes=3, class_counts=True
    )
    np.testing.assert_array_equal(good.payloads[0].class_counts, [4, 0, 6])
    for metrics in ({}, {CLASS_COUNTS: [4, 6]}, {CLASS_COUNTS: [-1, 2, 3]}, {CLASS_COUNTS: [0, 0, 0]}):
        parsed = parse_soft_label_replies([_soft_label_reply(metrics)], num_inputs=2, num_classes=3, class_counts=True)
        assert parsed.accepted == [] and parsed.rejected_nodes == [7], metrics
    # Without class_weighted, counts are neither needed nor read.
    assert (
        parse_soft_label_replies([_soft_label_reply({})], num_inputs=2, num_classes=3).payloads[0].class_counts is None
    )


@pytest.mark.parametrize("mechanism", ["dpsgd", "gaussian", "gnmax", "pate"])
def test_class_counts_are_refused_under_every_privacy_mechanism(mechanism):
    config = dataclasses.replace(CLASS_WEIGHTED, privacy=PrivacyConfig(mechanism=mechanism))
    with pytest.raises(ValueError, match="class counts.*privacy=none"):
        check_run(config)
    check_run(CLASS_WEIGHTED)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_the_strategy_aggregates_with_the_class_counts_as_weights():
    seen: list[np.ndarray] = []

    def recording(soft_labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
        seen.append(weights)
        return class_weighted(soft_labels, weights)

    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = build_model("cnn_small", input_shape=(1, 28, 28), num_classes=3, seed=0)
    strategy = EnsembleDistillation(
        student=Student(model, temperature=1.0, epochs=1, settings=OptimizerSettings(batch_size=4), seed=0),
        source=PublicTransfer(inputs=inputs, indices=np.arange(4), aggregator=recording),
        num_classes=3,
        weights_by_class=True,
    )
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid())
    counts = {1: [5, 0, 1], 2: [0, 7, 2]}
    replies = []
    for node_id, client_counts in counts.items():
        content = soft_label_reply(
            np.full((4, 3), 1 / 3, dtype=np.float32), num_examples=6, client_id=node_id, class_counts=client_counts
        )
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
        instruction.metadata.__dict__["_message_id"] = f"m{node_id}"
        replies.append(Message(content, reply_to=instruction))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_array_equal(seen[0], np.array([counts[1], counts[2]], dtype=float))


def test_the_runs_class_weight_power_reaches_its_aggregator():
    soft = np.random.default_rng(0).dirichlet(np.ones(3), size=(4, 6)).astype(np.float32)
    counts = np.array([[30.0, 1.0, 0.0], [2.0, 20.0, 5.0], [1.0, 1.0, 40.0], [10.0, 10.0, 10.0]])
    info = info_for(CLASS_WEIGHTED.split_spec())
    model = build_model("cnn_small", input_shape=info.input_shape, num_classes=info.num_classes)
    for power in (1.0, 2.0):
        strategy = dataclasses.replace(CLASS_WEIGHTED.strategy, class_weight_power=power)
        run = dataclasses.replace(CLASS_WEIGHTED, strategy=strategy)
        combined = BuildContext(config=run, info=info, student_model=model).aggregator
        aggregate = combined.aggregate(soft, counts, client_ids=range(4))
        np.testing.assert_allclose(aggregate, class_weighted(soft, counts, power=power), atol=1e-6)
        assert combined.name == "class_weighted"
    with pytest.raises(ValueError, match="class_weight_power must be a finite number > 0"):
        StrategyConfig(class_weight_power=0.0)


def test_class_weighted_squares_the_counts_where_the_partition_spreads_the_classes():
    soft = np.random.default_rng(1).dirichlet(np.ones(3), size=(4, 6)).astype(np.float32)
    counts = np.array([[30.0, 1.0, 0.0], [2.0, 20.0, 5.0], [1.0, 1.0, 40.0], [10.0, 10.0, 10.0]])
    info = info_for(CLASS_WEIGHTED.split_spec())
    model = build_model("cnn_small", input_shape=info.input_shape, num_classes=info.num_classes)
    default = dataclasses.replace(
        CLASS_WEIGHTED,
        strategy=StrategyConfig(aggregator="class_weighted"),
        partition=PartitionConfig(scheme="dirichlet", alpha=0.5),
    )
    assert default.class_weight_power == 2.0
    assert dataclasses.replace(default, partition=PartitionConfig(scheme="iid")).class_weight_power == 2.0
    # Where most clients hold a class or two, a squared count hands a column to one client.
    for skewed in (PartitionConfig(scheme="dirichlet", alpha=0.1), PartitionConfig(scheme="pathological")):
        assert dataclasses.replace(default, partition=skewed).class_weight_power == 1.0
    combined = BuildContext(config=default, info=info, student_model=model).aggregator
    np.testing.assert_allclose(
        combined.aggregate(soft, counts, client_ids=range(4)), class_weighted(soft, counts, power=2.0), atol=1e-6
    )
    # No other aggregator reads the counts' power, so its default asks nothing of them.
    weighted = dataclasses.replace(CLASS_WEIGHTED, strategy=StrategyConfig(aggregator="weighted"))
    assert weighted.class_weight_power == 1.0
    check_run(weighted)
    assert RunConfig(privacy=PrivacyConfig(mechanism="gaussian")).class_weight_power == 1.0


def test_a_class_weight_power_without_class_counts_is_refused_with_what_to_do():
    weighted = dataclasses.replace(
        CLASS_WEIGHTED, strategy=StrategyConfig(aggregator="weighted", class_weight_power=2.0)
    )
    with pytest.raises(ValueError, match="only strategy.aggregator=class_weighted weighs by, not weighted"):
        check_run(weighted)
    check_run(
        dataclasses.replace(weighted, strategy=StrategyConfig(aggregator="class_weighted", class_weight_power=2.0))
    )
