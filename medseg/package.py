"""Model packages: the directory a training run exports and inference loads.

Layout (MONAI Bundle, so MONAI tools can read it)::

    <package>/configs/metadata.json   MONAI bundle metadata; the medseg model card under "medseg"
    <package>/models/model.pt         the network's state dict (torch.save)
    <package>/folds/fold_K/           cross-validation ensembles only: the other folds' packages,
                                      listed in the card's ``folds`` (:meth:`ModelPackage.fold_packages`)

The model card (:class:`ModelCard`) is everything inference needs: network name and config, input
modality, label card, target spacing and orientation, intensity normalisation, patch size,
post-processing, the training data card and the validation metrics.

Identity: name and version are what the trainer's config says, so two trainings of one config share
them. What tells packages apart is ``weights_sha256`` (sha256 of ``models/model.pt``; the first 12
hex digits, :attr:`ModelCard.weights_short`, are the short form shown in previews and SEG content
descriptions) and ``trained_at`` (ISO 8601 UTC), both written by :meth:`ModelPackage.save`. For
packages written before these fields existed the hash is computed from the weights file when the
package is loaded, and ``trained_at`` stays ``None``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from medseg.errors import ModelNotFoundError, UnreadableFileError
from medseg.labels import Label

if TYPE_CHECKING:
    import torch

METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"
#: MONAI Bundle inference config, written for ``unet`` packages (:func:`monai_inference_config`)
INFERENCE = Path("configs") / "inference.json"
#: the MONAI bundle meta schema shipped with medseg, for ``monai.bundle verify_metadata``
BUNDLE_SCHEMA = Path(__file__).parent / "bundle_schema" / "meta_schema.json"
BUNDLED_MODELS = Path(__file__).parent / "models"


class NetworkSpec(BaseModel):
    """``create_network(name, **config)``; config includes spatial_dims, in_channels, out_channels."""

    name: str
    config: dict[str, Any]


class Normalization(BaseModel):
    """Intensity normalisation (nnU-Net's schemes).

    ``zscore``: per image, ``(x - mean(x)) / std(x)`` (MR). ``ct``: clip to ``clip`` (the 0.5 / 99.5
    foreground percentiles, HU) then ``(x - mean) / std`` with dataset foreground statistics.
    ``max``: per image, ``x / max(x)`` (SPOCKMIP's max normalisation, for 8-bit microscopy / MRA stacks).
    ``rgb``: 8-bit RGB tiles, ``(x / 255 - 0.5) / 0.5`` per channel (CellViT / CellVTA, nuclei).
    ``none``: unchanged.

    ``window_max``: after the scheme, each network input window is divided by its own maximum
    (SPOCKMIP's per-patch max normalisation): each training patch, and each sliding window at
    inference (:func:`medseg.preprocess.window_max_normalize`).
    """

    scheme: Literal["zscore", "ct", "max", "rgb", "none"] = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    window_max: bool = False


class PostProcessing(BaseModel):
    """Label-map clean-up after argmax."""

    largest_component: bool = False
    min_blob_mm3: float = 0.0


class ModelCard(BaseModel):
    """What a model is, what it expects and how well it did."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    task: Literal["segmentation", "nuclei"] = Field(
        "segmentation",
        description="segmentation: a label map per series (3D volumes); nuclei: an instance map per 2D "
        "RGB tile from NP/HV outputs (medseg.nuclei)",
    )
    network: NetworkSpec
    modality: list[str] = Field(description="one DICOM modality per input channel, e.g. ['MR']; ['SM'] for tiles")
    labels: list[Label]
    spacing: tuple[float, float, float] | tuple[float, float] = Field(
        description="target voxel spacing in mm (X, Y, Z); nuclei: the pixel size (x, y) in mm (0.00025 = 0.25 um/px)"
    )
    orientation: str = "RAS"
    normalization: Normalization = Normalization()
    patch_size: tuple[int, ...]
    overlap: float = 0.5
    postprocessing: PostProcessing = PostProcessing()
    formats: list[str] | None = Field(
        None,
        description="what `medseg predict` writes when --formats is not given (names of "
        "medseg.outputs.FORMATS, e.g. ['tiff', 'nifti', 'json', 'mip'] for vessel stacks); None: "
        "medseg.outputs.DEFAULT_FORMATS",
    )
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_card: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str | None = Field(
        None,
        description="sha256 (64 lower-case hex) of models/model.pt; set by ModelPackage.save, "
        "computed at load time for older packages",
    )
    trained_at: str | None = Field(
        None,
        description="when the weights were produced, ISO 8601 UTC ('2026-11-22T04:52:58Z'); "
        "None for packages written before this field existed",
    )
    clinically_validated: bool = Field(
        False,
        description="the model has been validated and cleared for diagnostic use; only then "
        "do previews omit the 'not for diagnostic use' notice",
    )
    folds: list[str] | None = Field(
        None,
        description="a cross-validation ensemble: the further fold packages this package holds, as "
        "paths relative to the package folder in POSIX form (e.g. ['folds/fold_1', 'folds/fold_2']); "
        "models/model.pt is the first fold's. The Predictor averages all of them per window; None: "
        "a single model",
    )
    tta_default: bool = Field(
        False,
        description="mirroring test-time augmentation is on unless the caller turns it off "
        "(Predictor(tta=None), `medseg predict` without --tta/--no-tta)",
    )

    @field_validator("weights_sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("weights_sha256 must be 64 lower-case hex digits")
        return value

    @field_validator("folds")
    @classmethod
    def _check_folds(cls, value: list[str] | None) -> list[str] | None:
        """Fold paths stay inside the package: relative, POSIX, no ``..``, no duplicates."""
        if value is None:
            return None
        for rel in value:
            parts = rel.split("/")
            if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"folds: {rel!r} is not a relative path inside the package (e.g. 'folds/fold_1')")
        if len(set(value)) != len(value):
            raise ValueError("folds: a fold is listed twice")
        return value

    @field_validator("trained_at", mode="before")
    @classmethod
    def _utc_timestamp(cls, value: Any) -> str | None:
        """Accept a time-zone-aware ``datetime`` or ISO 8601 text; store UTC ``...Z`` text."""
        return None if value is None else utc_timestamp(value)

    @property
    def mpp(self) -> float:
        """Pixel size of the model grid in microns (nuclei models: ``spacing[0] * 1000``)."""
        return float(self.spacing[0]) * 1000.0

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return int(self.network.config["out_channels"])

    @property
    def weights_short(self) -> str | None:
        """First 12 hex digits of :attr:`weights_sha256` (``None`` when unknown)."""
        return self.weights_sha256[:12] if self.weights_sha256 else None

    @property
    def identity(self) -> str:
        """``"<name> <version>"`` plus ``" sha256:<short hash>"`` when the hash is known, e.g.
        ``"hippocampus 0.1.0 sha256:1a2b3c4d5e6f"``."""
        short = self.weights_short
        return f"{self.name} {self.version}" + (f" sha256:{short}" if short else "")


def utc_timestamp(value: str | _dt.datetime | None = None) -> str:
    """``value`` (default: now) as ISO 8601 UTC text with seconds, ``YYYY-MM-DDTHH:MM:SSZ``.

    Raises:
        ValueError: text that is not ISO 8601, or a date-time without a time zone.
    """
    if value is None:
        moment = _dt.datetime.now(_dt.timezone.utc)
    elif isinstance(value, _dt.datetime):
        moment = value
    else:
        try:
            moment = _dt.datetime.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {str(value)[:40]!r}") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("trained_at needs a time zone (UTC, e.g. '2026-11-22T04:52:58Z')")
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (64 lower-case hex) of a file's bytes, read in 1 MiB blocks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelPackage:
    """A model package on disk: its card and (lazily) its network.

    Attributes:
        path: the package folder.
        card: its :class:`ModelCard`; ``card.weights_sha256`` is always set when the weights file
            exists (from the metadata, or computed from ``models/model.pt`` for packages written
            before the field existed; ``hash_source`` says which).
        hash_source: ``"metadata"``, ``"computed"`` or ``None`` (no weights file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            metadata = json.loads((self.path / METADATA).read_text())
            self.card = ModelCard.model_validate(metadata["medseg"])
        except (OSError, KeyError, ValueError) as error:
            raise UnreadableFileError(f"{self.path}: not a medseg model package ({error})") from None
        self.hash_source: str | None = "metadata" if self.card.weights_sha256 else None
        if self.card.weights_sha256 is None and (self.path / WEIGHTS).is_file():
            # an older package: identify it by its weights file (read only, never rewritten)
            self.card.weights_sha256 = file_sha256(self.path / WEIGHTS)
            self.hash_source = "computed"

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of ``models/model.pt`` (see :attr:`ModelCard.weights_sha256`)."""
        return self.card.weights_sha256

    def fold_packages(self) -> list[ModelPackage]:
        """The further fold packages this one holds (:attr:`ModelCard.folds`), in card order; empty
        for a single model.

        Raises:
            UnreadableFileError: a listed fold is missing or not a model package, or itself holds folds.
        """
        packages = []
        for rel in self.card.folds or []:
            folder = self.path / rel
            if not (folder / METADATA).is_file():
                raise UnreadableFileError(f"{self.path.name}: fold {rel} listed in the model card is missing")
            package = ModelPackage(folder)
            if package.card.folds:
                raise UnreadableFileError(f"{self.path.name}: fold {rel} holds folds itself (nesting is not allowed)")
            packages.append(package)
        return packages

    @property
    def runtime_dir(self) -> Path:
        """``runtime/openvino``: converted models shipped with the package
        (:func:`medseg.inference.runtime.prepare_package`)."""
        return self.path / "runtime" / "openvino"

    @property
    def trained_at(self) -> str | None:
        """ISO 8601 UTC training timestamp, ``None`` for packages that predate the field."""
        return self.card.trained_at

    def check_weights(self) -> str | None:
        """The weights' sha256 after checking ``models/model.pt`` against the card (a few ms), so
        that what runs (the network, or a converted model keyed by this hash) is what the card
        names.

        Raises:
            UnreadableFileError: ``models/model.pt`` no longer matches the card's
                ``weights_sha256`` (replaced or damaged after export).
        """
        if self.hash_source == "metadata":
            actual = file_sha256(self.path / WEIGHTS)
            if actual != self.card.weights_sha256:
                raise UnreadableFileError(
                    f"{self.path.name}: models/model.pt (sha256 {actual[:12]}) does not match the "
                    f"model card's weights_sha256 ({self.card.weights_short}); the weights were "
                    "changed after export - re-export the package"
                )
        return self.weights_sha256

    def load_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Build the network from the card, load the weights, and return it in eval mode.

        Raises:
            UnreadableFileError: ``models/model.pt`` no longer matches the card's
                ``weights_sha256`` (replaced or damaged after export), so outputs would carry a
                wrong model identity.
        """
        import torch

        from medseg.networks import create_network

        self.check_weights()
        spec = self.card.network
        network = create_network(spec.name, **spec.config)
        state = torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return network.to(device).eval()

    @staticmethod
    def save(path: str | os.PathLike, card: ModelCard, state_dict: dict[str, torch.Tensor]) -> ModelPackage:
        """Write a package atomically (to a temporary directory, then rename) and return it.

        The stored card gets ``weights_sha256`` = sha256 of the written ``models/model.pt``
        (whatever ``card`` held is replaced) and ``trained_at`` = ``card.trained_at``, or the save
        time (UTC) when that is ``None``. ``card`` itself is not modified.
        """
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / METADATA).parent.mkdir(parents=True)
            (tmp / WEIGHTS).parent.mkdir(parents=True)
            torch.save(state_dict, tmp / WEIGHTS)
            card = card.model_copy(
                update={"weights_sha256": file_sha256(tmp / WEIGHTS), "trained_at": card.trained_at or utc_timestamp()}
            )
            (tmp / METADATA).write_text(json.dumps(_bundle_metadata(card), indent=2))
            inference = monai_inference_config(card)
            if inference is not None:
                (tmp / INFERENCE).write_text(json.dumps(inference, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelPackage(path)


def _bundle_metadata(card: ModelCard) -> dict[str, Any]:
    import monai
    import numpy
    import torch

    channels = card.network.config.get("in_channels", 1)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": card.version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"medseg": __import__("medseg").__version__},
        "task": f"Segmentation of {', '.join(label.name for label in card.labels)}",
        "description": card.description,
        "authors": "medseg",
        "copyright": card.data_card.get("licence", ""),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "/".join(card.modality),
                    "num_channels": channels,
                    "spatial_shape": list(card.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): m for i, m in enumerate(card.modality)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": card.num_classes,
                    "spatial_shape": list(card.patch_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", **{str(l.id): l.name for l in card.labels}},
                }
            },
        },
        **(
            {}
            if monai_inference_config(card) is not None
            else {
                "medseg_bundle_note": (
                    f"no configs/inference.json: network {card.network.name!r} has no MONAI "
                    "equivalent; run it with `medseg predict`"
                )
            }
        ),
        "medseg": card.model_dump(mode="json"),
    }


def dynunet_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``monai.networks.nets.DynUNet`` keyword arguments equal to medseg's ``unet`` ``config``.

    Mirrors :class:`medseg.networks.unet.UNet`: strides default to ``[1, 2, ...]``, kernel 3,
    transposed-conv upsampling with the strides, instance norm (affine), LeakyReLU 0.01, no
    transposed-conv bias. The medseg state dict loads into this DynUNet once the ``net.`` key
    prefix is removed (with ``deep_supervision = 0`` there are no head weights either way).

    Raises:
        ValueError: a config value DynUNet cannot take.
    """
    filters = [int(f) for f in config.get("filters", (32, 64, 128, 256, 320, 320))]
    stages = len(filters)
    strides = config.get("strides") or [1] + [2] * (stages - 1)
    kernels = config.get("kernel_sizes") or [3] * stages
    heads = int(config.get("deep_supervision", 0))
    norm = config.get("norm_name", ("INSTANCE", {"affine": True}))
    return {
        "spatial_dims": int(config.get("spatial_dims", 3)),
        "in_channels": int(config.get("in_channels", 1)),
        "out_channels": int(config.get("out_channels", 2)),
        "kernel_size": list(kernels),
        "strides": list(strides),
        "upsample_kernel_size": list(strides[1:]),
        "filters": filters,
        "dropout": config.get("dropout"),
        "norm_name": list(norm) if isinstance(norm, (list, tuple)) else norm,
        "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.01}],
        "deep_supervision": heads > 0,
        "deep_supr_num": max(heads, 1),
        "res_block": bool(config.get("res_block", False)),
        "trans_bias": False,
    }


def monai_inference_config(card: ModelCard) -> dict[str, Any] | None:
    """The MONAI Bundle ``configs/inference.json`` of a ``unet`` segmentation package, ``None`` otherwise.

    ``python -m monai.bundle run --config_file configs/inference.json --meta_file
    configs/metadata.json --bundle_root <package> --dataset_dir <folder of .nii/.nii.gz>
    [--output_dir <folder>]`` segments every image with MONAI alone: LoadImaged,
    EnsureChannelFirstd, Orientationd (the card's orientation), Spacingd (the card's spacing,
    mm), NormalizeIntensityd (zscore: ``nonzero=False, channel_wise=True``; ``ct``:
    ScaleIntensityRanged computing ``(clip(x) - mean) / std``), a Gaussian
    SlidingWindowInferer with the card's patch size and overlap, DynUNet
    (:func:`dynunet_kwargs`) with ``models/model.pt`` (``net.`` prefix stripped), argmax
    over the logits (AsDiscreted), Invertd back to the input grid, SaveImaged (``<name>_seg.nii.gz``,
    uint8 labels). Post-processing of the card (largest component, blob removal) is not
    applied; ``medseg predict`` remains the reference runtime.
    """
    if card.network.name != "unet" or card.task != "segmentation":
        return None
    norm = card.normalization
    if norm.scheme == "zscore":
        normalise = [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True}]
    elif norm.scheme == "ct" and norm.mean is not None and norm.std:
        low, high = norm.clip if norm.clip else (-1e9, 1e9)
        normalise = [  # (clip(x) - mean) / std as one linear map of the clip range
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": float(low),
                "a_max": float(high),
                "b_min": (float(low) - norm.mean) / norm.std,
                "b_max": (float(high) - norm.mean) / norm.std,
                "clip": True,
            }
        ]
    elif norm.scheme == "none":
        normalise = []
    else:
        return None
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "network_def": {"_target_": "DynUNet", **dynunet_kwargs(card.network.config)},
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": card.orientation},
                {"_target_": "Spacingd", "keys": "image", "pixdim": list(card.spacing), "mode": "bilinear"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                *normalise,
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(card.patch_size),
            "sw_batch_size": 1,
            "overlap": card.overlap,
            "mode": "gaussian",
            "sigma_scale": 0.125,
            "padding_mode": "constant",
            "cval": 0.0,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$torch.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        },
        "load_weights": (
            "$@network_def.load_state_dict({(k[4:] if k.startswith('net.') else k):"
            " v for k, v in torch.load(@ckpt_path, map_location='cpu', "
            "weights_only=True).items()})"
        ),
        "predict": (
            "$[@postprocessing(dict(item, pred=@inferer(item['image'].unsqueeze(0)"
            ".to(@device), @network)[0].cpu())) for item in @dataset]"
        ),
        "initialize": ["$torch.set_grad_enabled(False)", "@load_weights"],
        "run": ["@predict"],
        "finalize": [],
    }


def model_search_path() -> list[Path]:
    """Folders searched for packages by name: ``$MEDSEG_MODEL_PATH`` (os.pathsep-separated), then bundled."""
    extra = [Path(p) for p in os.environ.get("MEDSEG_MODEL_PATH", "").split(os.pathsep) if p]
    return [*extra, BUNDLED_MODELS]


def resolve_model(name_or_path: str | os.PathLike, *, allow_path: bool = True) -> ModelPackage:
    """A package by directory path, or by name in :func:`model_search_path`.

    Args:
        name_or_path: a registered package name, or (with ``allow_path``) a package folder.
        allow_path: ``False`` for untrusted callers (the service): only a plain registered name
            (letters, digits, ``.``, ``_``, ``-``; no folder part) is looked up, never a path.

    Raises:
        ModelNotFoundError: nothing of that name or path holds ``configs/metadata.json``.
    """
    text = str(name_or_path)
    if allow_path:
        candidate = Path(name_or_path)
        if (candidate / METADATA).is_file():
            return ModelPackage(candidate)
    if is_model_name(text):
        for folder in model_search_path():
            if (folder / text / METADATA).is_file():
                return ModelPackage(folder / text)
    known = ", ".join(list_models()) or "none"
    shown = text if is_model_name(text) else Path(text).name[:80]
    raise ModelNotFoundError(f"model '{shown}' not found (known: {known})")


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def is_model_name(text: str) -> bool:
    """Whether ``text`` is a plain package name (no path separator, no ``..``)."""
    import re

    return re.fullmatch(MODEL_NAME_PATTERN, text) is not None and ".." not in text


def package_folders() -> list[Path]:
    """Every package folder on :func:`model_search_path`, in search order (a name found in an
    earlier folder shadows the same name later; :func:`resolve_model` returns the first)."""
    found = []
    for folder in model_search_path():
        if folder.is_dir():
            found += sorted((p for p in folder.iterdir() if (p / METADATA).is_file()), key=lambda p: p.name)
    return found


def list_models() -> list[str]:
    """Names of the packages found on :func:`model_search_path`."""
    names = []
    for folder in model_search_path():
        if folder.is_dir():
            names += sorted(p.name for p in folder.iterdir() if (p / METADATA).is_file())
    return names
