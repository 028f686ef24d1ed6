"""File-name stems of a series' outputs, free of patient identifiers (shared by the writers,
the previews and ``medseg evaluate``'s pairing by name)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from medseg.formats import strip_suffix
from medseg.io.image import Image

__all__ = ["series_stem", "stem_for"]


def _sanitize(text: str, limit: int = 48) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")
    return cleaned[:limit]


def series_stem(image: Image) -> str:
    """File-name stem for a series' outputs, free of patient identifiers (see :func:`stem_for`)."""
    return stem_for(image.meta, dicom=bool(image.dicom_source))


def stem_for(meta: dict[str, Any], dicom: bool) -> str:
    """File-name stem from series metadata (``series_uid``, ``series_number``,
    ``series_description``, ``source``).

    DICOM: ``<series number>_<series description>_<8 hex of sha1(series UID)>`` (sanitised to
    ``[A-Za-z0-9._-]``; number or description omitted when absent), unique per series.
    Volume files: the file name without its extension (sanitised, at most 200 characters, so that
    ``medseg evaluate`` pairs it with a label of the same name) — the name the user gave.
    """
    if dicom:
        uid = str(meta.get("series_uid") or "")
        parts = [
            str(meta["series_number"]) if meta.get("series_number") is not None else "",
            _sanitize(meta.get("series_description") or ""),
            hashlib.sha1(uid.encode()).hexdigest()[:8] if uid else "",
        ]
        stem = "_".join(p for p in parts if p)
        return stem or "series"
    name = strip_suffix(Path(str(meta.get("series_uid") or meta.get("source") or "image")).name)
    return _sanitize(name, limit=200) or "image"
