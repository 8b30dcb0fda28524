import dataclasses

import pytest

from fedkd.config import (
    ClientTask,
    PartitionConfig,
    RunConfig,
    StrategyConfig,
    SynthesisConfig,
    run_config_from_flower,
    run_config_from_mapping,
    run_config_to_flower,
)


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
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"kd_alpha": 0.5}, "public_labels"),
        ({"student_model": "vgg99"}, "Unknown model"),
        ({"client_models": ("cnn_small", "nope")}, "Unknown model"),
        ({"client_models": ()}, "client_models"),
        ({"engine": "spark"}, "engine"),
        ({"lr": 0.0}, "lr"),
        ({"transfer": "web"}, "Unknown transfer"),
        ({"transfer": "synthetic", "strategy": StrategyConfig(name="fedmd")}, "ensemble_distillation"),
        ({"transfer": "synthetic", "public_labels": True}, "public_labels=false"),
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
        (StrategyConfig, {"name": "fedsomething"}, "Unknown strategy"),
        (StrategyConfig, {"aggregator": "max"}, "Unknown aggregator"),
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
    task = ClientTask.from_run(RunConfig(), mode="soft-labels", server_round=4)
    record = task.to_record()
    assert all(isinstance(v, (int, float, str, bool)) for v in record.values())
    assert ClientTask.from_record(record) == task


def test_client_task_missing_keys_are_named():
    record = ClientTask.from_run(RunConfig(), mode="soft-labels", server_round=1).to_record()
    del record["temperature"]
    with pytest.raises(ValueError, match="temperature"):
        ClientTask.from_record(record)


def test_split_spec_agrees_between_server_and_client():
    config = RunConfig(num_clients=5, seed=3)
    task = ClientTask.from_run(config, mode="soft-labels", server_round=1)
    assert task.split_spec() == config.split_spec()
    assert task.split_spec(data_root="/elsewhere").data_root == "/elsewhere"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().rounds = 5  # type: ignore[misc]


def test_the_three_default_configs_agree():
    """pyproject's Flower run config, the Hydra defaults and RunConfig() describe one run."""
    import tomllib
    from pathlib import Path

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from federation.server_app import SERVER_APP_KEYS
    from federation.sim import LAUNCHER_KEYS

    root = Path(__file__).resolve().parents[1]
    flower = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for key in SERVER_APP_KEYS:  # how the ServerApp runs, not what it runs
        flower.pop(key)
    assert run_config_from_flower(flower) == RunConfig()
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["data_root=''"])
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in LAUNCHER_KEYS:  # how fedkd-sim runs, not what it runs
        values.pop(key)
    assert run_config_from_mapping(values) == RunConfig()


def test_synthetic_transfer_has_no_public_set_and_ignores_public_size():
    config = RunConfig(transfer="synthetic", public_size=1000)
    assert config.split_spec().public_size == 0
    task = ClientTask.from_run(config, mode="soft-labels", server_round=1)
    assert task.split_spec() == config.split_spec()


def test_synthesis_settings_travel_through_flower_and_hydra_configs():
    flat = {"transfer": "synthetic", "synthesis-method": "deepinversion", "synthesis-per-client": 7, "synthesis-steps": 9}
    config = run_config_from_flower(flat)
    assert config.synthesis == SynthesisConfig(method="deepinversion", per_client=7, steps=9)
    assert run_config_from_flower(run_config_to_flower(config)) == config
    nested = run_config_from_mapping({"transfer": "synthetic", "synthesis": {"per_client": 3}})
    assert nested.synthesis.per_client == 3
