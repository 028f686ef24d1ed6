"""Training configuration: a YAML file validated by pydantic, plus ``key=value`` overrides.

Every section forbids unknown keys, so a typo fails before training starts with a
:class:`~medseg.errors.ConfigError` that names the dotted key (e.g. ``optimizer.lr``).
Relative paths in the file are resolved against the file's directory; ``$VARS`` are expanded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medseg.errors import ConfigError, config_error
from medseg.package import Normalization, PostProcessing


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Where the cases are and how they are prepared (anything unset comes from the plan)."""

    dataset_dir: str = Field(description="MSD / nnU-Net layout: imagesTr/, labelsTr/, dataset.json")
    manifest: str | None = Field(
        None,
        description="case manifest (JSON: training pairs relative to dataset_dir, optional spacing and fixed "
        "folds; medseg.data.cases.read_case_manifest) instead of the MSD layout",
    )
    input_spacing: tuple[float, float, float] | None = Field(
        None, description="voxel size (mm, X Y Z) of TIFF stacks that state none; not a resampling target"
    )
    data_card: str | None = Field(None, description="data card name or path (labels, modality, licence)")
    plan: str | None = Field(None, description="plan.json from `medseg plan`; computed at start when absent")
    fold: int = 0
    num_folds: int = 5
    max_cases: int | None = Field(None, description="use only the first N cases (tests, smoke runs)")
    spacing: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | tuple[int, int] | None = Field(
        None, description="training patch (voxels; nuclei: (P, P) pixels at data.mpp)"
    )
    mpp: float = Field(
        0.25, gt=0, description="nuclei: the model's pixel size in um/px (0.25 = 40x); tiles are resampled to it"
    )
    normalization: Normalization | None = None
    modality: list[str] | None = None
    foreground_oversample: float = Field(0.33, ge=0, le=1, description="nnU-Net: 1/3 of patches centred on foreground")
    patch_max_normalization: bool = Field(False, description="divide each image patch by its max (SPOCKMIP)")
    mip_target: Literal["whole_volume", "patch"] = Field(
        "whole_volume",
        description="mip/ftl_mip losses: project the whole label volume cropped to the patch window "
        "(SPOCKMIP) or only the patch's label",
    )
    cache_rate: float = Field(1.0, ge=0, le=1)
    num_workers: int = Field(0, ge=0, description="DataLoader workers (0: augment in the training process)")


class AugmentationConfig(_Section):
    """nnU-Net-style augmentation (MONAI transforms); probabilities per sample."""

    enabled: bool = True
    rotate_deg: float = 30.0
    scale: float = Field(0.3, description="isotropic zoom factor in [1 - scale, 1 + scale]")
    affine_prob: float = 0.2
    flip_prob: float = 0.5
    noise_prob: float = 0.1
    blur_prob: float = 0.2
    brightness_prob: float = 0.15
    gamma_prob: float = 0.3


class NetworkConfig(_Section):
    """``create_network(name, spatial_dims=3, in_channels, out_channels, **config)``; channels and
    out_channels are filled from the data card unless given."""

    name: str = "unet"
    config: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None


class DSDConfig(_Section):
    """Dual self-distillation options (:class:`medseg.losses.DualSelfDistillationLoss`)."""

    temperature: float = 3.0
    alpha: float = 1.0
    detach_teacher: bool = False
    upsample: Literal["deconv", "trilinear"] = "deconv"


class LossConfig(_Section):
    """``medseg.losses.build_loss`` arguments."""

    name: Literal["dice", "dice_ce", "dice_focal", "focal_tversky", "mip", "ftl_mip", "hover"] = "dice_ce"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    deep_supervision: bool = True
    deep_supervision_weights: list[float] | None = None
    dsd: DSDConfig | None = None


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD only (nnU-Net: 0.99, Nesterov)")
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)


class SchedulerConfig(_Section):
    """Per-iteration learning-rate schedule: ``poly`` (nnU-Net, (1 - t) ** power) or ``cosine``;
    optional linear warm-up over ``warmup_iterations``."""

    name: Literal["poly", "cosine", "constant"] = "poly"
    power: float = 0.9
    warmup_iterations: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    time_based: bool = Field(
        False,
        description=(
            "with training.max_minutes: progress = max(iterations done / total, elapsed / max_minutes), and "
            "training stops when the budget is spent, so the LR is annealed on time whatever the CPU share; "
            "the number of iterations then depends on the machine (not bitwise reproducible)"
        ),
    )


class TrainingConfig(_Section):
    epochs: int = Field(50, ge=1)
    iterations_per_epoch: int | None = Field(None, ge=1, description="default: one pass over the training cases")
    batch_size: int | None = Field(None, ge=1, description="per process; default from the plan")
    grad_clip: float | None = Field(12.0, gt=0, description="max gradient L2 norm (nnU-Net: 12)")
    amp: bool = Field(True, description="bfloat16 autocast on CUDA; ignored on CPU")
    amp_cpu: bool = Field(
        False,
        description="bfloat16 autocast on CPU too (CPUs with AVX512-BF16/AMX: 2D convs about 2.5x faster, "
        "measured for the nuclei U-Net); weights and optimiser stay float32",
    )
    seed: int = 0
    deterministic: bool = True
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    channels_last: bool = Field(False, description="channels-last (NDHWC) memory format: ~20 % faster 3D convs on CPU")
    device: str | None = Field(None, description="cpu, cuda, cuda:N (default: cuda when available)")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock guard: stop early, still validate and export")


class ValidationConfig(_Section):
    """Sliding-window validation; ``patch_size`` (default: the training patch) is also the window the
    exported model card asks inference to use, so the reported metrics are what inference gets."""

    patch_size: tuple[int, int, int] | tuple[int, int] | None = None
    every: int = Field(5, ge=1, description="validate every N epochs (and after the last)")
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    hd95: bool = True
    max_cases: int | None = Field(None, ge=1)


class ExportConfig(_Section):
    enabled: bool = True
    name: str | None = Field(None, description="model package name (default: the config name)")
    version: str = "0.1.0"
    description: str = ""
    postprocessing: PostProcessing = PostProcessing()
    formats: list[str] | None = Field(
        None, description="the card's default outputs for `medseg predict` (medseg.outputs.FORMATS names)"
    )
    openvino: bool = Field(
        True,
        description="convert the network to OpenVINO at export and ship it in the package "
        "(runtime/openvino), so the first predict converts nothing",
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str] | None) -> list[str] | None:
        from medseg.outputs import FORMATS

        unknown = [f for f in value or [] if f not in FORMATS]
        if unknown or value == []:
            raise ValueError(f"unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(FORMATS)})")
        return value


class TrainConfig(_Section):
    """A complete training experiment (``medseg train CONFIG.yaml``)."""

    name: str
    task: Literal["segmentation", "nuclei"] = Field(
        "segmentation",
        description="segmentation: 3D label maps (MSD layout or manifest); nuclei: 2D H&E tiles with "
        "instance label maps, HoVer targets and PQ validation (medseg.training.nuclei)",
    )
    data: DataConfig
    network: NetworkConfig = NetworkConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    training: TrainingConfig = TrainingConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys from ``key=value`` strings (values parsed as YAML: ``training.epochs=3``,
    ``network.config.filters=[16,32,64]``).

    Raises:
        ConfigError: an override without ``=`` or descending into a non-mapping.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config; resolve its paths.

    Raises:
        ConfigError: unreadable YAML, unknown keys or invalid values (naming the dotted key).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read config ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    config = validate_config(raw, source=str(path))
    base = path.resolve().parent
    data = config.data
    data.dataset_dir = resolve_path(data.dataset_dir, base)
    if data.plan:
        data.plan = resolve_path(data.plan, base)
    if data.manifest:
        data.manifest = resolve_path(data.manifest, base)
    if data.data_card and any(s in data.data_card for s in ("/", ".yaml", ".yml", ".json")):
        data.data_card = resolve_path(data.data_card, base)
    return config


def validate_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config mapping; :class:`ConfigError` names the first bad dotted key."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise config_error(error, source) from None


def resolve_path(value: str, base: Path) -> str:
    """Expand ``$VARS`` and ``~``; a relative path is taken relative to ``base`` (the config's folder)."""
    expanded = Path(os.path.expanduser(os.path.expandvars(value)))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())
