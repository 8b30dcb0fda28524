"""The strategy registry: every strategy declares what it supports, and the layers stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedkd.config import AttackConfig, RunConfig, StrategyConfig
from fedkd.privacy.config import PrivacyConfig
from strategies.registry import check_run, get_spec, strategy_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_strategy_file_registers_one_strategy_with_a_yaml():
    names = strategy_names()
    assert {"ensemble_distillation", "fedmd", "dsfl", "fd", "feddf", "fedavg"} <= set(names)
    for name in names:
        assert (ROOT / "experiments" / "conf" / "strategy" / f"{name}.yaml").exists()


@pytest.mark.parametrize(
    "config, match",
    [
        (RunConfig(strategy=StrategyConfig(name="fedsomething")), "Unknown strategy 'fedsomething'"),
        (RunConfig(strategy=StrategyConfig(aggregator="max")), "Unknown aggregator 'max'"),
        (RunConfig(transfer="synthetic", strategy=StrategyConfig(name="fedmd")), "ensemble_distillation"),
        (RunConfig(strategy=StrategyConfig(name="dsfl", aggregator="era")), "twice"),
        (RunConfig(strategy=StrategyConfig(name="fedavg"), privacy=PrivacyConfig(mechanism="dpsgd")), "privacy=dpsgd"),
        (RunConfig(strategy=StrategyConfig(name="fd"), attack=AttackConfig(kind="flip", fraction=0.1)), "soft labels"),
        (RunConfig(strategy=StrategyConfig(name="feddf"), public_size=0), "public_size > 0"),
    ],
)
def test_a_strategy_refuses_what_it_does_not_support_and_names_the_fix(config, match):
    with pytest.raises(ValueError, match=match):
        check_run(config)


def test_supported_combinations_pass():
    check_run(RunConfig(strategy=StrategyConfig(name="dsfl", aggregator="mean")))
    check_run(RunConfig(transfer="synthetic"))
    check_run(RunConfig(privacy=PrivacyConfig(mechanism="gnmax")))
    assert get_spec("fd").client_mode == "class-logits"


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("fedkd", {"strategies", "federation", "experiments"}),
        ("strategies", {"federation", "experiments"}),
        ("generators", {"fedkd", "strategies", "federation", "experiments"}),
    ],
)
def test_layers_import_only_downwards(package, forbidden):
    """fedkd (the library) < generators, strategies < federation (the composition root)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in (ROOT / package).rglob("*.py")
        if _imported_packages(path) & forbidden
    }
    assert not offenders
