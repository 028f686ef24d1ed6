"""Data cards: where a dataset comes from, its licence, modality, labels and spacing.

One YAML file per dataset in ``data_cards/`` at the repository root, packaged with medseg (see
:data:`CARDS_DIR`), so ``load_data_card("hippocampus")`` works from any folder and after install. Labels
carry the SNOMED CT codes that DICOM SEG needs (:class:`medseg.labels.Label`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from medseg.errors import ConfigError, config_error
from medseg.labels import Label, check_unique

#: Folder of the bundled cards: ``medseg/data_card_files``, a link to ``<repo>/data_cards`` in a
#: checkout and a packaged copy in an installed wheel (``package-data``), so cards load by name
#: after a normal install too.
CARDS_DIR = Path(__file__).parent / "data_card_files"


class DataCard(BaseModel):
    """A dataset's card.

    Attributes:
        name: short identifier (the YAML file's stem).
        description: one paragraph on what the images show.
        source: where the data came from (project, institution, URL).
        licence: licence of the data (SPDX-like, e.g. ``CC-BY-SA-4.0``).
        citation: references to cite when using the data.
        modality: DICOM modalities of the images (``["MR"]``).
        labels: foreground labels of the label maps (ids, names, SNOMED CT codes, colours).
        spacing: typical voxel spacing (mm) along i, j, k, if uniform.
        field_of_view_mm: ``{"min": [x, y, z], "max": [x, y, z]}``, the smallest and largest image
            extent (voxels x spacing, mm, per RAS axis) in the data set; models trained on it
            record it, and ``medseg predict`` skips series far outside it (e.g. a whole brain for
            a hippocampus-crop model).
        quirks: things a user of the data will trip over.
    """

    name: str
    description: str = ""
    source: str
    licence: str
    citation: list[str] = Field(default_factory=list)
    modality: list[str]
    labels: list[Label]
    spacing: tuple[float, float, float] | None = None
    field_of_view_mm: dict[str, tuple[float, float, float]] | None = None
    quirks: list[str] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _unique(cls, labels: list[Label]) -> list[Label]:
        return check_unique(labels)

    @field_validator("spacing")
    @classmethod
    def _positive(cls, spacing):
        if spacing is not None and any(v <= 0 for v in spacing):
            raise ValueError("spacing must be positive (mm)")
        return spacing


def available_data_cards() -> list[str]:
    """Names of the bundled cards."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml")) if CARDS_DIR.is_dir() else []


def load_data_card(path_or_name: str | Path) -> DataCard:
    """Load a card from a YAML path, or by name from the bundled ``data_cards/<name>.yaml``.

    Raises:
        ConfigError: unknown name or missing file (lists the bundled cards), invalid YAML, or a
            card that fails validation (the message names the bad key).
    """
    path = Path(path_or_name)
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml") or len(path.parts) > 1:
            raise ConfigError(f"data card {path}: no such file")
        path = CARDS_DIR / f"{path_or_name}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown data card {str(path_or_name)!r}; bundled cards: "
                + (", ".join(available_data_cards()) or "none")
            )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"data card {path.name}: unreadable YAML ({type(error).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"data card {path.name}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    try:
        return DataCard.model_validate(raw)
    except ValidationError as error:
        raise config_error(error, f"data card {path.name}") from None
