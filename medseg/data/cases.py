"""Finding the image/label pairs of a dataset in the Medical Segmentation Decathlon / nnU-Net layout.

``DATASET/imagesTr/<case>.nii.gz`` (MSD) or ``<case>_0000.nii.gz`` (nnU-Net v2, one file per
channel) pairs with ``DATASET/labelsTr/<case>.nii.gz``; a ``"training"`` list in
``dataset.json`` (MSD) takes precedence. Any file format nibabel reads is accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError
from medseg.formats import strip_suffix, volume_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One training case: its id (file name without suffix) and image/label paths."""

    case_id: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, str]:
        """The MONAI dictionary form: ``{"image", "label", "case"}``."""
        return {"image": str(self.image), "label": str(self.label), "case": self.case_id}


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
