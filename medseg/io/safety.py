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
SMALL_DECODE_BYTES = 64 * 1024**2  # compressed data declared smaller than this is decoded directly


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
    return text_header(path).data_files


@dataclass(frozen=True)
class TextHeader:
    """The parts of a MetaImage or NRRD text header that decide where the pixels are.

    Attributes:
        fields: ``key -> value`` (keys lower case, values stripped), e.g. ``encoding``,
            ``compresseddata``.
        data_files: detached data file names (``[]`` when the data is attached; ``LIST`` first
            when the header lists them).
        data_offset: byte offset of attached pixel data, or ``None`` (detached, or not found).
        nrrd: an NRRD header (else MetaImage).
    """

    nrrd: bool
    fields: dict[str, str]
    data_files: list[str]
    data_offset: int | None


def text_header(path: str | Path) -> TextHeader:
    """Parse the text header of a MetaImage (``Key = Value`` lines up to ``ElementDataFile``) or
    NRRD file (``key: value`` lines up to the blank line), reading at most :data:`HEADER_LIMIT`.

    Raises:
        UnreadableFileError: the file cannot be read.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(HEADER_LIMIT)
    except OSError:
        raise UnreadableFileError(f"{path.name}: cannot be read") from None
    nrrd = head.startswith(b"NRRD")
    fields: dict[str, str] = {}
    offset = 0
    lines = head.split(b"\n")
    for index, raw in enumerate(lines):
        offset += len(raw) + 1
        line = raw.rstrip(b"\r")
        if nrrd:
            if index == 0 or line.startswith(b"#") or b":=" in line:
                continue
            if not line:  # the blank line ends the header; attached data follows
                return TextHeader(nrrd, fields, [], offset)
            key, sep, value = line.partition(b":")
        else:
            key, sep, value = line.partition(b"=")
        if not sep:
            continue
        key_text = key.strip().lower().decode("latin-1")
        value_text = value.strip().decode("latin-1")
        if nrrd and key_text in ("data file", "datafile"):
            if value_text.upper().startswith("LIST"):
                files = [v.rstrip(b"\r").decode("latin-1") for v in lines[index + 1 :] if v.strip()]
                return TextHeader(nrrd, fields, ["LIST", *files], None)
            return TextHeader(nrrd, fields, [value_text], None)
        if not nrrd and key_text == "elementdatafile":  # the last MetaImage field
            if value_text.upper() == "LOCAL":
                return TextHeader(nrrd, fields, [], offset)
            return TextHeader(nrrd, fields, [value_text], None)
        fields[key_text] = value_text
    return TextHeader(nrrd, fields, [], None)


def check_attached_length(path: str | Path, nbytes: int, name: str) -> None:
    """Attached pixel data of a MetaImage (``ElementDataFile = LOCAL``, raw or
    ``CompressedData = True``) or NRRD (``encoding`` raw or gzip) holds ``nbytes`` once decoded.

    Raises:
        UnreadableFileError: the data ends early (see :func:`check_stream_length`).
    """
    header = text_header(path)
    if header.data_offset is None:
        return
    if header.nrrd:
        compression = {"raw": "none", "gzip": "zlib", "gz": "zlib"}.get(header.fields.get("encoding", "raw").lower())
    else:
        compression = "zlib" if header.fields.get("compresseddata", "").lower() == "true" else "none"
    if compression is not None:
        check_stream_length(path, header.data_offset, nbytes, name, compression)


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
    declared size in CPU time. A compressed claim of at most :data:`SMALL_DECODE_BYTES` is not
    pre-checked: decoding it right away costs no more memory than that, and no second pass.

    Raises:
        UnreadableFileError: the data ends early (truncated file or lying header).
    """
    path = Path(path)
    need = offset + nbytes
    if compression != "none" and nbytes <= SMALL_DECODE_BYTES:
        return
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
