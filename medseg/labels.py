"""Label cards: what each integer of a label map means.

One :class:`Label` per foreground id, with the SNOMED CT codes that DICOM SEG needs
(segmented property category and type, DICOM PS3.3 C.8.20.2) and a display colour. Data cards
(``data_cards/*.yaml``) and model cards (:mod:`medseg.package`) both embed a list of labels.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator


class Code(BaseModel):
    """A coded concept (DICOM PS3.3 Code Sequence Macro): ``value`` in ``scheme`` meaning ``meaning``."""

    value: str
    scheme: str = "SCT"
    meaning: str


class Label(BaseModel):
    """One foreground label of a label map."""

    id: int = Field(ge=1, le=65535)
    name: str
    category: Code = Code(value="123037004", meaning="Anatomical Structure")
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("color components must be in 0..255")
        return value


def check_unique(labels: list[Label]) -> list[Label]:
    """Raise ``ValueError`` if two labels share an id or a name."""
    ids = [label.id for label in labels]
    names = [label.name for label in labels]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise ValueError("label ids and names must be unique")
    return labels
