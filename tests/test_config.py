import dataclasses
from pathlib import Path

import pytest

from fedkd.config import (
    CHEAP_ROUNDS,
    COSTLY_ROUNDS,
    DATASET_AUGMENT_SHIFT,
    DATASET_SHIFT,
    GROUPS,
    ROUNDS_BY_COST,
    ClientTask,
    PartitionConfig,
    RunConfig,
    StrategyConfig,
    SynthesisConfig,
    run_config_from_flower,
    run_config_from_mapping,
    run_config_to_flower,
)

GROUPS_PRIMARY = {group: primary for group, (_, primary) in GROUPS.items()}


def test_defaults_are_valid_and_quick():
    config = RunConfig()
    assert config.dataset == "digits"
    assert config.kd_alpha == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clients": 0}, "num_clients"),
        ({"rounds": 0}, "rounds"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"public_size": -1}, "public_size"),
        ({"validation_size": -5}, "validation_size must be ≥ 0"),
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"kd_alpha": 0.5}, "public_labels"),
        ({"student_model": "vgg99"}, "Unknown model"),
        ({"client_models": ("cnn_small", "nope")}, "Unknown model"),
        ({"client_models": ()}, "client_models"),
        ({"engine": "spark"}, "engine"),
        ({"lr": 0.0}, "lr"),
        ({"transfer": "web"}, "Unknown transfer"),
        ({"transfer": "synthetic", "public_labels": True}, "public_labels=false"),
        ({"distill_ema": 1.0}, "distill_ema must lie in"),
    ],
)
def test_invalid_run_config_names_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (PartitionConfig, {"alpha": 0.0}, "alpha must be > 0"),
        (PartitionConfig, {"scheme": "shards"}, "Unknown partition scheme"),
        (StrategyConfig, {"fraction_train": 0.0}, "fraction_train"),
        (SynthesisConfig, {"method": "gan"}, "Unknown synthesis method"),
        (SynthesisConfig, {"per_client": 0}, "per_client"),
        (SynthesisConfig, {"steps": 0}, "steps"),
    ],
)
def test_invalid_nested_config(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_from_mapping_builds_nested_dataclasses():
    config = run_config_from_mapping(
        {
            "dataset": "mnist",
            "data_root": None,
            "partition": {"scheme": "iid", "alpha": 0.5, "classes_per_partition": 2},
            "strategy": {"name": "fedavg"},
            "client_models": ["cnn_small"],
        }
    )
    assert config.partition.scheme == "iid"
    assert config.strategy.name == "fedavg"
    assert config.client_models == ("cnn_small",)
    assert config.data_root == ""


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="Unknown RunConfig keys"):
        run_config_from_mapping({"num_client": 3})


def test_flower_round_trip():
    config = RunConfig(
        num_clients=7,
        partition=PartitionConfig(scheme="pathological", classes_per_partition=3),
        strategy=StrategyConfig(name="fedavg", fraction_train=0.5),
        client_models=("cnn_small", "mlp"),
    )
    flat = run_config_to_flower(config)
    assert all("_" not in key for key in flat)
    assert run_config_from_flower(flat) == config
    assert "engine" not in flat


def test_flower_config_ignores_output_dir():
    assert run_config_from_flower({"output-dir": "somewhere", "rounds": 2}).rounds == 2


def test_client_task_round_trips_through_a_record():
    task = ClientTask(mode="soft-labels", server_round=4, run=RunConfig())
    record = task.to_record()
    assert all(isinstance(v, (int, float, str, bool)) for v in record.values())
    assert ClientTask.from_record(record) == task


def test_client_task_missing_keys_are_named():
    record = ClientTask(mode="soft-labels", server_round=1, run=RunConfig()).to_record()
    del record["server-round"]
    with pytest.raises(ValueError, match="server-round"):
        ClientTask.from_record(record)


def test_split_spec_agrees_between_server_and_client():
    config = RunConfig(num_clients=5, seed=3)
    task = ClientTask(mode="soft-labels", server_round=1, run=config)
    assert task.run.split_spec() == config.split_spec()
    assert task.run.split_spec(data_root="/elsewhere").data_root == "/elsewhere"


def test_the_default_shift_is_the_datasets_and_an_explicit_one_wins():
    assert RunConfig(dataset="mnist").augment_shift == DATASET_AUGMENT_SHIFT["mnist"] > 0
    assert RunConfig(dataset="digits").augment_shift == DATASET_AUGMENT_SHIFT["digits"] > 0
    assert RunConfig(dataset="fashion_mnist").augment_shift == 0.0
    assert RunConfig(dataset="mnist", augment_shift=0.0).augment_shift == 0.0
    assert RunConfig(dataset="fashion_mnist", augment_shift=0.05).augment_shift == 0.05
    # What the run records is the resolved value, which reads back as the same run.
    resolved = RunConfig(dataset="mnist")
    assert run_config_from_mapping(dataclasses.asdict(resolved)) == resolved
    with pytest.raises(ValueError, match="dataset's own"):
        RunConfig(augment_shift=-0.5)


def test_the_default_rounds_follow_what_a_round_costs():
    from fedkd.privacy.config import PrivacyConfig

    assert RunConfig().rounds == CHEAP_ROUNDS  # public transfer, no privacy
    assert RunConfig(transfer="synthetic").rounds == COSTLY_ROUNDS
    assert RunConfig(privacy=PrivacyConfig(mechanism="gaussian")).rounds == COSTLY_ROUNDS
    assert RunConfig(rounds=3, transfer="synthetic").rounds == 3  # a number given is kept
    # What the run records is the resolved number, which reads back as the same run.
    resolved = RunConfig(transfer="synthetic")
    assert run_config_from_mapping(dataclasses.asdict(resolved)) == resolved
    with pytest.raises(ValueError, match="rounds"):
        RunConfig(rounds=0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().rounds = 5  # type: ignore[misc]


def test_the_three_default_configs_agree():
    """pyproject's Flower run config, the Hydra defaults and RunConfig() describe one run."""
    from pathlib import Path

    import tomllib
    from hydra import compose, initialize_config_module

    from federation.hydra_schema import sim_config_from_hydra

    root = Path(__file__).resolve().parents[1]
    flower = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config_from_flower(flower) == RunConfig()
    # pyproject asks for the dataset's shift and for the rounds that suit a round's cost; a built
    # config holds the values they resolved to.
    assert flower["augment-shift"] == DATASET_SHIFT and flower["rounds"] == ROUNDS_BY_COST
    resolved_keys = ("augment-shift", "rounds")
    written = {key: value for key, value in flower.items() if key not in ("output-dir", *resolved_keys)}
    resolved = run_config_to_flower(RunConfig())
    assert resolved.pop("augment-shift") == DATASET_AUGMENT_SHIFT["digits"]
    assert resolved.pop("rounds") == CHEAP_ROUNDS
    assert written == resolved
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["data_root=''"])
    assert sim_config_from_hydra(cfg).run_config() == RunConfig()


CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
# pate_by_partition/ refines privacy=pate per partition scheme; it is not a RunConfig group.
GROUP_FILES = sorted(path for path in CONF.glob("*/*.yaml") if path.parent.name in GROUPS)
PATE_BY_PARTITION = CONF / "pate_by_partition"


def _composed_run(*overrides: str) -> RunConfig:
    from hydra import compose, initialize_config_module

    from federation.hydra_schema import sim_config_from_hydra

    with initialize_config_module(config_module="experiments.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, "data_root=''"])
    return sim_config_from_hydra(cfg).run_config()


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_group_file_names_its_choice_and_lists_only_what_differs(path):
    """Defaults live in the dataclasses; a group file that repeated one would drift from it."""
    import yaml

    from fedkd.config import GROUPS

    text = path.read_text()
    values = yaml.safe_load(text)
    schema, primary = GROUPS[path.parent.name]
    run_level: dict = {}
    if "@package _global_" in text:  # a group that also sets run-level keys nests its own
        run_level = {key: value for key, value in values.items() if key != path.parent.name}
        values = values[path.parent.name]
    assert values[primary] == path.stem
    defaults = schema()
    repeated = [key for key, value in values.items() if key != primary and getattr(defaults, key) == value]
    # Run-level keys against their declared defaults (the class attributes): augment_shift's
    # resolves per dataset, and a group that pins it pins it for every dataset.
    repeated += [
        key
        for key, value in run_level.items()
        if getattr(RunConfig, key) in (value, tuple(value) if isinstance(value, list) else value)
    ]
    assert not repeated, f"{path} repeats the defaults of {repeated}; delete those lines"


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_group_file_composes_into_a_valid_run(path):
    config = _composed_run(f"{path.parent.name}={path.stem}")
    assert getattr(getattr(config, path.parent.name), GROUPS_PRIMARY[path.parent.name]) == path.stem


def test_every_conf_folder_is_a_group_or_the_pate_refinement():
    folders = {path.name for path in CONF.iterdir() if path.is_dir() and not path.name.startswith("__")}
    assert folders <= set(GROUPS) | {PATE_BY_PARTITION.name}, (
        "a conf folder that is no group would be skipped by the tests above"
    )


@pytest.mark.parametrize("scheme", sorted(path.stem for path in (CONF / "partition").glob("*.yaml")))
def test_privacy_pate_takes_its_queries_and_noise_from_the_partition_scheme(scheme):
    """Every scheme has its PATE settings, and they reach the run (IID teachers agree, others do not)."""
    import yaml

    path = PATE_BY_PARTITION / f"pate_{scheme}.yaml"
    assert path.exists(), f"privacy=pate partition={scheme} would fall back to PrivacyConfig's defaults"
    config = _composed_run("privacy=pate", f"partition={scheme}")
    values = yaml.safe_load(path.read_text())
    if "privacy" not in values:  # a file that takes another's settings through its defaults list
        values = yaml.safe_load((PATE_BY_PARTITION / f"{values['defaults'][0]}.yaml").read_text())
    assert set(values) == {"privacy"}, f"{path} may only set privacy.*"
    for key, value in values["privacy"].items():
        assert getattr(config.privacy, key) == value, key
    assert config.partition.scheme == scheme and config.privacy.mechanism == "pate"


def test_pate_settings_differ_by_partition_and_yield_to_the_command_line():
    iid, dirichlet = (
        _composed_run("privacy=pate", "partition=iid"),
        _composed_run("privacy=pate", "partition=dirichlet"),
    )
    assert (iid.privacy.queries, iid.privacy.sigma_gnmax) == (640, 30.0)
    assert (dirichlet.privacy.queries, dirichlet.privacy.sigma_gnmax) == (250, 40.0)
    assert _composed_run("privacy=pate", "partition=dirichlet", "privacy.queries=300").privacy.queries == 300
    # Other mechanisms keep the dataclass's values whatever the partition.
    assert _composed_run("privacy=gnmax", "partition=iid").privacy.queries == RunConfig().privacy.queries


def test_synthetic_transfer_has_no_public_set_and_ignores_public_size():
    config = RunConfig(transfer="synthetic", public_size=1000)
    assert config.split_spec().public_size == 0
    task = ClientTask(mode="soft-labels", server_round=1, run=config)
    assert task.run.split_spec() == config.split_spec()


def test_synthesis_settings_travel_through_flower_and_hydra_configs():
    flat = {
        "transfer": "synthetic",
        "synthesis": "deepinversion",
        "synthesis-per-client": 7,
        "synthesis-steps": 9,
        "synthesis-warm-steps": 0,
    }
    config = run_config_from_flower(flat)
    assert config.synthesis == SynthesisConfig(method="deepinversion", per_client=7, steps=9, warm_steps=0)
    assert run_config_from_flower(run_config_to_flower(config)) == config
    nested = run_config_from_mapping({"transfer": "synthetic", "synthesis": {"per_client": 3}})
    assert nested.synthesis.per_client == 3
