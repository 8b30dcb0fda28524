"""Typed configuration of a run: the one source of every default, and the adapters that read it.

The dataclasses below hold every key and its default. Hydra's config tree is built on them
(``federation.hydra_schema`` registers them as structured configs, so a group YAML lists only
what differs), Flower's flat kebab-case run config is derived from them
(:func:`run_config_to_flower`; ``[tool.flwr.app.config]`` in pyproject.toml must equal
``run_config_to_flower(RunConfig())``, which a test checks), and what a client needs for a
round travels as a :class:`ClientTask` that carries the run config itself.

Values are checked here; which strategy supports which transfer source, privacy mechanism or
attack is declared by the strategy (``strategies.registry``) and checked when the run is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedkd.attacks import ATTACK_KINDS
from fedkd.data.partition import PARTITION_SCHEMES
from fedkd.distillation import LR_SCHEDULES
from fedkd.models import NORMALIZATION_FREE_MODELS, check_model_name
from fedkd.privacy.config import PrivacyConfig

# auto: the sharded worker processes where this process may use several cores, else in-process
# (federation.sim.chosen_engine); every engine gives the same metrics.
ENGINES = ("auto", "inprocess", "processes", "ray", "flower-ray")
# Where the transfer inputs come from: a public split, or synthesized from the teachers.
TRANSFER_SOURCES = ("public", "synthetic")
SYNTHESIS_METHODS = ("adversarial", "generator", "deepinversion")
LOGGERS = ("jsonl", "tensorboard")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")
    return value


@dataclass(frozen=True)
class PartitionConfig:
    """How the private data is split among clients (flwr-datasets partitioners)."""

    scheme: str = "dirichlet"
    alpha: float = 0.5
    classes_per_partition: int = 2

    def __post_init__(self) -> None:
        _choice("partition scheme", self.scheme, PARTITION_SCHEMES)
        if self.alpha <= 0:
            raise ValueError(f"partition.alpha must be > 0 (smaller is more skewed), got {self.alpha}.")
        if self.classes_per_partition < 1:
            raise ValueError(f"partition.classes_per_partition must be ≥ 1, got {self.classes_per_partition}.")


# strategy.consensus_weight's default: CO_DISTILLATION_WEIGHT for the strategies in
# CO_DISTILLING_BY_DEFAULT on public transfer without privacy, else 0 (RunConfig.consensus_weight).
# Fashion-MNIST, 50 clients, Dirichlet α = 0.1: after five rounds the teachers' class-weighted
# ensemble scores 0.78 without and 0.88 with it, and the student 0.77 and 0.86 (README,
# Federated-distillation recipe, Co-distillation).
# Under a privacy mechanism a client's steps on the public inputs would need their own accounting,
# and synthetic inputs stay on the client that made them, so those runs keep it off.
CONSENSUS_WHERE_FREE = -1.0
# strategy.class_weight_power's default: the exponent that suits the run's aggregator and partition.
POWER_BY_SETTING = -1.0
# class_weighted's exponent on the clients' class counts when the run sets none, chosen on a
# validation hold-out (validation_size=5000; Fashion-MNIST) at two heterogeneities. With Dirichlet
# α = 0.5 (100 clients, 10 rounds) squared counts lead the counts by 0.7–1.2 points from round 3
# (0.8820 against 0.8700 after round 10); with α = 0.1 (50 clients, 12 rounds), where most clients
# hold one or two classes and a squared count hands a class column to its single largest holder,
# they lead until round 7 and then fall behind as the student's loss rises (0.8606 against 0.8832
# after round 12). So the counts are squared where clients spread over the classes (iid, Dirichlet
# α ≥ SQUARED_COUNTS_MIN_ALPHA) and kept as they are on more skewed partitions; between α = 0.1 and
# 0.5 nothing was measured (README, Federated-distillation recipe, Squared counts, chosen on a
# validation hold-out).
CLASS_WEIGHTED_POWER = 2.0
SQUARED_COUNTS_MIN_ALPHA = 0.5
CO_DISTILLATION_WEIGHT = 1.0
CO_DISTILLING_BY_DEFAULT = ("ensemble_distillation",)

# client_models' default: the teachers that suit the run (RunConfig.teacher_models).
TEACHERS_BY_SETTING = ("auto",)
# Teachers on public transfer without privacy, by dataset (TEACHERS where a dataset has none).
# On 600 Fashion-MNIST images of a few classes cnn_fc (two conv blocks and a fully connected head)
# learns more than cnn_small, whose global average pooling discards where in the image a feature
# is: with 100 clients, Dirichlet α = 0.5, today's defaults end at 0.8605 with cnn_fc teachers
# against 0.8534 with cnn_small and lenet5_bn. On MNIST both scored 0.9761 after five rounds, but a
# round with cnn_fc teachers took about 100 s on 2 cores, so the 15 rounds of the 100-client
# command would take 25 minutes; the digits keep the cheaper pair (README,
# Federated-distillation recipe, Teachers).
DATASET_PUBLIC_TRANSFER_TEACHERS = {"fashion_mnist": ("cnn_fc",)}
# Elsewhere, the teachers the data-free and private results were measured with: synthetic
# transfer inverts these teachers' BatchNorm statistics, and the private mechanisms were tuned
# on them (privacy=dpsgd has its own privacy.teacher_model).
TEACHERS = ("cnn_small", "lenet5_bn")

# strategy.aggregator=auto: class-weighted where the clients may share their class counts (no
# privacy mechanism), the size-weighted mean under any privacy mechanism (see RunConfig.aggregator).
AUTO_AGGREGATOR = "auto"


@dataclass(frozen=True)
class StrategyConfig:
    """Which server strategy runs and how it aggregates soft labels.

    ``name`` and ``aggregator`` are checked against the strategy registry when the run is built.
    ``aggregator=auto`` is :attr:`RunConfig.aggregator`'s choice for the run.
    """

    name: str = "ensemble_distillation"
    aggregator: str = AUTO_AGGREGATOR
    fraction_train: float = 1.0
    min_replies: int = 1
    digest_epochs: int = 1  # fedmd, dsfl: epochs a client spends fitting the consensus
    sharpen_temperature: float = 0.1  # dsfl: entropy-reduction temperature (< 1 sharpens)
    regularizer_weight: float = 1.0  # fd: weight of the distillation term in local training
    # The temperature at which the clients' soft labels are combined; the aggregate is then
    # re-tempered to the run's `temperature` for the student (0: combine at `temperature`).
    aggregate_temperature: float = 0.0
    # Public transfer: the student's targets are the running average of the rounds' aggregates
    # with this decay (temporal ensembling; 0: each round's aggregate alone).
    round_average: float = 0.0
    # Co-distillation: the last round's aggregate (the consensus) travels down with the transfer
    # indices, and each client's local training adds this weight × the KD loss toward it on the
    # public inputs (fedkd.distillation.train_with_consensus; 0: the consensus stays on the
    # server). CONSENSUS_WHERE_FREE (the default) resolves in RunConfig.consensus_weight.
    consensus_weight: float = CONSENSUS_WHERE_FREE
    # Which public inputs a client learns the consensus on: each in proportion to the consensus's
    # probability on the classes the client lacks, a class counting as lacked (fully at zero
    # examples) while under this share of a uniform partition's (fedkd.distillation.lacked_classes;
    # 0: every input fully).
    consensus_lacked_share: float = 0.1
    # aggregator=class_weighted: client k's weight in class column c is its count n_kc raised to
    # this power (1: FedFTG's counts; 2 trusts the clients that hold many examples of a class
    # more than those that hold a few; strategies.aggregation.class_weighted). POWER_BY_SETTING
    # (the default) resolves in RunConfig.class_weight_power. README, Federated-distillation
    # recipe, Fashion-MNIST 100 at the cap.
    class_weight_power: float = POWER_BY_SETTING

    def __post_init__(self) -> None:
        power = self.class_weight_power
        if power != POWER_BY_SETTING and not (math.isfinite(power) and power > 0):
            raise ValueError(
                f"strategy.class_weight_power must be a finite number > 0, or {POWER_BY_SETTING} for the "
                f"setting's own (RunConfig.class_weight_power); got {power}."
            )
        if self.digest_epochs < 0:
            raise ValueError(f"strategy.digest_epochs must be ≥ 0, got {self.digest_epochs}.")
        if self.sharpen_temperature <= 0:
            raise ValueError(f"strategy.sharpen_temperature must be > 0, got {self.sharpen_temperature}.")
        if not (math.isfinite(self.aggregate_temperature) and self.aggregate_temperature >= 0):
            raise ValueError(
                f"strategy.aggregate_temperature must be a finite number ≥ 0 (0: combine at the run's "
                f"temperature), got {self.aggregate_temperature}."
            )
        if not 0.0 <= self.round_average < 1.0:
            raise ValueError(f"strategy.round_average must lie in [0, 1) (0: off), got {self.round_average}.")
        if not (math.isfinite(self.consensus_weight) and self.consensus_weight >= 0) and (
            self.consensus_weight != CONSENSUS_WHERE_FREE
        ):
            raise ValueError(
                f"strategy.consensus_weight must be a finite number ≥ 0 (0: off), or {CONSENSUS_WHERE_FREE} for "
                f"the default by strategy and transfer; got {self.consensus_weight}."
            )
        if not 0.0 <= self.consensus_lacked_share <= 1.0:
            raise ValueError(
                f"strategy.consensus_lacked_share must lie in [0, 1] (0: every public input), "
                f"got {self.consensus_lacked_share}."
            )
        if self.regularizer_weight < 0:
            raise ValueError(f"strategy.regularizer_weight must be ≥ 0, got {self.regularizer_weight}.")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"strategy.fraction_train must lie in (0, 1], got {self.fraction_train}.")
        if self.min_replies < 1:
            raise ValueError(f"strategy.min_replies must be ≥ 1, got {self.min_replies}.")


@dataclass(frozen=True)
class SynthesisConfig:
    """How clients synthesize transfer inputs from their teachers (``transfer=synthetic``)."""

    # adversarial: a generator trained against a proxy student (DFAD) with BatchNorm matching, then
    # sampled | generator: trained on DeepInversion's objective alone | deepinversion: per-batch pixels
    method: str = "generator"
    per_client: int = 200  # synthetic inputs each sampled client contributes per round
    steps: int = 200  # generator–student iterations, generator training steps, or DeepInversion iterations per batch
    keep_pools: bool = True  # the student distills on every round's pool so far (server memory)
    # keep_pools: how many inputs of the earlier rounds' pools the student replays each round beside
    # the newest pool (a fresh seeded draw every round; 0 = all of them). Bounds the student's work
    # per round, which otherwise grows with the rounds (CMI and Fast-DFKD sample their memory banks).
    replay_inputs: int = 4000
    # generator: 0 trains a fresh generator every round; N > 0 keeps each client's generator
    # between rounds (on the client) and, after its first round, trains it N more steps against
    # the round's teacher (Fast-DFKD's reuse: Fang et al., AAAI 2022). The other methods keep no
    # generator and need warm_steps=0.
    warm_steps: int = 20
    # adversarial: the architecture of the local proxy student the client's generator plays against
    proxy_student: str = "lenet5_half"

    def __post_init__(self) -> None:
        _choice("synthesis method", self.method, SYNTHESIS_METHODS)
        if self.per_client < 1:
            raise ValueError(f"synthesis.per_client must be ≥ 1, got {self.per_client}.")
        if self.steps < 1:
            raise ValueError(f"synthesis.steps must be ≥ 1, got {self.steps}.")
        if self.replay_inputs < 0:
            raise ValueError(
                f"synthesis.replay_inputs must be ≥ 0 (0 = replay every earlier pool), got {self.replay_inputs}."
            )
        if self.warm_steps < 0:
            raise ValueError(
                f"synthesis.warm_steps must be ≥ 0 (0 = a fresh generator every round), got {self.warm_steps}."
            )
        if self.warm_steps and self.method != "generator":
            raise ValueError(
                f"synthesis.warm_steps={self.warm_steps} reuses the generator of synthesis.method=generator; method "
                f"{self.method!r} keeps no generator between rounds. Add synthesis.warm_steps=0 (or use "
                "synthesis.method=generator)."
            )
        check_model_name(self.proxy_student)


@dataclass(frozen=True)
class AttackConfig:
    """Simulated malicious clients (``attack.kind``, ``attack.fraction``); see fedkd.attacks."""

    kind: str = "none"  # none | random | flip | scale | nan | collude | adaptive
    fraction: float = 0.0  # share of the clients that attack (a seeded choice, fixed for the run)
    scale: float = -4.0  # scale: the factor on the malicious logits (negative inverts the ranking)
    lie_fraction: float = 0.4  # adaptive: share of the inputs whose argmax the attackers move

    def __post_init__(self) -> None:
        _choice("attack.kind", self.kind, ATTACK_KINDS)
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack.fraction must lie in [0, 1], got {self.fraction}.")
        if not 0.0 <= self.lie_fraction <= 1.0:
            raise ValueError(f"attack.lie_fraction must lie in [0, 1], got {self.lie_fraction}.")
        if self.kind != "none" and self.fraction == 0.0:
            raise ValueError(
                f"attack.kind={self.kind} with attack.fraction=0 attacks nobody; set attack.fraction, "
                "e.g. attack.fraction=0.1."
            )

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.fraction > 0


@dataclass(frozen=True)
class FailureConfig:
    """Simulated faults (``failure.crash_fraction``); see fedkd.faults."""

    crash_fraction: float = 0.0  # share of the clients that crash in every round (a fresh seeded choice)

    def __post_init__(self) -> None:
        if not 0.0 <= self.crash_fraction <= 1.0:
            raise ValueError(f"failure.crash_fraction must lie in [0, 1], got {self.crash_fraction}.")


@dataclass(frozen=True)
class SplitSpec:
    """Everything that determines the public/private split; server and clients agree on it."""

    dataset: str
    data_root: str
    num_clients: int
    public_size: int
    scheme: str
    alpha: float
    classes_per_partition: int
    seed: int
    validation_size: int = 0


# Settings that say where and how a run executes, not what it computes (the engines give the
# same metrics bit for bit on one machine): two runs that differ only in them are the same run.
EXECUTION_SETTINGS = ("data_root", "engine", "workers", "teacher_cache", "node_wait_timeout")


# rounds' default: as many as suit what a round costs (resolved in RunConfig.__post_init__).
ROUNDS_BY_COST = -1
# A round on the public set without privacy costs each client one labelling pass and no privacy
# budget, and its student is still improving after 10 (MNIST, 100 clients, α = 0.5: 0.9801 after
# 10 rounds, 0.980–0.982 in rounds 11–15; README, Federated-distillation recipe). A synthetic
# round costs about three of them (every client synthesizes its inputs), and a private round
# spends privacy budget, so those take 10.
CHEAP_ROUNDS = 15
COSTLY_ROUNDS = 10

# augment_shift's default: each dataset's own value (DATASET_AUGMENT_SHIFT, 0 where it has none).
DATASET_SHIFT = -1.0
# Random shifts (fraction of the image side) in local training and distillation, by dataset.
# Handwritten digits keep their class when moved a few pixels, and a teacher with 600 of them
# learns more from moved copies (MNIST, 100 clients, α = 0.5: 0.9795 against 0.9698 unshifted);
# Fashion-MNIST's garments are centred, and moved copies cost its teachers and student 2.9 points
# (README, Federated-distillation recipe).
DATASET_AUGMENT_SHIFT = {"digits": 0.1, "mnist": 0.1}

# student_shift's default: the shift that suits the run's student (RunConfig.distill_shift).
SHIFT_BY_SETTING = -1.0
# The student's random shifts on public transfer without privacy, by dataset (augment_shift where
# a dataset has none). The student moves the public inputs while their targets stay the teachers'
# on the unmoved ones: it learns that small moves keep the class, which its 2,000 inputs cannot
# show, although the teachers themselves learn more from Fashion-MNIST's centred garments unmoved.
# Chosen on a validation hold-out of the training pool (experiments.student_shift: Fashion-MNIST, 100
# clients, α = 0.5, one central teacher): the student distilled on the 2,000 public inputs scores
# 0.870 unshifted and 0.882 with shifts of 5 % there, best of 0–10 % (README,
# Federated-distillation recipe, The student's shifts).
DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT = {"fashion_mnist": 0.05}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults give the quick embedded-data job."""

    dataset: str = "digits"
    data_root: str = ""
    num_clients: int = 10
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    transfer: str = "public"
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    # ROUNDS_BY_COST (the default): CHEAP_ROUNDS with public transfer and privacy=none, else
    # COSTLY_ROUNDS; the run records the number it resolved to.
    rounds: int = ROUNDS_BY_COST
    public_size: int = 1000
    # Labelled examples of the training pool held out of the public set and of every partition; the
    # server scores the student on them each round (validation_accuracy), so that settings can be
    # chosen without the test split. 0: none, and the split is the one without the setting.
    validation_size: int = 0
    # Mixed pairs of public inputs (fedkd.mixup) the clients label each round beside the public
    # set; the student keeps every round's views with the targets they got in their round.
    mixup_views: int = 0
    public_labels: bool = False
    local_epochs: int = 3
    # The student recipe (README, Federated-distillation recipe): ten distillation epochs per round
    # at T = 4, no random shifts, and (strategy.aggregator=auto) class-weighted soft labels.
    distill_epochs: int = 10
    # The student's learning rate within a round: constant, or cosine-annealed to 0 over the round's
    # distillation steps (fedkd.distillation.LR_SCHEDULES).
    distill_schedule: str = "constant"
    # Decay of a moving average of the student's weights over a round's distillation steps, which
    # the student keeps at the end of the round (Polyak averaging; 0 = the last step's weights);
    # with semi_supervised=true, the decay of FixMatch's own average.
    distill_ema: float = 0.99
    temperature: float = 4.0
    kd_alpha: float = 1.0
    # The teachers' architectures, round-robin over the clients; TEACHERS_BY_SETTING (the default)
    # resolves on use (RunConfig.teacher_models).
    client_models: tuple[str, ...] = TEACHERS_BY_SETTING
    student_model: str = "cnn_fc"
    lr: float = 1e-3
    batch_size: int = 32
    # DATASET_SHIFT (the default) takes the dataset's value from DATASET_AUGMENT_SHIFT; the run
    # records the value it resolved to.
    augment_shift: float = DATASET_SHIFT
    # Random shifts of the student's inputs in distillation (fraction of the image side);
    # SHIFT_BY_SETTING (the default) resolves on use (RunConfig.distill_shift).
    student_shift: float = SHIFT_BY_SETTING
    # The student also learns from the public inputs without targets (FixMatch, Sohn et al. 2020):
    # with privacy=gaussian|gnmax|pate those not released, otherwise the transfer set itself.
    semi_supervised: bool = False
    seed: int = 0
    engine: str = "auto"
    # engine=processes|ray: workers (processes, Ray actors), each holding a fixed shard of the
    # clients; 0 = one per core this process may run on (engine=ray: one per CPU of the cluster).
    workers: int = 0
    # Seconds the server waits for a round's replies; later ones count as failed (in-process:
    # each client's own time is measured, since clients run one after another).
    round_timeout: float = 3600.0
    # Seconds a deployment's ServerApp waits for num_clients SuperNodes before it gives up with
    # the fix (a local simulation's nodes are all there at once; see federation.nodes).
    node_wait_timeout: float = 60.0
    # Simulation only: a folder where clients keep each round's trained teacher and its logits,
    # so that runs differing only in what follows the teachers (aggregator, attack on the
    # replies, student) train each teacher once (federation.teacher_cache). Same numbers.
    teacher_cache: str = ""

    def __post_init__(self) -> None:
        # Hydra and Flower hand lists over; the run config is a value, so hold a tuple.
        object.__setattr__(self, "client_models", _models(self.client_models))
        if self.rounds == ROUNDS_BY_COST:
            cheap = self.public_transfer_without_privacy
            object.__setattr__(self, "rounds", CHEAP_ROUNDS if cheap else COSTLY_ROUNDS)
        positive = {
            "num_clients": self.num_clients,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "distill_epochs": self.distill_epochs,
            "batch_size": self.batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}.")
        if self.public_size < 0:
            raise ValueError(f"public_size must be ≥ 0, got {self.public_size}.")
        if self.validation_size < 0:
            raise ValueError(f"validation_size must be ≥ 0 (0: no hold-out), got {self.validation_size}.")
        self._check_mixup_views()
        _choice("transfer", self.transfer, TRANSFER_SOURCES)
        _choice("distill_schedule", self.distill_schedule, LR_SCHEDULES)
        if not 0.0 <= self.distill_ema < 1.0:
            raise ValueError(f"distill_ema must lie in [0, 1) (0 = no weight averaging), got {self.distill_ema}.")
        if self.transfer == "synthetic" and self.public_labels:
            raise ValueError(
                "public_labels=true needs a public set, but transfer=synthetic has none; set public_labels=false."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout must be > 0 seconds, got {self.round_timeout}.")
        if not self.node_wait_timeout >= 0:
            raise ValueError(f"node_wait_timeout must be ≥ 0 seconds, got {self.node_wait_timeout}.")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must lie in [0, 1], got {self.kd_alpha}.")
        if self.kd_alpha < 1.0 and not self.public_labels:
            raise ValueError(
                f"kd_alpha={self.kd_alpha} mixes in cross-entropy on public labels, "
                "which the server may not use; set public_labels=true or kd_alpha=1."
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.semi_supervised and self.distill_schedule != "constant":
            raise ValueError(
                f"semi_supervised=true follows FixMatch's own learning-rate schedule; distill_schedule="
                f"{self.distill_schedule} would not apply. Set distill_schedule=constant or semi_supervised=false."
            )
        if self.semi_supervised and self.kd_alpha < 1.0:
            raise ValueError(
                f"semi_supervised=true with kd_alpha={self.kd_alpha}: the semi-supervised student does not "
                "mix in public labels; set kd_alpha=1 or semi_supervised=false."
            )
        if self.augment_shift == DATASET_SHIFT:
            object.__setattr__(self, "augment_shift", DATASET_AUGMENT_SHIFT.get(self.dataset, 0.0))
        if not 0.0 <= self.augment_shift < 0.5:
            raise ValueError(
                f"augment_shift must lie in [0, 0.5), or be {DATASET_SHIFT} for the dataset's own "
                f"({DATASET_AUGMENT_SHIFT}, else 0); got {self.augment_shift}."
            )
        if self.student_shift != SHIFT_BY_SETTING and not 0.0 <= self.student_shift < 0.5:
            raise ValueError(
                f"student_shift must lie in [0, 0.5), or be {SHIFT_BY_SETTING} for the setting's own "
                f"({DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT} on public transfer without privacy, else "
                f"augment_shift); got {self.student_shift}."
            )
        if not self.client_models:
            raise ValueError("client_models is empty; give at least one architecture name.")
        for name in (*self.teacher_models, self.student_model):
            check_model_name(name)
        _choice("engine", self.engine, ENGINES)
        if self.workers < 0:
            raise ValueError(f"workers must be ≥ 0 (0 = one per available core or Ray CPU), got {self.workers}.")
        self._check_privacy()

    def _check_mixup_views(self) -> None:
        if self.mixup_views < 0:
            raise ValueError(f"mixup_views must be ≥ 0, got {self.mixup_views}.")
        if not self.mixup_views:
            return
        if self.strategy.round_average:
            raise ValueError(
                f"strategy.round_average={self.strategy.round_average} averages each input's targets over the "
                "rounds, but mixup views are new inputs every round; set strategy.round_average=0 or mixup_views=0."
            )
        if self.transfer != "public" or self.public_size < 2:
            raise ValueError(
                f"mixup_views={self.mixup_views} mixes pairs of public inputs; it needs transfer=public and "
                "public_size ≥ 2 (or set mixup_views=0)."
            )
        if self.public_labels:
            raise ValueError(
                "mixup_views has no labels for its mixed inputs, and public_labels=true would need them; "
                "set one of public_labels=false or mixup_views=0."
            )
        if self.privacy.on_server or self.privacy.mechanism == "pate":
            raise ValueError(
                f"privacy={self.privacy.mechanism} releases its own queries of the public set; mixup_views "
                "applies with privacy=none or privacy=dpsgd. Set mixup_views=0."
            )

    def _check_privacy(self) -> None:
        privacy = self.privacy
        if self.transfer == "synthetic" and privacy.enabled and privacy.mechanism != "dpsgd":
            raise ValueError(
                f"privacy={privacy.mechanism} with transfer=synthetic is not supported: the synthetic "
                "inputs come from the teachers and their feature statistics, which only privacy=dpsgd "
                "protects (DP-SGD teachers, privately released statistics). Use privacy=dpsgd or "
                "transfer=public."
            )
        if self.releases_feature_statistics and privacy.teacher_model in NORMALIZATION_FREE_MODELS:
            raise ValueError(
                f"privacy=dpsgd with transfer=synthetic inverts the teachers' normalization layers, and "
                f"privacy.teacher_model={privacy.teacher_model} has none; set "
                "privacy.teacher_model=client_models (or a model with BatchNorm, e.g. cnn_small)."
            )
        if privacy.on_server and privacy.queries > self.public_size:
            raise ValueError(
                f"privacy.queries={privacy.queries} exceeds public_size={self.public_size}; "
                "lower privacy.queries or raise public_size."
            )
        if privacy.on_server and self.public_labels:
            raise ValueError(
                f"privacy={privacy.mechanism} trains the student on released labels only; set public_labels=false."
            )
        if privacy.mechanism == "pate" and self.transfer != "public":
            raise ValueError("privacy=pate queries the teachers on public inputs; set transfer=public.")
        if self.teacher_cache and (privacy.enabled or self.transfer != "public"):
            raise ValueError(
                f"teacher_cache with privacy={privacy.mechanism} transfer={self.transfer}: the cache skips "
                "training, which must be charged to a private teacher's ledger, and synthetic inputs "
                "come from the round's teacher; use it with privacy=none transfer=public, or unset it."
            )
        if self.attack.enabled and privacy.on_server:
            raise ValueError(
                f"attack.kind with privacy={privacy.mechanism} is not supported: clients share "
                "clipped or voted rows there. Use privacy=none or privacy=dpsgd."
            )

    @property
    def public_transfer_without_privacy(self) -> bool:
        """Public transfer inputs and no privacy mechanism: where rounds are cheap and the recipe's
        co-distillation and teachers apply (``rounds``, ``consensus_weight``, ``teacher_models``)."""
        return self.transfer == "public" and self.privacy.mechanism == "none"

    @property
    def consensus_weight(self) -> float:
        """``strategy.consensus_weight``, with CONSENSUS_WHERE_FREE resolved: CO_DISTILLATION_WEIGHT
        for the strategies in CO_DISTILLING_BY_DEFAULT on public transfer without privacy, else 0.
        Resolved on use, like ``aggregator``, so that a copy with another transfer or privacy
        mechanism (``dataclasses.replace``) gets its own default."""
        weight = self.strategy.consensus_weight
        if weight != CONSENSUS_WHERE_FREE:
            return weight
        free = self.public_transfer_without_privacy
        return CO_DISTILLATION_WEIGHT if free and self.strategy.name in CO_DISTILLING_BY_DEFAULT else 0.0

    @property
    def class_weight_power(self) -> float:
        """``strategy.class_weight_power``, with POWER_BY_SETTING resolved: CLASS_WEIGHTED_POWER
        where the run's aggregator is ``class_weighted`` and its partition spreads the clients over
        the classes (iid, or Dirichlet with α ≥ SQUARED_COUNTS_MIN_ALPHA), else 1 (no other
        aggregator reads it). Resolved on use, like ``aggregator``."""
        power = self.strategy.class_weight_power
        if power != POWER_BY_SETTING:
            return power
        partition = self.partition
        spread = partition.scheme == "iid" or (
            partition.scheme == "dirichlet" and partition.alpha >= SQUARED_COUNTS_MIN_ALPHA
        )
        return CLASS_WEIGHTED_POWER if self.aggregator == "class_weighted" and spread else 1.0

    @property
    def teacher_models(self) -> tuple[str, ...]:
        """``client_models``, with TEACHERS_BY_SETTING resolved: the dataset's
        DATASET_PUBLIC_TRANSFER_TEACHERS on public transfer without privacy, else TEACHERS.
        Resolved on use, like ``consensus_weight``."""
        if self.client_models != TEACHERS_BY_SETTING:
            return self.client_models
        free = self.public_transfer_without_privacy
        return DATASET_PUBLIC_TRANSFER_TEACHERS.get(self.dataset, TEACHERS) if free else TEACHERS

    @property
    def distill_shift(self) -> float:
        """``student_shift``, with SHIFT_BY_SETTING resolved: the dataset's
        DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT on public transfer without privacy, else
        ``augment_shift`` (the teachers' shifts). Resolved on use, like ``teacher_models``."""
        if self.student_shift != SHIFT_BY_SETTING:
            return self.student_shift
        if not self.public_transfer_without_privacy:
            return self.augment_shift
        return DATASET_PUBLIC_TRANSFER_STUDENT_SHIFT.get(self.dataset, self.augment_shift)

    @property
    def aggregator(self) -> str:
        """The aggregator the run uses: ``strategy.aggregator``, with ``auto`` resolved.

        ``auto`` weighs each class column by the clients' counts of that class
        (``class_weighted``, 1 point better than the size-weighted mean on 100-client
        Fashion-MNIST, see README), which makes every client send its class counts as they are;
        under a privacy mechanism nothing un-noised may leave a client, so there it is the
        size-weighted mean (``weighted``).
        """
        if self.strategy.aggregator != AUTO_AGGREGATOR:
            return self.strategy.aggregator
        return "class_weighted" if self.privacy.mechanism == "none" else "weighted"

    def same_run(self, other: RunConfig) -> bool:
        """Whether ``other`` computes the same run, whatever its :data:`EXECUTION_SETTINGS` (and,
        with a public transfer set, whatever its synthesis settings, which such a run never reads)."""
        ignored: dict[str, Any] = {name: getattr(self, name) for name in EXECUTION_SETTINGS}
        if self.transfer == "public":
            ignored["synthesis"] = self.synthesis
        # Run folders record the teachers and the student's shifts the run resolved to.
        ignored["client_models"] = self.client_models
        ignored["student_shift"] = self.student_shift
        resolved_alike = other.teacher_models == self.teacher_models and other.distill_shift == self.distill_shift
        return resolved_alike and dataclasses.replace(other, **ignored) == self

    @property
    def releases_feature_statistics(self) -> bool:
        """DP-SGD teachers synthesize against privately released feature statistics."""
        return self.privacy.mechanism == "dpsgd" and self.transfer == "synthetic"

    @property
    def effective_public_size(self) -> int:
        """Size of the public split; 0 with synthetic transfer, where no public set exists."""
        return 0 if self.transfer == "synthetic" else self.public_size

    def split_spec(self, *, data_root: str | None = None) -> SplitSpec:
        """The split of this run; a node may read the data from its own ``data_root``."""
        return SplitSpec(
            dataset=self.dataset,
            data_root=self.data_root if data_root is None else data_root,
            num_clients=self.num_clients,
            public_size=self.effective_public_size,
            scheme=self.partition.scheme,
            alpha=self.partition.alpha,
            classes_per_partition=self.partition.classes_per_partition,
            seed=self.seed,
            validation_size=self.validation_size,
        )


# The nested groups of a run config, with the field that names the group's choice: that field is
# written as the bare group name in Flower's flat keys (``strategy = "dsfl"``), the others as
# ``<group>-<field>`` (``strategy-aggregator``). A group without a choice (None) writes every
# field as ``<group>-<field>``.
GROUPS: dict[str, tuple[type, str | None]] = {
    "partition": (PartitionConfig, "scheme"),
    "strategy": (StrategyConfig, "name"),
    "synthesis": (SynthesisConfig, "method"),
    "privacy": (PrivacyConfig, "mechanism"),
    "attack": (AttackConfig, "kind"),
    "failure": (FailureConfig, None),
}
# Keys of [tool.flwr.app.config] that describe where results go, not the run itself.
FLOWER_OUTPUT_KEYS = ("output-dir",)
# Keys that belong to the runtime, not to the run: ``flwr run`` brings its own engine.
_NOT_IN_FLOWER = ("engine", "workers")


def _flower_key(group: str, name: str) -> str:
    primary = GROUPS[group][1]
    return group if name == primary else f"{group}-{name}".replace("_", "-")


def _models(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return tuple(str(name) for name in value)


def _coerce(cls: type, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}.")
    return cls(**values)


# Settings added after run folders were committed, where today's default is not what a run did
# before the setting existed: a stored config without the key means the value here, and is read
# back with it (fedkd.results.RunFolder.stored_config), so that an old folder neither passes for a
# run of today's default nor is described by it.
BEFORE_THE_SETTING: dict[tuple[str, ...], Any] = {
    ("synthesis", "warm_steps"): 0,
    ("synthesis", "replay_inputs"): 0,
    ("distill_ema",): 0.0,
    # Before co-distillation no client learned the consensus (today: on by default for
    # ensemble_distillation on public inputs without privacy).
    ("strategy", "consensus_weight"): 0.0,
    # Before class_weight_power, class_weighted weighed by the counts themselves.
    ("strategy", "class_weight_power"): 1.0,
}


def stored_run_config(values: Mapping[str, Any]) -> RunConfig:
    """The :class:`RunConfig` a stored config (a run folder's ``config.yaml``) describes, keys it
    predates taking their :data:`BEFORE_THE_SETTING` values."""
    values = {key: dict(value) if isinstance(value, Mapping) else value for key, value in values.items()}
    # Before student_shift the student moved its inputs as the teachers did.
    if "student_shift" not in values and "augment_shift" in values:
        values["student_shift"] = values["augment_shift"]
    for path, value in BEFORE_THE_SETTING.items():
        target = values
        for group in path[:-1]:
            target = target.setdefault(group, {})
        target.setdefault(path[-1], value)
    return run_config_from_mapping(values)


def run_config_from_mapping(values: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping (Hydra's resolved config, JSON, YAML)."""
    values = dict(values)
    values.pop("hydra", None)
    for group, (cls, _) in GROUPS.items():
        if group in values:
            values[group] = _coerce(cls, _group_values(group, values[group]))
    if values.get("data_root") is None:
        values["data_root"] = ""
    return _coerce(RunConfig, values)


def _group_values(group: str, values: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(values)
    if group == "privacy" and "epsilon" in values:  # "inf" from YAML, a CLI or Flower's run config
        values["epsilon"] = float(values["epsilon"])
    if group == "attack" and "kind" in values:  # YAML and Hydra's CLI read a bare `nan` as the float NaN
        kind = values["kind"]
        values["kind"] = "nan" if isinstance(kind, float) and math.isnan(kind) else str(kind)
    return values


def run_config_from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from Flower's flat kebab-case ``context.run_config``."""
    by_flower_key = {
        _flower_key(group, f.name): (group, f.name)
        for group, (cls, _) in GROUPS.items()
        for f in dataclasses.fields(cls)
    }
    nested: dict[str, Any] = {group: {} for group in GROUPS}
    for key, value in run_config.items():
        if key in FLOWER_OUTPUT_KEYS:
            continue
        if key in by_flower_key:
            group, name = by_flower_key[key]
            nested[group][name] = value
        else:
            nested[key.replace("-", "_")] = value
    return run_config_from_mapping(nested)


def run_config_to_flower(config: RunConfig) -> dict[str, Any]:
    """Flower's flat run config for ``config``: the inverse of :func:`run_config_from_flower`."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _NOT_IN_FLOWER:
            continue
        if f.name in GROUPS:
            for inner in dataclasses.fields(value):
                flat[_flower_key(f.name, inner.name)] = getattr(value, inner.name)
        elif isinstance(value, tuple):
            flat[f.name.replace("_", "-")] = ",".join(value)
        else:
            flat[f.name.replace("_", "-")] = value
    return flat


# What a client does with a train message: "soft-labels" trains the teacher and replies with
# soft labels on the transfer inputs; "weights" trains the received model and replies with its
# weights (FedAvg, FedDF); "class-logits" trains toward the global per-class logits and replies
# with its own (FD). Each strategy declares its mode in ``strategies.registry``.
CLIENT_MODES = ("soft-labels", "weights", "class-logits")


@dataclass(frozen=True)
class ClientTask:
    """What a client needs to do its part of a round; sent inside each train message.

    Clients hold no run config of their own: the server is the single source of truth, so the
    same ClientApp works under any simulation engine and in a real deployment. The task is the
    run config itself plus what the server decides per round.
    """

    mode: str
    server_round: int
    run: RunConfig
    # Distributed Gaussian noise (privacy.noise_at=clients): the total standard deviation on the
    # sum and the number of clients sharing it; the server fills these in each round.
    privacy_noise_std: float = 0.0
    privacy_noise_shares: int = 1

    def __post_init__(self) -> None:
        _choice("task mode", self.mode, CLIENT_MODES)

    @property
    def feature_releases(self) -> int:
        """How many times the run releases each client's feature statistics (one per round)."""
        return self.run.rounds if self.run.releases_feature_statistics else 0

    def to_record(self) -> dict[str, Any]:
        """Flat values that fit a Flower ``ConfigRecord``."""
        return {
            "mode": self.mode,
            "server-round": self.server_round,
            "privacy-noise-std": self.privacy_noise_std,
            "privacy-noise-shares": self.privacy_noise_shares,
            **run_config_to_flower(self.run),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientTask:
        values = dict(record)
        missing = [key for key in ("mode", "server-round") if key not in values]
        if missing:
            raise ValueError(f"Train message lacks task keys {missing}; is the server up to date?")
        return cls(
            mode=str(values.pop("mode")),
            server_round=int(values.pop("server-round")),
            privacy_noise_std=float(values.pop("privacy-noise-std", 0.0)),
            privacy_noise_shares=int(values.pop("privacy-noise-shares", 1)),
            run=run_config_from_flower(values),
        )
