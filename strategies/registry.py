"""The strategy registry: one :class:`StrategySpec` per strategy, registered in its own file.

A spec says what a strategy's clients do, what it supports (privacy mechanisms, synthetic
transfer, attacks, a choice of aggregator) and how it is built from a run's configuration. The
composition root (``federation``) looks strategies up here; nothing else names them.

Adding a strategy: write ``strategies/<name>.py`` with the class and a ``register(StrategySpec(...))``
call, and ``experiments/conf/strategy/<name>.yaml`` with ``name: <name>`` and whatever differs
from :class:`fedkd.config.StrategyConfig`. Every module of this package is imported by
:func:`load_strategies`, so the new file needs no import elsewhere.

Every registered strategy keeps its state across rounds through the
:class:`CheckpointableStrategy` protocol, which the run loop uses for checkpoints and resume,
as Opacus's accountants expose ``state_dict``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from fedkd.config import AUTO_AGGREGATOR, POWER_BY_SETTING, RunConfig
from fedkd.data import DatasetInfo
from fedkd.data.local import public_inputs
from fedkd.distillation import OptimizerSettings, SemiSupervision
from fedkd.student import Student
from strategies.aggregation import AGGREGATORS, PER_CLASS_WEIGHTS, Aggregator, class_weighted, get_aggregator
from strategies.sampling import ClientSampling, sample_size
from strategies.transfer import (
    ClientAggregator,
    PublicTransfer,
    RobustAggregation,
    RoundAveraged,
    StatelessAggregation,
    client_aggregator,
    retempered,
)

StateRecords = dict[str, ArrayRecord | ConfigRecord]


@runtime_checkable
class CheckpointableStrategy(Protocol):
    """What the run loop asks of every registered strategy beyond Flower's ``Strategy``."""

    # Strategies without a global model (FD) have their clients report accuracy instead.
    evaluates_on_clients: bool

    def state_records(self) -> StateRecords:
        """What the strategy carries from one round to the next ({} if nothing)."""
        ...

    def load_state_records(self, state: StateRecords) -> None:
        """Continue from :meth:`state_records` of an earlier run of the same configuration."""
        ...

    def privacy_state(self) -> dict[str, Any] | None:
        """The run's privacy accounting so far, for ``privacy.json`` (``None`` without privacy)."""
        ...


@dataclass(frozen=True)
class BuildContext:
    """What building a strategy needs: the run, its dataset's shape, and the student network."""

    config: RunConfig
    info: DatasetInfo
    student_model: torch.nn.Module

    @property
    def sampling(self) -> ClientSampling:
        strategy = self.config.strategy
        return ClientSampling(
            fraction=strategy.fraction_train, min_available_nodes=self.config.num_clients, seed=self.config.seed
        )

    @property
    def expected_clients(self) -> int:
        """Clients sampled per round (public: it follows from the configuration)."""
        return sample_size(self.config.num_clients, self.config.strategy.fraction_train)

    @property
    def aggregator(self) -> ClientAggregator:
        """The run's aggregator; ``robust`` keeps each client's reputation across rounds. With
        ``strategy.aggregate_temperature`` set (and unlike ``temperature``) it combines the clients'
        rows at that temperature and softens the aggregate back to ``temperature``."""
        name = self.config.aggregator
        aggregate = get_aggregator(name)
        power = self.config.class_weight_power
        if name == "class_weighted" and power != 1.0:
            aggregate = functools.partial(class_weighted, power=power)
        combined: ClientAggregator = (
            RobustAggregation(self.info.num_classes) if name == "robust" else StatelessAggregation(aggregate)
        )
        combine_at = self.config.strategy.aggregate_temperature
        if combine_at and combine_at != self.config.temperature:
            return retempered(combined, sent_at=self.config.temperature, combined_at=combine_at)
        return combined

    def student(self) -> Student:
        config = self.config
        return Student(
            self.student_model,
            temperature=config.temperature,
            epochs=config.distill_epochs,
            settings=OptimizerSettings(lr=config.lr, batch_size=config.batch_size),
            seed=config.seed,
            alpha=config.kd_alpha,
            max_shift=config.distill_shift,
            schedule=config.distill_schedule,
            average_decay=config.distill_ema,
            semi=SemiSupervision(ema_decay=config.distill_ema) if config.semi_supervised else None,
        )

    def public_transfer(self, aggregator: Aggregator | ClientAggregator | None = None) -> PublicTransfer:
        """The whole public split as the transfer set (labels only where the run allows them)."""
        public = public_inputs(self.config.split_spec())
        combined = client_aggregator(aggregator if aggregator is not None else self.aggregator)
        if self.config.strategy.round_average > 0:
            combined = RoundAveraged(combined, decay=self.config.strategy.round_average)
        return PublicTransfer(
            inputs=public.images,
            indices=np.arange(len(public.images)),
            aggregator=combined,
            labels=public.labels if self.config.public_labels else None,
            mixup_views=self.config.mixup_views,
            seed=self.config.seed,
        )


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy.

    Parameters
    ----------
    name : str
        The ``strategy=`` value and the YAML file name.
    client_mode : str
        What its clients do with a train message (see ``fedkd.config.CLIENT_MODES``).
    build : Callable[[BuildContext], Strategy]
        Builds the strategy for a run.
    privacy : tuple[str, ...]
        Privacy mechanisms it supports besides ``none``.
    synthetic_transfer : bool
        Whether ``transfer=synthetic`` can replace its public set.
    attacks : bool
        Whether simulated attacks apply (its clients share soft labels).
    aggregators : bool
        Whether ``strategy.aggregator`` applies to it.
    needs_public_set : bool
        Whether it distills on the public split (``public_size`` must be > 0).
    mixup_views : bool
        Whether its clients label mixup views of the public inputs (``mixup_views`` > 0).
    co_distillation : bool
        Whether the consensus can travel down for the clients to learn from in their local
        training (``strategy.consensus_weight`` > 0).
    digests_consensus : bool
        Whether its clients first fit the consensus alone, ``strategy.digest_epochs`` (FedMD, DS-FL).
    extra_check : Callable[[RunConfig], None], optional
        Further conditions of this strategy on the configuration (raises ``ValueError``).
    """

    name: str
    client_mode: str
    build: Callable[[BuildContext], Strategy]
    privacy: tuple[str, ...] = ()
    synthetic_transfer: bool = False
    attacks: bool = False
    aggregators: bool = False
    needs_public_set: bool = False
    mixup_views: bool = False
    co_distillation: bool = False
    digests_consensus: bool = False
    extra_check: Callable[[RunConfig], None] | None = None

    def check(self, config: RunConfig) -> None:
        """Raise ``ValueError`` naming the fix if ``config`` asks for what this strategy lacks."""
        name = config.strategy.name
        if config.transfer == "synthetic" and not self.synthetic_transfer:
            raise ValueError(
                f"transfer=synthetic works with {names_where(lambda s: s.synthetic_transfer)}, not "
                f"strategy={name}; use one of them or transfer=public."
            )
        if self.needs_public_set and config.transfer == "public" and config.public_size == 0:
            raise ValueError(f"strategy={name} distills on a public transfer set; set public_size > 0.")
        mechanism = config.privacy.mechanism
        if mechanism != "none" and mechanism not in self.privacy:
            raise ValueError(
                f"privacy={mechanism} is not supported by strategy={name}; use one of "
                f"{names_where(lambda s: mechanism in s.privacy)} or privacy=none."
            )
        if config.attack.enabled and not self.attacks:
            raise ValueError(
                f"attack.kind={config.attack.kind} corrupts shared soft labels; strategy={name} shares "
                f"something else. Use one of {names_where(lambda s: s.attacks)}."
            )
        if config.aggregator not in AGGREGATORS:
            raise ValueError(
                f"Unknown aggregator {config.aggregator!r}; choose one of {sorted([AUTO_AGGREGATOR, *AGGREGATORS])}."
            )
        if config.mixup_views and not self.mixup_views:
            raise ValueError(
                f"mixup_views={config.mixup_views} is labelled by clients that share soft labels on the public "
                f"set ({names_where(lambda s: s.mixup_views)}), not by strategy={name}; set mixup_views=0."
            )
        if config.aggregator in PER_CLASS_WEIGHTS and mechanism != "none":
            raise ValueError(
                f"strategy.aggregator={config.strategy.aggregator} has every client send its class counts, "
                f"which privacy={mechanism} does not noise or account for; use strategy.aggregator=weighted "
                "(or another aggregator) with privacy, or privacy=none."
            )
        power = config.strategy.class_weight_power
        if power not in (1.0, POWER_BY_SETTING) and config.aggregator != "class_weighted":
            raise ValueError(
                f"strategy.class_weight_power={power} raises the class counts that only "
                f"strategy.aggregator=class_weighted weighs by, not {config.aggregator}; set "
                "strategy.aggregator=class_weighted (auto is class_weighted without privacy) or "
                "strategy.class_weight_power=1."
            )
        self._check_consensus_weight(config)
        if self.extra_check is not None:
            self.extra_check(config)

    def _check_consensus_weight(self, config: RunConfig) -> None:
        weight, name = config.consensus_weight, config.strategy.name
        if weight == 0:
            return
        if not self.co_distillation:
            raise ValueError(
                f"strategy.consensus_weight={weight} sends the aggregated soft labels down for the clients to "
                f"learn from; strategy={name} has none. Use one of {names_where(lambda s: s.co_distillation)} "
                "or strategy.consensus_weight=0."
            )
        if config.transfer != "public":
            raise ValueError(
                f"strategy.consensus_weight={weight} needs transfer=public: synthetic inputs stay with the client "
                "that made them, so the others cannot learn the consensus on them. Set strategy.consensus_weight=0."
            )
        if config.privacy.mechanism != "none":
            raise ValueError(
                f"strategy.consensus_weight={weight} adds steps on the public inputs to every client's training, "
                f"which privacy={config.privacy.mechanism} does not account for; set strategy.consensus_weight=0."
            )


_REGISTRY: dict[str, StrategySpec] = {}


def register(spec: StrategySpec) -> StrategySpec:
    """Add ``spec`` to the registry (called once, in the strategy's own module)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"two strategies are registered as {spec.name!r}; rename one.")
    _REGISTRY[spec.name] = spec
    return spec


@functools.cache
def load_strategies() -> None:
    """Import every module of this package, so each strategy's ``register`` call has run."""
    import strategies

    for module in pkgutil.iter_modules(strategies.__path__):
        importlib.import_module(f"strategies.{module.name}")


def strategy_names() -> list[str]:
    load_strategies()
    return sorted(_REGISTRY)


def names_where(predicate: Callable[[StrategySpec], bool]) -> list[str]:
    load_strategies()
    return sorted(name for name, spec in _REGISTRY.items() if predicate(spec))


def get_spec(name: str) -> StrategySpec:
    """The spec registered as ``name``, or a ``ValueError`` listing the known ones."""
    load_strategies()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {strategy_names()}.")
    return _REGISTRY[name]


def check_run(config: RunConfig) -> StrategySpec:
    """The run's strategy spec, after checking that the strategy supports the configuration."""
    spec = get_spec(config.strategy.name)
    spec.check(config)
    return spec


def build_strategy(config: RunConfig, *, info: DatasetInfo, student_model: torch.nn.Module) -> Strategy:
    """Build the run's strategy; it is checked to keep its state through the checkpoint protocol."""
    spec = check_run(config)
    strategy = spec.build(BuildContext(config, info, student_model))
    if not isinstance(strategy, CheckpointableStrategy):
        raise TypeError(
            f"strategy {spec.name!r} ({type(strategy).__name__}) does not implement CheckpointableStrategy: "
            "give it state_records, load_state_records, privacy_state and evaluates_on_clients."
        )
    return strategy
