"""The training loop behind ``medseg train``.

A small explicit loop rather than MONAI's Ignite workflows or PyTorch Lightning: the loss needs the
network's full :class:`~medseg.networks.base.NetworkOutput` (deep supervision, dual
self-distillation side heads that the optimiser also trains), resume must restore RNG states and a
per-iteration LR schedule exactly, and DDP needs only a wrapper module — each of which would mean
overriding most of a workflow engine. Everything the loop calls is a library piece: MONAI
transforms, ``CacheDataset``, losses and metrics; ``torch.distributed`` for DDP (``torchrun``),
``torch.utils.tensorboard`` and ``tqdm`` for logging. Validation is not a second inference path:
each validation case, read by :mod:`medseg.io`, goes through
:meth:`medseg.inference.Predictor.from_network`, so the card's metrics are what users of the
exported package get.

Per run (``OUTPUT``): ``config.yaml`` (resolved), ``plan.json``, ``log.csv`` (one row per epoch),
``tensorboard/``, ``checkpoints/{last,best}.pt``, ``model/`` (the exported model package, see
:mod:`medseg.package`) and ``summary.json``.

Reproducibility: seeds are set once (``monai.utils.set_determinism``) and, at every epoch, the
random transforms and the sampler are re-seeded from ``(seed, epoch, rank)``, so ``--resume``
from an epoch's checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler
from tqdm import tqdm

from medseg.data.cases import find_cases, read_case_manifest
from medseg.data.plan import Plan, make_plan, write_json_atomic
from medseg.data.transforms import training_transforms
from medseg.errors import ConfigError, DatasetError
from medseg.hardware import cpu_model
from medseg.io import read_image
from medseg.io.atomic import atomic_write
from medseg.losses import build_loss
from medseg.metrics import label_map_metrics, summarize
from medseg.networks import create_network
from medseg.package import ModelCard, ModelPackage, NetworkSpec
from medseg.training.cards import load_training_data_card
from medseg.training.config import TrainConfig

log = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Network plus loss in one module, so DDP synchronises the loss's own parameters (DSD side heads)
    too. ``forward(image (B, C, *patch), label (B, 1, *patch)) -> scalar loss``."""

    def __init__(self, network: nn.Module, loss: nn.Module, channels_last: bool = False, ndim: int = 5):
        super().__init__()
        self.network, self.loss = network, loss
        self.memory_format = _memory_format(channels_last, ndim)

    def forward(self, image: torch.Tensor, label: torch.Tensor, target_mip: dict | None = None) -> torch.Tensor:
        output = self.network(image.contiguous(memory_format=self.memory_format), features=True)
        return self.loss(output, label) if target_mip is None else self.loss(output, label, target_mip)


def _memory_format(channels_last: bool, ndim: int = 5) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


class LRSchedule:
    """Multiplier of the base LR at iteration ``it`` (for ``LambdaLR``): linear warm-up, then poly
    ``(1 - t) ** power`` or cosine to ``min_ratio``, or constant. ``t`` is the fraction of the
    iterations done, or ``time_fraction`` (the trainer's share of a wall-clock budget spent) when
    that is larger."""

    def __init__(self, total_iterations: int, name: str, power: float, warmup: int, min_ratio: float):
        self.total, self.name, self.power, self.warmup, self.min_ratio = (
            total_iterations,
            name,
            power,
            warmup,
            min_ratio,
        )
        self.time_fraction = 0.0

    def __call__(self, it: int) -> float:
        if self.warmup and it < self.warmup:
            return (it + 1) / self.warmup
        t = min(1.0, max((it - self.warmup) / max(1, self.total - self.warmup), self.time_fraction))
        if self.name == "poly":
            f = (1.0 - t) ** self.power
        elif self.name == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            f = 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * f


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the random transforms and sampler for one epoch on one process."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % 2**32


def _save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class TrainResult:
    """What a finished run reports."""

    output_dir: Path
    epochs: int
    best_epoch: int | None
    best_metrics: dict[str, Any]
    train_seconds: float
    package: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train ``config`` on fold ``fold`` into ``output_dir``; :meth:`fit` runs it.

    ``task: nuclei`` configs train through the subclass :class:`medseg.training.nuclei.NucleiTrainer`
    (:func:`medseg.training.trainer_for` picks it), which replaces the data, the validation and the card, and keeps
    this loop, the checkpoints, resume and export.

    Raises (before training starts): :class:`ConfigError` for bad configs (unknown network, loss,
    keys), :class:`DatasetError` for bad data (unpaired files, label values outside the data card,
    image/label grid mismatch, empty dataset).
    """

    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | os.PathLike | None = None,
        fold: int | None = None,
        resume: bool = False,
        show_progress: bool = True,
    ):
        self.config = config
        self.fold = config.data.fold if fold is None else fold
        self.output_dir = Path(output_dir or Path("runs") / config.name / f"fold_{self.fold}")
        self.resume = resume
        self.show_progress = show_progress
        self._setup_distributed()
        self._setup()

    # ----------------------------------------------------------------------------------- set-up
    def _setup_distributed(self) -> None:
        t = self.config.training
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if t.device:
            device = torch.device(t.device)
        else:
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def _setup(self) -> None:
        """Set-up in its stages: threads and seeds, plan and data card, network and loss, data,
        optimiser and LR schedule, then the run's state (resumed or fresh) and its output folder."""
        self._setup_runtime()
        self._setup_plan()
        self._setup_network()
        self._setup_data()
        self._setup_optimizer()
        self._setup_state()

    def _setup_runtime(self) -> None:
        """Threads, seeds and the fold's range (before anything else is built)."""
        c = self.config
        if c.training.num_threads:
            torch.set_num_threads(c.training.num_threads)
        set_determinism(seed=c.training.seed) if c.training.deterministic else set_determinism(None)
        torch.manual_seed(c.training.seed)
        if self.fold < 0 or self.fold >= c.data.num_folds:
            raise ConfigError(f"data.fold: {self.fold} is outside 0..{c.data.num_folds - 1}")

    def _setup_plan(self) -> None:
        c = self.config

        self.card = load_training_data_card(c.data.data_card, c.data.dataset_dir)
        self.plan = self._plan()
        self.spacing = tuple(c.data.spacing or self.plan.spacing)
        self.patch_size = tuple(c.data.patch_size or self.plan.patch_size)
        self.normalization = c.data.normalization or self.plan.normalization
        if c.data.patch_max_normalization:  # the card tells inference to do it per window
            self.normalization = self.normalization.model_copy(update={"window_max": True})
        self.modality = c.data.modality or self.card.modality or self.plan.modality
        self.inference_patch_size = tuple(c.validation.patch_size or self.patch_size)
        self.batch_size = c.training.batch_size or self.plan.batch_size
        self.num_classes = max(label.id for label in self.card.labels) + 1
        # a 2D patch trains a 2D network on axial slices (medseg.data.transforms.training_transforms)
        dims = len(self.patch_size)
        self.network_defaults = {
            "spatial_dims": dims,
            "in_channels": len(self.modality),
            "out_channels": self.num_classes,
        }
        declared = c.network.config.get("spatial_dims", dims)
        if declared != dims or len(self.inference_patch_size) != dims:
            raise ConfigError(
                f"network.config.spatial_dims {declared}, data.patch_size {list(self.patch_size)} and "
                f"validation.patch_size {list(self.inference_patch_size)} must agree (2D networks train "
                "on axial slices with a 2D patch)"
            )

    def _setup_network(self) -> None:
        c = self.config
        torch.manual_seed(c.training.seed)
        net_config = {**self.network_defaults, **c.network.config}
        self.network_spec = NetworkSpec(name=c.network.name, config=net_config)
        self.network = create_network(c.network.name, pretrained=c.network.pretrained, **net_config).to(self.device)
        divisor = getattr(self.network, "input_divisor", (1, 1, 1))
        for key, size in (("data.patch_size", self.patch_size), ("validation.patch_size", self.inference_patch_size)):
            if any(p % d for p, d in zip(size, divisor)):
                raise ConfigError(f"{key}: {size} is not divisible by the network's input divisor {tuple(divisor)}")
        self.loss = build_loss(
            c.loss.name,
            self.network,
            self.patch_size,
            c.loss.kwargs,
            c.loss.deep_supervision,
            c.loss.deep_supervision_weights,
            c.loss.dsd.model_dump() if c.loss.dsd else None,
        ).to(self.device)
        if c.training.channels_last:
            self.network.to(memory_format=_memory_format(True, len(self.patch_size) + 2))
            self.loss.to(memory_format=_memory_format(True, len(self.patch_size) + 2))
        self.step_module: nn.Module = TrainStep(
            self.network, self.loss, c.training.channels_last, len(self.patch_size) + 2
        )
        if self.world_size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

    def _setup_data(self) -> None:
        c = self.config
        fold = self.plan.folds[self.fold]
        self.cases = {case.case_id: case for case in self._cases()}
        missing = sorted(set(fold.train + fold.val) - set(self.cases))
        if missing:
            raise DatasetError(
                f"fold {self.fold}: case {missing[0]} of the plan is not in {c.data.dataset_dir}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self.train_cases = [self.cases[i].as_dict() for i in fold.train]
        self.val_cases = [self.cases[i].as_dict() for i in fold.val]
        if c.validation.max_cases:
            self.val_cases = self.val_cases[: c.validation.max_cases]
        if len(self.train_cases) < self.batch_size * self.world_size or not self.val_cases:
            raise DatasetError(
                f"fold {self.fold}: {len(self.train_cases)} training / {len(self.val_cases)} validation "
                f"cases are too few for batch size {self.batch_size} x {self.world_size} processes"
            )
        self.train_ds = CacheDataset(
            self.train_cases,
            training_transforms(
                self.spacing,
                self.normalization,
                self.patch_size,
                c.data.foreground_oversample,
                c.augmentation,
                mip_axis=self._mip_axis(),
                patch_max_normalization=c.data.patch_max_normalization,
            ),
            cache_rate=c.data.cache_rate,
            num_workers=max(1, c.data.num_workers) if c.data.num_workers else None,
            progress=False,
        )
        # validation reads the cases as `medseg predict` does (medseg.io, on their own grid)
        self.val_images = (
            [
                (
                    read_image(case["image"], spacing=case.get("spacing")),
                    read_image(case["label"], spacing=case.get("spacing")).array,
                )
                for case in self.val_cases
            ]
            if self.is_main
            else []
        )
        self.iterations = c.training.iterations_per_epoch or len(self.train_cases) // (
            self.batch_size * self.world_size
        )
        self.total_iterations = self.iterations * c.training.epochs

    def _setup_optimizer(self) -> None:
        c = self.config
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        o = c.optimizer
        if o.name == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        else:
            self.optimizer = torch.optim.SGD(
                params,
                lr=o.lr,
                weight_decay=o.weight_decay,
                momentum=o.momentum,
                nesterov=o.nesterov and o.momentum > 0,
            )
        s = c.scheduler
        if s.time_based and not c.training.max_minutes:
            raise ConfigError("scheduler.time_based: needs training.max_minutes")
        self.schedule = LRSchedule(self.total_iterations, s.name, s.power, s.warmup_iterations, s.min_lr / o.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)

    def _setup_state(self) -> None:
        c = self.config
        self.start_epoch, self.global_step, self.elapsed = 0, 0, 0.0
        self.best_metric, self.best_epoch, self.best_summary = -math.inf, None, {}
        self.history: list[dict[str, Any]] = []
        if self.resume:
            self._load_checkpoint(self.output_dir / "checkpoints" / "last.pt")
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False)
            atomic_write(self.output_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
            if self.plan is not None:
                self.plan.save(self.output_dir / "plan.json")

    def _cases(self):
        return dataset_cases(self.config)

    def _mip_axis(self) -> str | None:
        """The axis (``x``/``y``/``z``/``multi``) of the whole-volume MIP targets the transforms add,
        for the ``mip``/``ftl_mip`` losses with ``data.mip_target: whole_volume``; else ``None``."""
        loss = self.config.loss
        if loss.name not in ("mip", "ftl_mip") or self.config.data.mip_target != "whole_volume" or loss.dsd:
            return None
        return str(loss.kwargs.get("axis", "z"))

    def _plan(self) -> Plan:
        c = self.config.data
        if c.plan:
            plan = Plan.load(c.plan)
            if len(plan.folds) != c.num_folds:
                raise ConfigError(f"data.num_folds: {c.num_folds} but the plan {c.plan} has {len(plan.folds)} folds")
            unknown = sorted(set(plan.fingerprint.label_ids) - {label.id for label in self.card.labels})
            if unknown:
                raise DatasetError(f"{c.plan}: label values {unknown} are not in the data card {c.data_card}")
            return plan
        divisor = tuple(int(d) for d in _network_divisor(self.config))
        return make_plan(
            c.dataset_dir,
            label_ids=[label.id for label in self.card.labels],
            modality=self.card.modality,
            divisor=divisor,
            num_folds=c.num_folds,
            seed=self.config.training.seed,
            cases=self._cases(),
            folds=read_case_manifest(c.manifest, c.dataset_dir)[1] if c.manifest else None,
        )

    def close(self) -> None:
        """Leave the DDP process group (if this trainer joined one)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train the remaining epochs, validate every ``validation.every`` epochs and after the last,
        keep the best and last checkpoints, and export the model package from the best one."""
        c = self.config
        started = time.perf_counter() - self.elapsed
        writer = self._tensorboard()
        stopped_early = False
        epoch = self.start_epoch - 1
        if self.resume and self._finished():
            # a finished run resumed (e.g. with other validation settings): re-validate the final
            # weights with the current settings, keep them as best, and re-export
            self.best_metric = -math.inf
            row = {"epoch": epoch + 1, "step": self.global_step, **self._validate(epoch)}
            if self.is_main:
                self._log_row(row, writer)
        try:
            for epoch in range(self.start_epoch, c.training.epochs if not self._finished() else 0):
                row = self._train_epoch(epoch, started)
                budget_spent = row.pop("budget_spent", False)
                time_up = budget_spent or bool(
                    c.training.max_minutes and time.perf_counter() - started > 60 * c.training.max_minutes
                )
                if (epoch + 1) % c.validation.every == 0 or epoch + 1 == c.training.epochs or time_up:
                    row.update(self._validate(epoch))
                self.elapsed = time.perf_counter() - started
                row["elapsed_s"] = round(self.elapsed, 1)
                self.history.append(row)
                if self.is_main:
                    self._log_row(row, writer)
                    self._save_checkpoint(epoch, "last.pt")
                if time_up and epoch + 1 < c.training.epochs:
                    log.warning("training.max_minutes reached after epoch %d; stopping early", epoch + 1)
                    stopped_early = True
                    break
        finally:
            if writer is not None:
                writer.close()
        package = None
        if self.is_main and c.export.enabled:
            package = self.export(epochs_trained=epoch + 1, stopped_early=stopped_early)
        result = TrainResult(
            self.output_dir, epoch + 1, self.best_epoch, self.best_summary, self.elapsed, package, self.history
        )
        if self.is_main:
            write_json_atomic(
                self.output_dir / "summary.json",
                {
                    "epochs": result.epochs,
                    "best_epoch": result.best_epoch,
                    "best": result.best_metrics,
                    "train_seconds": round(result.train_seconds, 1),
                    "package": str(package) if package else None,
                    "stopped_early": stopped_early,
                    "seconds_per_epoch": round(result.train_seconds / max(1, epoch + 1), 1),
                    "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
                },
            )
        if self.world_size > 1:
            dist.barrier()
        return result

    @property
    def dataset_name(self) -> str:
        """The dataset's name, for the model card."""
        return self.plan.dataset

    @property
    def validation_protocol(self) -> str:
        """How the card's validation metrics were measured."""
        return VALIDATION_PROTOCOL

    def _finished(self) -> bool:
        """All epochs done, or (``scheduler.time_based``) the time budget spent."""
        t = self.config.training
        budget_spent = self.config.scheduler.time_based and self.elapsed >= 60 * (t.max_minutes or math.inf)
        return self.start_epoch >= t.epochs or budget_spent

    def _budget_fraction(self, started: float) -> float:
        """Share of ``training.max_minutes`` spent (rank 0's clock, broadcast so all ranks agree)."""
        fraction = torch.tensor(
            [(time.perf_counter() - started) / (60 * self.config.training.max_minutes)], device=self.device
        )  # NCCL broadcasts CUDA tensors
        if self.world_size > 1:
            dist.broadcast(fraction, 0)
        return float(fraction)

    def _train_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        c = self.config
        time_based = c.scheduler.time_based
        budget_spent = False
        seed = epoch_seed(c.training.seed, epoch, self.rank)
        self.train_ds.transform.set_random_state(seed=seed)
        if self.world_size > 1:
            sampler = DistributedSampler(
                self.train_ds, self.world_size, self.rank, shuffle=True, seed=c.training.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.train_ds, generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=c.data.num_workers,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,
        )
        self.step_module.train()
        amp = (c.training.amp and self.device.type == "cuda") or (c.training.amp_cpu and self.device.type == "cpu")
        losses, samples, t0 = [], 0, time.perf_counter()
        bar = tqdm(
            total=self.iterations,
            desc=f"epoch {epoch + 1}/{c.training.epochs}",
            unit="it",
            disable=not (self.is_main and self.show_progress),
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
            leave=sys.stderr.isatty(),
        )
        batches = _cycle(loader)
        for _ in range(self.iterations):
            if time_based:
                self.schedule.time_fraction = self._budget_fraction(started)
                if self.schedule.time_fraction >= 1.0:
                    budget_spent = True
                    break
            batch = next(batches)
            image = torch.as_tensor(batch["image"]).to(self.device, non_blocking=True)
            label = torch.as_tensor(batch["label"]).to(self.device, non_blocking=True).float()
            target_mip = {
                key.rsplit("_", 1)[1]: torch.as_tensor(value).to(self.device, non_blocking=True)
                for key, value in batch.items()
                if key.startswith("label_mip_")
            } or None  # the whole-volume MIP targets (SPOCKMIP), when the transforms add them
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = self.step_module(image, label, target_mip)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {self.global_step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.training.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.step_module.parameters(), c.training.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            losses.append(loss.item())
            samples += image.shape[0] * self.world_size
            rate = samples / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", samples_per_s=f"{rate:.2f}", refresh=False)
            bar.update()
        bar.close()
        seconds = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "budget_spent": budget_spent,
            "epoch_s": round(seconds, 2),
            "samples_per_s": round(samples / max(seconds, 1e-9), 3),
            "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
        }

    @torch.no_grad()
    def inference_card(self) -> ModelCard:
        """What inference needs of the model card (no training record, no metrics): the card the
        validation Predictor uses and the exported package carries."""
        c = self.config
        return ModelCard(
            name=c.export.name or c.name,
            version=c.export.version,
            network=self.network_spec,
            modality=list(self.modality),
            labels=list(self.card.labels),
            spacing=self.spacing,
            orientation="RAS",
            normalization=self.normalization,
            patch_size=self.inference_patch_size,
            overlap=c.validation.overlap,
            postprocessing=c.export.postprocessing,
            formats=c.export.formats,
        )

    def _validate(self, epoch: int) -> dict[str, Any]:
        """Dice/HD95 per class on the fold's validation cases (rank 0 only), measured the way
        users get them: :meth:`Predictor.from_network` on each case as read by :mod:`medseg.io`
        (model grid, sliding window, inverse to the input grid, post-processing), then
        :func:`label_map_metrics` against the label map on the input grid (mm from its affine)."""
        if not self.is_main:
            return {}
        from medseg.inference import Predictor

        c = self.config
        self.network.eval()
        predictor = Predictor.from_network(
            self.network, self.inference_card(), device=self.device, sw_batch_size=c.validation.sw_batch_size
        )
        per_case, t0 = [], time.perf_counter()
        for image, label in self.val_images:
            prediction = predictor.predict(image).label_map.array
            metrics = label_map_metrics(prediction, label.astype(np.int64), self.num_classes, image.spacing)
            if not c.validation.hd95:
                for values in metrics.values():
                    values["hd95"] = float("nan")
            per_case.append(metrics)
        self.network.train()
        summary = summarize(per_case)
        names = {str(label.id): label.name for label in self.card.labels}
        row: dict[str, Any] = {"val_s": round(time.perf_counter() - t0, 2)}
        for key, values in summary.items():
            name = _column(names.get(key, key))
            row[f"val_dice_{name}"] = round(values["dice"], 4)
            row[f"val_hd95_{name}"] = round(values["hd95"], 3)
        mean_dice = summary.get("mean", {}).get("dice", float("nan"))
        if math.isfinite(mean_dice) and mean_dice > self.best_metric:
            self.best_metric, self.best_epoch = mean_dice, epoch + 1
            self.best_summary = {
                "epoch": epoch + 1,
                "num_cases": len(per_case),
                "fold": self.fold,
                "dice": {names.get(k, k): v["dice"] for k, v in summary.items()},
                "hd95_mm": {names.get(k, k): v["hd95"] for k, v in summary.items()},
            }
            self._save_checkpoint(epoch, "best.pt")
        return row

    # ----------------------------------------------------------------------------------- logging
    def _tensorboard(self):
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=self.global_step or None)

    def validation_columns(self) -> list[str]:
        """The validation metrics' columns of ``log.csv`` (Dice and HD95 per label and mean)."""
        names = [_column(label.name) for label in self.card.labels] + ["mean"]
        return [*[f"val_dice_{n}" for n in names], *[f"val_hd95_{n}" for n in names]]

    def log_columns(self) -> list[str]:
        """The columns of ``log.csv``."""
        return [
            "epoch",
            "step",
            "lr",
            "train_loss",
            "epoch_s",
            "samples_per_s",
            "peak_memory_mb",
            "val_s",
            *self.validation_columns(),
            "elapsed_s",
        ]

    def _log_row(self, row: dict[str, Any], writer) -> None:
        columns = self.log_columns()
        path = self.output_dir / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow(row)
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, row["step"])
        writer.flush()
        val = {k: v for k, v in row.items() if k.startswith("val_") and k != "val_s"}
        log.info("epoch %d loss %s %s", row["epoch"], row.get("train_loss"), val)
        if self.show_progress:
            text = " ".join(f"{k}={v}" for k, v in row.items())
            print(text, file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------- state
    def _save_checkpoint(self, epoch: int, name: str) -> None:
        state = {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "elapsed_s": self.elapsed,
            "network": self.network.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": {"metric": self.best_metric, "epoch": self.best_epoch, "summary": self.best_summary},
            "history": self.history,
            "config": self.config.model_dump(mode="json"),
            "fold": self.fold,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        _save_atomic(state, self.output_dir / "checkpoints" / name)

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("fold") != self.fold:
            raise ConfigError(f"--resume: {path} is fold {state.get('fold')}, not fold {self.fold}")
        self.network.load_state_dict(state["network"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.global_step, self.elapsed = state["epoch"], state["global_step"], state["elapsed_s"]
        best = state["best"]
        self.best_metric, self.best_epoch, self.best_summary = best["metric"], best["epoch"], best["summary"]
        self.history = state["history"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def export(self, epochs_trained: int, stopped_early: bool = False) -> Path:
        """Write the model package (best checkpoint's weights) to ``OUTPUT/model``.

        The card's ``trained_at`` is the export time (ISO 8601 UTC); :meth:`ModelPackage.save`
        adds ``weights_sha256``, so retrainings of one config (same name and version) stay
        distinguishable in reports, SEGs and previews.
        """
        from medseg.package import utc_timestamp

        c = self.config
        best = self.output_dir / "checkpoints" / "best.pt"
        weights = (
            torch.load(best, map_location="cpu", weights_only=False)["network"]
            if best.is_file()
            else self.network.state_dict()
        )
        weights = _contiguous_state(weights)
        card = self.inference_card().model_copy(
            update=dict(
                description=c.export.description
                or f"{c.network.name} trained on {self.dataset_name} (fold {self.fold})",
                training={
                    "config": c.model_dump(mode="json"),
                    "fold": self.fold,
                    "epochs": epochs_trained,
                    "stopped_early": stopped_early,
                    "best_epoch": self.best_epoch,
                    "train_seconds": round(self.elapsed, 1),
                    "num_training_cases": len(self.train_cases),
                    "num_validation_cases": len(self.val_cases),
                    "batch_size": self.batch_size,
                    "training_patch_size": list(self.patch_size),
                    "world_size": self.world_size,
                    "hardware": _hardware(self.device),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": {"torch": torch.__version__, "monai": __import__("monai").__version__},
                },
                metrics={"validation": {**self.best_summary, "protocol": self.validation_protocol}},
                data_card=self.card.as_dict(),
                trained_at=utc_timestamp(),
            )
        )
        package = ModelPackage.save(self.output_dir / "model", card, weights)
        if c.export.openvino:
            from medseg.inference.runtime import ConversionMismatchError, openvino_available, prepare_package

            if openvino_available():
                try:  # shipped with the package, so its first predict converts nothing
                    prepare_package(package)
                except ConversionMismatchError as error:  # the Predictor falls back to eager PyTorch
                    log.warning("no OpenVINO model exported: %s", error)
        return package.path


def dataset_cases(config: TrainConfig) -> list:
    """The config's cases (:class:`medseg.data.cases.Case`): its ``data.manifest``, else every case of
    ``data.dataset_dir``, the first ``data.max_cases`` when that is set — what the plan's folds hold.

    Raises:
        DatasetError: see :func:`~medseg.data.cases.find_cases` / ``read_case_manifest``.
    """
    d = config.data
    if d.manifest:
        cases = read_case_manifest(d.manifest, d.dataset_dir, d.input_spacing)[0]
    else:
        cases = find_cases(d.dataset_dir)
    return cases[: d.max_cases] if d.max_cases else cases


def run_finished(config: TrainConfig, output_dir: str | os.PathLike) -> bool:
    """Whether the run in ``output_dir`` of ``config`` is done: its model package exported
    (``model/configs/metadata.json``), ``summary.json`` written (the last step of :meth:`Trainer.fit`)
    and ``checkpoints/last.pt`` complete as :meth:`Trainer._finished` judges it (all
    ``training.epochs`` done, or the ``scheduler.time_based`` budget spent), or the run stopped early
    at ``training.max_minutes``. A run that is not finished but has ``checkpoints/last.pt`` can be
    resumed; ``medseg train --fold all`` skips finished runs. Never raises: an unreadable
    checkpoint or summary counts as not finished.
    """
    from medseg.package import METADATA

    out = Path(output_dir)
    last = out / "checkpoints" / "last.pt"
    if not ((out / "model" / METADATA).is_file() and (out / "summary.json").is_file() and last.is_file()):
        return False
    try:
        summary = json.loads((out / "summary.json").read_text())
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
        epochs_done, elapsed = int(state["epoch"]), float(state["elapsed_s"])
    except Exception:  # noqa: BLE001 - damaged or foreign files: train it again (resume decides)
        return False
    t = config.training
    if epochs_done >= t.epochs:
        return True
    budget = 60 * t.max_minutes if t.max_minutes else math.inf
    return elapsed >= budget and (config.scheduler.time_based or bool(summary.get("stopped_early")))


VALIDATION_PROTOCOL = (
    "medseg Predictor (model grid, sliding window, inverse to the input grid, "
    "post-processing); Dice and HD95 (mm) on the input grid, MONAI metrics"
)


def _contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous (not channels-last) copies, keeping tensors that are shared between keys shared
    (MONAI's DynUNet lists each skip layer twice; copying them apart would double the file)."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        ident = (value.device, value.data_ptr(), tuple(value.shape), value.stride())
        if ident not in copies:
            copies[ident] = value.detach().cpu().contiguous()
        out[key] = copies[ident]
    return out


def _column(name: str) -> str:
    """A label name as a CSV / TensorBoard key: ``anterior hippocampus`` -> ``anterior_hippocampus``."""
    return "_".join(name.split())


def _cycle(loader):
    while True:
        yield from loader


def _network_divisor(config: TrainConfig) -> tuple[int, int, int]:
    """The network's input divisor per volume axis (the plan's), from a build on the meta device
    (nothing allocated); a 2D network (2D ``data.patch_size``) divides the in-plane axes only."""
    dims = len(config.data.patch_size) if config.data.patch_size else 3
    net_config = {"spatial_dims": dims, "in_channels": 1, "out_channels": 2, **config.network.config}
    with torch.device("meta"):
        network = create_network(config.network.name, **net_config)
    divisor = getattr(network, "input_divisor", 1)
    divisor = tuple(divisor) if isinstance(divisor, (tuple, list)) else (int(divisor),) * dims
    return (*divisor, 1)[:3] if len(divisor) == 2 else divisor


def _hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
