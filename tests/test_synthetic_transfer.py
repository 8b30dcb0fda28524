"""Pooling the clients' synthetic inputs (pure, no Flower run) and the data-free mode end to end."""

import dataclasses

import numpy as np
import pytest
from baselines import untrained_student_accuracy
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grids import RecordingGrid

from federation.client_app import app as client_app
from federation.inprocess import InProcessGrid
from federation.run import run_federation
from fedkd.config import PartitionConfig, RunConfig, SynthesisConfig
from fedkd.data import DatasetInfo
from fedkd.data import local as local_data
from fedkd.messages import (
    SYNTHESIZE_MESSAGE,
    SYNTHETIC_KEY,
    TRANSFER_IMAGES,
    TRANSFER_KEY,
    synthetic_reply,
)
from strategies.aggregation import weighted_mean
from strategies.synthetic_transfer import (
    SyntheticTransfer,
    pool_synthetic_replies,
    replay_draw,
    validate_synthetic_images,
)
from strategies.validation import InvalidReply

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a Flower runtime need the sender's identity set."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(images, client_id, node_id=None):
    query = Message(RecordDict(), dst_node_id=node_id or client_id + 1, message_type=SYNTHESIZE_MESSAGE)
    # A reply's source is the node the query went to.
    query.metadata.__dict__["_message_id"] = f"q{client_id}"
    return Message(synthetic_reply(images, client_id=client_id, seconds=0.1), reply_to=query)


def _images(n, value):
    return np.full((n, *SHAPE), value, dtype=np.uint8)


def test_pool_concatenates_in_client_order_whatever_the_arrival_order():
    replies = [_reply(_images(2, 20), 2), _reply(_images(1, 0), 0), _reply(_images(3, 10), 1)]
    pool = pool_synthetic_replies(replies, input_shape=SHAPE, max_per_client=3)
    again = pool_synthetic_replies(replies[::-1], input_shape=SHAPE, max_per_client=3)
    assert pool.contributors == [0, 1, 2]
    assert [int(image[0, 0, 0]) for image in pool.images] == [0, 10, 10, 10, 20, 20]
    np.testing.assert_array_equal(pool.images, again.images)
    assert pool.failed == [] and pool.rejected == []


def test_pool_counts_failures_and_rejects_malformed_images_without_losing_the_rest():
    bad_dtype = _reply(_images(2, 0), 1)
    bad_dtype.content[SYNTHETIC_KEY] = ArrayRecord({TRANSFER_IMAGES: Array(np.zeros((2, *SHAPE), np.float32))})
    too_many = _reply(_images(5, 1), 2)
    wrong_shape = _reply(np.zeros((2, 1, 5, 5), dtype=np.uint8), 3)
    query = Message(RecordDict(), dst_node_id=9, message_type=SYNTHESIZE_MESSAGE)
    query.metadata.__dict__["_message_id"] = "q9"
    failed = Message(Error(code=0, reason="boom"), reply_to=query)
    good = _reply(_images(2, 7), 0)
    pool = pool_synthetic_replies([bad_dtype, too_many, wrong_shape, failed, good], input_shape=SHAPE, max_per_client=3)
    assert pool.contributors == [0] and len(pool.images) == 2
    assert len(pool.rejected) == 3 and len(pool.failed) == 1
    assert "uint8" in " ".join(pool.rejected) and "shape" in " ".join(pool.rejected)


def test_empty_pool_has_the_input_shape():
    pool = pool_synthetic_replies([], input_shape=SHAPE, max_per_client=3)
    assert pool.images.shape == (0, *SHAPE) and pool.images.dtype == np.uint8


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((0, *SHAPE), dtype=np.uint8), "1..3"),
        (np.zeros((2, 4, 4), dtype=np.uint8), "shape"),
        (np.zeros((2, *SHAPE), dtype=np.int16), "uint8"),
    ],
)
def test_validation_names_the_problem(images, match):
    with pytest.raises(InvalidReply, match=match):
        validate_synthetic_images(images, input_shape=SHAPE, max_count=3)


# --- end to end through Flower -----------------------------------------------------------

DATA_FREE = RunConfig(
    dataset="digits",
    num_clients=3,
    rounds=2,
    local_epochs=2,
    distill_epochs=5,
    partition=PartitionConfig(scheme="iid"),
    transfer="synthetic",
    synthesis=SynthesisConfig(per_client=60, steps=60),
    student_model="cnn_small",
)


DATA_FREE_LEARNED = 0.05


class _OneClientGrid:
    """Answers each round's synthesize query with that round's images, as client 0."""

    def __init__(self, pools):
        self.pools = iter(pools)

    def send_and_receive(self, queries, timeout):
        return [_reply(next(self.pools), client_id=0)]


def _distillation_sets(rounds, *, per_round=4, **transfer_options):
    """Each round's distillation set when round r's pool is ``per_round`` images of pixel value r."""
    info = DatasetInfo("pixels", 2, SHAPE, (0.0,), (1.0 / 255,))  # normalized input = pixel value
    transfer = SyntheticTransfer(info=info, per_client=per_round, aggregator=weighted_mean, **transfer_options)
    grid = _OneClientGrid(_images(per_round, r) for r in range(1, rounds + 1))
    sets = []
    for server_round in range(1, rounds + 1):
        transfer.prepare(server_round, grid, [1], task=ConfigRecord())
        # The soft labels say which round labelled an input: [r, 1 - r/10].
        labels = np.tile(np.float32([server_round / 10, 1 - server_round / 10]), (1, per_round, 1))
        sets.append(transfer.distillation_set(labels, np.ones(1), server_round=server_round))
    return sets


def test_kept_pools_are_all_distilled_with_the_labels_of_their_round():
    sets = _distillation_sets(3)
    assert [len(s.inputs) for s in sets] == [4, 8, 12]
    last = sets[-1]
    rounds = last.inputs[:, 0, 0, 0].numpy()
    assert rounds.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    np.testing.assert_allclose(last.targets[:, 0], rounds / 10, rtol=1e-6)


def test_replay_bounds_the_earlier_pools_and_always_keeps_the_newest():
    sets = _distillation_sets(4, replay_inputs=3, seed=7)
    assert [len(s.inputs) for s in sets] == [4, 7, 7, 7]
    for server_round, learned in enumerate(sets, start=1):
        rounds = learned.inputs[:, 0, 0, 0].numpy()
        assert (rounds == server_round).sum() == 4  # the newest pool, whole
        assert set(rounds) <= set(range(1, server_round + 1))
        np.testing.assert_allclose(learned.targets[:, 0], rounds / 10, rtol=1e-6)  # each input keeps its round's label
    again = _distillation_sets(4, replay_inputs=3, seed=7)
    assert all(np.array_equal(a.targets, b.targets) for a, b in zip(sets, again, strict=True))


def test_replay_draw_is_without_replacement_and_differs_by_round():
    draws = [replay_draw(100, 10, np.random.default_rng(seed)) for seed in (1, 2)]
    for draw in draws:
        assert len(set(draw.tolist())) == 10 and draw.min() >= 0 and draw.max() < 100
    assert not np.array_equal(*draws)
    assert replay_draw(100, 0, np.random.default_rng(0)) is None  # 0: replay everything
    assert replay_draw(5, 10, np.random.default_rng(0)) is None  # fewer kept than asked: all of them


def test_replay_inputs_must_not_be_negative():
    with pytest.raises(ValueError, match="replay_inputs"):
        SynthesisConfig(replay_inputs=-1)


@pytest.mark.slow
def test_data_free_run_learns_without_the_server_touching_real_data(monkeypatch):
    def no_public_set(*args, **kwargs):
        raise AssertionError("the data-free mode read the public split")

    # Clients and server share this process: nobody may read public inputs, and no public
    # split exists (its size is 0), so everything the student learns from is synthetic.
    monkeypatch.setattr(local_data, "public_inputs", no_public_set)
    monkeypatch.setattr("strategies.registry.public_inputs", no_public_set)
    monkeypatch.setattr("federation.client_app.public_inputs", no_public_set)
    assert local_data.split_for(DATA_FREE.split_spec()).public_indices.size == 0

    grid = RecordingGrid(client_app, num_nodes=DATA_FREE.num_clients)
    rows = run_federation(grid, DATA_FREE, run_dir=None)

    assert [row["round"] for row in rows] == [1, 2]
    # Data-free distillation lifts the student clear of its untrained self (0.10-0.12), not far:
    # final − untrained was 0.26, 0.33, 0.40 for seeds 0-2 here, 0.16 for seed 0 on another CPU.
    assert rows[-1]["student_accuracy"] > untrained_student_accuracy(DATA_FREE) + DATA_FREE_LEARNED
    assert all(row["synthetic_inputs"] == 3 * 60 and row["rejected"] == 0 for row in rows)

    queries = [(m, r) for m, r in grid.exchanges if m.metadata.message_type == SYNTHESIZE_MESSAGE]
    trains = [(m, r) for m, r in grid.exchanges if m.metadata.message_type == MessageType.TRAIN]
    assert len(queries) == len(trains) == 3 * 2
    pixels_per_input = int(np.prod(local_data.info_for(DATA_FREE.split_spec()).input_shape))
    for _, reply in queries:
        images = reply.content[SYNTHETIC_KEY][TRANSFER_IMAGES].numpy()
        assert images.dtype == np.uint8 and images.shape[0] == 60
    final_pool = trains[-1][0].content[TRANSFER_KEY][TRANSFER_IMAGES].numpy()
    final_queries = [r.content[SYNTHETIC_KEY][TRANSFER_IMAGES].numpy() for _, r in queries[-3:]]
    np.testing.assert_array_equal(final_pool, np.concatenate(final_queries))

    # Bytes on the wire include the synthetic images both ways.
    row = rows[-1]
    up_images = 3 * 60 * pixels_per_input
    down_pool = 3 * (3 * 60) * pixels_per_input
    assert row["bytes_up"] >= up_images + 3 * (3 * 60) * 10 * 4
    assert row["bytes_down"] >= down_pool


# Two clients, two rounds, a few generator steps: enough to follow what each client does.
TWO_CLIENTS_DATA_FREE = RunConfig(
    dataset="digits",
    num_clients=2,
    rounds=2,
    local_epochs=1,
    distill_epochs=1,
    partition=PartitionConfig(scheme="iid"),
    transfer="synthetic",
    synthesis=SynthesisConfig(per_client=10, steps=5),
    student_model="cnn_small",
)


@pytest.mark.slow
def test_each_client_trains_its_teacher_once_per_round_in_data_free_mode(monkeypatch):
    import federation.client_app as client_module

    trained: list[tuple[int, int]] = []
    original = client_module.train_locally

    def counting(model, client, **kwargs):
        trained.append((client.task.server_round, client.client_id))
        return original(model, client, **kwargs)

    monkeypatch.setattr(client_module, "train_locally", counting)
    grid = InProcessGrid(client_app, num_nodes=2)
    run_federation(grid, TWO_CLIENTS_DATA_FREE, run_dir=None)
    assert sorted(trained) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # The note that the query trained the teacher is used up by the train message.
    assert all("teacher-round" not in grid.context(node).state for node in (1, 2))


@pytest.mark.slow
def test_warm_steps_keep_each_clients_generator_and_continue_it_the_next_round(monkeypatch):
    from generators.amortized import AmortizedGenerator

    fits: list[tuple[int, bool]] = []
    original = AmortizedGenerator.fit

    def recording(self, *, generator, student=None, start=None):
        fits.append((self.config.steps, start is not None))
        return original(self, generator=generator, student=student, start=start)

    monkeypatch.setattr(AmortizedGenerator, "fit", recording)
    config = dataclasses.replace(
        TWO_CLIENTS_DATA_FREE, rounds=3, synthesis=SynthesisConfig(per_client=10, steps=5, warm_steps=2)
    )
    grid = InProcessGrid(client_app, num_nodes=2)
    rows = run_federation(grid, config, run_dir=None)
    assert [row["synthetic_inputs"] for row in rows] == [20, 20, 20]
    # Round 1 trains each generator from scratch, rounds 2 and 3 continue the kept one.
    assert fits == [(5, False)] * 2 + [(2, True)] * 4
    assert all("generator" in grid.context(node).state for node in (1, 2))


def test_warm_steps_are_only_for_the_generator_method():
    with pytest.raises(ValueError, match="synthesis.warm_steps=0"):
        SynthesisConfig(method="deepinversion")  # the default keeps a generator, which this method has not
    assert SynthesisConfig(method="deepinversion", warm_steps=0).warm_steps == 0
    with pytest.raises(ValueError, match="≥ 0"):
        SynthesisConfig(warm_steps=-1)


@pytest.mark.slow
def test_bad_synthetic_inputs_are_rejected_and_counted_and_the_round_goes_on():
    from flwr.clientapp import ClientApp

    import federation.client_app as honest

    app = ClientApp()

    @app.query("synthesize")
    def synthesize(message, context):
        reply = honest.synthesize(message, context)
        if int(context.node_config["partition-id"]) == 0:
            images = reply.content[SYNTHETIC_KEY][TRANSFER_IMAGES].numpy()
            reply.content[SYNTHETIC_KEY] = ArrayRecord({TRANSFER_IMAGES: Array(images.astype(np.float32))})
        return reply

    app.train()(honest.train)
    config = RunConfig(
        dataset="digits",
        num_clients=3,
        rounds=1,
        local_epochs=1,
        distill_epochs=1,
        partition=PartitionConfig(scheme="iid"),
        transfer="synthetic",
        synthesis=SynthesisConfig(per_client=10, steps=5),
        student_model="cnn_small",
    )
    (row,) = run_federation(InProcessGrid(app, num_nodes=3), config, run_dir=None)
    assert row["rejected"] == 1
    assert row["synthetic_inputs"] == 20 and row["clients"] == 3


@pytest.mark.slow
def test_flowers_ray_engine_runs_the_data_free_mode(tmp_path):
    from federation.sim import simulate

    config = RunConfig(
        dataset="digits",
        num_clients=2,
        rounds=1,
        local_epochs=1,
        distill_epochs=1,
        partition=PartitionConfig(scheme="iid"),
        transfer="synthetic",
        synthesis=SynthesisConfig(per_client=10, steps=5),
        student_model="cnn_small",
        engine="flower-ray",
    )
    (row,) = simulate(config, run_dir=tmp_path)
    assert row["synthetic_inputs"] == 20 and row["clients"] == 2 and row["failed"] == 0
