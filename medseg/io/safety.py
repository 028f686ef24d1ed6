"""What a reader may touch: detached pixel data and declared sizes, checked before any pixel read.

Two header formats can point at pixel data in *another* file: MetaImage (``.mhd``/``.mha``,
``ElementDataFile = <file> | LIST | <pattern>``) and NRRD (``.nhdr``/``.nrrd``, ``data file:``).
A hostile header naming ``/etc/passwd`` or another tenant's upload would make the reader return
that file's bytes as pixels. :class:`ReadPolicy` says what is allowed:

- ``detached_data="same-folder"`` (the CLI): a detached data file must be one plain file name in
  the header's own folder (no absolute path, no ``..``, no folder part, no ``LIST`` or pattern);
- ``detached_data="refuse"`` (the service): every volume file must be self-contained.

``max_voxels`` bounds what a header may *declare* (shape x channels) before the decoder allocates
it, and :func:`check_stream_length` catches compressed files whose data is shorter than their
header claims (a 64-byte ``.nii.gz`` claiming 1000x1000x400 float32) without allocating it.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medseg.errors import InputTooLargeError, UnreadableFileError, UnsafeInputError

HEADER_LIMIT = 64 * 1024  # bytes of text header parsed; real headers are < 2 KiB
_CHUNK = 1024**2


@dataclass(frozen=True)
class ReadPolicy:
    """Limits for reading one untrusted input.

    Attributes:
        detached_data: ``"same-folder"`` or ``"refuse"`` (see the module docstring).
        max_voxels: most voxels (all channels / volumes) a series may declare; ``None``: no limit.
    """

    detached_data: Literal["same-folder", "refuse"] = "same-folder"
    max_voxels: int | None = None


CLI_POLICY = ReadPolicy()
"""The command line's default: same-folder detached data, no size limit."""


def detached_data_files(path: str | Path) -> list[str]:
    """The data file names a MetaImage or NRRD header points at (``[]`` if self-contained).

    ``LIST`` and file patterns (``%d``) are returned as the header wrote them.

    Raises:
        UnreadableFileError: the header cannot be read.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_LIMIT)
    except OSError:
        raise UnreadableFileError(f"{path.name}: cannot be read") from None
    if head.startswith(b"NRRD"):
        return _nrrd_data_files(head)
    return _metaimage_data_files(head)


def _metaimage_data_files(head: bytes) -> list[str]:
    for raw in head.split(b"\n"):
        key, sep, value = raw.partition(b"=")
        if not sep:
            continue
        if key.strip().lower() == b"elementdatafile":
            value = value.strip().decode("latin-1")
            return [] if value.upper() == "LOCAL" else [value]
    return []


def _nrrd_data_files(head: bytes) -> list[str]:
    lines = head.split(b"\n")
    for index, raw in enumerate(lines[1:], start=1):
        line = raw.rstrip(b"\r")
        if not line:  # the blank line ends the header; attached data follows
            return []
        if line.startswith(b"#") or b":=" in line:
            continue
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() in (b"data file", b"datafile"):
            value = value.strip().decode("latin-1")
            if value.upper().startswith("LIST"):
                files = [v.rstrip(b"\r").decode("latin-1") for v in lines[index + 1 :] if v.strip()]
                return ["LIST", *files]
            return [value]
    return []


def check_self_contained(path: str | Path, policy: ReadPolicy, display: str | None = None) -> None:
    """Refuse a MetaImage/NRRD header whose pixel data lies where ``policy`` does not allow.

    Args:
        path: the header file (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``).
        policy: see :class:`ReadPolicy`.
        display: the name to show in the message (default: the file's own name).

    Raises:
        UnsafeInputError: detached data refused by the policy (absolute path, ``..``, a folder
            part, LIST or pattern, or any detached file under ``"refuse"``).
        UnreadableFileError: a same-folder data file that does not exist.
    """
    path = Path(path)
    name = display or path.name
    files = detached_data_files(path)
    if not files:
        return
    if policy.detached_data == "refuse":
        raise UnsafeInputError(
            f"{name}: pixel data is in a separate file; upload a self-contained file (.mha, .nrrd or .nii.gz)"
        )
    value = files[0]
    if len(files) > 1 or value.upper() == "LIST" or " " in value.strip() or "%" in value:
        raise UnsafeInputError(f"{name}: a LIST or pattern of data files is not supported")
    if "/" in value or "\\" in value or value in ("", ".", "..") or Path(value).is_absolute():
        raise UnsafeInputError(
            f"{name}: its data file must be a file in the same folder (no absolute path, no folder, no '..')"
        )
    data = path.parent / value
    if not data.is_file() or data.is_symlink():
        raise UnreadableFileError(f"{name}: data file {value} not found beside it")


def check_declared_voxels(voxels: int, policy: ReadPolicy, name: str) -> None:
    """Refuse a series whose header declares more voxels than ``policy.max_voxels``.

    Raises:
        InputTooLargeError: too many voxels (413 in the service).
    """
    if policy.max_voxels is not None and voxels > policy.max_voxels:
        raise InputTooLargeError(f"{name}: declares {voxels} voxels, more than the limit of {policy.max_voxels}")


def check_stream_length(
    path: str | Path, offset: int, nbytes: int, name: str, compression: Literal["gzip", "zlib", "none"] = "gzip"
) -> None:
    """Make sure ``path`` holds at least ``nbytes`` of (decompressed) data after ``offset``.

    Decompresses in 1 MiB chunks and stops as soon as ``nbytes`` are reached, so memory stays
    at a few MiB whatever the header claims and a decompression bomb costs no more than the
    declared size in CPU time.

    Raises:
        UnreadableFileError: the data ends early (truncated file or lying header).
    """
    path = Path(path)
    need = offset + nbytes
    try:
        if compression == "none":
            have = path.stat().st_size
        elif compression == "gzip":
            have = 0
            with gzip.open(path, "rb") as stream:
                while have < need:
                    chunk = stream.read(min(_CHUNK, need - have))
                    if not chunk:
                        break
                    have += len(chunk)
        else:  # zlib stream starting at ``offset`` of the raw file
            have, decoder = offset, zlib.decompressobj(47)  # zlib or gzip header, auto
            with path.open("rb") as handle:
                handle.seek(offset)
                while have < need:
                    raw = handle.read(_CHUNK)
                    if not raw:
                        break
                    have += len(decoder.decompress(raw, need - have + 1))
                    while decoder.unconsumed_tail and have < need:
                        have += len(decoder.decompress(decoder.unconsumed_tail, need - have + 1))
    except (OSError, EOFError, zlib.error):
        raise UnreadableFileError(f"{name}: compressed data is corrupt or truncated") from None
    if have < need:
        raise UnreadableFileError(
            f"{name}: truncated; the header declares {nbytes} bytes of "
            f"pixel data, the file holds {max(0, have - offset)}"
        )
