"""Typed configuration of a run, and the two adapters that build it.

Library code receives these dataclasses only. Flower's flat kebab-case run config is read by
:func:`run_config_from_flower`; Hydra's nested config by :func:`run_config_from_mapping`.
What a client needs for a round travels inside the message as a :class:`ClientTask`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedkd.models import check_model_name

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")
STRATEGIES = ("ensemble_distillation", "fedmd", "dsfl", "fd", "feddf", "fedavg")
# Strategies that distill on the public transfer set (all but FD and FedAvg).
PUBLIC_SET_STRATEGIES = ("ensemble_distillation", "fedmd", "dsfl", "feddf")
ENGINES = ("inprocess", "ray")
# Where the transfer inputs come from: a public split, or synthesized from the teachers.
TRANSFER_SOURCES = ("public", "synthetic")
SYNTHESIS_METHODS = ("generator", "deepinversion")
# Strategies whose clients only label the inputs they are sent, so a synthetic pool can replace
# the public set. FedMD and DS-FL send last round's consensus back down by public index, FedDF
# averages weights around the public set, and FD has no transfer set.
SYNTHETIC_TRANSFER_STRATEGIES = ("ensemble_distillation",)
PRIVACY_MECHANISMS = ("none", "dpsgd", "gaussian", "gnmax")
# DP-SGD protects each client's teacher, so it fits every strategy whose clients share soft labels.
DPSGD_STRATEGIES = ("ensemble_distillation", "fedmd", "dsfl")
# Strategies whose clients share soft labels on transfer inputs (what attacks corrupt).
SOFT_LABEL_STRATEGIES = ("ensemble_distillation", "fedmd", "dsfl")
NOISE_LOCATIONS = ("server", "clients")


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
            raise ValueError(
                f"partition.alpha must be > 0 (smaller is more skewed), got {self.alpha}."
            )
        if self.classes_per_partition < 1:
            raise ValueError(
                f"partition.classes_per_partition must be ≥ 1, got {self.classes_per_partition}."
            )


@dataclass(frozen=True)
class StrategyConfig:
    """Which server strategy runs and how it aggregates soft labels."""

    name: str = "ensemble_distillation"
    aggregator: str = "weighted"
    fraction_train: float = 1.0
    min_replies: int = 1
    digest_epochs: int = 1  # fedmd, dsfl: epochs a client spends fitting the consensus
    sharpen_temperature: float = 0.1  # dsfl: entropy-reduction temperature (< 1 sharpens)
    regularizer_weight: float = 1.0  # fd: weight of the distillation term in local training

    def __post_init__(self) -> None:
        from strategies.aggregation import AGGREGATORS

        _choice("strategy", self.name, STRATEGIES)
        _choice("aggregator", self.aggregator, tuple(sorted(AGGREGATORS)))
        if self.digest_epochs < 0:
            raise ValueError(f"digest_epochs must be ≥ 0, got {self.digest_epochs}.")
        if self.sharpen_temperature <= 0:
            raise ValueError(f"sharpen_temperature must be > 0, got {self.sharpen_temperature}.")
        if self.regularizer_weight < 0:
            raise ValueError(f"regularizer_weight must be ≥ 0, got {self.regularizer_weight}.")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction_train must lie in (0, 1], got {self.fraction_train}.")
        if self.min_replies < 1:
            raise ValueError(f"min_replies must be ≥ 1, got {self.min_replies}.")


@dataclass(frozen=True)
class SynthesisConfig:
    """How clients synthesize transfer inputs from their teachers (``transfer=synthetic``)."""

    method: str = "generator"  # generator (amortized, fast) | deepinversion (per-batch pixels)
    per_client: int = 200  # synthetic inputs each sampled client contributes per round
    steps: int = 200  # generator training steps, or DeepInversion iterations per batch
    keep_pools: bool = True  # the student distills on every round's pool so far (server memory)

    def __post_init__(self) -> None:
        _choice("synthesis method", self.method, SYNTHESIS_METHODS)
        if self.per_client < 1:
            raise ValueError(f"synthesis.per_client must be ≥ 1, got {self.per_client}.")
        if self.steps < 1:
            raise ValueError(f"synthesis.steps must be ≥ 1, got {self.steps}.")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for the run (``privacy=<mechanism>``); ε and δ bound the whole run."""

    mechanism: str = "none"  # none | dpsgd (teachers) | gaussian (aggregate) | gnmax (noisy votes)
    epsilon: float = 2.0  # target ε at the end of the run; inf trains the same way without noise
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # dpsgd: per-example gradient clip
    clip_norm: float = 1.0  # gaussian: L2 bound on each soft-label row (≥ 1 leaves probabilities as they are)
    noise_at: str = "server"  # gaussian: server (central DP) | clients (each adds its share)
    queries: int = 100  # gaussian, gnmax: transfer inputs released per round
    # dpsgd with transfer=synthetic: L2 bound on each example's feature moments, in units of
    # each layer's data-independent reference scale (see fedkd.privacy.feature_statistics)
    feature_clip_norm: float = 3.0

    def __post_init__(self) -> None:
        _choice("privacy mechanism", self.mechanism, PRIVACY_MECHANISMS)
        _choice("privacy.noise_at", self.noise_at, NOISE_LOCATIONS)
        if not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon must be > 0 (inf for no noise), got {self.epsilon}.")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"privacy.delta must lie in (0, 1), got {self.delta}; 1e-5 is usual for MNIST.")
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}.")
        if self.clip_norm <= 0:
            raise ValueError(f"privacy.clip_norm must be > 0, got {self.clip_norm}.")
        if self.queries < 1:
            raise ValueError(f"privacy.queries must be ≥ 1, got {self.queries}.")
        if self.feature_clip_norm <= 0:
            raise ValueError(f"privacy.feature_clip_norm must be > 0, got {self.feature_clip_norm}.")

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"

    @property
    def on_server(self) -> bool:
        """Mechanisms that release the aggregate of a fresh batch of ``queries`` inputs per round."""
        return self.mechanism in ("gaussian", "gnmax")


@dataclass(frozen=True)
class AttackConfig:
    """Simulated malicious clients (``attack.kind``, ``attack.fraction``); see fedkd.attacks."""

    kind: str = "none"  # none | random | flip | scale | nan
    fraction: float = 0.0  # share of the clients that attack (a seeded choice, fixed for the run)
    scale: float = -4.0  # scale: the factor on the malicious logits (negative inverts the ranking)

    def __post_init__(self) -> None:
        from fedkd.attacks import ATTACK_KINDS

        _choice("attack.kind", self.kind, ATTACK_KINDS)
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack.fraction must lie in [0, 1], got {self.fraction}.")
        if self.kind != "none" and self.fraction == 0.0:
            raise ValueError(
                f"attack.kind={self.kind} with attack.fraction=0 attacks nobody; set attack.fraction, "
                "e.g. attack.fraction=0.1."
            )

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.fraction > 0


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
    rounds: int = 5
    public_size: int = 1000
    public_labels: bool = False
    local_epochs: int = 3
    distill_epochs: int = 5
    temperature: float = 1.0
    kd_alpha: float = 1.0
    client_models: tuple[str, ...] = ("cnn_small", "lenet5_bn")
    student_model: str = "cnn_fc"
    lr: float = 1e-3
    batch_size: int = 32
    augment_shift: float = 0.1
    seed: int = 0
    engine: str = "inprocess"
    # Seconds the server waits for a round's replies; later ones count as failed (in-process:
    # each client's own time is measured, since clients run one after another).
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
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
        _choice("transfer", self.transfer, TRANSFER_SOURCES)
        if self.transfer == "synthetic" and self.strategy.name not in SYNTHETIC_TRANSFER_STRATEGIES:
            raise ValueError(
                f"transfer=synthetic works with strategy=ensemble_distillation, not "
                f"{self.strategy.name}; use it (any aggregator, e.g. strategy.aggregator=era for "
                "DS-FL's entropy reduction) or transfer=public."
            )
        if self.transfer == "synthetic" and self.public_labels:
            raise ValueError(
                "public_labels=true needs a public set, but transfer=synthetic has none; "
                "set public_labels=false."
            )
        if (
            self.strategy.name in PUBLIC_SET_STRATEGIES
            and self.transfer == "public"
            and self.public_size == 0
        ):
            raise ValueError(
                f"strategy={self.strategy.name} distills on a public transfer set; "
                "set public_size > 0."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not self.round_timeout > 0:
            raise ValueError(f"round_timeout must be > 0 seconds, got {self.round_timeout}.")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must lie in [0, 1], got {self.kd_alpha}.")
        if self.kd_alpha < 1.0 and not self.public_labels:
            raise ValueError(
                f"kd_alpha={self.kd_alpha} mixes in cross-entropy on public labels, "
                "which the server may not use; set public_labels=true or kd_alpha=1."
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not 0.0 <= self.augment_shift < 0.5:
            raise ValueError(f"augment_shift must lie in [0, 0.5), got {self.augment_shift}.")
        if not self.client_models:
            raise ValueError("client_models is empty; give at least one architecture name.")
        for name in (*self.client_models, self.student_model):
            check_model_name(name)
        _choice("engine", self.engine, ENGINES)
        self._check_privacy()
        if self.attack.enabled and self.strategy.name not in SOFT_LABEL_STRATEGIES:
            raise ValueError(
                f"attack.kind={self.attack.kind} corrupts shared soft labels; strategy={self.strategy.name} "
                f"shares something else. Use one of {list(SOFT_LABEL_STRATEGIES)}."
            )
        if self.attack.enabled and self.privacy.on_server:
            raise ValueError(
                f"attack.kind with privacy={self.privacy.mechanism} is not supported: clients share "
                "clipped or voted rows there. Use privacy=none or privacy=dpsgd."
            )

    def _check_privacy(self) -> None:
        privacy = self.privacy
        if not privacy.enabled:
            return
        if privacy.mechanism == "dpsgd" and self.strategy.name not in DPSGD_STRATEGIES:
            raise ValueError(
                f"privacy=dpsgd trains private teachers that share soft labels; strategy="
                f"{self.strategy.name} shares something else. Use one of {list(DPSGD_STRATEGIES)}."
            )
        if privacy.on_server and self.strategy.name != "ensemble_distillation":
            raise ValueError(
                f"privacy={privacy.mechanism} replaces the aggregation of strategy=ensemble_distillation; "
                f"set strategy=ensemble_distillation (got {self.strategy.name})."
            )
        if self.transfer == "synthetic" and privacy.mechanism != "dpsgd":
            raise ValueError(
                f"privacy={privacy.mechanism} with transfer=synthetic is not supported: the synthetic "
                "inputs come from the teachers and their feature statistics, which only privacy=dpsgd "
                "protects (DP-SGD teachers, privately released statistics). Use privacy=dpsgd or "
                "transfer=public."
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

    @property
    def releases_feature_statistics(self) -> bool:
        """DP-SGD teachers synthesize against privately released feature statistics."""
        return self.privacy.mechanism == "dpsgd" and self.transfer == "synthetic"

    @property
    def effective_public_size(self) -> int:
        """Size of the public split; 0 with synthetic transfer, where no public set exists."""
        return 0 if self.transfer == "synthetic" else self.public_size

    def split_spec(self) -> SplitSpec:
        return SplitSpec(
            dataset=self.dataset,
            data_root=self.data_root,
            num_clients=self.num_clients,
            public_size=self.effective_public_size,
            scheme=self.partition.scheme,
            alpha=self.partition.alpha,
            classes_per_partition=self.partition.classes_per_partition,
            seed=self.seed,
        )


def _coerce(cls: type, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}.")
    return cls(**values)


def _models(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return tuple(value)


def run_config_from_mapping(values: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping (Hydra's resolved config)."""
    values = dict(values)
    values.pop("hydra", None)
    if "partition" in values:
        values["partition"] = _coerce(PartitionConfig, values["partition"])
    if "strategy" in values:
        values["strategy"] = _coerce(StrategyConfig, values["strategy"])
    if "synthesis" in values:
        values["synthesis"] = _coerce(SynthesisConfig, values["synthesis"])
    if "privacy" in values:
        privacy = dict(values["privacy"])
        if "epsilon" in privacy:  # "inf" from YAML, a CLI or Flower's run config
            privacy["epsilon"] = float(privacy["epsilon"])
        values["privacy"] = _coerce(PrivacyConfig, privacy)
    if "attack" in values:
        attack = dict(values["attack"])
        if "kind" in attack:  # YAML and Hydra's CLI read a bare `nan` as the float NaN
            attack["kind"] = str(attack["kind"])
        values["attack"] = _coerce(AttackConfig, attack)
    if "client_models" in values:
        values["client_models"] = _models(values["client_models"])
    if values.get("data_root") is None:
        values["data_root"] = ""
    return _coerce(RunConfig, values)


_FLOWER_NESTED = {
    "partition": ("partition", "scheme"),
    "partition-alpha": ("partition", "alpha"),
    "partition-classes": ("partition", "classes_per_partition"),
    "strategy": ("strategy", "name"),
    "aggregator": ("strategy", "aggregator"),
    "fraction-train": ("strategy", "fraction_train"),
    "min-replies": ("strategy", "min_replies"),
    "digest-epochs": ("strategy", "digest_epochs"),
    "sharpen-temperature": ("strategy", "sharpen_temperature"),
    "regularizer-weight": ("strategy", "regularizer_weight"),
    "synthesis-method": ("synthesis", "method"),
    "synthesis-per-client": ("synthesis", "per_client"),
    "synthesis-steps": ("synthesis", "steps"),
    "synthesis-keep-pools": ("synthesis", "keep_pools"),
    "privacy": ("privacy", "mechanism"),
    "privacy-epsilon": ("privacy", "epsilon"),
    "privacy-delta": ("privacy", "delta"),
    "privacy-max-grad-norm": ("privacy", "max_grad_norm"),
    "privacy-clip-norm": ("privacy", "clip_norm"),
    "privacy-noise-at": ("privacy", "noise_at"),
    "privacy-queries": ("privacy", "queries"),
    "privacy-feature-clip-norm": ("privacy", "feature_clip_norm"),
    "attack": ("attack", "kind"),
    "attack-fraction": ("attack", "fraction"),
    "attack-scale": ("attack", "scale"),
}
# Keys of [tool.flwr.app.config] that describe where results go, not the run itself.
FLOWER_OUTPUT_KEYS = ("output-dir",)


def run_config_from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from Flower's flat kebab-case ``context.run_config``."""
    nested: dict[str, Any] = {"partition": {}, "strategy": {}, "synthesis": {}, "privacy": {}, "attack": {}}
    for key, value in run_config.items():
        if key in FLOWER_OUTPUT_KEYS:
            continue
        if key in _FLOWER_NESTED:
            group, name = _FLOWER_NESTED[key]
            nested[group][name] = value
        else:
            nested[key.replace("-", "_")] = value
    return run_config_from_mapping(nested)


def run_config_to_flower(config: RunConfig) -> dict[str, Any]:
    """Inverse of :func:`run_config_from_flower` (for ``flwr run --run-config``)."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict) or key == "engine":  # flwr run brings its own runtime
            continue
        flat[key.replace("_", "-")] = ",".join(value) if isinstance(value, (list, tuple)) else value
    for flower_key, (group, name) in _FLOWER_NESTED.items():
        flat[flower_key] = getattr(getattr(config, group), name)
    return flat


@dataclass(frozen=True)
class ClientTask:
    """What a client needs to do its part of a round; sent inside each train message.

    Clients hold no run config of their own: the server is the single source of truth, so
    the same ClientApp works under any simulation engine and in a real deployment.
    """

    # "soft-labels": train the teacher, reply with soft labels on the transfer inputs;
    # "weights": train the received model, reply with its weights (FedAvg, FedDF);
    # "class-logits": train with the global per-class logits, reply with own ones (FD).
    mode: str
    server_round: int
    dataset: str
    data_root: str
    num_clients: int
    partition_scheme: str
    partition_alpha: float
    partition_classes: int
    public_size: int
    seed: int
    local_epochs: int
    temperature: float
    client_models: tuple[str, ...]
    student_model: str
    lr: float
    batch_size: int
    augment_shift: float
    digest_epochs: int
    regularizer_weight: float
    synthesis_method: str
    synthesis_per_client: int
    synthesis_steps: int
    rounds: int
    privacy_mechanism: str
    privacy_epsilon: float
    privacy_delta: float
    privacy_max_grad_norm: float
    privacy_clip_norm: float
    # Distributed Gaussian noise (privacy.noise_at=clients): the total standard deviation on the
    # sum and the number of clients sharing it; the server fills these in each round.
    privacy_noise_std: float = 0.0
    privacy_noise_shares: int = 1
    # DP-SGD teachers with synthetic transfer: how many times the run releases each client's
    # feature statistics (one per round), and their clip norm.
    privacy_feature_releases: int = 0
    privacy_feature_clip_norm: float = 3.0
    # Simulated attack (fedkd.attacks): every client knows the kind and fraction, and from the
    # seed whether it is one of the malicious ones.
    attack_kind: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = -4.0

    @classmethod
    def from_run(cls, config: RunConfig, *, mode: str, server_round: int) -> ClientTask:
        return cls(
            mode=mode,
            server_round=server_round,
            dataset=config.dataset,
            data_root=config.data_root,
            num_clients=config.num_clients,
            partition_scheme=config.partition.scheme,
            partition_alpha=config.partition.alpha,
            partition_classes=config.partition.classes_per_partition,
            public_size=config.effective_public_size,
            seed=config.seed,
            local_epochs=config.local_epochs,
            temperature=config.temperature,
            client_models=config.client_models,
            student_model=config.student_model,
            lr=config.lr,
            batch_size=config.batch_size,
            augment_shift=config.augment_shift,
            digest_epochs=config.strategy.digest_epochs,
            regularizer_weight=config.strategy.regularizer_weight,
            synthesis_method=config.synthesis.method,
            synthesis_per_client=config.synthesis.per_client,
            synthesis_steps=config.synthesis.steps,
            rounds=config.rounds,
            privacy_mechanism=config.privacy.mechanism,
            privacy_epsilon=config.privacy.epsilon,
            privacy_delta=config.privacy.delta,
            privacy_max_grad_norm=config.privacy.max_grad_norm,
            privacy_clip_norm=config.privacy.clip_norm,
            privacy_feature_releases=config.rounds if config.releases_feature_statistics else 0,
            privacy_feature_clip_norm=config.privacy.feature_clip_norm,
            attack_kind=config.attack.kind,
            attack_fraction=config.attack.fraction,
            attack_scale=config.attack.scale,
        )

    def split_spec(self, *, data_root: str | None = None) -> SplitSpec:
        """The split this task refers to; a node may read the data from its own ``data_root``."""
        return SplitSpec(
            dataset=self.dataset,
            data_root=self.data_root if data_root is None else data_root,
            num_clients=self.num_clients,
            public_size=self.public_size,
            scheme=self.partition_scheme,
            alpha=self.partition_alpha,
            classes_per_partition=self.partition_classes,
            seed=self.seed,
        )

    def to_record(self) -> dict[str, Any]:
        """Flat values that fit a Flower ``ConfigRecord``."""
        values = dataclasses.asdict(self)
        values["client_models"] = ",".join(self.client_models)
        return {key.replace("_", "-"): value for key, value in values.items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientTask:
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        values = {key.replace("-", "_"): value for key, value in record.items()}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"Train message lacks task keys {missing}; is the server up to date?")
        values = {key: value for key, value in values.items() if key in names}
        values["client_models"] = _models(values["client_models"])
        return cls(**values)
