"""Model packages: the directory a training run exports and inference loads.

Layout (MONAI Bundle, so MONAI tools can read it)::

    <package>/configs/metadata.json   MONAI bundle metadata; the medseg model card under "medseg"
    <package>/models/model.pt         the network's state dict (torch.save); floating-point tensors
                                      in float32, or float16 (the card's ``weights_dtype``)
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

Weight storage: ``models/model.pt`` may hold its floating-point tensors in float16 (half the size:
bundled packages, :meth:`ModelPackage.copy_to`, ``medseg models install --fp16``). Loading casts
them to float32 before ``load_state_dict`` (:meth:`ModelPackage.load_network`; integer and boolean
buffers as stored), so every consumer (Predictor, OpenVINO conversion, MONAI bundle runner, whose
``load_state_dict`` copies into float32 parameters) runs a float32 network. The card records the
storage in ``weights_dtype`` (``float32`` for packages written before the field existed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from medseg.errors import ConfigError, MedsegError, ModelNotFoundError, UnreadableFileError, UnsupportedInputError
from medseg.labels import Label

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"
#: MONAI Bundle inference config, written for ``unet`` packages (:func:`monai_inference_config`)
INFERENCE = Path("configs") / "inference.json"
#: the MONAI bundle meta schema shipped with medseg, for ``monai.bundle verify_metadata``
BUNDLE_SCHEMA = Path(__file__).parent / "bundle_schema" / "meta_schema.json"
BUNDLED_MODELS = Path(__file__).parent / "models"
#: how ``models/model.pt`` may store floating-point tensors (:attr:`ModelCard.weights_dtype`)
WEIGHTS_DTYPES = ("float32", "float16")


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


class Int8Runtime(BaseModel):
    """The optional int8 OpenVINO runtime of a package (``runtime/openvino-int8/``, written by
    ``medseg quantize``: NNCF post-training quantisation calibrated on training cases of the
    model's fold) and what it measured against the float32 runtime on the fold's validation cases.

    The Predictor's ``auto`` runtime uses it only when ``enabled`` (set by ``medseg quantize``
    only when ``|dice_change| <= 0.5`` points), ``weights_sha256`` is the package's, and the int8
    model for the CPU window is present; otherwise ``auto`` is unchanged (float32 ``openvino``).
    """

    enabled: bool = False
    dice_change: float | None = Field(
        None, description="points: 100 x (int8 mean Dice - float32 mean Dice) on measured_on"
    )
    measured_on: str = Field("", description="e.g. 'hippocampus fold 0 validation, 44 cases'")
    weights_sha256: str | None = Field(None, description="the weights the int8 model and figures belong to")
    dice: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per runtime ('openvino', 'openvino_int8'): per label name and 'mean'"
    )
    hd95_mm: dict[str, dict[str, float]] = Field(default_factory=dict, description="as dice, HD95 in mm")
    label_agreement: float | None = Field(None, description="% of validation voxels labelled alike by both")
    seconds_per_case: dict[str, float] = Field(default_factory=dict, description="per runtime, wall clock")
    threads: int | None = None
    cpu: str = ""
    calibration: dict[str, Any] = Field(
        default_factory=dict, description="training cases, windows, preset, NNCF and OpenVINO versions"
    )
    measured_at: str | None = None


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
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="how models/model.pt stores its floating-point tensors: float32, or float16 (half the "
        "file; cast to float32 when loaded, so the network always runs in float32); integer and boolean "
        "buffers are stored as they are. float32 for packages written before this field existed",
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
    int8: Int8Runtime | None = Field(
        None,
        description="the optional int8 OpenVINO runtime and its measured Dice change (`medseg quantize`); "
        "None: none measured, the Predictor's auto runtime stays float32",
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
    def int8_runtime_dir(self) -> Path:
        """``runtime/openvino-int8``: int8 models made by ``medseg quantize``
        (:func:`medseg.inference.int8.quantize_package`), beside :attr:`runtime_dir`."""
        return self.path / "runtime" / "openvino-int8"

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

        float16 weights (:attr:`ModelCard.weights_dtype`) are cast to float32 before
        ``load_state_dict`` (:func:`load_weights`): the network is float32 either way.

        Raises:
            UnreadableFileError: ``models/model.pt`` no longer matches the card's
                ``weights_sha256`` (replaced or damaged after export), so outputs would carry a
                wrong model identity.
        """
        from medseg.networks import create_network

        self.check_weights()
        spec = self.card.network
        network = create_network(spec.name, **spec.config)
        network.load_state_dict(load_weights(self.path / WEIGHTS))
        return network.to(device).eval()

    @staticmethod
    def save(path: str | os.PathLike, card: ModelCard, state_dict: dict[str, torch.Tensor]) -> ModelPackage:
        """Write a package atomically (to a temporary directory, then rename) and return it.

        The stored card gets ``weights_sha256`` = sha256 of the written ``models/model.pt``
        (whatever ``card`` held is replaced), ``weights_dtype`` = how ``state_dict`` stores its
        floating-point tensors (:func:`weights_dtype_of`) and ``trained_at`` = ``card.trained_at``,
        or the save time (UTC) when that is ``None``. ``card`` itself is not modified.
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
                update={
                    "weights_sha256": file_sha256(tmp / WEIGHTS),
                    "weights_dtype": weights_dtype_of(state_dict),
                    "trained_at": card.trained_at or utc_timestamp(),
                }
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

    def copy_to(
        self,
        dest: str | os.PathLike,
        weights_dtype: str = "float16",
        *,
        overwrite: bool = False,
        prepare: Callable[[ModelPackage], Any] | None = None,
    ) -> ModelPackage:
        """Write a copy of this package to ``dest`` with its weights stored as ``weights_dtype``
        (``"float16"``: half the file; ``"float32"``) and return the copy.

        Everything in the package is copied except converted runtimes (``runtime/`` of the
        package and of each fold package): they are keyed by the weights' sha256, which the copy
        changes. In the copy, each ``models/model.pt`` (the package's and its folds') holds the
        floating-point tensors as ``weights_dtype`` (integer and boolean buffers as they are), and
        each card gets the new file's ``weights_sha256``, ``weights_dtype``, and no ``int8``
        entry (that runtime belonged to the old weights); the rest of the card (name, version,
        ``trained_at``, metrics) and of the MONAI metadata is as it was.

        The copy is assembled in a temporary folder beside ``dest``; ``prepare(copy)`` runs there
        (e.g. :func:`medseg.inference.runtime.prepare_package`, to ship the OpenVINO model of the
        new weights), and only then is the folder renamed to ``dest``: ``dest`` ends up holding the
        complete copy, or is left as it was.

        Args:
            dest: the new package folder; must not exist unless ``overwrite``.
            weights_dtype: one of :data:`WEIGHTS_DTYPES`.
            overwrite: replace an existing package at ``dest`` (a folder that is not a model
                package is never replaced).
            prepare: called with the finished copy before it is moved into place; what it raises
                aborts the copy.

        Raises:
            PackageExistsError: ``dest`` exists (without ``overwrite``), exists and is not a model
                package, or is this package or a folder inside it.
            UnreadableFileError: a weights file does not match its card (:meth:`check_weights`).
            UnsupportedInputError: a weight lies beyond float16's range (``|x| > 65504``).
            ValueError: ``weights_dtype`` is not one of :data:`WEIGHTS_DTYPES`.
        """
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, not {weights_dtype!r}")
        dest = Path(dest)
        source, target = self.path.resolve(), dest.resolve()
        if target == source or source in target.parents:
            raise PackageExistsError(f"{dest}: is the package {self.path.name} itself or inside it; copy elsewhere")
        _check_destination(dest, overwrite)
        packages = [self, *self.fold_packages()]
        for package in packages:
            package.check_weights()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            shutil.copytree(
                self.path,
                tmp,
                dirs_exist_ok=True,
                ignore=lambda folder, names: {"runtime"} if (Path(folder) / METADATA).is_file() else set(),
            )
            for rel in ["", *(self.card.folds or [])]:
                _rewrite_weights(tmp / rel if rel else tmp, weights_dtype)
            copy = ModelPackage(tmp)
            if prepare is not None:
                prepare(copy)
            _publish(tmp, dest, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelPackage(dest)


class PackageExistsError(MedsegError):
    """A package cannot be written where asked: the folder exists (and replacing was not asked
    for, or it is not a model package), or it is the source package itself."""

    code = "package-exists"
    http_status = 409


#: float16's largest finite value: weights beyond it cannot be stored in float16
FLOAT16_MAX = 65504.0


def weights_dtype_of(state_dict: dict[str, Any]) -> str:
    """``"float16"`` when every floating-point tensor of ``state_dict`` is float16 (and there is
    one), else ``"float32"`` (what :attr:`ModelCard.weights_dtype` records)."""
    dtypes = {str(v.dtype) for v in state_dict.values() if hasattr(v, "is_floating_point") and v.is_floating_point()}
    return "float16" if dtypes == {"torch.float16"} else "float32"


def cast_weights(state_dict: dict[str, Any], weights_dtype: str) -> dict[str, Any]:
    """``state_dict`` (changed in place and returned, so its ``_metadata`` stays) with its
    floating-point tensors as ``weights_dtype`` (``"float16"`` or ``"float32"``); integer and
    boolean buffers and non-tensor entries are left as they are. For ``"float32"`` only reduced
    precision tensors (float16, bfloat16) are cast; tensors sharing memory stay shared.

    Raises:
        UnsupportedInputError: casting to float16 would turn a finite weight infinite (``|x| > 65504``).
        ValueError: ``weights_dtype`` is not one of :data:`WEIGHTS_DTYPES`.
    """
    import torch

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, not {weights_dtype!r}")
    dtype = getattr(torch, weights_dtype)
    done: dict[tuple, torch.Tensor] = {}  # tied tensors (same memory, layout) are cast once
    for key in list(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            continue
        if dtype == torch.float32 and value.dtype not in (torch.float16, torch.bfloat16):
            continue  # float64 stays: load_state_dict copies it into the float32 parameters
        tie = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if tie not in done:
            cast = value.detach().to(dtype)
            if dtype == torch.float16 and value.numel():
                overflow = torch.isfinite(value) & ~torch.isfinite(cast)
                if bool(overflow.any()):
                    raise UnsupportedInputError(
                        f"weight {key}: values beyond float16's range (|x| > {FLOAT16_MAX:g}); keep float32 weights"
                    )
            done[tie] = cast
        state_dict[key] = done[tie]
    return state_dict


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """A package's state dict (``models/model.pt``) with float16 and bfloat16 tensors cast to
    float32 (:func:`cast_weights`), ready for a float32 network's ``load_state_dict``."""
    import torch

    return cast_weights(torch.load(path, map_location="cpu", weights_only=True), "float32")


def _rewrite_weights(folder: Path, weights_dtype: str) -> None:
    """Store ``folder``'s ``models/model.pt`` as ``weights_dtype`` and update its card (new
    ``weights_sha256``, ``weights_dtype``, no ``int8``); the rest of the metadata as it was."""
    import torch

    state = cast_weights(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True), weights_dtype)
    torch.save(state, folder / WEIGHTS)
    metadata = json.loads((folder / METADATA).read_text())
    card = ModelCard.model_validate(metadata["medseg"])
    update: dict[str, Any] = {"weights_sha256": file_sha256(folder / WEIGHTS), "weights_dtype": weights_dtype}
    if getattr(card, "int8", None) is not None:
        update["int8"] = None  # runtime/openvino-int8 is not copied: it was the old weights'
    metadata["medseg"] = card.model_copy(update=update).model_dump(mode="json")
    (folder / METADATA).write_text(json.dumps(metadata, indent=2))


def _check_destination(dest: Path, overwrite: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        return
    if not overwrite:
        raise PackageExistsError(f"{dest}: already exists; not replaced (replace it with --force)")
    if dest.is_symlink() or not (dest / METADATA).is_file():
        raise PackageExistsError(f"{dest}: exists and is not a model package; not replaced")


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``dest``; with ``overwrite`` an existing package there is
    moved aside first and deleted once the new one is in place (restored if that fails)."""
    _check_destination(dest, overwrite)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None and not dest.exists():
            os.replace(old, dest)
        elif old is None and dest.exists():
            raise PackageExistsError(f"{dest}: appeared while the copy was written; not replaced") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install_package(
    source: str | os.PathLike | ModelPackage,
    name: str | None = None,
    dest: str | os.PathLike = BUNDLED_MODELS,
    weights_dtype: str | None = None,
    *,
    force: bool = False,
    openvino: bool = True,
) -> ModelPackage:
    """Install a copy of package ``source`` as ``dest/name`` (:meth:`ModelPackage.copy_to`) with
    its weights stored as ``weights_dtype`` (``None``: as the source stores them), and ship the
    OpenVINO model of the new weights (:func:`medseg.inference.runtime.prepare_package`) in it
    before it is moved into place. When OpenVINO is missing or ``openvino`` is false the copy
    has no ``runtime/`` (the Predictor converts on first use); when the conversion fails, the
    reason stays in ``runtime/openvino/<tag>/failed.json`` and the Predictor runs the network
    eagerly, as for a freshly trained package.

    Args:
        source: a package folder, or a package name on :func:`model_search_path`.
        name: the new folder's name (default: the card's name); the card's name is kept, since it
            is the model's identity (name, version, weights sha256).
        dest: the folder of packages (default: the bundled models, ``medseg/models``).
        force: replace an existing package of that name in ``dest``.

    Raises:
        ModelNotFoundError, UnreadableFileError: ``source`` is not a model package.
        ConfigError: ``name`` is not a plain package name (:func:`is_model_name`).
        PackageExistsError, UnsupportedInputError: see :meth:`ModelPackage.copy_to`.
    """
    if isinstance(source, ModelPackage):
        package = source
    elif Path(source).exists():
        package = ModelPackage(source)  # says why a folder is not a package
    else:
        package = resolve_model(source)
    name = package.card.name if name is None else name
    if not is_model_name(name):
        raise ConfigError(
            f"package name {name[:80]!r}: letters, digits, '.', '_', '-' only, starting with a letter or digit"
        )
    prepare = None
    if openvino:
        from medseg.inference.runtime import openvino_available

        if openvino_available():
            prepare = _prepare_openvino
        else:
            log.warning("OpenVINO is not installed: %s ships no converted model", name)
    return package.copy_to(
        Path(dest) / name, weights_dtype or package.card.weights_dtype, overwrite=force, prepare=prepare
    )


def _prepare_openvino(package: ModelPackage) -> None:
    from medseg.inference.runtime import ConversionMismatchError, prepare_package

    try:
        prepare_package(package)
    except ConversionMismatchError as error:  # the Predictor falls back to eager PyTorch
        log.warning("no OpenVINO model shipped: %s", error)


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
