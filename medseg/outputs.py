"""Everything a prediction leaves on disk, written by one function: :func:`write_outputs`.

Per series, in ``out_dir``, named ``<stem>`` + suffix (see :func:`series_stem`):

- ``<stem>.nii.gz`` — the label map (NIfTI, sform = qform = the input affine);
- ``<stem>.seg.dcm`` — DICOM SEG (binary, PS3.3 A.51) referencing the source series, only when the
  input was DICOM (``image.dicom_source``);
- ``<stem>.rtstruct.dcm`` — DICOM RT Structure Set (PS3.3 A.19, :mod:`medseg.io.rtstruct`): one
  ROI per label with planar contours on the source slices, only for DICOM input;
- ``<stem>.json`` — the report: model (name, version, weights sha256, training time), input
  geometry, per-label volumes, timings;
- ``<stem>.png`` — a preview (:func:`medseg.preview.write_preview`): sagittal, coronal and axial slices through the
  segmentation with the label overlay, orientation letters, a legend with volumes (ml), the
  series description, the model identity and, unless the model is validated, "not for diagnostic
  use";
- ``<stem>.mip.png`` — maximum intensity projections of the image and the label map side by side
  (:func:`medseg.mip_preview.write_mip_preview`; vessel models).

The DICOM SEG's algorithm identification carries the model name and version, and its
AlgorithmParameters the weights' sha256 and training time; its ContentDescription is
``"<name> <version> sha256:<12 hex>"``.

Every file is written under a temporary name and renamed (:func:`medseg.io.atomic.atomic_write`);
the JSON report is written last, so its presence marks a complete set (``--skip-existing``).
Nothing written carries patient identifiers: names come from the series number, description and
a hash of the series UID, and the report holds series-level metadata only.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.io.atomic import atomic_write
from medseg.io.image import Image
from medseg.package import ModelCard
from medseg.preview import write_preview
from medseg.stems import series_stem, stem_for  # noqa: F401  (re-exported: the names of outputs)

if TYPE_CHECKING:  # pragma: no cover
    from medseg.inference.predictor import Prediction

FORMATS = ("nifti", "tiff", "seg", "rtstruct", "json", "png", "mip")
SUFFIXES = {
    "nifti": ".nii.gz",
    "tiff": ".label.tif",  # (Z, Y, X) label stack, medseg.io.tiff.write_label_tiff
    "seg": ".seg.dcm",
    "rtstruct": ".rtstruct.dcm",
    "json": ".json",
    "png": ".png",
    "mip": ".mip.png",  # image and label-map maximum intensity projections, medseg.mip_preview
}
#: formats written only for DICOM input (they reference the source instances)
DICOM_ONLY_FORMATS = ("seg", "rtstruct")
#: what is written when no formats are given (RTSTRUCT only on request)
DEFAULT_FORMATS = ("nifti", "seg", "json", "png")
#: series metadata copied into the report (no patient-level keys)
SERIES_KEYS = (
    "modality",
    "series_uid",
    "study_uid",
    "series_description",
    "series_number",
    "manufacturer",
    "instance_count",
)


def output_paths(out_dir: str | Path, stem: str, formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Path]:
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


def build_report(
    prediction: Prediction, image: Image, card: ModelCard, outputs: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The JSON report of one prediction (see the module docstring).

    ``model`` identifies the exact weights: ``name``, ``version``, ``weights_sha256`` (64 hex,
    ``None`` only for a card not loaded from a package), ``weights_sha256_short`` (12 hex),
    ``trained_at`` (ISO 8601 UTC or ``None``), ``clinically_validated``, plus network, modality,
    spacing (mm), orientation and patch size. ``labels`` has per-label volumes in ml.
    """
    import medseg

    series = {key: image.meta.get(key) for key in SERIES_KEYS if image.meta.get(key) not in (None, "")}
    if not image.dicom_source and "series_uid" in series:
        series["series_uid"] = Path(str(series["series_uid"])).name  # a path for volume files
    return {
        "medseg_version": medseg.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": card.name,
            "version": card.version,
            "weights_sha256": card.weights_sha256,
            "weights_sha256_short": card.weights_short,
            "trained_at": card.trained_at,
            "clinically_validated": card.clinically_validated,
            "network": card.network.name,
            "modality": list(card.modality),
            "spacing_mm": list(card.spacing),
            "orientation": card.orientation,
            "patch_size": list(card.patch_size),
        },
        "input": {**series, **geometry(image), "warnings": list(image.warnings)},
        "settings": prediction.settings,
        "labels": prediction.statistics,
        "timings_s": prediction.timings,
        "outputs": {fmt: path.name for fmt, path in (outputs or {}).items()},
    }


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


def write_outputs(
    prediction: Prediction,
    image: Image,
    card: ModelCard,
    out_dir: str | Path,
    formats: Sequence[str] = DEFAULT_FORMATS,
    stem: str | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Path]:
    """Write the outputs of ``prediction`` for ``image`` and return ``{format: path}``.

    Args:
        prediction: from :meth:`medseg.inference.Predictor.predict` on ``image``.
        image: the input image (geometry, intensities for the preview, DICOM source for SEG).
        card: the model card (labels, name, version, weights hash, training time, whether
            validated); its identity goes into the report, the SEG and the preview.
        out_dir: folder, created if needed.
        formats: any of ``nifti``, ``tiff`` (label stack), ``seg``, ``rtstruct``, ``json``, ``png``,
            ``mip`` (default :data:`DEFAULT_FORMATS`); ``seg`` and ``rtstruct`` are skipped
            (not an error) when the input was not DICOM.
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
    wanted = [f for f in FORMATS if f in formats and (f not in DICOM_ONLY_FORMATS or image.dicom_source)]
    paths = output_paths(out_dir, stem, wanted)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    labels = sorted(card.labels, key=lambda label: label.id)
    written: dict[str, Path] = {}
    notes: list[str] = []
    if "nifti" in paths:
        written["nifti"] = write_nifti(prediction.label_map, paths["nifti"], label_map=True)
    if "tiff" in paths:
        from medseg.io.tiff import write_label_tiff

        written["tiff"] = write_label_tiff(prediction.label_map, paths["tiff"])
    if "seg" in paths:
        parameters = {
            key: value
            for key, value in (("weights_sha256", card.weights_sha256), ("trained_at", card.trained_at))
            if value
        }
        written["seg"] = write_seg(
            prediction.label_map,
            image,
            labels,
            paths["seg"],
            series_description=f"{card.name} segmentation"[:64],
            algorithm_name=card.name,
            algorithm_version=card.version,
            algorithm_parameters=parameters,
            content_description=card.identity,
            warnings=notes,
        )
    if "rtstruct" in paths:
        from medseg.io.rtstruct import write_rtstruct

        written["rtstruct"] = write_rtstruct(
            prediction.label_map,
            image,
            labels,
            paths["rtstruct"],
            series_description=f"{card.name} contours"[:64],
            structure_set_label=card.name[:16],
            algorithm_name=card.name,
            algorithm_version=card.version,
            warnings=notes,
        )
    if "png" in paths:
        written["png"] = write_preview(
            prediction.label_map.array, image, labels, paths["png"], statistics=prediction.statistics, card=card
        )
    if "mip" in paths:
        from medseg.mip_preview import write_mip_preview

        written["mip"] = write_mip_preview(
            prediction.label_map.array, image, labels, paths["mip"], statistics=prediction.statistics, card=card
        )
    if "json" in paths:
        report = build_report(prediction, image, card, {**written, "json": paths["json"]})
        report["input"]["warnings"] = [*report["input"]["warnings"], *notes]
        written["json"] = write_report(report, paths["json"])
    if warnings is not None:
        warnings.extend(notes)
    return written
