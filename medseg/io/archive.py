"""Safe extraction of uploaded / exported ZIP archives.

Every entry is checked BEFORE anything is written: no absolute names, drive letters, ``..``
components, symbolic links or special files; bounded entry count, total uncompressed size and
compression ratio (zip bombs). Extraction goes to a fresh temporary folder that the caller owns
(a :class:`tempfile.TemporaryDirectory`, removed on ``cleanup()`` or garbage collection), and
never writes more bytes than the entry declares.
"""

from __future__ import annotations

import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from medseg.errors import UnreadableFileError, UnsafeArchiveError

#: Largest total uncompressed size of an archive (bytes).
MAX_UNCOMPRESSED_BYTES = 8 * 1024**3
#: Largest uncompressed/compressed ratio, for the whole archive and for any entry larger than
#: :data:`RATIO_CHECK_MIN_BYTES` (DICOM compresses about 2-10x; a zip bomb of zeros ~1000x).
MAX_COMPRESSION_RATIO = 100.0
#: Entries smaller than this are not ratio-checked on their own (tiny files compress oddly).
RATIO_CHECK_MIN_BYTES = 1024**2
#: Largest number of entries.
MAX_ENTRIES = 200_000

_CHUNK = 1024**2


def check_archive(archive: zipfile.ZipFile, name: str) -> list[zipfile.ZipInfo]:
    """Validate all entries of ``archive``; returns the file entries to extract.

    Raises:
        UnsafeArchiveError: path traversal, links, too many entries, too large, or too high a
            compression ratio (the message names the archive and the entry).
    """
    entries = archive.infolist()
    if len(entries) > MAX_ENTRIES:
        raise UnsafeArchiveError(f"{name}: {len(entries)} entries exceed the limit {MAX_ENTRIES}")
    files: list[zipfile.ZipInfo] = []
    total = compressed = 0
    for entry in entries:
        entry_name = entry.filename
        parts = PurePosixPath(entry_name.replace("\\", "/")).parts
        if (
            entry_name.startswith(("/", "\\"))
            or (len(entry_name) > 1 and entry_name[1] == ":")
            or ".." in parts
            or "\x00" in entry_name
        ):
            raise UnsafeArchiveError(f"{name}: entry {entry_name!r} points outside the archive folder")
        mode = entry.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"{name}: entry {entry_name!r} is a link or special file")
        if entry.is_dir():
            continue
        total += entry.file_size
        compressed += entry.compress_size
        if total > MAX_UNCOMPRESSED_BYTES:
            raise UnsafeArchiveError(f"{name}: uncompressed size exceeds {MAX_UNCOMPRESSED_BYTES} bytes")
        if entry.file_size >= RATIO_CHECK_MIN_BYTES and entry.file_size > MAX_COMPRESSION_RATIO * max(
            entry.compress_size, 1
        ):
            raise UnsafeArchiveError(
                f"{name}: entry {entry_name!r} has compression ratio above {MAX_COMPRESSION_RATIO:g} (zip bomb?)"
            )
        files.append(entry)
    if total >= RATIO_CHECK_MIN_BYTES and total > MAX_COMPRESSION_RATIO * max(compressed, 1):
        raise UnsafeArchiveError(f"{name}: compression ratio above {MAX_COMPRESSION_RATIO:g} (zip bomb?)")
    return files


def extract_zip(path: str | Path) -> tempfile.TemporaryDirectory:
    """Check, then extract ``path`` into a new temporary folder.

    Returns:
        The :class:`tempfile.TemporaryDirectory` (``.name`` is the folder); call ``cleanup()``
        when done, or let it be garbage-collected.

    Raises:
        UnreadableFileError: not a valid ZIP file (or a corrupt entry).
        UnsafeArchiveError: see :func:`check_archive`.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UnreadableFileError(f"{path.name}: not a readable ZIP archive ({type(error).__name__})") from None
    with archive:
        entries = check_archive(archive, path.name)
        folder = tempfile.TemporaryDirectory(prefix="medseg-zip-")
        root = Path(folder.name).resolve()
        try:
            for entry in entries:
                target = (root / entry.filename.replace("\\", "/")).resolve()
                if root not in target.parents:
                    raise UnsafeArchiveError(f"{path.name}: entry {entry.filename!r} points outside the archive folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with archive.open(entry) as source, target.open("wb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > entry.file_size:
                            raise UnsafeArchiveError(f"{path.name}: entry {entry.filename!r} is larger than declared")
                        sink.write(chunk)
        except UnsafeArchiveError:
            folder.cleanup()
            raise
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as error:
            folder.cleanup()
            raise UnreadableFileError(f"{path.name}: corrupt ZIP entry ({type(error).__name__})") from None
        except BaseException:
            folder.cleanup()
            raise
    return folder
