"""privacy=dpsgd's teacher recipe: the tanh CNN, and the privacy group's DP-SGD settings reaching
the clients (architecture, epochs, logical batch, learning rate, momentum, clip, augmentation) and
their noise plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.validators import ModuleValidator

from experiments import dpsgd_central as central
from federation.client_app import ClientRound, restore_teacher, train_locally
from fedkd.config import ClientTask, RunConfig, StrategyConfig, run_config_from_flower, run_config_to_flower
from fedkd.messages import TASK_KEY
from fedkd.models import NORMALIZATION_FREE_MODELS, TanhCNN, build_model, count_parameters
from fedkd.privacy import client as client_privacy
from fedkd.privacy.client import client_ledger, noise_plan
from fedkd.privacy.config import PrivacyConfig
from fedkd.privacy.dpsgd import batches_per_epoch, calibrate_for_run, make_private_compatible
from fedkd.results import RunFolder, read_config
from generators.hooks import normalization_layers

DPSGD = PrivacyConfig(mechanism="dpsgd", local_epochs=1)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a Flower runtime need the sender's identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


TINY = RunConfig(num_clients=4, public_size=200, local_epochs=1, rounds=2, privacy=DPSGD)


def _client(run: RunConfig, client_id: int = 0) -> ClientRound:
    context = Context(
        run_id=1,
        node_id=client_id + 1,
        state=RecordDict(),
        run_config={},
        node_config={"partition-id": client_id, "num-partitions": run.num_clients},
    )
    task = ClientTask(mode="soft-labels", server_round=1, run=run)
    message = Message(
        RecordDict({TASK_KEY: ConfigRecord(task.to_record())}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    return ClientRound(message, context, task, client_id=client_id, data_root=None)


# --- the model ------------------------------------------------------------------------------


def test_tanh_cnn_is_the_central_baselines_model():
    """One definition: the federated teachers and experiments/dpsgd_central.py share it."""
    torch.manual_seed(7)
    central_model = central.build_model()
    registered = build_model("tanh_cnn", input_shape=(1, 28, 28), num_classes=10, seed=7)
    assert isinstance(central_model, TanhCNN) and type(registered) is TanhCNN
    for (name, a), (other, b) in zip(central_model.state_dict().items(), registered.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)
    assert 25_000 < count_parameters(registered) < 27_000  # Papernot et al.: about 26 k


def test_tanh_cnn_needs_no_substitute_layer_for_dp_sgd():
    model = build_model("tanh_cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert ModuleValidator.is_valid(model) and make_private_compatible(model) is model
    assert not normalization_layers(model) and "tanh_cnn" in NORMALIZATION_FREE_MODELS
    activations = {type(m) for m in model.modules() if not list(m.children())} - {
        torch.nn.Conv2d,
        torch.nn.Linear,
        torch.nn.MaxPool2d,
        torch.nn.Flatten,
    }
    assert activations == {torch.nn.Tanh}


# --- configuration --------------------------------------------------------------------------


def test_the_dpsgd_group_file_takes_the_recipe_from_the_dataclass():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "conf" / "privacy" / "dpsgd.yaml"
    values = yaml.safe_load(path.read_text())
    # The DP-SGD recipe itself comes from PrivacyConfig; beside the mechanism the group only pins
    # the student settings its results were measured with.
    assert values.pop("privacy") == {"mechanism": "dpsgd"}
    assert values == {"temperature": 1.0, "distill_epochs": 5, "augment_shift": 0.1, "distill_ema": 0.0}
    recipe = PrivacyConfig(mechanism="dpsgd")
    assert (recipe.teacher_model, recipe.momentum, recipe.max_grad_norm, recipe.augment_shift) == (
        "tanh_cnn",
        0.9,
        0.1,
        0.0,
    )


def test_the_recipe_travels_in_flowers_run_config():
    run = dataclasses.replace(
        TINY,
        privacy=PrivacyConfig(mechanism="dpsgd", teacher_model="client_models", batch_size=64, lr=0.25, momentum=0.5),
    )
    flat = run_config_to_flower(run)
    assert (flat["privacy-teacher-model"], flat["privacy-batch-size"], flat["privacy-lr"]) == (
        "client_models",
        64,
        0.25,
    )
    assert run_config_from_flower(flat) == run


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(teacher_model="vgg99"), "privacy.teacher_model"),
        (dict(batch_size=0), "privacy.batch_size"),
        (dict(local_epochs=0), "privacy.local_epochs"),
        (dict(augment_shift=0.5), "privacy.augment_shift"),
        (dict(lr=0.0), "privacy.lr"),
        (dict(momentum=1.0), "privacy.momentum"),
        (dict(momentum=-0.1), "privacy.momentum"),
        (dict(max_grad_norm=0.0), "privacy.max_grad_norm"),
    ],
)
def test_bad_recipe_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrivacyConfig(mechanism="dpsgd", **kwargs)


def test_data_free_synthesis_needs_a_teacher_with_normalization_layers():
    with pytest.raises(ValueError, match="privacy.teacher_model=client_models"):
        RunConfig(privacy=DPSGD, transfer="synthetic")
    run = RunConfig(privacy=dataclasses.replace(DPSGD, teacher_model="client_models"), transfer="synthetic")
    assert run.releases_feature_statistics


# --- clients --------------------------------------------------------------------------------


def test_dpsgd_replaces_client_models_with_the_teacher_model():
    run = dataclasses.replace(TINY, client_models=("cnn_small", "lenet5_bn"))
    for client_id in range(2):
        assert type(restore_teacher(_client(run, client_id))) is TanhCNN
    kept = dataclasses.replace(run, privacy=dataclasses.replace(DPSGD, teacher_model="client_models"))
    teachers = [restore_teacher(_client(kept, client_id)) for client_id in range(2)]
    assert [type(t).__name__ for t in teachers] == ["SmallCNN", "LeNet5BN"]
    assert all(isinstance(m, torch.nn.GroupNorm) for t in teachers for m in normalization_layers(t))
    # Without privacy the client architectures are untouched.
    assert type(restore_teacher(_client(dataclasses.replace(run, privacy=PrivacyConfig()), 0))).__name__ == "SmallCNN"


def test_default_teachers_are_cnn_fc_on_public_fashion_mnist_without_privacy_and_the_measured_pair_elsewhere(
    tmp_path,
):
    public = RunConfig(dataset="fashion_mnist", num_clients=4, public_size=200)
    assert public.client_models == ("auto",)
    # (Fashion-MNIST's files are not read by the unit tests: the clients' models follow teacher_models.)
    assert public.teacher_models == ("cnn_fc",)
    for run in (
        dataclasses.replace(public, transfer="synthetic"),
        # Resolved on use: a copy with a privacy mechanism gets that mechanism's teachers.
        dataclasses.replace(
            public, privacy=PrivacyConfig(mechanism="gaussian"), strategy=StrategyConfig(aggregator="weighted")
        ),
        # The digits keep the cheaper pair on public transfer too.
        dataclasses.replace(public, dataset="mnist"),
        dataclasses.replace(public, dataset="digits"),
    ):
        assert run.teacher_models == ("cnn_small", "lenet5_bn")
    digits = dataclasses.replace(public, dataset="digits")
    assert [type(restore_teacher(_client(digits, k))).__name__ for k in range(2)] == ["SmallCNN", "LeNet5BN"]
    # Architectures given explicitly are kept.
    assert RunConfig(dataset="fashion_mnist", client_models=("lenet5_bn",)).teacher_models == ("lenet5_bn",)
    # The run folder records the teachers the clients used, and a relaunch of the default still
    # finds its run there (not one with other teachers).
    folder = RunFolder(tmp_path)
    folder.write_config(public)
    assert read_config(tmp_path)["client_models"] == ["cnn_fc"]
    assert public.same_run(folder.stored_config())
    assert not dataclasses.replace(public, client_models=("lenet5_bn",)).same_run(folder.stored_config())


def test_the_noise_is_calibrated_for_the_privacy_groups_batch_and_epochs():
    run = dataclasses.replace(
        TINY, batch_size=32, local_epochs=3, privacy=dataclasses.replace(DPSGD, batch_size=100, local_epochs=4)
    )
    plan = noise_plan(run, num_examples=1000, feature_releases=0)
    assert plan == calibrate_for_run(
        target_epsilon=2.0, delta=1e-5, num_examples=1000, batch_size=100, epochs_in_run=2 * 4
    )
    assert plan != calibrate_for_run(
        target_epsilon=2.0, delta=1e-5, num_examples=1000, batch_size=32, epochs_in_run=2 * 3
    )


def test_teachers_train_with_the_privacy_groups_recipe(monkeypatch):
    privacy = dataclasses.replace(
        DPSGD, local_epochs=2, batch_size=50, lr=0.3, momentum=0.8, max_grad_norm=0.2, augment_shift=0.05
    )
    run = dataclasses.replace(TINY, local_epochs=1, lr=1e-3, batch_size=32, augment_shift=0.1, privacy=privacy)
    client = _client(run)
    seen = {}
    real = client_privacy.train_dp_sgd

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_privacy, "train_dp_sgd", spy)
    teacher = restore_teacher(client)
    before = [p.detach().clone() for p in teacher.parameters()]
    train_locally(teacher, client)
    assert (seen["settings"].lr, seen["settings"].batch_size) == (0.3, 50)
    assert (seen["epochs"], seen["momentum"], seen["max_grad_norm"], seen["max_shift"]) == (2, 0.8, 0.2, 0.05)
    batches = batches_per_epoch(len(client.partition), 50)
    ledger = client_ledger(client.state)
    sigma = noise_plan(run, num_examples=len(client.partition), feature_releases=0).training
    assert ledger.history == [(sigma, 1 / batches, 2 * batches)]
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


@pytest.mark.parametrize("name", ["cnn_small", "lenet5_bn", "tanh_cnn"])
def test_per_sample_gradients_of_a_private_teacher_add_up_to_its_batch_gradient(name):
    """Opacus's per-sample convolution gradients are wrong on build_model's channels-last
    weights (off by ~0.04 on cnn_small); make_private_compatible returns the standard layout."""
    from opacus import GradSampleModule

    model = GradSampleModule(
        make_private_compatible(build_model(name, input_shape=(1, 28, 28), num_classes=10, seed=0))
    )
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    for parameter in model.parameters():
        assert torch.allclose(parameter.grad_sample.sum(0) / len(inputs), parameter.grad, atol=1e-5)
