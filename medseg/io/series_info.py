"""What :func:`medseg.io.find_series` reports about one image series, before any pixel is read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medseg.io.image import Image
from medseg.io.safety import CLI_POLICY, ReadPolicy, check_declared_voxels


@dataclass(frozen=True)
class SeriesGeometry:
    """The grid of a series as its headers declare it (:meth:`SeriesInfo.geometry`).

    Attributes:
        shape: array shape ``(I, J, K)``, or ``(I, J, K, T)`` for a multi-volume series.
        affine: ``(4, 4)`` voxel -> RAS+ mm affine.
    """

    shape: tuple[int, ...]
    affine: Any

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (column norms of the affine), as :attr:`Image.spacing`."""
        import numpy as np

        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))


@dataclass
class SeriesInfo:
    """One image series found in a file, folder or archive.

    Attributes:
        uid: SeriesInstanceUID for DICOM (a derived ``nouid-...`` key when the tag is empty);
            the file path for NIfTI/NRRD/MetaImage files.
        modality: DICOM Modality (``CT``, ``MR``...), or from the file name / sidecar JSON for
            volume files, else ``""``.
        description: SeriesDescription (or the file name for volume files).
        study_uid: StudyInstanceUID (``""`` when unknown).
        instance_count: image instances kept for the series (1 for a volume file).
        files: the kept instance paths (one path for a volume file).
        warnings: what the scan skipped (localizers, other orientations, unreadable files...).
        series_number: DICOM SeriesNumber, if any.
        format: ``"dicom"``, ``"nifti"``, ``"nrrd"`` or ``"metaimage"``.
        source: the path the user gave (file, folder or archive).
        declared_voxels: voxels the DICOM headers declare (rows x columns x frames x samples,
            summed over instances); 0 when only the reader knows (volume files).
        policy: what reading may touch (:class:`medseg.io.safety.ReadPolicy`).
    """

    uid: str
    modality: str = ""
    description: str = ""
    study_uid: str = ""
    instance_count: int = 0
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    series_number: int | None = None
    format: str = "dicom"
    source: str = ""
    declared_voxels: int = 0
    policy: ReadPolicy = CLI_POLICY
    _reader: Callable[[SeriesInfo], Image] | None = field(default=None, repr=False, compare=False)
    _keepalive: Any = field(default=None, repr=False, compare=False)

    def read(self) -> Image:
        """Read the series' pixels into an :class:`Image` (see :func:`medseg.io.read_image`)."""
        if self._reader is None:
            raise RuntimeError(f"series {self.uid} has no reader")
        check_declared_voxels(self.declared_voxels, self.policy, f"series {self.uid}")
        image = self._reader(self)
        repair_non_finite(image, f"series {self.uid}")
        image.meta.setdefault("source", self.source)
        image.meta.setdefault("instance_count", self.instance_count)
        return image

    def geometry(self) -> SeriesGeometry:
        """The grid :meth:`read` would give, from the headers alone: no pixel data is decoded.

        DICOM: every instance's header (:func:`medseg.io.dicom_volume.header_geometry`); NIfTI:
        nibabel's header (:func:`medseg.io.volume_files.nifti_geometry`); NRRD / MetaImage:
        SimpleITK's image information (:func:`medseg.io.volume_files.itk_geometry`). Formats
        without a header path (TIFF stacks) are read. The same header checks as :meth:`read`
        apply (declared size, detached data, geometry); the pixels may still turn out to be
        undecodable when read.

        Raises:
            UnreadableFileError, UnsafeInputError, InputTooLargeError, UnsupportedInputError,
            MissingGeometryError: what the header checks of :meth:`read` raise.
        """
        check_declared_voxels(self.declared_voxels, self.policy, f"series {self.uid}")
        if self.format == "dicom":
            from medseg.io.dicom_volume import header_geometry

            name = f"{self.uid} ({self.description})" if self.description else self.uid
            shape, affine = header_geometry(self.files, series_name=name)
        elif self.format == "nifti":
            from medseg.io.volume_files import nifti_geometry

            shape, affine = nifti_geometry(self.files[0], self.policy)
        elif self.format in ("nrrd", "metaimage"):
            from medseg.io.volume_files import itk_geometry

            shape, affine = itk_geometry(self.files[0], self.policy)
        else:
            image = self.read()
            shape, affine = image.array.shape, image.affine
        return SeriesGeometry(shape=tuple(int(s) for s in shape), affine=affine)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no pixel data, no patient identifiers)."""
        return {
            "uid": self.uid,
            "modality": self.modality,
            "description": self.description,
            "study_uid": self.study_uid,
            "series_number": self.series_number,
            "instance_count": self.instance_count,
            "format": self.format,
            "warnings": list(self.warnings),
        }


def repair_non_finite(image: Image, name: str) -> None:
    """Replace NaN / +-inf voxels by the image's finite minimum, in place, with a warning.

    Scanner exports and converted files sometimes carry NaN outside the field of view; left in,
    they make every normalised voxel NaN and the label map silently empty.

    Raises:
        NoImageDataError: not a single finite voxel.
    """
    import numpy as np

    array = image.array
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    bad = int(array.size - np.count_nonzero(finite))
    if not bad:
        return
    if bad == array.size:
        from medseg.errors import NoImageDataError

        raise NoImageDataError(f"{name}: every voxel is NaN or infinite")
    low = float(array[finite].min())
    if not array.flags.writeable:
        array = image.array = np.array(array)
    array[~finite] = low
    image.warnings.append(
        f"{bad} voxel(s) ({100 * bad / array.size:.2g} %) were NaN or infinite; set to the image minimum {low:g}"
    )
