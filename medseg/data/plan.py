"""Dataset fingerprint and experiment plan, as nnU-Net derives them (Isensee et al., Nature
Methods 2021, "rule-based parameters").

The fingerprint reads every case once (nibabel) and records spacing, shape and foreground
intensity statistics; reading it is also where bad data is caught, before any training:
unpaired files, image/label grid mismatches and label values outside the data card raise
:class:`~medseg.errors.DatasetError` naming the case. The plan derives from it the target spacing
(median), the patch size (the median shape, rounded up to the network's divisor), the batch size,
the intensity normalisation (:class:`medseg.package.Normalization`, applied by
:func:`medseg.preprocess.normalize_intensity`, the one normalisation shared with inference) and a
seeded k-fold split.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import partition_dataset
from pydantic import BaseModel, Field

from medseg.data.cases import Case, find_cases, read_manifest
from medseg.errors import DatasetError, UnreadableFileError
from medseg.io.atomic import atomic_write
from medseg.package import Normalization

# nnU-Net samples 10e7 foreground voxels over the whole dataset for its intensity statistics
FOREGROUND_SAMPLES = 10_000_000
GRID_TOLERANCE_MM = 1e-3


class CaseFingerprint(BaseModel):
    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = Field(description="mm per array axis")
    foreground_voxels: int


class IntensityStats(BaseModel):
    """Foreground intensity statistics (nnU-Net ``foreground_intensity_properties``)."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


class Fingerprint(BaseModel):
    dataset: str
    modality: list[str]
    label_ids: list[int]
    cases: list[CaseFingerprint]
    intensity: IntensityStats

    @property
    def median_shape(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median([c.shape for c in self.cases], axis=0))


class Fold(BaseModel):
    train: list[str]
    val: list[str]


class Plan(BaseModel):
    """What ``medseg train`` uses unless the config overrides it (``medseg plan`` writes it)."""

    dataset: str
    dataset_dir: str
    modality: list[str]
    spacing: tuple[float, float, float] = Field(description="target voxel spacing in mm")
    patch_size: tuple[int, int, int]
    divisor: tuple[int, int, int]
    batch_size: int
    normalization: Normalization
    folds: list[Fold]
    seed: int
    fingerprint: Fingerprint

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically (temporary name, then rename)."""
        write_json_atomic(path, self.model_dump(mode="json"))

    @staticmethod
    def load(path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`. Raises :class:`UnreadableFileError`."""
        try:
            return Plan.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UnreadableFileError(f"{path}: not a medseg plan ({str(error).splitlines()[0]})") from None


def write_json_atomic(path: str | os.PathLike, payload: object) -> None:
    """JSON to a temporary name beside ``path``, then renamed (:func:`medseg.io.atomic.atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))


def modality_from_manifest(manifest: dict) -> list[str]:
    """DICOM modality codes from an MSD ``dataset.json`` ``modality`` entry (``MRI``/``T1w`` -> ``MR``)."""
    entries = manifest.get("modality") or manifest.get("channel_names") or {"0": "MR"}
    codes = []
    for _, name in sorted(entries.items(), key=lambda kv: int(kv[0])):
        upper = str(name).upper()
        codes.append(
            "CT"
            if upper == "CT"
            else "MR"
            if upper in ("MR", "MRI") or upper.startswith(("T1", "T2", "FLAIR", "ADC", "DWI"))
            else upper
        )
    return codes


def _read_pair(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(image float32, label, image affine, label affine, spacing mm)`` of a case: nibabel for
    NIfTI (as before), :mod:`medseg.io` for TIFF stacks (``case.spacing``; 0/255 masks as 0/1).

    Raises:
        UnreadableFileError: a file cannot be read (or a TIFF has no spacing: the message says so).
    """
    from medseg.errors import MedsegError
    from medseg.io.tiff import is_tiff

    if is_tiff(case.image) or is_tiff(case.label):
        from medseg.io import read_image

        try:
            image, label = read_image(case.image, spacing=case.spacing), read_image(case.label, spacing=case.spacing)
        except MedsegError as error:
            raise UnreadableFileError(f"case {case.case_id}: {error}") from None
        return image.array.astype(np.float32), label.array, image.affine, label.affine, image.spacing
    try:
        image_nii, label_nii = nib.load(case.image), nib.load(case.label)
        image = np.asarray(image_nii.dataobj, dtype=np.float32)
        label = np.asarray(label_nii.dataobj)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise UnreadableFileError(f"case {case.case_id}: cannot read image/label ({error})") from None
    spacing = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
    return image, label, image_nii.affine, label_nii.affine, spacing


def fingerprint_case(case: Case, label_ids: set[int], samples: int, seed: int) -> tuple[CaseFingerprint, np.ndarray]:
    """Check one case and return its fingerprint and up to ``samples`` foreground intensities.

    Raises:
        DatasetError: image and label grids (shape or affine) differ, label values are not integers
            or not in ``label_ids``.
        UnreadableFileError: a file cannot be read.
    """
    image, label, image_affine, label_affine, spacing = _read_pair(case)
    if image.ndim == 4:
        image = image[..., 0]
    if image.shape[:3] != label.shape[:3] or label.ndim != 3:
        raise DatasetError(f"case {case.case_id}: image grid {image.shape} differs from label grid {label.shape}")
    if not np.allclose(image_affine, label_affine, atol=GRID_TOLERANCE_MM):
        raise DatasetError(f"case {case.case_id}: image and label affines differ (not on the same grid)")
    values = np.unique(label)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise DatasetError(f"case {case.case_id}: label map has non-integer values")
    unknown = sorted(int(v) for v in values if int(v) != 0 and int(v) not in label_ids)
    if unknown:
        raise DatasetError(
            f"case {case.case_id}: label values {unknown} are not in the data card "
            f"(allowed 0, {', '.join(map(str, sorted(label_ids)))})"
        )
    foreground = image[label > 0]
    rng = np.random.default_rng(seed)
    if foreground.size > samples:
        foreground = rng.choice(foreground, samples, replace=False)
    return CaseFingerprint(
        case_id=case.case_id, shape=image.shape[:3], spacing=spacing, foreground_voxels=int((label > 0).sum())
    ), foreground


def compute_fingerprint(
    dataset_dir: str | Path,
    label_ids: Iterable[int] | None = None,
    modality: list[str] | None = None,
    cases: Sequence[Case] | None = None,
    seed: int = 0,
    num_workers: int = 2,
) -> Fingerprint:
    """Read and check every case of ``dataset_dir`` (see :func:`fingerprint_case`).

    Args:
        label_ids: allowed foreground ids (default: the ``labels`` of ``dataset.json``).
        modality: DICOM modality per channel (default: from ``dataset.json``).
        cases: a subset of :func:`find_cases` to use.

    Raises:
        DatasetError: see :func:`find_cases` and :func:`fingerprint_case`.
    """
    manifest = read_manifest(dataset_dir)
    cases = list(cases) if cases is not None else find_cases(dataset_dir)
    if not cases:
        raise DatasetError(f"{dataset_dir}: no cases")
    if label_ids is None:
        label_ids = [int(k) for k in (manifest.get("labels") or {}) if int(k) != 0]
        if not label_ids:
            raise DatasetError(f"{dataset_dir}: no labels in dataset.json and no data card given")
    ids = {int(i) for i in label_ids}
    per_case = max(1, FOREGROUND_SAMPLES // len(cases))
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(pool.map(lambda ic: fingerprint_case(ic[1], ids, per_case, seed + ic[0]), enumerate(cases)))
    foreground = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.float32)
    if foreground.size == 0:
        raise DatasetError(f"{dataset_dir}: no foreground voxels in any label map")
    intensity = IntensityStats(
        mean=float(foreground.mean()),
        std=float(foreground.std()),
        median=float(np.median(foreground)),
        min=float(foreground.min()),
        max=float(foreground.max()),
        percentile_00_5=float(np.percentile(foreground, 0.5)),
        percentile_99_5=float(np.percentile(foreground, 99.5)),
    )
    return Fingerprint(
        dataset=str(manifest.get("name") or Path(dataset_dir).name),
        modality=modality or modality_from_manifest(manifest),
        label_ids=sorted(ids),
        cases=[r[0] for r in results],
        intensity=intensity,
    )


def target_spacing(fingerprint: Fingerprint) -> tuple[float, float, float]:
    """Median spacing; for anisotropic data (max/min > 3) the coarse axis gets the 10th percentile,
    as nnU-Net does."""
    spacings = np.array([c.spacing for c in fingerprint.cases])
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    if target[worst] > 3 * target.min():
        target[worst] = np.percentile(spacings[:, worst], 10)
    return tuple(float(v) for v in target)


def plan_patch_size(
    median_shape: Sequence[float], divisor: Sequence[int], max_voxels: int = 128**3
) -> tuple[int, int, int]:
    """The median shape rounded up to multiples of ``divisor``, shrunk (largest axis first, one divisor
    step at a time) until it holds at most ``max_voxels``."""
    patch = [int(math.ceil(s / d) * d) for s, d in zip(median_shape, divisor)]
    while math.prod(patch) > max_voxels:
        axis = int(np.argmax(patch))
        if patch[axis] <= divisor[axis]:
            break
        patch[axis] -= divisor[axis]
    return tuple(patch)


def plan_batch_size(patch_size: Sequence[int], fingerprint: Fingerprint, reference_voxels: int = 2 * 128**3) -> int:
    """nnU-Net-like: as many patches as ``reference_voxels`` (the voxels of two 128^3 patches) holds,
    at least 2 and at most 5 % of the dataset's voxels."""
    patch_voxels = math.prod(patch_size)
    dataset_voxels = sum(math.prod(c.shape) for c in fingerprint.cases)
    cap = max(2, int(0.05 * dataset_voxels / patch_voxels))
    return int(min(max(2, reference_voxels // patch_voxels), cap))


def plan_normalization(fingerprint: Fingerprint) -> Normalization:
    """CT: clip to the foreground 0.5 / 99.5 percentiles, z-score with foreground mean/std; otherwise
    per-image z-score (nnU-Net's ``CTNormalization`` / ``ZScoreNormalization``)."""
    if fingerprint.modality and fingerprint.modality[0] == "CT":
        s = fingerprint.intensity
        return Normalization(scheme="ct", clip=(s.percentile_00_5, s.percentile_99_5), mean=s.mean, std=s.std)
    return Normalization(scheme="zscore")


def make_folds(
    case_ids: Sequence[str], num_folds: int = 5, seed: int = 0, fixed: Sequence[Sequence[str]] | None = None
) -> list[Fold]:
    """Seeded k-fold split (MONAI ``partition_dataset``): fold k validates on partition k. With
    ``fixed`` (validation case ids per fold, e.g. a manifest's ``folds``) those folds are used as given.

    Raises:
        DatasetError: too few cases, or ``fixed`` has not ``num_folds`` folds.
    """
    if fixed is not None:
        if len(fixed) != num_folds:
            raise DatasetError(f"the manifest fixes {len(fixed)} folds, data.num_folds is {num_folds}")
        ids = sorted(case_ids)
        return [Fold(train=[c for c in ids if c not in set(val)], val=sorted(val)) for val in fixed]
    if len(case_ids) < num_folds:
        raise DatasetError(f"{len(case_ids)} cases cannot be split into {num_folds} folds")
    parts = partition_dataset(sorted(case_ids), num_partitions=num_folds, shuffle=True, seed=seed)
    return [
        Fold(train=sorted(c for j, p in enumerate(parts) if j != k for c in p), val=sorted(parts[k]))
        for k in range(num_folds)
    ]


def make_plan(
    dataset_dir: str | Path,
    label_ids: Iterable[int] | None = None,
    modality: list[str] | None = None,
    divisor: Sequence[int] = (8, 8, 8),
    num_folds: int = 5,
    seed: int = 0,
    cases: Sequence[Case] | None = None,
    folds: Sequence[Sequence[str]] | None = None,
) -> Plan:
    """Fingerprint ``dataset_dir`` and derive the plan (see the module docstring).

    ``folds``: fixed validation case ids per fold (see :func:`make_folds`).

    Raises:
        DatasetError: bad or empty dataset (see :func:`compute_fingerprint`), too few cases for the folds.
    """
    fingerprint = compute_fingerprint(dataset_dir, label_ids, modality, cases=cases, seed=seed)
    spacing = target_spacing(fingerprint)
    shapes_mm = np.array([np.array(c.shape) * np.array(c.spacing) for c in fingerprint.cases])
    median_shape = np.median(shapes_mm, axis=0) / np.array(spacing)
    divisor = tuple(int(d) for d in divisor)
    patch = plan_patch_size(median_shape, divisor)
    return Plan(
        dataset=fingerprint.dataset,
        dataset_dir=str(Path(dataset_dir).resolve()),
        modality=fingerprint.modality,
        spacing=spacing,
        patch_size=patch,
        divisor=divisor,
        batch_size=plan_batch_size(patch, fingerprint),
        normalization=plan_normalization(fingerprint),
        folds=make_folds([c.case_id for c in fingerprint.cases], num_folds, seed, fixed=folds),
        seed=seed,
        fingerprint=fingerprint,
    )
