"""Mixup views of the public inputs: drawn by the server, built and labelled by every client, kept
by the student across rounds, and never a reason to retrain a cached teacher."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation import client_app as client_module
from federation.client_app import TEACHER_STATE
from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.sim import simulate
from fedkd.config import ClientTask, PartitionConfig, RunConfig, StrategyConfig
from fedkd.data.local import info_for, public_inputs
from fedkd.distillation import predict_logits, soften
from fedkd.messages import SOFT_LABELS_ARRAY, SOFT_LABELS_KEY, TASK_KEY, TRANSFER_KEY, mixup_pairs, transfer_record
from fedkd.mixup import MixupPairs, draw_pairs, mix, mix_within_batch
from fedkd.models import build_model, model_for_client
from fedkd.privacy.config import PrivacyConfig
from strategies.aggregation import weighted_mean
from strategies.registry import check_run
from strategies.transfer import PublicTransfer

TINY = RunConfig(
    dataset="digits",
    num_clients=3,
    rounds=2,
    public_size=300,
    local_epochs=1,
    distill_epochs=1,
    partition=PartitionConfig(scheme="iid"),
    student_model="cnn_small",
    mixup_views=40,
)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_pairs_mix_given_positions_with_weights_in_the_unit_interval():
    positions = np.array([5, 9, 11])
    pairs = draw_pairs(positions, 500, np.random.default_rng(0))
    assert len(pairs) == 500 and set(pairs.first) | set(pairs.second) == {5, 9, 11}
    assert pairs.weight.min() >= 0 and pairs.weight.max() <= 1 and pairs.weight.std() > 0.2
    again = draw_pairs(positions, 500, np.random.default_rng(0))
    np.testing.assert_array_equal(pairs.weight, again.weight)
    assert len(draw_pairs(positions, 0, np.random.default_rng(0))) == 0
    with pytest.raises(ValueError, match="at least two"):
        draw_pairs(np.array([3]), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        MixupPairs(np.zeros(1, np.int32), np.zeros(1, np.int32), np.array([1.5], np.float32))


def test_a_view_is_the_weighted_sum_of_its_pair():
    first, second = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), -1.0)
    views = mix(first, second, np.array([0.25, 1.0]))
    torch.testing.assert_close(views[0], torch.full((1, 2, 2), -0.5))
    torch.testing.assert_close(views[1], torch.full((1, 2, 2), 1.0))


def test_a_client_labels_the_views_after_the_indexed_inputs_with_its_own_teacher():
    grid = InProcessGrid(client_app, num_nodes=TINY.num_clients)
    pairs = draw_pairs(np.arange(TINY.public_size), 7, np.random.default_rng(1))
    wanted = np.array([4, 2])
    task = ClientTask(mode="soft-labels", server_round=1, run=TINY).to_record()
    message = Message(
        RecordDict({TASK_KEY: ConfigRecord(task), TRANSFER_KEY: transfer_record(wanted, pairs)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([message])
    probs = reply.content[SOFT_LABELS_KEY][SOFT_LABELS_ARRAY].numpy()
    assert probs.shape == (2 + 7, 10)
    context = grid.context(1)
    info = info_for(TINY.split_spec())
    client_id = int(context.node_config["partition-id"])
    teacher = build_model(
        model_for_client(TINY.teacher_models, client_id), input_shape=info.input_shape, num_classes=info.num_classes
    )
    teacher.load_state_dict(context.state[TEACHER_STATE].to_torch_state_dict())
    split = TINY.split_spec()
    views = mix(public_inputs(split, pairs.first).images, public_inputs(split, pairs.second).images, pairs.weight)
    expected = soften(
        predict_logits(teacher, torch.cat([public_inputs(split, wanted).images, views])), TINY.temperature
    )
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)


def _public(views: int) -> PublicTransfer:
    inputs = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return PublicTransfer(inputs=inputs, indices=np.arange(6), aggregator=weighted_mean, mixup_views=views, seed=3)


def test_the_student_keeps_every_rounds_views_with_the_targets_of_their_round():
    source = _public(views=4)
    sets = []
    for server_round in (1, 2):
        transfer = source.prepare(server_round, None, [1, 2], ConfigRecord())  # type: ignore[arg-type]
        assert transfer.num_inputs == 6 + 4
        pairs = mixup_pairs(transfer.records[TRANSFER_KEY])
        assert pairs is not None and len(pairs) == 4
        rows = np.random.default_rng(server_round).dirichlet(np.ones(3), size=(2, 10)).astype(np.float32)
        sets.append((pairs, rows, source.distillation_set(rows, np.ones(2), server_round=server_round)))
    (pairs_1, rows_1, first), (pairs_2, rows_2, second) = sets
    assert not np.array_equal(pairs_1.weight, pairs_2.weight)  # fresh views each round
    assert len(first.inputs) == 6 + 4 and len(second.inputs) == 6 + 8
    np.testing.assert_allclose(second.aggregate, rows_2.mean(axis=0)[:6], rtol=1e-6)  # what FedMD/DS-FL send down
    np.testing.assert_allclose(second.targets[:6], rows_2.mean(axis=0)[:6], rtol=1e-6)
    np.testing.assert_allclose(second.targets[6:10], rows_1.mean(axis=0)[6:], rtol=1e-6)  # round 1's targets
    np.testing.assert_allclose(second.targets[10:], rows_2.mean(axis=0)[6:], rtol=1e-6)
    expected = mix(source.inputs[pairs_2.first], source.inputs[pairs_2.second], pairs_2.weight)
    torch.testing.assert_close(second.inputs[10:], expected)
    # A checkpoint brings the kept views back.
    restored = _public(views=4)
    restored.load_state_records(source.state_records())
    np.testing.assert_array_equal(restored.kept_targets, source.kept_targets)
    np.testing.assert_array_equal(restored.kept_pairs.first, source.kept_pairs.first)


def test_without_views_nothing_changes():
    source = _public(views=0)
    transfer = source.prepare(1, None, [1], ConfigRecord())  # type: ignore[arg-type]
    assert transfer.num_inputs == 6 and mixup_pairs(transfer.records[TRANSFER_KEY]) is None


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"public_labels": True, "kd_alpha": 0.5}, "public_labels"),
        ({"transfer": "synthetic"}, "transfer=public"),
        ({"privacy": PrivacyConfig(mechanism="gaussian")}, "privacy=gaussian"),
        ({"mixup_views": -1}, "≥ 0"),
    ],
)
def test_the_configuration_refuses_views_it_cannot_label(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def test_only_soft_label_strategies_take_views():
    check_run(TINY)
    check_run(dataclasses.replace(TINY, strategy=StrategyConfig(name="dsfl")))
    for name in ("fd", "feddf", "fedavg"):
        with pytest.raises(ValueError, match="mixup_views=40 is labelled by clients"):
            check_run(dataclasses.replace(TINY, strategy=StrategyConfig(name=name)))


@pytest.mark.slow
def test_views_reuse_cached_teachers_and_report_what_a_trained_run_does(tmp_path, monkeypatch):
    trained = simulate(TINY, run_dir=None)
    cache = str(tmp_path / "cache")
    simulate(dataclasses.replace(TINY, mixup_views=0, teacher_cache=cache), run_dir=None)

    def no_training(*args, **kwargs):
        raise AssertionError("a teacher trained although the cache holds it")

    monkeypatch.setattr(client_module, "train_locally", no_training)
    replayed = simulate(dataclasses.replace(TINY, teacher_cache=cache), run_dir=None)

    def outcome(rows):
        return [(row["student_accuracy"], row["distill_loss"], row["bytes_up"]) for row in rows]

    assert outcome(replayed) == outcome(trained)


def test_mix_within_batch_mixes_the_requested_share_with_partners_from_the_batch() -> None:
    inputs = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    mixed = mix_within_batch(inputs, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(mixed[4:], inputs[4:])  # the rest is kept as it was
    assert not torch.equal(mixed[:4], inputs[:4])
    # every mixed row is a convex combination of two rows, so it stays within the batch's range
    assert mixed.min() >= inputs.min() and mixed.max() <= inputs.max()
    assert torch.equal(inputs, torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 2))


def test_mix_within_batch_is_the_identity_at_zero_and_rejects_a_share_outside_zero_one() -> None:
    inputs = torch.randn(6, 1, 3, 3)
    assert torch.equal(mix_within_batch(inputs, 0.0, torch.Generator().manual_seed(0)), inputs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_within_batch(inputs, 1.5, torch.Generator().manual_seed(0))
