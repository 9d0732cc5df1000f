import re
from pathlib import Path

import pytest
import yaml

from aihpc.config import (
    ConfigError,
    DistillConfig,
    evaluate_config,
    load_config,
    model_config,
    model_gpu_bounds,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]


def minimal() -> dict:
    return {
        "data": {"name": "fashion-mnist", "format": "idx", "root": "/data"},
        "models": {"net": {"arch": "resnet_s"}},
    }


def test_defaults_are_filled():
    config = validate_config(minimal())
    assert config["data"]["val_fraction"] == 0.05
    assert config["train"]["epochs"] == 10
    assert config["evaluate"]["latency_batch_sizes"] == [1, 256]
    assert config["models"]["net"]["kwargs"] == {}
    assert DistillConfig(**config["compress"]["distill"]) == DistillConfig(
        weight=0.0, temperature=4.0
    )


def test_model_train_block_overrides_only_what_it_sets():
    config = minimal()
    config["train"] = {"lr": 0.05, "epochs": 4}
    config["models"]["net"]["train"] = {"epochs": 7}
    validate_config(config)
    # The per-model block gets no defaults filled in, or it would mask the top level.
    assert config["models"]["net"]["train"] == {"epochs": 7}
    model = model_config(config, "net")
    assert (model.train.epochs, model.train.lr, model.train.batch_size) == (7, 0.05, 256)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c["models"]["net"].update(arch="vgg"), "models.net.arch"),
        (lambda c: c.update(train={"lr": -0.1}), "train.lr"),
        (lambda c: c["data"].update(val_fraction=1.0), "data.val_fraction"),
        (lambda c: c["data"].update(format="csv"), "data.format"),
        (lambda c: c["models"]["net"].update(train={"epochs": 0}), "models.net.train.epochs"),
        (lambda c: c["models"].update({"bad-name": {"arch": "seed_cnn"}}), "models"),
        (lambda c: c["data"].pop("root"), "data"),
        (lambda c: c.update(extra=1), "(top level)"),
        (lambda c: c.update(compress={"distill": {"weight": 1.5}}), "compress.distill.weight"),
        (
            lambda c: c.update(compress={"distill": {"temperature": 0}}),
            "compress.distill.temperature",
        ),
        (lambda c: c.update(compress={"distill": {"alpha": 0.5}}), "compress.distill"),
    ],
)
def test_schema_violations_name_the_field(change, field):
    config = minimal()
    change(config)
    with pytest.raises(ConfigError, match=re.escape(f"my.yaml: field '{field}'")):
        validate_config(config, "my.yaml")


def test_load_config_reads_and_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert load_config(path)["train"]["optimizer"] == "sgd"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        load_config(path)


@pytest.mark.parametrize("name", ["config.yaml", "test.yaml", "cifar10.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(ROOT / "config" / name)
    for model in config["models"]:
        model_config(config, model)
    assert evaluate_config(config).latency_batch_sizes[0] == 1


def test_unknown_model_variant():
    with pytest.raises(ConfigError, match="unknown model variant 'nope'"):
        model_config(validate_config(minimal()), "nope")


def allocating(gpus, enabled: bool = True) -> dict:
    config = minimal()
    config["models"]["net"]["gpus"] = gpus
    config["allocate"] = {"enabled": enabled}
    return config


@pytest.mark.parametrize(
    ("gpus", "bounds"),
    [(None, (1, None)), (4, (4, 4)), ({"min": 2}, (2, None)), ({"min": 2, "max": 8}, (2, 8))],
)
def test_model_gpus_bound_the_plan(gpus, bounds):
    config = minimal() if gpus is None else allocating(gpus)
    assert model_gpu_bounds(validate_config(config), "net") == bounds


@pytest.mark.parametrize(
    ("gpus", "enabled", "message"),
    [
        ({"min": 4, "max": 2}, True, "models.net.gpus': min 4 > max 2"),
        ({"min": 2}, False, "models.net.gpus': a {min, max} range is for the allocator"),
        (0, True, "models.net.gpus': 0 with allocate.enabled"),
        ({}, True, "models.net.gpus': {} should be non-empty"),
        ({"mx": 2}, True, "models.net.gpus': Additional properties are not allowed ('mx'"),
        ({"min": 0}, True, "models.net.gpus.min': 0 is less than the minimum of 1"),
        (-1, False, "models.net.gpus': -1 is less than the minimum of 0"),
        ("2", True, "models.net.gpus': '2' is not of type 'integer', 'object'"),
    ],
)
def test_model_gpus_errors_name_the_field(gpus, enabled, message):
    with pytest.raises(ConfigError, match=re.escape(f"my.yaml: field '{message}")):
        validate_config(allocating(gpus, enabled), "my.yaml")
