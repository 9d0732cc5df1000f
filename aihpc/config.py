"""Typed view of the validated workflow config; the one place that reads config YAML.

The schema (workflow/schemas/config.schema.yaml) is the single source of field names,
constraints and defaults: Snakemake validates with it in common.smk, and ``load_config``
validates with the same function for callers outside Snakemake.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aihpc.errors import InputError

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(InputError):
    """A config that violates the schema; the message names the file and the field."""


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place against the schema, filling defaults; return it."""
    import jsonschema
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA), set_default=True)
    except Exception as exc:
        # Snakemake wraps the jsonschema error (as the context of its WorkflowError).
        candidates = (exc.__cause__, exc.__context__, *exc.args)
        cause = next((c for c in candidates if isinstance(c, jsonschema.ValidationError)), None)
        if cause is None:
            raise
        where = ".".join(str(p) for p in cause.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: field '{where}': {cause.message}") from None
    _check_model_gpus(config, source)
    return config


def _check_model_gpus(config: dict[str, Any], source: str) -> None:
    """What the schema cannot say about ``models.<name>.gpus``: min <= max, and which form
    goes with allocate.enabled."""
    allocating = config["allocate"]["enabled"]
    for name, entry in config["models"].items():
        gpus = entry.get("gpus")
        where = f"{source}: field 'models.{name}.gpus'"
        if isinstance(gpus, dict):
            if not allocating:
                raise ConfigError(
                    f"{where}: a {{min, max}} range is for the allocator (allocate.enabled: "
                    f"true); without it give the GPU count to ask for"
                )
            low, high = model_gpu_bounds(config, name)
            if high is not None and low > high:
                raise ConfigError(f"{where}: min {low} > max {high}")
        elif gpus == 0 and allocating:
            raise ConfigError(
                f"{where}: 0 with allocate.enabled: a plan gives every job at least one GPU "
                f'(or CPU worker on a "cpu" pool); give a count >= 1 or {{min, max}}'
            )


def model_gpu_bounds(config: dict[str, Any], name: str) -> tuple[int, int | None]:
    """(min, max) GPUs the allocator may plan for model ``name``'s training job, from its
    validated ``gpus``: a count fixes both, {min, max} bounds them; max None = no bound."""
    gpus = config["models"][name].get("gpus")
    if gpus is None:
        return 1, None
    if isinstance(gpus, dict):
        return gpus.get("min", 1), gpus.get("max")
    return gpus, gpus


def load_config(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(config, str(path))


@dataclass(frozen=True)
class DataConfig:
    name: str
    format: str
    root: str
    train_file: str | None = None
    test_file: str | None = None
    class_names: list[str] | None = None
    val_fraction: float = 0.05
    seed: int = 0
    verify_checksums: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.25
    label_smoothing: float = 0.1
    crop_padding: int = 2
    hflip: bool = True
    seed: int = 0
    accelerator: str = "auto"
    precision: str = "auto"
    limit_train_batches: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """One model of the sweep: its variant name, architecture and effective train settings."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistributedConfig:
    """How the train rule runs a model: ``workers`` DDP ranks on a Dask cluster."""

    cluster: str = "local"
    workers: int = 1
    scheduler_address: str | None = None
    scheduler_file: str | None = None
    timeout_s: float = 120.0


@dataclass(frozen=True)
class EvaluateConfig:
    threads: int = 1
    warmup: int = 3
    repeats: int = 10
    latency_batch_sizes: tuple[int, ...] = (1, 256)
    compile: bool = True
    cpp_wrapper: bool = False
    aot: bool = False


def data_config(config: dict[str, Any]) -> DataConfig:
    return DataConfig(**config["data"])


def model_config(config: dict[str, Any], name: str) -> ModelConfig:
    """The model ``name`` with the top-level train settings overridden by its own."""
    if name not in config["models"]:
        raise ConfigError(f"unknown model variant '{name}'; configured: {sorted(config['models'])}")
    entry = copy.deepcopy(config["models"][name])
    train = {**config.get("train", {}), **entry.get("train", {})}
    return ModelConfig(
        name=name, arch=entry["arch"], kwargs=entry.get("kwargs", {}), train=TrainConfig(**train)
    )


def distributed_config(config: dict[str, Any]) -> DistributedConfig:
    return DistributedConfig(**config.get("distributed", {}))


def evaluate_config(config: dict[str, Any]) -> EvaluateConfig:
    settings = dict(config.get("evaluate", {}))
    if "latency_batch_sizes" in settings:
        settings["latency_batch_sizes"] = tuple(settings["latency_batch_sizes"])
    return EvaluateConfig(**settings)


# --- compression variants (compress: in the config) ------------------------------------------

PRUNE_TOKENS = {"structured": "struct", "unstructured": "unstruct"}
QUANT_MODES = ("int8", "int8dyn", "fp16", "bf16")


@dataclass(frozen=True)
class CompressStage:
    """One compression stage's output variant.

    ``stage`` is ``prune`` (prune + fine-tune the ``parent`` model) or ``quantize``
    (quantise the ``parent`` variant). ``model`` is the trained model the path starts from.
    """

    name: str
    model: str
    parent: str
    stage: str
    prune_method: str | None = None
    prune_ratio: float | None = None
    l1: float = 0.0
    gradual: bool = False
    quant: str = "fp32"
    finetune: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the unpruned model while fine-tuning (weight 0: off)."""

    weight: float = 0.0
    temperature: float = 4.0


def prune_token(prune: dict[str, Any]) -> str:
    """``struct0.5``, ``unstruct0.8``; ``g`` marks a gradual schedule, ``_lam<l1>`` a penalty."""
    token = f"{PRUNE_TOKENS[prune['method']]}{float(prune['ratio']):g}"
    if prune.get("gradual"):
        token += "g"
    if prune.get("l1"):
        token += f"_lam{float(prune['l1']):g}"
    return token


def compress_stages(config: dict[str, Any]) -> dict[str, CompressStage]:
    """Every pruned and quantised variant of ``compress.variants``, named once, in config
    order (a pruned variant before the quantised one built from it). Raises ConfigError for
    an unknown model, an entry that neither prunes nor quantises, gradual structured
    pruning, or one name defined twice with different settings."""
    stages: dict[str, CompressStage] = {}

    def add(stage: CompressStage, where: str) -> None:
        if stage.name in stages and stages[stage.name] != stage:
            raise ConfigError(
                f"field '{where}': variant '{stage.name}' is defined twice with different settings"
            )
        stages[stage.name] = stage

    for i, entry in enumerate(config.get("compress", {}).get("variants", [])):
        where = f"compress.variants.{i}"
        model = entry["model"]
        if model not in config["models"]:
            raise ConfigError(
                f"field '{where}.model': '{model}' is not a key of models "
                f"({sorted(config['models'])})"
            )
        prune, quant = entry.get("prune"), entry.get("quant", "none")
        if not prune and quant == "none":
            raise ConfigError(
                f"field '{where}': needs a prune step, a quant mode other than none, or both"
            )
        parent = model
        if prune:
            if prune.get("gradual") and prune["method"] != "unstructured":
                raise ConfigError(
                    f"field '{where}.prune.gradual': only unstructured pruning is gradual"
                )
            name = f"{model}-{prune_token(prune)}"
            add(
                CompressStage(
                    name=name,
                    model=model,
                    parent=model,
                    stage="prune",
                    prune_method=prune["method"],
                    prune_ratio=float(prune["ratio"]),
                    l1=float(prune.get("l1", 0.0)),
                    gradual=bool(prune.get("gradual", False)),
                    finetune=dict(entry.get("finetune") or {}),
                ),
                where,
            )
            parent = name
        if quant != "none":
            base = stages[parent] if prune else None
            add(
                CompressStage(
                    name=f"{parent}-{quant}",
                    model=model,
                    parent=parent,
                    stage="quantize",
                    prune_method=base.prune_method if base else None,
                    prune_ratio=base.prune_ratio if base else None,
                    l1=base.l1 if base else 0.0,
                    gradual=base.gradual if base else False,
                    quant=quant,
                ),
                where,
            )
    return stages


def finetune_config(config: dict[str, Any], stage: CompressStage) -> ModelConfig:
    """Fine-tuning settings of a pruned variant: the model's effective train settings,
    overridden by ``compress.finetune``, then by the variant's own ``finetune`` block."""
    base = model_config(config, stage.model)
    train = {
        **asdict(base.train),
        **config.get("compress", {}).get("finetune", {}),
        **stage.finetune,
    }
    return ModelConfig(
        name=stage.name, arch=base.arch, kwargs=base.kwargs, train=TrainConfig(**train)
    )
