"""Nothing derived from private data leaves a private client unless it is noised and charged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from federation.client_app import ClientRound, class_prior
from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from fedkd.config import ClientTask, RunConfig
from fedkd.messages import METRICS_KEY, TASK_KEY, TRANSFER_KEY, metric_record, transfer_record
from fedkd.privacy.config import PrivacyConfig


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a Flower runtime need the sender's identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


TINY = RunConfig(num_clients=4, public_size=200, local_epochs=1, client_models=("cnn_small",))


def _client(run: RunConfig) -> ClientRound:
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": run.num_clients},
        state=RecordDict(),
        run_config={},
    )
    task = ClientTask(mode="soft-labels", server_round=1, run=run)
    message = Message(
        RecordDict({TASK_KEY: ConfigRecord(task.to_record())}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    return ClientRound(message, context, task, client_id=0, data_root=None)


def test_without_privacy_a_teacher_synthesizes_the_classes_it_learned_in_its_proportions():
    client = _client(TINY)
    prior = class_prior(client)
    counts = np.bincount(client.partition.labels.numpy(), minlength=10)
    assert prior == counts.tolist() and len(set(prior)) > 1


@pytest.mark.parametrize("mechanism", ["dpsgd", "gaussian", "gnmax"])
def test_under_privacy_the_synthetic_class_mix_is_uniform(mechanism):
    """The client's class counts are a statistic of its private data; the server could recover
    them by classifying the synthetic images, so a private client synthesizes every class alike."""
    prior = class_prior(_client(dataclasses.replace(TINY, privacy=PrivacyConfig(mechanism=mechanism))))
    assert prior == [1.0] * 10


@pytest.mark.parametrize("mechanism, shares_loss", [("none", True), ("gnmax", False), ("gaussian", False)])
def test_the_training_loss_stays_home_under_privacy(mechanism, shares_loss):
    run = dataclasses.replace(TINY, privacy=PrivacyConfig(mechanism=mechanism, queries=10))
    task = ClientTask(mode="soft-labels", server_round=1, run=run, privacy_noise_std=0.0)
    message = Message(
        RecordDict({TASK_KEY: ConfigRecord(task.to_record()), TRANSFER_KEY: transfer_record(np.arange(10))}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    (reply,) = InProcessGrid(client_app, num_nodes=run.num_clients).send_and_receive([message])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert ("train-loss" in metric_record(reply.content, METRICS_KEY)) == shares_loss
