"""Find the image series among DICOM files by reading headers only (no pixel data).

Instances are grouped by SeriesInstanceUID, never by folder. Within a series the scan skips,
with a warning on the series:

- objects that are not images (SR, presentation states, SEG, RTSTRUCT/RTPLAN, KO, encapsulated
  documents, raw data, registrations, waveforms), recognised by SOP Class and Modality;
- localizers / scouts: ImageType containing ``LOCALIZER``, or an orientation (or matrix size)
  that differs from the series majority;
- files that carry the ``DICM`` marker but cannot be parsed (named in the warning).

Files that are not DICOM at all (READMEs, JSON sidecars) are ignored silently.

A series mixing echoes (EchoNumbers) or image kinds (magnitude / phase / real / imaginary /
derived, from ImageType) is split into parts the way dcm2niix writes them, each its own
:class:`SeriesInfo`: ``<SeriesInstanceUID>`` for the main part (first echo, magnitude), and
``<uid>.e2``, ``<uid>.ph``, ``<uid>.derived``... for the others (:func:`split_series`). Pass the
part's uid to ``choose_series`` / ``--series``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medseg.errors import MedsegError
from medseg.io.dicom_frames import ORIENTATION_DECIMALS, is_enhanced_multiframe
from medseg.io.dicom_header import (  # noqa: F401  (re-exported)
    NON_IMAGE_MODALITIES,
    NON_IMAGE_SOP_CLASS_PREFIXES,
    is_image_instance,
    looks_like_instance,
    read_header,
)
from medseg.io.dicom_volume import read_dicom_volume
from medseg.io.safety import CLI_POLICY, ReadPolicy
from medseg.io.series_info import SeriesInfo

log = logging.getLogger(__name__)


@dataclass
class _Instance:
    path: str
    ds: Dataset
    orientation: tuple[float, ...] | None
    size: tuple[int, int]


def is_localizer(ds: Dataset) -> bool:
    """ImageType contains ``LOCALIZER`` (CT topograms, MR scouts)."""
    return any("LOCALIZER" in str(v).upper() for v in ds.get("ImageType", []) or [])


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    value = ds.get("ImageOrientationPatient")
    if value is None and is_enhanced_multiframe(ds):
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = ds.get(group)
            if seq:
                item = seq[0].get("PlaneOrientationSequence")
                if item:
                    value = item[0].get("ImageOrientationPatient")
                    if value is not None:
                        break
    try:
        return tuple(np.round([float(v) for v in value], ORIENTATION_DECIMALS).tolist())
    except (TypeError, ValueError):
        return None


def _series_key(ds: Dataset) -> tuple[str, bool]:
    """``(key, derived)``: the SeriesInstanceUID, or a derived key when it is empty."""
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    if uid:
        return uid, False
    parts = [
        str(ds.get(k) or "")
        for k in (
            "StudyInstanceUID",
            "FrameOfReferenceUID",
            "SeriesNumber",
            "SeriesDescription",
            "Modality",
            "SeriesDate",
            "SeriesTime",
        )
    ]
    return "nouid-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:16], True


def scan_dicom_files(paths: Iterable[str | Path], *, source: str, policy: ReadPolicy = CLI_POLICY) -> list[SeriesInfo]:
    """Group DICOM files into image series (headers only).

    Args:
        paths: candidate files (non-DICOM files are ignored).
        source: the user's input path, recorded on each :class:`SeriesInfo`.
        policy: read limits, recorded on each series and enforced when it is read.

    Returns:
        One :class:`SeriesInfo` per image series, sorted by study, SeriesNumber and UID.
    """
    groups: dict[str, list[_Instance]] = defaultdict(list)
    derived: set[str] = set()
    unreadable: list[str] = []
    skipped_objects: dict[str, Counter] = defaultdict(Counter)
    for path in paths:
        try:
            ds = read_header(path)
        except MedsegError:
            unreadable.append(Path(path).name)
            continue
        if ds is None or not looks_like_instance(ds):
            continue
        key, is_derived = _series_key(ds)
        if not is_image_instance(ds):
            skipped_objects[key][str(ds.get("Modality") or "non-image")] += 1
            continue
        if is_derived:
            derived.add(key)
        groups[key].append(
            _Instance(path=str(path), ds=ds, orientation=_orientation(ds), size=(int(ds.Rows), int(ds.Columns)))
        )

    series: list[SeriesInfo] = []
    for key, instances in groups.items():
        notes: list[str] = []
        if key in derived:
            notes.append("SeriesInstanceUID is empty: series identified by a derived key")
        for modality, count in sorted(skipped_objects.get(key, {}).items()):
            notes.append(f"skipped {count} non-image object(s) ({modality})")
        localizers = [i for i in instances if is_localizer(i.ds)]
        if localizers:
            notes.append(f"skipped {len(localizers)} localizer image(s)")
            instances = [i for i in instances if not is_localizer(i.ds)]
        if not instances:
            continue
        oriented = [i.orientation for i in instances if i.orientation is not None]
        majority = Counter(oriented).most_common(1)[0][0] if oriented else None
        others = [i for i in instances if i.orientation is not None and i.orientation != majority]
        if others:
            notes.append(
                f"skipped {len(others)} image(s) whose orientation differs from the series majority (localizer/scout?)"
            )
            instances = [i for i in instances if i.orientation in (majority, None)]
        size = Counter(i.size for i in instances).most_common(1)[0][0]
        others = [i for i in instances if i.size != size]
        if others:
            notes.append(
                f"skipped {len(others)} image(s) whose matrix size differs from the series majority {size[0]}x{size[1]}"
            )
            instances = [i for i in instances if i.size == size]
        if unreadable:
            shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
            notes.append(f"skipped {len(unreadable)} unreadable DICOM file(s): {shown}")
        for uid, part, part_notes in split_series(key, instances):
            first = part[0].ds
            number = first.get("SeriesNumber")
            try:
                number = int(number) if number not in (None, "") else None
            except (TypeError, ValueError):
                number = None
            series.append(
                SeriesInfo(
                    uid=uid,
                    modality=str(first.get("Modality") or ""),
                    description=str(first.get("SeriesDescription") or ""),
                    study_uid=str(first.get("StudyInstanceUID") or ""),
                    instance_count=len(part),
                    files=sorted(i.path for i in part),
                    warnings=notes + part_notes,
                    series_number=number,
                    format="dicom",
                    source=source,
                    declared_voxels=sum(_declared_voxels(i.ds) for i in part),
                    policy=policy,
                    _reader=_read_series,
                )
            )
    if not series and unreadable:
        from medseg.errors import UnreadableFileError

        shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise UnreadableFileError(f"{Path(source).name}: no readable DICOM image; unreadable file(s): {shown}")
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else -1, s.uid))
    return series


def _echo_number(ds: Dataset) -> int | None:
    value = ds.get("EchoNumbers")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def image_kind(ds: Dataset) -> str:
    """``"phase"``, ``"real"``, ``"imaginary"``, ``"derived"`` or ``"magnitude"`` from ImageType
    (PS3.3 C.8.3.1.1.1 and the vendor values dcm2niix recognises: ``P``/``PHASE``,
    ``R``/``REAL``, ``I``/``IMAGINARY``; value 1 ``DERIVED``); ``M``/``MAGNITUDE`` or anything
    else is magnitude."""
    values = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    if "P" in values or "PHASE" in values:
        return "phase"
    if "R" in values or "REAL" in values:
        return "real"
    if "I" in values or "IMAGINARY" in values:
        return "imaginary"
    if values and values[0] == "DERIVED":
        return "derived"
    return "magnitude"


#: series-part suffix of each image kind other than magnitude (see :func:`split_series`).
KIND_SUFFIXES = {"magnitude": "", "phase": ".ph", "real": ".real", "imaginary": ".imag", "derived": ".derived"}


def split_series(uid: str, instances: list[_Instance]) -> list[tuple[str, list[_Instance], list[str]]]:
    """Split one SeriesInstanceUID into the volumes dcm2niix would write separately.

    Instances are grouped by EchoNumbers (0018,0086) and by image kind (:func:`image_kind`:
    magnitude / phase / real / imaginary / derived from ImageType (0008,0008)). Each group is
    one series part with its own uid:

    - ``<uid>`` for the first echo's magnitude (original) images, the main part;
    - ``<uid>.e<N>`` for echo ``N`` other than the first (only when the series has several);
    - ``<uid>.ph``, ``.real``, ``.imag``, ``.derived`` appended for the other kinds (only when
      the series mixes kinds), e.g. ``<uid>.e2.ph`` for the phase of the second echo.

    When the main part is absent (a series of phase images only), the suffixes still apply, so a
    uid always says what the part holds. A series with one echo and one kind is returned whole.

    Returns:
        ``[(uid, instances, notes)]``, main part first, each note naming the split.
    """
    echoes = sorted({e for e in (_echo_number(i.ds) for i in instances) if e is not None})
    kinds = sorted({image_kind(i.ds) for i in instances}, key=list(KIND_SUFFIXES).index)
    if len(echoes) <= 1 and len(kinds) <= 1:
        return [(uid, instances, [])]
    groups: dict[tuple[int, int], list[_Instance]] = {}
    for instance in instances:
        echo = _echo_number(instance.ds)
        echo_rank = echoes.index(echo) if echo in echoes else 0
        kind_rank = list(KIND_SUFFIXES).index(image_kind(instance.ds))
        groups.setdefault((echo_rank, kind_rank), []).append(instance)
    notes = []
    if len(echoes) > 1:
        notes.append(f"split by echo: {len(echoes)} echoes (EchoNumbers " + ", ".join(str(e) for e in echoes) + ")")
    if len(kinds) > 1:
        notes.append(f"split by image type: {', '.join(kinds)}")
    parts = []
    for (echo_rank, kind_rank), members in sorted(groups.items()):
        suffix = f".e{echoes[echo_rank]}" if len(echoes) > 1 and echo_rank > 0 else ""
        suffix += list(KIND_SUFFIXES.values())[kind_rank]
        part_uid = uid + suffix
        parts.append((part_uid, members, [f"{note}; this part is {part_uid}" for note in notes]))
    return parts


def _declared_voxels(ds: Dataset) -> int:
    """Rows x Columns x NumberOfFrames x SamplesPerPixel of one instance (header values)."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        return int(ds.Rows) * int(ds.Columns) * max(frames, 1) * max(samples, 1)
    except (TypeError, ValueError, AttributeError):
        return 0


def _read_series(info: SeriesInfo):
    name = f"{info.uid} ({info.description})" if info.description else info.uid
    image = read_dicom_volume(info.files, series_name=name, warnings=info.warnings, meta={"source": info.source})
    if info.uid.startswith("nouid-"):
        image.meta["series_uid"] = info.uid
    elif info.uid != image.meta.get("series_uid"):
        image.meta["series_part"] = info.uid  # an echo / phase / derived part of the series
    if info._keepalive is not None and image.dicom_source is not None:
        image.dicom_source = SourceFiles(image.dicom_source, keepalive=info._keepalive)
    return image


class SourceFiles(list):
    """A list of source file paths that keeps a temporary extraction folder alive.

    DICOM read from an archive lives in a temporary folder; the folder is removed when the last
    image (or label map made with :meth:`Image.with_array`, which shares this list) is gone.
    """

    def __init__(self, items, *, keepalive=None):
        super().__init__(items)
        self.keepalive = keepalive
