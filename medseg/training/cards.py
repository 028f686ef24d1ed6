"""The data card as training needs it: labels (ids, names, SNOMED CT codes, colours), modality and
the card itself for the model package.

Cards are read by :func:`medseg.data_cards.load_data_card` (the one reader); this module only
adapts its result to what the trainer uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, MedsegError
from medseg.labels import Label, check_unique


@dataclass
class TrainingDataCard:
    labels: list[Label]
    modality: list[str] | None
    raw: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The card as JSON-able data (stored in the model card's ``data_card``)."""
        return self.raw


def _as_dict(card: Any) -> dict[str, Any]:
    if hasattr(card, "model_dump"):
        return card.model_dump(mode="json")
    if isinstance(card, dict):
        return card
    raise ConfigError(f"data card of unexpected type {type(card).__name__}")


def load_training_data_card(name_or_path: str | None, dataset_dir: str | Path | None = None) -> TrainingDataCard:
    """Load a data card by name or path; without one, labels and modality come from the
    dataset's MSD / nnU-Net ``dataset.json`` (:func:`card_from_dataset_json`).

    Raises:
        ConfigError: no card and no usable ``dataset.json``, the card is unknown or unreadable,
            or its labels are invalid.
    """
    if not name_or_path:
        if dataset_dir is not None and (Path(dataset_dir) / "dataset.json").is_file():
            return card_from_dataset_json(Path(dataset_dir) / "dataset.json")
        raise ConfigError(
            "data.data_card: a data card (name or path) is required for the label "
            "map and modality (or a dataset.json beside imagesTr/ and labelsTr/)"
        )
    try:
        from medseg.data_cards import load_data_card
    except ImportError as error:  # pragma: no cover - the reader ships with medseg
        raise ConfigError(f"data.data_card: the data card reader is unavailable ({error})") from None
    try:
        card = load_data_card(name_or_path)
    except MedsegError as error:
        raise ConfigError(f"data.data_card: {error}") from None
    raw = _as_dict(card)
    try:
        labels = check_unique(
            [
                label if isinstance(label, Label) else Label.model_validate(label)
                for label in (getattr(card, "labels", None) or raw.get("labels") or [])
            ]
        )
    except ValueError as error:
        raise ConfigError(f"data.data_card: invalid labels in {name_or_path} ({error})") from None
    if not labels:
        raise ConfigError(f"data.data_card: {name_or_path} lists no labels")
    modality = getattr(card, "modality", None) or raw.get("modality")
    if isinstance(modality, str):
        modality = [modality]
    return TrainingDataCard(labels=labels, modality=list(modality) if modality else None, raw=raw)


#: a generic SNOMED CT segmented property when dataset.json gives only a name
_GENERIC_TYPE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def card_from_dataset_json(path: Path) -> TrainingDataCard:
    """Labels and modality from an MSD (``labels: {"1": "Anterior"}``, ``modality: {"0": "MRI"}``)
    or nnU-Net v2 (``labels: {"Anterior": 1}``, ``channel_names: {"0": "T1"}``) ``dataset.json``.

    Labels get a generic SNOMED CT type (85756007 Tissue) and palette colours; give a data card
    for real codes. Licence and source are copied when present.

    Raises:
        ConfigError: unreadable JSON, or no foreground label in it.
    """
    import json

    from medseg.io.volume_files import guess_modality

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        pairs = raw["labels"].items()
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise ConfigError(f"{path.name}: no readable 'labels' ({type(error).__name__})") from None
    ids: dict[int, str] = {}
    for key, value in pairs:
        label_id, name = (key, value) if str(key).isdigit() else (value, key)
        if isinstance(label_id, (list, tuple)):  # nnU-Net region labels: not a label map
            raise ConfigError(f"{path.name}: region-based labels are not supported")
        if int(label_id) > 0:
            ids[int(label_id)] = str(name)
    if not ids:
        raise ConfigError(f"{path.name}: no foreground label")
    labels = [
        Label(id=i, name=name, type=_GENERIC_TYPE, color=_PALETTE[(i - 1) % len(_PALETTE)])
        for i, name in sorted(ids.items())
    ]
    channels = raw.get("modality") or raw.get("channel_names") or {}
    modality = [
        guess_modality(Path(f"{str(v).lower()}.nii")) or str(v).upper()
        for _, v in sorted(channels.items(), key=lambda kv: int(kv[0]))
    ]
    card = {
        "name": str(raw.get("name") or path.parent.name),
        "source": str(raw.get("reference") or ""),
        "licence": str(raw.get("licence") or raw.get("license") or ""),
        "modality": modality,
        "labels": [label.model_dump(mode="json") for label in labels],
        "quirks": ["labels and modality from dataset.json (generic SNOMED CT codes)"],
    }
    return TrainingDataCard(labels=check_unique(labels), modality=modality or None, raw=card)
