"""The typed schema of ``fedkd-sim``'s Hydra config, registered from :mod:`fedkd.config`.

Every default lives in the dataclasses; this registers them with Hydra's ConfigStore, so the
YAML tree under ``experiments/conf`` lists only what differs (``strategy/dsfl.yaml`` is
``name: dsfl``), and Hydra type-checks every override before the run starts
(``rounds=abc`` is refused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedkd.config import LOGGERS, RunConfig

SCHEMA_NAME = "fedkd_schema"


@dataclass(frozen=True)
class RayConfig:
    """Where ``engine=ray`` runs: ``address`` of a running Ray cluster (``ray start --head``
    prints it; ``auto`` finds one on this machine), or empty to start a private Ray here."""

    address: str = ""


@dataclass(frozen=True)
class SimConfig(RunConfig):
    """A run plus the keys that steer ``fedkd-sim`` itself (not part of the run's identity)."""

    verbose: bool = False  # show Flower's own INFO logs
    rerun: bool = False  # redo a run even if its folder already holds it finished
    resume: bool = False  # continue an interrupted run from its folder's last checkpoint
    logger: str = "jsonl"  # jsonl (metrics.jsonl only) | tensorboard (also TensorBoard event files)
    ray: RayConfig = field(default_factory=RayConfig)  # engine=ray only; not part of the run

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logger not in LOGGERS:
            raise ValueError(f"Unknown logger {self.logger!r}; choose one of {list(LOGGERS)}.")

    def run_config(self) -> RunConfig:
        """The run alone: what the run folder records and checkpoints are checked against."""
        names = {f.name for f in dataclasses.fields(RunConfig)}
        return RunConfig(**{name: getattr(self, name) for name in names})


LAUNCHER_KEYS = tuple(
    f.name for f in dataclasses.fields(SimConfig) if f.name not in {g.name for g in dataclasses.fields(RunConfig)}
)


def _writable(schema: type) -> DictConfig:
    # Frozen dataclasses (nested ones too) become read-only configs, which Hydra could not
    # override; the dataclasses stay frozen where the run uses them.
    node = OmegaConf.structured(schema)
    _unfreeze(node)
    return node


def _unfreeze(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _unfreeze(child)


def register_configs() -> None:
    """Register the schema (idempotent); the primary config names it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=_writable(SimConfig))


def sim_config_from_hydra(cfg: DictConfig) -> SimConfig:
    """The typed config from Hydra's composed one (raises ``ValueError`` on bad values)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(container, dict):
        raise ValueError("the composed configuration is not a mapping of keys to values.")
    values: dict[str, Any] = {str(key): value for key, value in container.items()}
    values.pop("hydra", None)
    from fedkd.config import run_config_from_mapping

    launcher = {key: values.pop(key) for key in LAUNCHER_KEYS if key in values}
    if isinstance(launcher.get("ray"), dict):
        unknown = sorted(set(launcher["ray"]) - {f.name for f in dataclasses.fields(RayConfig)})
        if unknown:
            raise ValueError(f"Unknown ray keys {unknown}; the only one is 'address'.")
        launcher["ray"] = RayConfig(**launcher["ray"])
    run = run_config_from_mapping(values)
    return SimConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}, **launcher)
