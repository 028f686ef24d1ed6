"""Training nuclei networks on H&E tiles (``task: nuclei``): the :class:`~medseg.training.trainer.Trainer`
loop with 2D tiles, HoVer targets and panoptic-quality validation.

- Data: a case manifest (:func:`medseg.data.cases.read_case_manifest`; e.g.
  ``configs/nuclei/monuseg_train.json``) of RGB tiles and instance label maps, with each tile's
  pixel size as ``spacing`` (mm along x, y) and fixed folds of whole tiles (a tile is never split
  between training and validation).
- Targets and augmentation: :func:`medseg.nuclei.transforms.nuclei_training_transforms` at
  ``data.mpp`` um/px.
- Network: 2D, 3 input channels; a plain network gets ``out_channels = 4`` (NP logits + HV maps,
  :mod:`medseg.networks.hover`), CellVTA its own NP/HV branches.
- Loss: ``loss.name: hover`` (:class:`medseg.losses.HoVerLoss`).
- Validation: every validation tile through :class:`medseg.nuclei.NucleiPredictor` (what ``medseg
  predict`` delivers: sliding window, whole-tile watershed), then PQ, DQ, SQ, AJI and Dice against
  its instance labels (:func:`medseg.metrics.instance_metrics`); the best checkpoint is the one of
  highest mean PQ.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset

from medseg.data.cases import read_case_manifest
from medseg.errors import ConfigError, DatasetError
from medseg.io.tile import read_instance_map, read_tile
from medseg.metrics import INSTANCE_METRICS, instance_metrics, summarize_instances
from medseg.networks.hover import HOVER_CHANNELS
from medseg.nuclei.transforms import case_mpp, nuclei_training_transforms
from medseg.package import ModelCard, Normalization
from medseg.training.cards import load_training_data_card
from medseg.training.trainer import Trainer

NUCLEI_VALIDATION_PROTOCOL = (
    "medseg NucleiPredictor (resample to the model's um/px, sliding window with Gaussian blending, "
    "HoVer-Net watershed on the whole tile, instance map on the tile's grid); PQ/DQ/SQ (IoU > 0.5), "
    "AJI and Dice per tile, mean over the validation tiles"
)


class NucleiTrainer(Trainer):
    """:class:`Trainer` for ``task: nuclei`` configs (module docstring).

    Raises (before training starts): :class:`ConfigError` (no manifest, bad patch size, a loss
    other than ``hover``), :class:`DatasetError` (missing files, no fixed folds, too few tiles).
    """

    def _setup_plan(self) -> None:
        c = self.config
        if not c.data.manifest:
            raise ConfigError("data.manifest: nuclei training needs a case manifest of tiles (with fixed folds)")
        if c.loss.name != "hover":
            raise ConfigError(f"loss.name: nuclei training uses the hover loss, not {c.loss.name}")
        self.card = load_training_data_card(c.data.data_card, c.data.dataset_dir)
        self.plan = None
        self.mpp = float(c.data.mpp)
        self.spacing = (self.mpp / 1000.0, self.mpp / 1000.0)
        self.patch_size = tuple(int(p) for p in (c.data.patch_size or (256, 256)))
        if len(self.patch_size) != 2:
            raise ConfigError(f"data.patch_size: nuclei patches are 2D (P, P), got {self.patch_size}")
        self.inference_patch_size = tuple(int(p) for p in (c.validation.patch_size or self.patch_size))
        self.normalization = Normalization(scheme="rgb")
        self.modality = c.data.modality or ["SM"]
        self.batch_size = c.training.batch_size or 8
        self.num_classes = 2
        self.network_defaults = {"spatial_dims": 2, "in_channels": 3, "out_channels": HOVER_CHANNELS}

    def _setup_data(self) -> None:
        c = self.config
        cases, folds = read_case_manifest(c.data.manifest, c.data.dataset_dir)
        if not folds:
            raise DatasetError(f"{c.data.manifest}: nuclei training needs fixed folds of whole tiles")
        if len(folds) != c.data.num_folds:
            raise ConfigError(f"data.num_folds: {c.data.num_folds} but {c.data.manifest} has {len(folds)} folds")
        if c.data.max_cases:
            keep = {case.case_id for case in cases[: c.data.max_cases]}
            cases = [case for case in cases if case.case_id in keep]
        by_id = {case.case_id: case for case in cases}
        val_ids = [i for i in folds[self.fold] if i in by_id]
        self.train_cases = [case.as_dict() for case in cases if case.case_id not in val_ids]
        self.val_cases = [by_id[i].as_dict() for i in val_ids]
        if c.validation.max_cases:
            self.val_cases = self.val_cases[: c.validation.max_cases]
        if len(self.train_cases) < self.batch_size * self.world_size or not self.val_cases:
            raise DatasetError(
                f"fold {self.fold}: {len(self.train_cases)} training / {len(self.val_cases)} validation tiles "
                f"are too few for batch size {self.batch_size} x {self.world_size} processes"
            )
        self.train_ds = CacheDataset(
            self.train_cases,
            nuclei_training_transforms(self.mpp, self.patch_size, c.augmentation),
            cache_rate=c.data.cache_rate,
            progress=False,
        )
        self.val_images = []
        if self.is_main:
            for case in self.val_cases:
                tile = read_tile(case["image"], mpp=case_mpp(case))
                self.val_images.append((tile, read_instance_map(case["label"])))
        self.iterations = c.training.iterations_per_epoch or max(1, len(self.train_cases) // self.batch_size)
        self.total_iterations = self.iterations * c.training.epochs

    @property
    def dataset_name(self) -> str:
        return self.card.name or "tiles"

    @property
    def validation_protocol(self) -> str:
        return NUCLEI_VALIDATION_PROTOCOL

    @torch.no_grad()
    def inference_card(self) -> ModelCard:
        c = self.config
        return ModelCard(
            name=c.export.name or c.name,
            version=c.export.version,
            task="nuclei",
            network=self.network_spec,
            modality=list(self.modality),
            labels=list(self.card.labels),
            spacing=self.spacing,
            orientation="",
            normalization=self.normalization,
            patch_size=self.inference_patch_size,
            overlap=c.validation.overlap,
        )

    def _validate(self, epoch: int) -> dict[str, Any]:
        """PQ, DQ, SQ, AJI and Dice on the fold's validation tiles (rank 0 only), as users get them."""
        if not self.is_main:
            return {}
        from medseg.nuclei.predictor import NucleiPredictor

        self.network.eval()
        predictor = NucleiPredictor.from_network(
            self.network, self.inference_card(), device=self.device, sw_batch_size=self.config.validation.sw_batch_size
        )
        per_tile, t0 = {}, time.perf_counter()
        for (tile, label), case in zip(self.val_images, self.val_cases):
            per_tile[case["case"]] = instance_metrics(predictor.predict(tile).instances, label)
        self.network.train()
        summary = summarize_instances(list(per_tile.values()))
        row: dict[str, Any] = {"val_s": round(time.perf_counter() - t0, 2)}
        row.update({f"val_{key}": round(float(summary[key]), 4) for key in INSTANCE_METRICS if key in summary})
        pq = float(summary.get("pq", float("nan")))
        if math.isfinite(pq) and pq > self.best_metric:
            self.best_metric, self.best_epoch = pq, epoch + 1
            self.best_summary = {
                "epoch": epoch + 1,
                "num_tiles": len(per_tile),
                "fold": self.fold,
                **{key: float(summary[key]) for key in INSTANCE_METRICS if key in summary},
                "per_tile": {name: {k: _round(v) for k, v in m.items()} for name, m in per_tile.items()},
            }
            self._save_checkpoint(epoch, "best.pt")
        return row

    def validation_columns(self) -> list[str]:
        return [f"val_{key}" for key in INSTANCE_METRICS]


def _round(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (float, np.floating)) else value
