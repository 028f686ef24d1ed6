"""Reading scanner exports and volume files with verified geometry; writing NIfTI and DICOM SEG.

Public API:

- :func:`read_image` / :func:`find_series` — NIfTI, NRRD, MetaImage, DICOM files, folders and
  ZIP archives, into :class:`Image` (RAS+ affine, ``(I, J, K[, T])`` array).
- :func:`write_nifti` — atomic NIfTI writer (label maps as integers, sform = qform = affine).
- :func:`write_seg` / :func:`read_seg` — DICOM SEG (highdicom) on the source series' grid.
- :func:`read_tile` / :func:`read_instance_map` / :func:`is_tile_file` — 2D PNG/JPEG/TIFF tiles
  (pathology, microscopy) as :class:`Tile` (``(H, W, 3)`` uint8 RGB, microns per pixel) and
  ``(H, W)`` instance label maps.
"""

from medseg.io.image import Image
from medseg.io.reader import find_series, read_image
from medseg.io.series_info import SeriesInfo
from medseg.io.tile import Tile, is_tile_file, read_instance_map, read_tile
from medseg.io.volume_files import write_nifti

__all__ = [
    "Image",
    "SeriesInfo",
    "find_series",
    "read_image",
    "write_nifti",
    "write_seg",
    "read_seg",
    "Tile",
    "read_tile",
    "read_instance_map",
    "is_tile_file",
]


def __getattr__(name):  # highdicom is imported only when SEG is used
    if name in ("write_seg", "read_seg"):
        from medseg.io import seg

        return getattr(seg, name)
    raise AttributeError(f"module 'medseg.io' has no attribute {name!r}")
