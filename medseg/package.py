"""Model packages: the directory a training run exports and inference loads.

Layout (MONAI Bundle, so MONAI tools can read it)::

    <package>/configs/metadata.json   MONAI bundle metadata; the medseg model card under "medseg"
    <package>/models/model.pt         the network's state dict (torch.save)

The model card (:class:`ModelCard`) is everything inference needs: network name and config, input
modality, label card, target spacing and orientation, intensity normalisation, patch size,
post-processing, the training data card and the validation metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from medseg.errors import ModelNotFoundError, UnreadableFileError
from medseg.labels import Label

METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"
BUNDLED_MODELS = Path(__file__).parent / "models"


class NetworkSpec(BaseModel):
    """``create_network(name, **config)``; config includes spatial_dims, in_channels, out_channels."""

    name: str
    config: dict[str, Any]


class Normalization(BaseModel):
    """Intensity normalisation (nnU-Net's schemes).

    ``zscore``: per image, ``(x - mean(x)) / std(x)`` (MR). ``ct``: clip to ``clip`` (the 0.5 / 99.5
    foreground percentiles, HU) then ``(x - mean) / std`` with dataset foreground statistics.
    ``none``: unchanged.
    """

    scheme: Literal["zscore", "ct", "none"] = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


class PostProcessing(BaseModel):
    """Label-map clean-up after argmax."""

    largest_component: bool = False
    min_blob_mm3: float = 0.0


class ModelCard(BaseModel):
    """What a model is, what it expects and how well it did."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    network: NetworkSpec
    modality: list[str] = Field(description="one DICOM modality per input channel, e.g. ['MR']")
    labels: list[Label]
    spacing: tuple[float, float, float] = Field(description="target voxel spacing in mm")
    orientation: str = "RAS"
    normalization: Normalization = Normalization()
    patch_size: tuple[int, ...]
    overlap: float = 0.5
    postprocessing: PostProcessing = PostProcessing()
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_card: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return int(self.network.config["out_channels"])


class ModelPackage:
    """A model package on disk: its card and (lazily) its network."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            metadata = json.loads((self.path / METADATA).read_text())
            self.card = ModelCard.model_validate(metadata["medseg"])
        except (OSError, KeyError, ValueError) as error:
            raise UnreadableFileError(f"{self.path}: not a medseg model package ({error})") from None

    def load_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Build the network from the card, load the weights, and return it in eval mode."""
        from medseg.networks import create_network

        spec = self.card.network
        network = create_network(spec.name, **spec.config)
        state = torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return network.to(device).eval()

    @staticmethod
    def save(path: str | os.PathLike, card: ModelCard, state_dict: dict[str, torch.Tensor]) -> "ModelPackage":
        """Write a package atomically (to a temporary directory, then rename) and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / METADATA).parent.mkdir(parents=True)
            (tmp / WEIGHTS).parent.mkdir(parents=True)
            torch.save(state_dict, tmp / WEIGHTS)
            (tmp / METADATA).write_text(json.dumps(_bundle_metadata(card), indent=2))
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
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "/".join(card.modality),
                "num_channels": channels, "spatial_shape": list(card.patch_size),
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): m for i, m in enumerate(card.modality)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": card.num_classes,
                "spatial_shape": list(card.patch_size), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "background", **{str(l.id): l.name for l in card.labels}},
            }},
        },
        "medseg": card.model_dump(mode="json"),
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


def list_models() -> list[str]:
    """Names of the packages found on :func:`model_search_path`."""
    names = []
    for folder in model_search_path():
        if folder.is_dir():
            names += sorted(p.name for p in folder.iterdir() if (p / METADATA).is_file())
    return names
