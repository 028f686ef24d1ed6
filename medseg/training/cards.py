"""The data card as training needs it: labels (ids, names, SNOMED CT codes, colours), modality and
the card itself for the model package.

Cards are read by :func:`medseg.data_cards.load_data_card` (the one reader); this module only
adapts its result to what the trainer uses.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def load_training_data_card(name_or_path: str | None) -> TrainingDataCard:
    """Load a data card by name or path.

    Raises:
        ConfigError: no card given, the card is unknown or unreadable, or its labels are invalid.
    """
    if not name_or_path:
        raise ConfigError("data.data_card: a data card (name or path) is required for the label map and modality")
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
        labels = check_unique([label if isinstance(label, Label) else Label.model_validate(label)
                               for label in (getattr(card, "labels", None) or raw.get("labels") or [])])
    except ValueError as error:
        raise ConfigError(f"data.data_card: invalid labels in {name_or_path} ({error})") from None
    if not labels:
        raise ConfigError(f"data.data_card: {name_or_path} lists no labels")
    modality = getattr(card, "modality", None) or raw.get("modality")
    if isinstance(modality, str):
        modality = [modality]
    return TrainingDataCard(labels=labels, modality=list(modality) if modality else None, raw=raw)
