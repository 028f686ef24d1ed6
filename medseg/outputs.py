"""Everything a prediction leaves on disk, written by one function: :func:`write_outputs`.

Per series, in ``out_dir``, named ``<stem>`` + suffix (see :func:`series_stem`):

- ``<stem>.nii.gz`` — the label map (NIfTI, sform = qform = the input affine);
- ``<stem>.seg.dcm`` — DICOM SEG (binary, PS3.3 A.51) referencing the source series, only when the
  input was DICOM (``image.dicom_source``);
- ``<stem>.json`` — the report: model, version, input geometry, per-label volumes, timings;
- ``<stem>.png`` — a preview: three orthogonal mid-slices with the label overlay.

Every file is written under a temporary name and renamed (:func:`medseg.io.atomic.atomic_write`);
the JSON report is written last, so its presence marks a complete set (``--skip-existing``).
Nothing written carries patient identifiers: names come from the series number, description and
a hash of the series UID, and the report holds series-level metadata only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.io.atomic import atomic_write
from medseg.io.image import Image
from medseg.labels import Label
from medseg.package import ModelCard

if TYPE_CHECKING:  # pragma: no cover
    from medseg.inference.predictor import Prediction

FORMATS = ("nifti", "seg", "json", "png")
SUFFIXES = {"nifti": ".nii.gz", "seg": ".seg.dcm", "json": ".json", "png": ".png"}
#: series metadata copied into the report (no patient-level keys)
SERIES_KEYS = ("modality", "series_uid", "study_uid", "series_description", "series_number",
               "manufacturer", "instance_count")


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
    Volume files: the file name without its extension (sanitised) — the name the user gave.
    """
    if dicom:
        uid = str(meta.get("series_uid") or "")
        parts = [str(meta["series_number"]) if meta.get("series_number") is not None else "",
                 _sanitize(meta.get("series_description") or ""),
                 hashlib.sha1(uid.encode()).hexdigest()[:8] if uid else ""]
        stem = "_".join(p for p in parts if p)
        return stem or "series"
    name = Path(str(meta.get("series_uid") or meta.get("source") or "image")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _sanitize(name) or "image"


def output_paths(out_dir: str | Path, stem: str, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """``{format: path}`` for ``stem`` in ``out_dir``."""
    return {fmt: Path(out_dir) / f"{stem}{SUFFIXES[fmt]}" for fmt in formats}


def geometry(image: Image) -> dict[str, Any]:
    """Shape, spacing (mm), orientation, origin and affine of ``image`` as plain values."""
    return {
        "shape": [int(s) for s in image.array.shape],
        "spacing_mm": [round(v, 6) for v in image.spacing],
        "orientation": image.orientation,
        "origin_mm": [round(v, 6) for v in image.origin],
        "affine": np.round(image.affine, 6).tolist(),
    }


def build_report(prediction: "Prediction", image: Image, card: ModelCard,
                 outputs: dict[str, Path] | None = None) -> dict[str, Any]:
    """The JSON report of one prediction (see the module docstring)."""
    import medseg

    series = {key: image.meta.get(key) for key in SERIES_KEYS if image.meta.get(key) not in (None, "")}
    if not image.dicom_source and "series_uid" in series:
        series["series_uid"] = Path(str(series["series_uid"])).name  # a path for volume files
    return {
        "medseg_version": medseg.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": card.name, "version": card.version, "network": card.network.name,
            "modality": list(card.modality), "spacing_mm": list(card.spacing),
            "orientation": card.orientation, "patch_size": list(card.patch_size),
        },
        "input": {**series, **geometry(image), "warnings": list(image.warnings)},
        "settings": prediction.settings,
        "labels": prediction.statistics,
        "timings_s": prediction.timings,
        "outputs": {fmt: path.name for fmt, path in (outputs or {}).items()},
    }


def write_preview(label_map: np.ndarray, image: Image, labels: Sequence[Label], path: str | Path,
                  alpha: float = 0.45) -> Path:
    """PNG of three orthogonal mid-slices (sagittal, coronal, axial) of ``image`` with the label
    overlay, displayed in RAS+ orientation (patient's right on the viewer's left for coronal and
    axial, radiological convention) with the true aspect ratio; matplotlib Agg, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import nibabel as nib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    ornt = nib.orientations.io_orientation(image.affine)
    data = np.asarray(image.array if image.array.ndim == 3 else image.array[..., 0], dtype=np.float32)
    data = nib.orientations.apply_orientation(data, ornt)
    seg = nib.orientations.apply_orientation(np.asarray(label_map), ornt)
    spacing = np.asarray(image.spacing)[np.argsort(ornt[:, 0])]
    lo, hi = np.percentile(data, [0.5, 99.5]) if data.size else (0.0, 1.0)
    size = max([label.id for label in labels] + [int(seg.max(initial=0))]) + 1
    colours = np.zeros((size, 4))
    for label in labels:
        colours[label.id] = [*(c / 255 for c in label.color), alpha]
    cmap = ListedColormap(colours)
    ci, cj, ck = (s // 2 for s in data.shape)
    views = [  # (title, image slice, seg slice, aspect = row spacing / column spacing)
        ("sagittal", data[ci, :, :].T, seg[ci, :, :].T, spacing[2] / spacing[1]),
        ("coronal", data[::-1, cj, :].T, seg[::-1, cj, :].T, spacing[2] / spacing[0]),
        ("axial", data[::-1, :, ck].T, seg[::-1, :, ck].T, spacing[1] / spacing[0]),
    ]
    figure = Figure(figsize=(12, 4.4), dpi=100)
    for index, (title, plane, overlay, aspect) in enumerate(views, start=1):
        axis = figure.add_subplot(1, 3, index)
        axis.imshow(plane, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                    interpolation="nearest")
        axis.imshow(overlay, cmap=cmap, vmin=0, vmax=size - 1, origin="lower", aspect=aspect,
                    interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write ``report`` as indented JSON, atomically."""
    text = json.dumps(report, indent=2, default=_json_default)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_outputs(prediction: "Prediction", image: Image, card: ModelCard, out_dir: str | Path,
                  formats: Sequence[str] = FORMATS, stem: str | None = None,
                  warnings: list[str] | None = None) -> dict[str, Path]:
    """Write the outputs of ``prediction`` for ``image`` and return ``{format: path}``.

    Args:
        prediction: from :meth:`medseg.inference.Predictor.predict` on ``image``.
        image: the input image (geometry, intensities for the preview, DICOM source for SEG).
        card: the model card (labels, name, version).
        out_dir: folder, created if needed.
        formats: any of ``nifti``, ``seg``, ``json``, ``png``; ``seg`` is skipped (not an error)
            when the input was not DICOM.
        stem: file-name stem (default: :func:`series_stem`).
        warnings: if given, receives the writers' warnings (e.g. the SEG's repaired or emptied
            patient/study attributes, by keyword); they are also added to the report's
            ``input.warnings``.

    Raises:
        ValueError: unknown format.
        MedsegError: from the writers (e.g. a DICOM source that SEG cannot reference).
    """
    from medseg.io import write_nifti, write_seg

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown} (known: {', '.join(FORMATS)})")
    stem = stem or series_stem(image)
    wanted = [f for f in FORMATS if f in formats and (f != "seg" or image.dicom_source)]
    paths = output_paths(out_dir, stem, wanted)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    labels = sorted(card.labels, key=lambda label: label.id)
    written: dict[str, Path] = {}
    notes: list[str] = []
    if "nifti" in paths:
        written["nifti"] = write_nifti(prediction.label_map, paths["nifti"], label_map=True)
    if "seg" in paths:
        written["seg"] = write_seg(prediction.label_map, image, labels, paths["seg"],
                                   series_description=f"{card.name} segmentation"[:64],
                                   algorithm_name=card.name, algorithm_version=card.version,
                                   warnings=notes)
    if "png" in paths:
        written["png"] = write_preview(prediction.label_map.array, image, labels, paths["png"])
    if "json" in paths:
        report = build_report(prediction, image, card, {**written, "json": paths["json"]})
        report["input"]["warnings"] = [*report["input"]["warnings"], *notes]
        written["json"] = write_report(report, paths["json"])
    if warnings is not None:
        warnings.extend(notes)
    return written
