"""Flower ClientApp: trains the local teacher and answers with soft labels on the transfer set.

The handler is a thin adapter: read the task from the message, call the pure training and
prediction functions, pack the reply. The teacher persists between rounds in
``context.state`` (an ArrayRecord of its weights), which Flower keeps per node in simulation
and in a real SuperNode alike.

Node configuration keys: ``partition-id`` (which private partition this node holds),
``num-partitions`` (must equal the run's number of clients) and, optionally, ``data-root``
(where this node finds its data; overrides the server's setting).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.attacks import attacked_logits, flip_labels, malicious_clients
from fedkd.config import ClientTask, SplitSpec
from fedkd.distillation import (
    OptimizerSettings,
    class_mean_logits,
    distill,
    evaluate,
    predict_logits,
    soften,
    train_supervised,
    train_with_class_targets,
)
from fedkd.data import DatasetInfo, to_tensor, to_uint8
from fedkd.local_data import LabeledTensors, evaluation_split, info_for, private_partition, public_inputs
from fedkd.messages import (
    CLASS_LOGITS_KEY,
    CLIENT_ID,
    COUNTS,
    LOGITS,
    CONSENSUS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SOFT_LABELS_ARRAY,
    TASK_KEY,
    TRANSFER_IMAGES,
    TRANSFER_INDICES,
    TRANSFER_KEY,
    WEIGHTS_KEY,
    class_logits_record,
    soft_label_reply,
    synthetic_reply,
)
from fedkd.models import build_model, model_for_client
from fedkd.privacy.accountant import PrivacyLedger
from fedkd.privacy.dpsgd import NoisePlan, calibrate_for_run, make_private_compatible, train_dp_sgd
from fedkd.privacy.feature_statistics import (
    per_sample_moments,
    reference_scales,
    release_feature_statistics,
    statistics_layout,
)
from fedkd.privacy.mechanisms import clip_rows, gaussian_noise_share, one_hot
from fedkd.seeding import (
    ATTACK_NOISE,
    CLIENT_NOISE,
    FEATURE_NOISE,
    FEATURE_REFERENCE,
    SYNTHESIS,
    TEACHER_DIGEST,
    TEACHER_INIT,
    TEACHER_TRAIN,
    derive_seed,
    numpy_generator,
    torch_generator,
)
from generators.hooks import SuppliedStatistics
from generators.registry import build_synthesizer

TEACHER_STATE = "teacher"
# Which round the stored teacher was trained in, with that training's examples and loss: with
# synthetic transfer a client hears twice per round (synthesize, then label) but trains once.
TEACHER_ROUND_STATE = "teacher-round"
# The client's DP-SGD ledger: every noisy step of every round so far (privacy=dpsgd).
PRIVACY_LEDGER_STATE = "privacy-ledger"

app = ClientApp()


@dataclass(frozen=True)
class NodeIdentity:
    client_id: int
    data_root: str | None


def node_identity(context: Context, task: ClientTask) -> NodeIdentity:
    """Which partition this node holds, checked against the task."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError(
            "node config lacks 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=<k> num-partitions=<n>'."
        )
    num_partitions = int(node_config.get("num-partitions", task.num_clients))
    if num_partitions != task.num_clients:
        raise ValueError(
            f"this node holds partition {node_config['partition-id']} of num-partitions="
            f"{num_partitions} but the run expects num-clients={task.num_clients}; make them "
            f"equal: flwr run . --federation-config \"num-supernodes={task.num_clients}\" or "
            f"--run-config \"num-clients={num_partitions}\" (a deployment: start each SuperNode "
            f"with --node-config 'partition-id=<k> num-partitions={task.num_clients}')."
        )
    data_root = node_config.get("data-root")
    return NodeIdentity(int(node_config["partition-id"]), str(data_root) if data_root else None)


def _train_locally(
    model: torch.nn.Module, task: ClientTask, identity: NodeIdentity, context: Context | None = None
) -> tuple[int, float]:
    """E local epochs on this client's private partition; returns (examples, last loss)."""
    partition = _nonempty_partition(task.split_spec(data_root=identity.data_root), identity.client_id)
    training = dict(
        epochs=task.local_epochs,
        settings=OptimizerSettings(lr=task.lr, batch_size=task.batch_size),
        generator=torch_generator(task.seed, task.server_round, identity.client_id, TEACHER_TRAIN),
        max_shift=task.augment_shift,
    )
    if _attacks(task, identity) == "flip":
        num_classes = info_for(task.split_spec(data_root=identity.data_root)).num_classes
        partition = LabeledTensors(partition.images, flip_labels(partition.labels, num_classes))
    if task.privacy_mechanism == "dpsgd":
        assert context is not None, "DP-SGD keeps its ledger in the node's context"
        return len(partition), _train_privately(model, partition, task, context, **training)
    return len(partition), train_supervised(model, partition.images, partition.labels, **training)


def _attacks(task: ClientTask, identity: NodeIdentity) -> str:
    """The attack this client runs (``"none"`` for an honest client)."""
    if task.attack_kind == "none":
        return "none"
    malicious = malicious_clients(task.num_clients, task.attack_fraction, task.seed)
    return task.attack_kind if identity.client_id in malicious else "none"


def _train_privately(
    model: torch.nn.Module, partition: LabeledTensors, task: ClientTask, context: Context, **training: Any
) -> float:
    """DP-SGD with noise calibrated for every epoch of the whole run; the ledger persists in
    ``context.state``, so this client's ε accumulates across rounds."""
    ledger = client_ledger(context)
    loss = train_dp_sgd(
        model,
        partition.images,
        partition.labels,
        noise_multiplier=_noise_plan(task, len(partition)).training,
        max_grad_norm=task.privacy_max_grad_norm,
        ledger=ledger,
        **training,
    )
    context.state[PRIVACY_LEDGER_STATE] = ConfigRecord(ledger.to_record())
    return loss


def _noise_plan(task: ClientTask, num_examples: int) -> NoisePlan:
    return calibrate_for_run(
        target_epsilon=task.privacy_epsilon,
        delta=task.privacy_delta,
        num_examples=num_examples,
        batch_size=task.batch_size,
        epochs_in_run=task.rounds * task.local_epochs,
        feature_releases=task.privacy_feature_releases,
    )


def _private_feature_statistics(
    teacher: torch.nn.Module, task: ClientTask, identity: NodeIdentity, context: Context, info: DatasetInfo
) -> SuppliedStatistics:
    """This round's feature statistics of the private partition, released under the Gaussian
    mechanism and recorded in the client's ledger beside its DP-SGD steps."""
    partition = _nonempty_partition(task.split_spec(data_root=identity.data_root), identity.client_id)
    noise_multiplier = _noise_plan(task, len(partition)).features
    statistics = release_feature_statistics(
        per_sample_moments(teacher, partition.images),
        statistics_layout(teacher),
        scales=reference_scales(
            teacher,
            input_shape=info.input_shape,
            pixel_mean=info.mean,
            pixel_std=info.std,
            generator=torch_generator(task.seed, task.server_round, identity.client_id, FEATURE_REFERENCE),
        ),
        clip_norm=task.privacy_feature_clip_norm,
        noise_multiplier=noise_multiplier,
        rng=numpy_generator(task.seed, task.server_round, identity.client_id, FEATURE_NOISE),
    )
    if noise_multiplier > 0:
        ledger = client_ledger(context)
        ledger.record(noise_multiplier=noise_multiplier, sample_rate=1.0)
        context.state[PRIVACY_LEDGER_STATE] = ConfigRecord(ledger.to_record())
    return statistics


def client_ledger(context: Context) -> PrivacyLedger:
    """This node's DP-SGD ledger (empty before its first private round)."""
    if PRIVACY_LEDGER_STATE not in context.state:
        return PrivacyLedger()
    return PrivacyLedger.from_record(context.state[PRIVACY_LEDGER_STATE])


def _nonempty_partition(spec: SplitSpec, client_id: int) -> LabeledTensors:
    partition = private_partition(spec, client_id)
    if len(partition) == 0:
        # Dirichlet splits with small alpha and many clients can leave a client with nothing;
        # an untrained teacher's guesses would only add noise to the aggregate.
        raise ValueError(
            f"client {client_id} holds no private examples (partition {spec.scheme}, "
            f"alpha={spec.alpha}, {spec.num_clients} clients); it sits this round out."
        )
    return partition


def _restore_teacher(task: ClientTask, identity: NodeIdentity, context: Context) -> torch.nn.Module:
    """This client's teacher as it was at the end of its last round (fresh in round 1)."""
    info = info_for(task.split_spec(data_root=identity.data_root))
    teacher = build_model(
        model_for_client(task.client_models, identity.client_id),
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        seed=derive_seed(task.seed, identity.client_id, TEACHER_INIT),
    )
    if task.privacy_mechanism == "dpsgd":
        teacher = make_private_compatible(teacher)
    if TEACHER_STATE in context.state:
        teacher.load_state_dict(context.state[TEACHER_STATE].to_torch_state_dict())
    return teacher


def _digest(teacher: torch.nn.Module, consensus: ArrayRecord, task: ClientTask, identity: NodeIdentity) -> None:
    """Fit the teacher to the server's aggregated soft labels on their transfer inputs."""
    positions = consensus[TRANSFER_INDICES].numpy()
    targets = torch.from_numpy(consensus[SOFT_LABELS_ARRAY].numpy().copy())
    inputs = public_inputs(task.split_spec(data_root=identity.data_root), positions).images
    distill(
        teacher,
        inputs,
        targets,
        epochs=task.digest_epochs,
        temperature=task.temperature,
        settings=OptimizerSettings(lr=task.lr, batch_size=task.batch_size),
        generator=torch_generator(task.seed, task.server_round, identity.client_id, TEACHER_DIGEST),
        max_shift=task.augment_shift,
    )


def _teacher_for_round(
    message: Message, context: Context, task: ClientTask, identity: NodeIdentity, *, remember: bool
) -> tuple[torch.nn.Module, int, float]:
    """This round's teacher, trained now unless the synthesize query already trained it.

    ``remember`` (the query) leaves a note that the round's training is done; the train message
    that follows uses the note up, so a later run in the same context trains afresh.
    Returns the teacher, the number of private examples and the last training loss.
    """
    teacher = _restore_teacher(task, identity, context)
    done = context.state.get(TEACHER_ROUND_STATE)
    if not remember and TEACHER_ROUND_STATE in context.state:
        del context.state[TEACHER_ROUND_STATE]
    if isinstance(done, ConfigRecord) and int(done["round"]) == task.server_round:
        return teacher, int(done["num-examples"]), float(done["train-loss"])
    if CONSENSUS_KEY in message.content:
        _digest(teacher, message.content[CONSENSUS_KEY], task, identity)
    num_examples, loss = _train_locally(teacher, task, identity, context)
    context.state[TEACHER_STATE] = ArrayRecord(teacher.state_dict())
    if remember:
        context.state[TEACHER_ROUND_STATE] = ConfigRecord(
            {"round": task.server_round, "num-examples": num_examples, "train-loss": float(loss)}
        )
    return teacher, num_examples, loss


def _transfer_inputs(message: Message, task: ClientTask, identity: NodeIdentity) -> torch.Tensor:
    """The inputs to label: sent by value (synthetic pool) or as indices into the public set."""
    record = message.content[TRANSFER_KEY]
    spec = task.split_spec(data_root=identity.data_root)
    if TRANSFER_IMAGES in record:
        return to_tensor(record[TRANSFER_IMAGES].numpy(), info_for(spec))
    return public_inputs(spec, record[TRANSFER_INDICES].numpy()).images


def _soft_labels(message: Message, context: Context, task: ClientTask, identity: NodeIdentity) -> RecordDict:
    teacher, num_examples, loss = _teacher_for_round(message, context, task, identity, remember=False)
    logits = attacked_logits(
        predict_logits(teacher, _transfer_inputs(message, task, identity)),
        _attacks(task, identity),
        scale=task.attack_scale,
        generator=torch_generator(task.seed, task.server_round, identity.client_id, ATTACK_NOISE),
    )
    probs = soften(logits, task.temperature).numpy()
    epsilon = None
    if task.privacy_mechanism == "dpsgd":
        # Training without noise (ε = inf) records nothing: its guarantee is none, not zero.
        no_noise = math.isinf(task.privacy_epsilon)
        epsilon = math.inf if no_noise else client_ledger(context).epsilon(task.privacy_delta)
    return soft_label_reply(
        _shared_rows(probs, task, identity),
        num_examples=num_examples,
        client_id=identity.client_id,
        train_loss=loss,
        epsilon=epsilon,
    )


def _shared_rows(probs: np.ndarray, task: ClientTask, identity: NodeIdentity) -> np.ndarray:
    """What leaves the client for the transfer inputs under the run's privacy mechanism."""
    if task.privacy_mechanism == "gnmax":
        return one_hot(probs.argmax(axis=-1), probs.shape[-1])  # a vote, nothing more
    if task.privacy_mechanism == "gaussian" and task.privacy_noise_std > 0:
        clipped = clip_rows(probs, task.privacy_clip_norm)
        noise = gaussian_noise_share(
            clipped.shape,
            noise_std=task.privacy_noise_std,
            num_shares=task.privacy_noise_shares,
            rng=numpy_generator(task.seed, task.server_round, identity.client_id, CLIENT_NOISE),
        )
        return (clipped + noise).astype(np.float32)
    return probs


def _weights(message: Message, task: ClientTask, identity: NodeIdentity) -> RecordDict:
    """FedAvg's local step: start from the global weights, train, send the weights back."""
    spec = task.split_spec(data_root=identity.data_root)
    info = info_for(spec)
    model = build_model(task.student_model, input_shape=info.input_shape, num_classes=info.num_classes)
    model.load_state_dict(message.content[WEIGHTS_KEY].to_torch_state_dict())
    num_examples, loss = _train_locally(model, task, identity)
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, CLIENT_ID: identity.client_id, "train-loss": loss})
    return RecordDict({WEIGHTS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})


def _class_logits(message: Message, context: Context, task: ClientTask, identity: NodeIdentity) -> RecordDict:
    """FD's local step: train toward the global per-class logits, reply with this client's own."""
    teacher = _restore_teacher(task, identity, context)
    spec = task.split_spec(data_root=identity.data_root)
    num_classes = info_for(spec).num_classes
    class_probs = None
    if CLASS_LOGITS_KEY in message.content:
        record = message.content[CLASS_LOGITS_KEY]
        global_logits = torch.from_numpy(record[LOGITS].numpy().copy())
        missing = torch.from_numpy(record[COUNTS].numpy() == 0)
        class_probs = soften(torch.nan_to_num(global_logits), task.temperature)
        class_probs[missing] = float("nan")
    partition = _nonempty_partition(spec, identity.client_id)
    loss = train_with_class_targets(
        teacher,
        partition.images,
        partition.labels,
        class_probs=class_probs,
        weight=task.regularizer_weight,
        temperature=task.temperature,
        epochs=task.local_epochs,
        settings=OptimizerSettings(lr=task.lr, batch_size=task.batch_size),
        generator=torch_generator(task.seed, task.server_round, identity.client_id, TEACHER_TRAIN),
        max_shift=task.augment_shift,
    )
    context.state[TEACHER_STATE] = ArrayRecord(teacher.state_dict())
    logits, counts = class_mean_logits(teacher, partition.images, partition.labels, num_classes=num_classes)
    metrics = MetricRecord({NUM_EXAMPLES: len(partition), CLIENT_ID: identity.client_id, "train-loss": loss})
    return RecordDict(
        {CLASS_LOGITS_KEY: class_logits_record(logits.numpy(), counts.numpy()), METRICS_KEY: metrics}
    )


def _class_counts(task: ClientTask, identity: NodeIdentity, num_classes: int) -> torch.Tensor:
    partition = _nonempty_partition(task.split_spec(data_root=identity.data_root), identity.client_id)
    return torch.bincount(partition.labels, minlength=num_classes).to(torch.float64)


@app.query("synthesize")
def synthesize(message: Message, context: Context) -> Message:
    """Invert this round's teacher into synthetic inputs (data-free transfer); no real data leaves."""
    torch.set_num_threads(1)
    task = ClientTask.from_record(message.content[TASK_KEY])
    identity = node_identity(context, task)
    torch.manual_seed(derive_seed(task.seed, task.server_round, identity.client_id, TEACHER_TRAIN))
    teacher, _, _ = _teacher_for_round(message, context, task, identity, remember=True)
    info = info_for(task.split_spec(data_root=identity.data_root))
    started = time.perf_counter()
    statistics = None
    if task.privacy_feature_releases:
        statistics = _private_feature_statistics(teacher, task, identity, context, info)
    synthesizer = build_synthesizer(
        task.synthesis_method,
        teacher,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        steps=task.synthesis_steps,
        pixel_mean=info.mean,
        pixel_std=info.std,
        statistics=statistics,
        # Synthesize the classes this teacher learned, in the proportions it saw them; the
        # proportions stay on the client (the reply carries unlabelled images only).
        class_prior=_class_counts(task, identity, info.num_classes).tolist(),
    )
    images, _ = synthesizer.sample(
        task.synthesis_per_client,
        generator=torch_generator(task.seed, task.server_round, identity.client_id, SYNTHESIS),
    )
    reply = synthetic_reply(
        to_uint8(images, info), client_id=identity.client_id, seconds=time.perf_counter() - started
    )
    return Message(reply, reply_to=message)


@app.evaluate()
def evaluate_teacher(message: Message, context: Context) -> Message:
    """Accuracy of this client's own model on the test split (for strategies without a student)."""
    torch.set_num_threads(1)
    task = ClientTask.from_record(message.content[TASK_KEY])
    identity = node_identity(context, task)
    if TEACHER_STATE not in context.state:
        raise ValueError("this client has not trained a model yet; evaluate after a train round.")
    teacher = _restore_teacher(task, identity, context)
    test = evaluation_split(task.split_spec(data_root=identity.data_root))
    result = evaluate(teacher, test.images, test.labels)
    metrics = MetricRecord(
        {"accuracy": result.accuracy, "loss": result.loss, NUM_EXAMPLES: len(test), CLIENT_ID: identity.client_id}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train locally; reply with soft labels (distillation) or weights (FedAvg baseline)."""
    # Simulated clients share the machine's cores; intra-op threads would only contend.
    torch.set_num_threads(1)
    task = ClientTask.from_record(message.content[TASK_KEY])
    identity = node_identity(context, task)
    # Dropout draws from the global stream; seed it so a client's round is reproducible.
    torch.manual_seed(derive_seed(task.seed, task.server_round, identity.client_id, TEACHER_TRAIN))
    if task.mode == "soft-labels":
        return Message(_soft_labels(message, context, task, identity), reply_to=message)
    if task.mode == "weights":
        return Message(_weights(message, task, identity), reply_to=message)
    if task.mode == "class-logits":
        return Message(_class_logits(message, context, task, identity), reply_to=message)
    raise ValueError(
        f"unknown task mode {task.mode!r}; expected 'soft-labels', 'weights' or 'class-logits'."
    )
