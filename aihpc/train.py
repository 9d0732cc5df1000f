"""Training, top to bottom: in-memory data, augmentation, the LightningModule, and ``fit``.

The whole preprocessed array lives in memory (on the GPU when training there) and batches
are sliced from it, so data loading never bounds a small model's step time. ``fit`` is the
one entry point: the Snakemake rule calls it once, the Dask launcher once per rank.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.environments import ClusterEnvironment, LightningEnvironment
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from aihpc.config import ModelConfig, TrainConfig
from aihpc.data import load_split, read_stats
from aihpc.files import atomic_path, file_sha256
from aihpc.models import build_model, load_artifact, model_spec, save_artifact
from aihpc.provenance import config_hash, package_versions

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainPaths:
    data_dir: Path  # preprocessed arrays + stats.json
    model_out: Path  # the model artifact
    metrics_out: Path  # per-epoch curves (CSVLogger's metrics.csv)
    work_dir: Path  # resumable checkpoints and raw logs, outside the declared outputs

    @classmethod
    def of_rule(cls, job: Any) -> TrainPaths:
        """The paths of a train/finetune rule's ``snakemake`` object (outputs ``model`` and
        ``metrics``, params ``data_dir`` and ``work_dir``)."""
        return cls(
            data_dir=Path(job.params.data_dir),
            model_out=Path(job.output.model),
            metrics_out=Path(job.output.metrics),
            work_dir=Path(job.params.work_dir),
        )


class InMemoryImages(Dataset[Batch]):
    """Images (N, C, H, W uint8) and labels held as tensors; a list of indices gives a batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> Batch:
        # DataLoader hands the whole batch of indices here: one slice instead of B lookups.
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]


def _batch_as_is(batch: Batch) -> Batch:
    """collate_fn: ``__getitems__`` already returns a batch."""
    return batch


class ArrayDataModule(pl.LightningDataModule):
    def __init__(self, data_dir: Path, batch_size: int, seed: int, eval_batch_size: int = 1000):
        super().__init__()
        self.data_dir, self.batch_size, self.seed = Path(data_dir), batch_size, seed
        self.eval_batch_size = eval_batch_size
        self.splits: dict[str, InMemoryImages] = {}

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        for split in ("train", "val"):
            images, labels = load_split(self.data_dir, split, mmap=False)
            self.splits[split] = InMemoryImages(
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                torch.from_numpy(labels).to(device),
            )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader[Batch]:
        # Our own DistributedSampler, also for one process: each rank takes every
        # world_size-th index of one seeded per-epoch permutation, so 2 ranks with batch b
        # see exactly the samples 1 process with batch 2b sees, step by step.
        trainer = self.trainer
        sampler = DistributedSampler(
            self.splits[split],
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=shuffle,
            seed=self.seed,
        )
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            collate_fn=_batch_as_is,
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("val", self.eval_batch_size, shuffle=False)


def random_crop_flip(
    x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random translation (zero padding) and horizontal flip, as batch tensor ops."""
    n, c, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4)
        shift = torch.randint(
            0, 2 * padding + 1, (2, n, 1, 1), device=x.device, generator=generator
        )
        rows = shift[0] + torch.arange(h, device=x.device).view(1, h, 1)
        cols = shift[1] + torch.arange(w, device=x.device).view(1, 1, w)
        flat_index = (rows * (w + 2 * padding) + cols).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.flatten(2).gather(2, flat_index).view(n, c, h, w)
    if hflip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


class StepTimer(Callback):
    """Median wall time of a training step (forward, backward, gradient sync, optimizer)
    after ``warmup`` steps: the steady-state figure scaling profiles and benchmarks need."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.times, self._started = warmup, [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._started)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


class Distillation:
    """Knowledge distillation (Hinton et al., 2015): the training loss becomes
    ``(1 - weight) * hard + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    ``hard`` the usual cross-entropy and ``T`` the temperature (the ``T^2`` keeps the soft
    term's gradients on the hard term's scale). The teacher is frozen in eval mode (its batch
    norms use their running statistics) and sees the same augmented batch as the student.

    ``teacher_id`` names the teacher's weights (e.g. its artifact's digest): with the
    settings it keys :func:`fit`'s resumable run. Not an ``nn.Module``: as a plain attribute
    of the LightningModule the teacher stays out of its parameters, checkpoints and
    ``train()``/``eval()`` switches."""

    def __init__(
        self, teacher: nn.Module, teacher_id: str, *, temperature: float, weight: float
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0 < weight <= 1:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight = float(temperature), float(weight)
        self.settings = {"teacher": teacher_id, "temperature": temperature, "weight": weight}

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.teacher.to(device=device, dtype=dtype, memory_format=torch.channels_last)

    def loss(self, x: torch.Tensor, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(self.teacher(x) / self.temperature, dim=1)
        soft = F.kl_div(
            F.log_softmax(logits / self.temperature, dim=1),
            target,
            reduction="batchmean",
            log_target=True,
        )
        return (1 - self.weight) * hard + self.weight * self.temperature**2 * soft


class ImageClassifier(pl.LightningModule):
    def __init__(
        self, spec: dict[str, Any], train: dict[str, Any], distill: Distillation | None = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["distill"])
        self.cfg = TrainConfig(**train)
        # channels_last: the oneDNN (CPU) and cuDNN conv kernels are fastest in NHWC.
        self.model = build_model(spec).to(memory_format=torch.channels_last)
        self.val_acc = MulticlassAccuracy(num_classes=spec["num_classes"], average="micro")
        self.distill = distill

    def on_fit_start(self) -> None:
        if self.distill is not None:  # the student's device and dtype are final by now
            self.distill.to(self.device, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> float in [0, 1], augmented while training, channels_last."""
        # The module's dtype: float32, or float64 under precision "64-true".
        x = images.to(self.dtype).div_(255)
        if self.training:
            # Drawn from (seed, step, rank), not the global RNG: a run resumed from a
            # checkpoint augments every later step exactly as the uninterrupted run would.
            generator = torch.Generator(device=x.device)
            generator.manual_seed(hash((self.cfg.seed, self.global_step, self.global_rank)))
            x = random_crop_flip(x, self.cfg.crop_padding, self.cfg.hflip, generator)
        return x.contiguous(memory_format=torch.channels_last)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, y = batch
        x = self.to_input(images)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        if self.distill is not None:
            loss = self.distill.loss(x, logits, loss)
        # sync_dist: the epoch mean over all ranks (one all-reduce per epoch, not per step).
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, y = batch
        logits = self(self.to_input(images))
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    def on_train_epoch_start(self) -> None:
        lr = self.optimizers().param_groups[0]["lr"]
        self.log("lr", lr, on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.cfg
        # No weight decay on BatchNorm parameters and biases.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = int(cfg.warmup_fraction * total_steps)
        if cfg.schedule == "onecycle":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=cfg.lr,
                total_steps=total_steps,
                # OneCycleLR divides by (warm-up steps - 1): keep at least two.
                pct_start=min(max(warmup_steps, 2) / total_steps, 0.9),
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(progress, 1.0))).item())


def resolve_accelerator(cfg: TrainConfig) -> tuple[str, str]:
    """(accelerator, precision) with ``auto`` resolved against the hardware present."""
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("train.accelerator is 'gpu' but torch sees no CUDA device")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return accelerator, precision


def merge_metrics(logs_dir: Path, out_csv: Path) -> None:
    """One metrics.csv from the CSVLogger versions of all attempts, in epoch order.

    An attempt resumed at epoch e supersedes whatever an earlier attempt logged from e on
    (the crashed epoch's partial rows).
    """
    files = sorted(
        logs_dir.glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[1])
    )
    attempts = [pd.read_csv(f) for f in files]
    kept = [frame[frame["epoch"] < later["epoch"].min()] for frame, later in pairwise(attempts)]
    pd.concat([*kept, *attempts[-1:]]).to_csv(out_csv, index=False)


def fit(
    paths: TrainPaths,
    model_cfg: ModelConfig,
    *,
    threads: int | None = None,
    env: ClusterEnvironment | None = None,
    strategy: Any = "auto",
    num_nodes: int = 1,
    init_from: Path | None = None,
    callbacks: Sequence[Callback] = (),
    extra_meta: dict[str, Any] | None = None,
    distill: Distillation | None = None,
) -> dict[str, Any]:
    """Train ``model_cfg`` on the arrays in ``paths.data_dir``; write the artifact and curves.

    Resumes from the last checkpoint of an interrupted run with the same config. ``env``,
    ``strategy`` and ``num_nodes`` let a launcher run this as one rank of a DDP job; only
    global rank 0 writes outputs. ``init_from`` starts from an artifact's architecture and
    weights instead of a fresh ``model_cfg.arch`` (fine-tuning a pruned model);
    ``callbacks`` join Lightning's (e.g. keeping pruning masks); ``extra_meta`` is added to
    the record; ``distill`` adds a knowledge-distillation term to the loss. Returns the run
    record (also stored in the artifact).
    """
    cfg = model_cfg.train
    stats = read_stats(paths.data_dir)
    init = load_artifact(init_from)[1] if init_from is not None else None
    run_hash = config_hash(
        {
            "model": model_cfg.as_dict(),
            "data_sha256": stats["data_sha256"],
            "init_sha256": file_sha256(init_from) if init_from is not None else None,
            # Only when distilling, so the keys (and resumable runs) of other runs stay as-is.
            **({"distill": distill.settings} if distill is not None else {}),
        }
    )
    if threads:
        torch.set_num_threads(threads)
    accelerator, precision = resolve_accelerator(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    spec = init["spec"] if init else model_spec(model_cfg.arch, stats, **model_cfg.kwargs)
    module = ImageClassifier(spec, asdict(cfg), distill)
    if init:
        module.model.load_state_dict(init["state_dict"])
    datamodule = ArrayDataModule(paths.data_dir, cfg.batch_size, seed=cfg.seed)
    has_val = stats["counts"]["val"] > 0
    # Checkpoints live under the config hash so a changed config never resumes a stale run.
    checkpoint_dir = Path(paths.work_dir) / run_hash / "checkpoints"
    # Two callbacks: "save_last" of a monitored checkpoint only saves when the monitored
    # metric improves, so a resume could go back several epochs.
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_acc", mode="max")
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", enable_version_counter=False)
    step_timer = StepTimer()
    # A new version per attempt: CSVLogger would otherwise delete the curves of the epochs
    # before a resume. merge_metrics joins the attempts.
    logger = CSVLogger(Path(paths.work_dir) / run_hash, name="logs")
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=accelerator,
        devices=1,
        num_nodes=num_nodes,
        strategy=strategy,
        # Without a launcher's env, one process: inside a Slurm job Lightning would otherwise
        # pick SLURMEnvironment (rank and world size from SLURM_* variables, and a SIGUSR1
        # handler that writes hpc_ckpt_*.ckpt to the working directory and requeues the job
        # behind Snakemake's back).
        plugins=[env if env is not None else LightningEnvironment()],
        precision=precision,
        # Deterministic kernels exist for everything used here on CPU; several CUDA
        # backward kernels (max-pooling) have none, so on GPU only warn.
        deterministic=True if accelerator == "cpu" else "warn",
        # Rule logs are files: a bar redrawn every step would flood them.
        callbacks=[
            *([best] if has_val else []),
            last,
            step_timer,
            TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50),
            *callbacks,
        ],
        logger=logger,
        limit_train_batches=cfg.limit_train_batches or 1.0,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # ArrayDataModule shards itself
        log_every_n_steps=10,
    )
    last_file = checkpoint_dir / "last.ckpt"
    resume_from = last_file if last_file.exists() else None
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    train_seconds = time.perf_counter() - started

    best_score = best.best_model_score if has_val else None
    record = {
        "variant": model_cfg.name,
        "model": model_cfg.name,
        "arch": model_cfg.arch,
        "dataset": stats["dataset"],
        "data_sha256": stats["data_sha256"],
        "config_hash": run_hash,
        "versions": package_versions(),
        "train_seconds": round(train_seconds, 3),
        "global_step": trainer.global_step,
        "step_time_s": step_timer.median,
        # Samples this run processed per second, all ranks together.
        "samples_per_s": round(
            trainer.global_step * cfg.batch_size * trainer.world_size / train_seconds, 1
        ),
        "epochs": cfg.epochs,
        "best_val_accuracy": float(best_score) if best_score is not None else None,
        "resumed": resume_from is not None,
        "accelerator": accelerator,
        "precision": precision,
        "world_size": trainer.world_size,
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        **(extra_meta or {}),
    }
    if trainer.global_rank == 0:
        model = module.model.to("cpu", memory_format=torch.contiguous_format)
        save_artifact(model, spec, paths.model_out, **record)
        with atomic_path(paths.metrics_out) as tmp:
            merge_metrics(Path(logger.root_dir), tmp)
    return record
