"""Finding the image/label pairs of a dataset in the Medical Segmentation Decathlon / nnU-Net layout.

``DATASET/imagesTr/<case>.nii.gz`` (MSD) or ``<case>_0000.nii.gz`` (nnU-Net v2, one file per
channel) pairs with ``DATASET/labelsTr/<case>.nii.gz``; a ``"training"`` list in
``dataset.json`` (MSD) takes precedence. Any file format nibabel reads is accepted.

A *manifest* (``data.manifest``, :func:`read_case_manifest`) lists the pairs of a dataset in any
other layout, e.g. the vesselNN two-photon TIFF stacks (``configs/vessels/vesselnn_2photon.json``)::

    {"name": "...", "spacing": [X, Y, Z] (mm, optional default for TIFF stacks),
     "training": [{"case": "id", "image": "denoised/a.tif", "label": "labels/a.tif",
                   "spacing": [X, Y, Z] (optional)}, ...],
     "folds": [{"val": ["id", ...]}, ...]   (optional fixed cross-validation folds)}

Paths are relative to ``data.dataset_dir``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError
from medseg.formats import strip_suffix, volume_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One training case: its id (file name without suffix) and image/label paths; ``spacing`` (mm
    along X, Y, Z) for files that carry none (TIFF stacks, :mod:`medseg.io.tiff`)."""

    case_id: str
    image: Path
    label: Path
    spacing: tuple[float, float, float] | None = None

    def as_dict(self) -> dict:
        """The MONAI dictionary form: ``{"image", "label", "case"}`` (+ ``"spacing"`` when set)."""
        d: dict = {"image": str(self.image), "label": str(self.label), "case": self.case_id}
        if self.spacing is not None:
            d["spacing"] = list(self.spacing)
        return d


def read_case_manifest(
    manifest: str | Path, dataset_dir: str | Path, default_spacing: Sequence[float] | None = None
) -> tuple[list[Case], list[list[str]] | None]:
    """The cases and fixed folds of a manifest (module docstring), sorted by case id.

    ``spacing`` precedence per case: the entry's, else ``default_spacing`` (``data.input_spacing``),
    else the manifest's top-level one, else ``None`` (the file must state it).

    Returns:
        ``(cases, folds)``; ``folds`` is the list of validation case ids per fold, or ``None``.

    Raises:
        DatasetError: unreadable manifest, a listed file missing, duplicate case ids, a fold naming
            an unknown case, or folds that do not cover every case exactly once.
    """
    path, root = Path(manifest), Path(dataset_dir)
    try:
        raw = json.loads(path.read_text())
        entries = raw["training"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: unreadable case manifest ({type(error).__name__}: {error})") from None
    top = raw.get("spacing")
    cases: list[Case] = []
    for entry in entries:
        image, label = root / entry["image"], root / entry["label"]
        for file in (image, label):
            if not file.is_file():
                raise DatasetError(f"{path}: listed file {file} does not exist (data.dataset_dir {root})")
        spacing = entry.get("spacing") or default_spacing or top
        cases.append(
            Case(
                str(entry.get("case") or _stem(image) or image.name),
                image,
                label,
                tuple(float(v) for v in spacing) if spacing else None,
            )
        )
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate case ids")
    folds = None
    if raw.get("folds"):
        folds = [sorted(fold["val"]) for fold in raw["folds"]]
        listed = [i for fold in folds for i in fold]
        unknown = sorted(set(listed) - set(ids))
        if unknown or sorted(listed) != sorted(ids):
            raise DatasetError(
                f"{path}: folds must hold every case exactly once"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
    return sorted(cases, key=lambda c: c.case_id), folds


def _stem(path: Path) -> str | None:
    return strip_suffix(path.name) if volume_suffix(path.name) else None


def _files_by_case(folder: Path, label_ids: set[str] | None = None) -> dict[str, Path]:
    """``{case id: path}``; with ``label_ids``, an image ``<case>_0000`` whose ``<case>`` has a label
    is nnU-Net v2 channel 0 of that case (other channels are skipped: single-channel data)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is None or path.name.startswith("."):
            continue
        match = _CHANNEL.match(stem)
        if label_ids is not None and match and stem not in label_ids and match["case"] in label_ids:
            if match["channel"] == "0000":
                found[match["case"]] = path
            continue
        found[stem] = path
    return found


def find_cases(dataset_dir: str | Path) -> list[Case]:
    """All labelled training cases of ``dataset_dir``, sorted by id.

    Raises:
        DatasetError: the folder or ``imagesTr``/``labelsTr`` is missing, an image has no label (or
            a label no image, naming the case), or no case is found.
    """
    root = Path(dataset_dir)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DatasetError(f"{root}: expected imagesTr/ and labelsTr/ folders (MSD / nnU-Net layout)")
    listed = _listed_cases(root)
    if listed is not None:
        return listed
    labels = _files_by_case(labels_dir)
    images = _files_by_case(images_dir, set(labels))
    unlabelled = sorted(set(images) - set(labels))
    orphans = sorted(set(labels) - set(images))
    if unlabelled:
        raise DatasetError(
            f"{root}: image {images[unlabelled[0]].name} has no label in labelsTr/"
            + (f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else "")
        )
    if orphans:
        raise DatasetError(
            f"{root}: label {labels[orphans[0]].name} has no image in imagesTr/"
            + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else "")
        )
    if not images:
        raise DatasetError(f"{root}: no cases found in imagesTr/")
    return [Case(case_id, images[case_id], labels[case_id]) for case_id in sorted(images)]


def _listed_cases(root: Path) -> list[Case] | None:
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text()).get("training")
    except (OSError, ValueError) as error:
        raise DatasetError(f"{manifest}: unreadable dataset.json ({error})") from None
    if not entries:
        return None
    cases = []
    for entry in entries:
        image, label = root / entry["image"], root / entry["label"]
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{manifest}: listed file {path.relative_to(root)} does not exist")
        cases.append(Case(_stem(image) or image.name, image, label))
    return sorted(cases, key=lambda c: c.case_id)


def read_manifest(dataset_dir: str | Path) -> dict:
    """``dataset.json`` as a dict (empty when absent)."""
    manifest = Path(dataset_dir) / "dataset.json"
    try:
        return json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, ValueError) as error:
        raise DatasetError(f"{manifest}: unreadable dataset.json ({error})") from None
