"""What a derived DICOM object (SEG, RTSTRUCT) needs of its source: the referenced instances.

One check of the source image and one reader of the source headers for every derived-object
writer (:mod:`medseg.io.seg`, :mod:`medseg.io.rtstruct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom

from medseg.errors import UnreadableFileError, UnsupportedInputError
from medseg.io.image import Image


def source_headers(source: Image, output: str, layouts: Sequence[str]) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of the DICOM instances ``source`` was read from, once each, in
    k order.

    Args:
        source: a 3D image read from DICOM (``dicom_source`` set, ``meta["dicom_layout"]``).
        output: the derived object's name for messages (``"DICOM SEG"``, ``"RTSTRUCT"``).
        layouts: the source layouts the writer supports (``single-frame``, ``multi-frame``,
            ``mosaic``).

    Raises:
        UnsupportedInputError: not DICOM (or resampled), a layout not in ``layouts``, or 4D.
        UnreadableFileError: a source instance cannot be read.
    """
    files = source.dicom_source
    series = source.meta.get("series_uid", "")
    if not files:
        raise UnsupportedInputError(
            f"{output} needs a DICOM source series; the source image was not read from DICOM (or was resampled)"
        )
    layout = source.meta.get("dicom_layout", "single-frame")
    if layout not in layouts:
        raise UnsupportedInputError(
            f"series {series}: {output} is written for {' / '.join(layouts)} sources, not {layout}"
        )
    if source.array.ndim != 3:
        raise UnsupportedInputError(f"series {series}: {output} on a multi-volume (4D) source is not supported")
    headers = []
    for path in dict.fromkeys(files):
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:
            raise UnreadableFileError(
                f"{Path(path).name}: cannot read {output} source instance ({type(error).__name__})"
            ) from None
    return headers
