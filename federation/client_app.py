"""Flower ClientApp: trains the local teacher and answers with soft labels on the transfer set.

Each handler opens a :class:`ClientRound` (the task, this node's identity and state, and its
seeded random streams), calls the pure training and prediction functions, and packs the reply.
The teacher persists between rounds in ``context.state`` (an ArrayRecord of its weights), which
Flower keeps per node in simulation and in a real SuperNode alike. Privacy (DP-SGD, private
feature statistics, what leaves a client under each mechanism) is :mod:`fedkd.privacy.client`.

Node configuration keys: ``partition-id`` (which private partition this node holds),
``num-partitions`` (must equal the run's number of clients) and, optionally, ``data-root``
(where this node finds its data; overrides the server's setting).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.teacher_cache import CachedTeacher, TeacherCache, entry_key
from fedkd.attacks import attacked_logits, collusion, flip_labels, malicious_clients
from fedkd.config import ClientTask, RunConfig, SplitSpec
from fedkd.data import DatasetInfo, to_tensor, to_uint8
from fedkd.data.local import LabeledTensors, evaluation_split, info_for, private_partition, public_inputs
from fedkd.distillation import (
    OptimizerSettings,
    class_mean_logits,
    distill,
    evaluate,
    lacked_classes,
    lacked_mass,
    predict_logits,
    soften,
    train_supervised,
    train_with_class_targets,
    train_with_consensus,
)
from fedkd.faults import SimulatedCrash, crashed_clients
from fedkd.messages import (
    CLASS_LOGITS_KEY,
    CLIENT_ID,
    CONSENSUS_KEY,
    COUNTS,
    LOGITS,
    METRICS_KEY,
    NUM_EXAMPLES,
    TASK_KEY,
    TRANSFER_IMAGES,
    TRANSFER_INDICES,
    TRANSFER_KEY,
    WEIGHTS_KEY,
    class_logits_record,
    consensus_targets,
    mixup_pairs,
    number,
    soft_label_reply,
    synthetic_reply,
)
from fedkd.mixup import mix
from fedkd.models import build_model, model_for_client
from fedkd.privacy import client as client_privacy
from fedkd.privacy.dpsgd import make_private_compatible
from fedkd.seeding import SeedPurpose, derive_seed, numpy_generator, torch_generator
from generators.amortized import AmortizedGenerator
from generators.registry import build_synthesizer
from strategies.aggregation import PER_CLASS_WEIGHTS, class_counts
from strategies.registry import get_spec

TEACHER_STATE = "teacher"
# Which round the stored teacher was trained in, with that training's examples and loss: with
# synthetic transfer a client hears twice per round (synthesize, then label) but trains once.
TEACHER_ROUND_STATE = "teacher-round"
# synthesis.warm_steps > 0: the client's generator, kept for its next round (never sent).
GENERATOR_STATE = "generator"

app = ClientApp()


@dataclass
class ClientRound:
    """One message's work on one node: the round's task, which partition the node holds, where
    its data lives, its persistent state, and its seeded random streams."""

    message: Message
    context: Context
    task: ClientTask
    client_id: int
    data_root: str | None

    @classmethod
    def open(cls, message: Message, context: Context) -> ClientRound:
        """Read the task and check it against this node's configuration."""
        # Simulated clients share the machine's cores; intra-op threads would only contend.
        torch.set_num_threads(1)
        task = ClientTask.from_record(message.content[TASK_KEY])
        node_config = context.node_config
        if "partition-id" not in node_config:
            raise ValueError(
                "node config lacks 'partition-id'; start the SuperNode with "
                "--node-config 'partition-id=<k> num-partitions=<n>'."
            )
        num_clients = task.run.num_clients
        num_partitions = int(node_config.get("num-partitions", num_clients))
        if num_partitions != num_clients:
            raise ValueError(
                f"this node holds partition {node_config['partition-id']} of num-partitions="
                f"{num_partitions} but the run expects num-clients={num_clients}; make them "
                f'equal: flwr run . --federation-config "num-supernodes={num_clients}" or '
                f'--run-config "num-clients={num_partitions}" (a deployment: start each SuperNode '
                f"with --node-config 'partition-id=<k> num-partitions={num_clients}')."
            )
        data_root = node_config.get("data-root")
        client_id = int(node_config["partition-id"])
        crash_fraction = task.run.failure.crash_fraction
        if crash_fraction > 0 and client_id in crashed_clients(
            num_clients, crash_fraction, task.run.seed, task.server_round
        ):
            raise SimulatedCrash(f"client {client_id} crashes in round {task.server_round} (failure.crash_fraction).")
        opened = cls(message, context, task, client_id, str(data_root) if data_root else None)
        # Dropout draws from the global stream; seed it so a client's round is reproducible.
        torch.manual_seed(opened.seed(SeedPurpose.TEACHER_TRAIN))
        return opened

    @property
    def run(self) -> RunConfig:
        return self.task.run

    @property
    def state(self) -> RecordDict:
        return self.context.state

    @functools.cached_property
    def split(self) -> SplitSpec:
        return self.run.split_spec(data_root=self.data_root)

    @functools.cached_property
    def info(self) -> DatasetInfo:
        return info_for(self.split)

    @functools.cached_property
    def partition(self) -> LabeledTensors:
        """This client's private examples (an empty partition sits the round out)."""
        partition = private_partition(self.split, self.client_id)
        if len(partition) == 0:
            # Dirichlet splits with small alpha and many clients can leave a client with nothing;
            # an untrained teacher's guesses would only add noise to the aggregate.
            raise ValueError(
                f"client {self.client_id} holds no private examples (partition {self.split.scheme}, "
                f"alpha={self.split.alpha}, {self.split.num_clients} clients); it sits this round out."
            )
        return partition

    @functools.cached_property
    def attack(self) -> str:
        """The attack this client runs (``"none"`` for an honest client)."""
        attack = self.run.attack
        if attack.kind == "none":
            return "none"
        malicious = malicious_clients(self.run.num_clients, attack.fraction, self.run.seed)
        return attack.kind if self.client_id in malicious else "none"

    @property
    def settings(self) -> OptimizerSettings:
        return OptimizerSettings(lr=self.run.lr, batch_size=self.run.batch_size)

    def seed(self, purpose: SeedPurpose) -> int:
        return derive_seed(self.run.seed, self.task.server_round, self.client_id, purpose)

    def generator(self, purpose: SeedPurpose) -> torch.Generator:
        return torch_generator(self.run.seed, self.task.server_round, self.client_id, purpose)

    def rng(self, purpose: SeedPurpose) -> np.random.Generator:
        return numpy_generator(self.run.seed, self.task.server_round, self.client_id, purpose)

    def reply(self, content: RecordDict) -> Message:
        return Message(content, reply_to=self.message)


def train_locally(
    model: torch.nn.Module,
    client: ClientRound,
    *,
    partition: LabeledTensors | None = None,
    teacher: int = 0,
    consensus: ArrayRecord | None = None,
) -> float:
    """E local epochs on this client's private partition (or one teacher's shard of it), learning
    the server's consensus on the public inputs alongside where it came down and
    ``strategy.consensus_weight`` > 0 (co-distillation); returns the last epoch's loss."""
    partition = client.partition if partition is None else partition
    if client.attack == "flip":
        partition = LabeledTensors(partition.images, flip_labels(partition.labels, client.info.num_classes))
    if client.run.privacy.mechanism == "dpsgd":
        return client_privacy.train_privately(
            model,
            partition,
            client.run,
            client.state,
            feature_releases=client.task.feature_releases,
            generator=client.generator(SeedPurpose.TEACHER_TRAIN),
        )
    strategy, weight = client.run.strategy, client.run.consensus_weight
    if consensus is not None and weight > 0:
        positions, probs = consensus_targets(consensus)
        targets = torch.from_numpy(probs)
        input_weights = None
        if strategy.consensus_lacked_share > 0:
            counts = torch.bincount(partition.labels, minlength=client.info.num_classes)
            input_weights = lacked_mass(targets, lacked_classes(counts, share=strategy.consensus_lacked_share))
        return train_with_consensus(
            model,
            partition.images,
            partition.labels,
            public_inputs(client.split, positions).images,
            targets,
            weight=weight,
            input_weights=input_weights,
            temperature=client.run.temperature,
            epochs=client.run.local_epochs,
            settings=client.settings,
            generator=teacher_generator(client, teacher),
            max_shift=client.run.augment_shift,
        )
    return train_supervised(
        model,
        partition.images,
        partition.labels,
        epochs=client.run.local_epochs,
        settings=client.settings,
        generator=teacher_generator(client, teacher),
        max_shift=client.run.augment_shift,
    )


def teacher_generator(client: ClientRound, teacher: int) -> torch.Generator:
    # Teacher 0 keeps the stream a one-teacher client always had.
    if teacher == 0:
        return client.generator(SeedPurpose.TEACHER_TRAIN)
    return torch_generator(
        client.run.seed, client.task.server_round, client.client_id, SeedPurpose.TEACHER_TRAIN, teacher
    )


def teacher_state_key(teacher: int) -> str:
    return TEACHER_STATE if teacher == 0 else f"{TEACHER_STATE}-{teacher}"


def restore_teacher(client: ClientRound, teacher_index: int = 0) -> torch.nn.Module:
    """This client's teacher (``teacher_index`` of its PATE teachers) as it was at the end of
    its last round (fresh in round 1)."""
    run = client.run
    per_client = run.privacy.teachers_per_client
    init = (run.seed, client.client_id, SeedPurpose.TEACHER_INIT) + ((teacher_index,) if teacher_index else ())
    # Architectures go round-robin over every teacher of the federation; DP-SGD teachers use
    # privacy.teacher_model.
    architecture = model_for_client(run.teacher_models, client.client_id * per_client + teacher_index)
    if run.privacy.mechanism == "dpsgd":
        architecture = client_privacy.teacher_architecture(run, client.client_id)
    teacher = build_model(
        architecture,
        input_shape=client.info.input_shape,
        num_classes=client.info.num_classes,
        seed=derive_seed(*init),
    )
    if run.privacy.mechanism == "dpsgd":
        teacher = make_private_compatible(teacher)
    stored = client.state.get(teacher_state_key(teacher_index))
    if isinstance(stored, ArrayRecord):
        teacher.load_state_dict(stored.to_torch_state_dict())
    return teacher


def digest(teacher: torch.nn.Module, consensus: ArrayRecord, client: ClientRound) -> None:
    """Fit the teacher to the server's aggregated soft labels on their transfer inputs."""
    positions, probs = consensus_targets(consensus)
    targets = torch.from_numpy(probs)
    distill(
        teacher,
        public_inputs(client.split, positions).images,
        targets,
        epochs=client.run.strategy.digest_epochs,
        temperature=client.run.temperature,
        settings=client.settings,
        generator=client.generator(SeedPurpose.TEACHER_DIGEST),
        max_shift=client.run.augment_shift,
    )


def teacher_for_round(client: ClientRound, *, remember: bool) -> tuple[torch.nn.Module, float]:
    """This round's teacher, trained now unless the synthesize query already trained it.

    ``remember`` (the query) leaves a note that the round's training is done; the train message
    that follows uses the note up, so a later run in the same context trains afresh.
    Returns the teacher and its last training loss.
    """
    teacher = restore_teacher(client)
    done = client.state.get(TEACHER_ROUND_STATE)
    if not remember and TEACHER_ROUND_STATE in client.state:
        del client.state[TEACHER_ROUND_STATE]
    if isinstance(done, ConfigRecord) and done["round"] == client.task.server_round:
        return teacher, number(done, "train-loss")
    consensus = client.message.content.get(CONSENSUS_KEY)
    consensus = consensus if isinstance(consensus, ArrayRecord) else None
    if consensus is not None and get_spec(client.run.strategy.name).digests_consensus:
        digest(teacher, consensus, client)
    loss = train_locally(teacher, client, consensus=consensus)
    client.state[TEACHER_STATE] = ArrayRecord(teacher.state_dict())
    if remember:
        client.state[TEACHER_ROUND_STATE] = ConfigRecord({"round": client.task.server_round, "train-loss": float(loss)})
    return teacher, loss


def indexed_inputs(client: ClientRound) -> torch.Tensor:
    """The transfer inputs sent by value (synthetic pool) or as indices into the public set."""
    record = client.message.content[TRANSFER_KEY]
    if TRANSFER_IMAGES in record:
        return to_tensor(record[TRANSFER_IMAGES].numpy(), client.info)
    return public_inputs(client.split, record[TRANSFER_INDICES].numpy()).images


def mixup_views(client: ClientRound) -> torch.Tensor | None:
    """The mixup views of public inputs the server asked for beside them (fedkd.mixup), if any."""
    pairs = mixup_pairs(client.message.content[TRANSFER_KEY])
    if pairs is None:
        return None
    first, second = public_inputs(client.split, pairs.first), public_inputs(client.split, pairs.second)
    return mix(first.images, second.images, pairs.weight)


def transfer_inputs(client: ClientRound) -> torch.Tensor:
    """Every input to label, in the order of the reply's rows: the indexed ones, then the views."""
    inputs, views = indexed_inputs(client), mixup_views(client)
    return inputs if views is None else torch.cat([inputs, views])


def logits_of_the_round(client: ClientRound) -> tuple[torch.Tensor, float]:
    """This round's teacher's logits on the transfer inputs and its last training loss; from
    the run's teacher cache when it keeps one and holds this teacher (federation.teacher_cache)."""
    if not client.run.teacher_cache:
        teacher, loss = teacher_for_round(client, remember=False)
        return with_views(teacher, predict_logits(teacher, indexed_inputs(client)), client), loss
    cache = TeacherCache(client.run.teacher_cache)
    content = client.message.content
    # Mixup views do not change how a teacher trains, so they stay out of the key: the cache keeps
    # the logits on the indexed inputs, and the views are labelled by the (cached) teacher.
    received = {"indices": content[TRANSFER_KEY][TRANSFER_INDICES].numpy()}
    consensus = content.get(CONSENSUS_KEY)
    if isinstance(consensus, ArrayRecord):
        received.update({f"consensus/{name}": array.numpy() for name, array in consensus.items()})
        # The teacher learns the consensus at the run's temperature, a setting the key otherwise skips.
        received["consensus/temperature"] = np.array(client.run.temperature)
    start = client.state.get(TEACHER_STATE)
    key = entry_key(
        client.run,
        server_round=client.task.server_round,
        client_id=client.client_id,
        flipped=client.attack == "flip",
        start=start if isinstance(start, ArrayRecord) else None,
        received=received,
    )
    cached = cache.load(key)
    if cached is not None:
        client.state[TEACHER_STATE] = ArrayRecord(cached.teacher)
        teacher, logits, loss = None, cached.logits, cached.train_loss
    else:
        teacher, loss = teacher_for_round(client, remember=False)
        logits = predict_logits(teacher, indexed_inputs(client))
        cache.store(key, CachedTeacher(teacher.state_dict(), logits, loss))
    if teacher is None and mixup_pairs(content[TRANSFER_KEY]) is not None:
        teacher = restore_teacher(client)  # the cached teacher, just put into the state
    return (logits if teacher is None else with_views(teacher, logits, client)), loss


def with_views(teacher: torch.nn.Module, logits: torch.Tensor, client: ClientRound) -> torch.Tensor:
    """``logits`` (on the indexed inputs) followed by the teacher's logits on any mixup views.

    Computed apart, with or without a teacher cache, so that both give the same numbers."""
    views = mixup_views(client)
    return logits if views is None else torch.cat([logits, predict_logits(teacher, views)])


def pate_votes(client: ClientRound) -> RecordDict:
    """PATE: train each of this client's teachers on its own disjoint shard and reply with the
    ``(N, C)`` count of their argmax votes (each row sums to ``privacy.teachers_per_client``)."""
    run = client.run
    inputs = transfer_inputs(client)
    counts = np.zeros((len(inputs), client.info.num_classes), dtype=np.float32)
    partition = client.partition
    shards = client_privacy.teacher_shards(
        len(partition),
        run.privacy.teachers_per_client,
        rng=numpy_generator(run.seed, client.client_id, SeedPurpose.TEACHER_SHARDS),
    )
    for index, shard in enumerate(shards):
        rows = torch.from_numpy(shard)
        teacher = restore_teacher(client, index)
        train_locally(
            teacher, client, partition=LabeledTensors(partition.images[rows], partition.labels[rows]), teacher=index
        )
        client.state[teacher_state_key(index)] = ArrayRecord(teacher.state_dict())
        votes = predict_logits(teacher, inputs).argmax(dim=-1).numpy()
        counts[np.arange(len(inputs)), votes] += 1.0
    # The training loss is a statistic of private data: it stays home.
    return soft_label_reply(counts, num_examples=len(partition), client_id=client.client_id, train_loss=None)


def soft_labels(client: ClientRound) -> RecordDict:
    if client.run.privacy.mechanism == "pate":
        return pate_votes(client)
    teacher_logits, loss = logits_of_the_round(client)
    logits = attacked_logits(
        teacher_logits,
        client.attack,
        scale=client.run.attack.scale,
        generator=client.generator(SeedPurpose.ATTACK_NOISE),
        plan=collusion(
            client.info.num_classes,
            seed=client.run.seed,
            server_round=client.task.server_round,
            lie_fraction=client.run.attack.lie_fraction,
        ),
    )
    probs = soften(logits, client.run.temperature).numpy()
    privacy = client.run.privacy
    shared = client_privacy.shared_rows(
        probs,
        client.run,
        noise_std=client.task.privacy_noise_std,
        noise_shares=client.task.privacy_noise_shares,
        rng=client.rng(SeedPurpose.CLIENT_NOISE),
    )
    return soft_label_reply(
        shared,
        # The partition size is the aggregation weight; under privacy=… public_sizes=false it is not sent.
        num_examples=len(client.partition) if not privacy.enabled or privacy.public_sizes else 1,
        client_id=client.client_id,
        # The training loss is a statistic of private data: it is noised by nothing, so it stays home.
        train_loss=None if privacy.enabled else loss,
        epsilon=client_privacy.reported_epsilon(client.run, client.state) if privacy.mechanism == "dpsgd" else None,
        class_counts=reported_class_counts(client) if client.run.aggregator in PER_CLASS_WEIGHTS else None,
    )


def reported_class_counts(client: ClientRound) -> list[int]:
    """The client's training examples per class, for ``strategy.aggregator=class_weighted``
    (never under a privacy mechanism: the configuration refuses that combination)."""
    if client.run.privacy.enabled:
        raise ValueError("class counts are not noised; strategy.aggregator=class_weighted needs privacy=none.")
    return [int(count) for count in class_counts(client.partition.labels.numpy(), client.info.num_classes)]


def weights(client: ClientRound) -> RecordDict:
    """FedAvg's local step: start from the global weights, train, send the weights back."""
    model = build_model(
        client.run.student_model, input_shape=client.info.input_shape, num_classes=client.info.num_classes
    )
    model.load_state_dict(client.message.content[WEIGHTS_KEY].to_torch_state_dict())
    loss = train_locally(model, client)
    metrics = MetricRecord({NUM_EXAMPLES: len(client.partition), CLIENT_ID: client.client_id, "train-loss": loss})
    return RecordDict({WEIGHTS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})


def class_logits(client: ClientRound) -> RecordDict:
    """FD's local step: train toward the others' per-class logits, reply with this client's own."""
    teacher = restore_teacher(client)
    run = client.run
    class_probs = None
    record = client.message.content.get(CLASS_LOGITS_KEY)
    if isinstance(record, ArrayRecord):
        global_logits = torch.from_numpy(record[LOGITS].numpy().copy())
        missing = torch.from_numpy(record[COUNTS].numpy() == 0)
        class_probs = soften(torch.nan_to_num(global_logits), run.temperature)
        class_probs[missing] = float("nan")
    partition = client.partition
    loss = train_with_class_targets(
        teacher,
        partition.images,
        partition.labels,
        class_probs=class_probs,
        weight=run.strategy.regularizer_weight,
        temperature=run.temperature,
        epochs=run.local_epochs,
        settings=client.settings,
        generator=client.generator(SeedPurpose.TEACHER_TRAIN),
        max_shift=run.augment_shift,
    )
    client.state[TEACHER_STATE] = ArrayRecord(teacher.state_dict())
    logits, counts = class_mean_logits(teacher, partition.images, partition.labels, num_classes=client.info.num_classes)
    metrics = MetricRecord({NUM_EXAMPLES: len(partition), CLIENT_ID: client.client_id, "train-loss": loss})
    return RecordDict({CLASS_LOGITS_KEY: class_logits_record(logits.numpy(), counts.numpy()), METRICS_KEY: metrics})


def class_prior(client: ClientRound) -> list[float]:
    """The class mix to synthesize. A teacher's own class counts are a statistic of its private
    data, so under privacy the mix is uniform (nothing about it is released); without privacy
    the teacher synthesizes the classes it learned in the proportions it saw them (the counts
    stay on the client: the reply carries unlabelled images only)."""
    num_classes = client.info.num_classes
    if client.run.privacy.enabled:
        return [1.0] * num_classes
    return torch.bincount(client.partition.labels, minlength=num_classes).to(torch.float64).tolist()


def proxy_student(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> torch.nn.Module:
    """The student a client's adversarial generator plays against (local, discarded afterwards)."""
    return build_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed)


def stored_generator(client: ClientRound) -> dict[str, torch.Tensor] | None:
    """The generator this client kept from its last synthesis (``synthesis.warm_steps`` > 0)."""
    stored = client.state.get(GENERATOR_STATE) if client.run.synthesis.warm_steps else None
    return stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) else None


@app.query("synthesize")
def synthesize(message: Message, context: Context) -> Message:
    """Invert this round's teacher into synthetic inputs (data-free transfer); no real data leaves."""
    client = ClientRound.open(message, context)
    teacher, _ = teacher_for_round(client, remember=True)
    started = time.perf_counter()
    statistics = None
    if client.task.feature_releases:
        statistics = client_privacy.private_feature_statistics(
            teacher,
            client.partition,
            client.run,
            client.state,
            info=client.info,
            feature_releases=client.task.feature_releases,
            reference_generator=client.generator(SeedPurpose.FEATURE_REFERENCE),
            noise_rng=client.rng(SeedPurpose.FEATURE_NOISE),
        )
    # Fast-DFKD's reuse: a kept generator already inverts last round's teacher, so it follows
    # this round's in synthesis.warm_steps steps instead of synthesis.steps from scratch.
    start = stored_generator(client)
    synthesizer = build_synthesizer(
        client.run.synthesis.method,
        teacher,
        input_shape=client.info.input_shape,
        num_classes=client.info.num_classes,
        steps=client.run.synthesis.steps if start is None else client.run.synthesis.warm_steps,
        pixel_mean=client.info.mean,
        pixel_std=client.info.std,
        statistics=statistics,
        class_prior=class_prior(client),
        proxy_student=functools.partial(
            proxy_student, client.run.synthesis.proxy_student, client.info.input_shape, client.info.num_classes
        ),
    )
    random = client.generator(SeedPurpose.SYNTHESIS)
    if client.run.synthesis.warm_steps:
        assert isinstance(synthesizer, AmortizedGenerator)  # SynthesisConfig allows warm_steps only for it
        synthesizer.fit(generator=random, start=start)
        assert synthesizer.network is not None
        client.state[GENERATOR_STATE] = ArrayRecord(synthesizer.network.state_dict())
    images, _ = synthesizer.sample(client.run.synthesis.per_client, generator=random)
    seconds = time.perf_counter() - started
    return client.reply(synthetic_reply(to_uint8(images, client.info), client_id=client.client_id, seconds=seconds))


@app.evaluate()
def evaluate_teacher(message: Message, context: Context) -> Message:
    """Accuracy of this client's own model on the test split (for strategies without a student).

    ``num-examples`` is the client's number of private training examples: the weight of its
    accuracy in the round's mean.
    """
    client = ClientRound.open(message, context)
    if TEACHER_STATE not in client.state:
        raise ValueError("this client has not trained a model yet; evaluate after a train round.")
    teacher = restore_teacher(client)
    test = evaluation_split(client.split)
    result = evaluate(teacher, test.images, test.labels)
    metrics = MetricRecord(
        {
            "accuracy": result.accuracy,
            "loss": result.loss,
            NUM_EXAMPLES: len(client.partition),
            CLIENT_ID: client.client_id,
        }
    )
    return client.reply(RecordDict({METRICS_KEY: metrics}))


HANDLERS = {"soft-labels": soft_labels, "weights": weights, "class-logits": class_logits}


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train locally; reply with soft labels, weights or class logits, as the strategy asks."""
    client = ClientRound.open(message, context)
    return client.reply(HANDLERS[client.task.mode](client))
