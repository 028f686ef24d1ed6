"""Receiving request bodies: multipart streamed to disk in chunks, never held in memory.

Used for ``POST /v1/jobs`` (``multipart/form-data``: file parts named ``file`` plus option fields)
and for STOW-RS (``multipart/related; type="application/dicom"``, DICOM PS3.18 10.5). Limits are
enforced while the bytes arrive: the body size (``Content-Length`` is checked before reading), the
number of files, the number and size of form fields, and the time to receive the body. Client
file names are never used as paths: parts are saved as ``00000<suffix>``, ``00001<suffix>``...
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from medseg.errors import InputTooLargeError
from medseg.formats import ARCHIVE_SUFFIX, DICOM_SUFFIX, VOLUME_SUFFIXES
from service.config import Settings
from service.problems import Problem

MAX_FIELD_BYTES = 64 * 1024
#: longest multipart boundary accepted, in characters. RFC 2046 5.1.1 says 1 to 70, but real
#: senders exceed it: Orthanc's DICOMweb client sends two UUIDs joined by '-' (73 characters).
#: The limit bounds the parser's work, so it is generous and fixed.
MAX_BOUNDARY_CHARS = 256
#: the characters RFC 2046 allows in a boundary (``bchars``; a space may not be the last one)
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]*[0-9A-Za-z'()+_,\-./:=?]")
KNOWN_SUFFIXES = (*VOLUME_SUFFIXES, ARCHIVE_SUFFIX, DICOM_SUFFIX)


@dataclass
class ReceivedFile:
    """One file part saved to disk: ``path`` is ours; ``filename`` is the client's (display only)."""

    path: Path
    filename: str
    content_type: str
    size: int


@dataclass
class Received:
    """A parsed multipart body."""

    files: list[ReceivedFile] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    size: int = 0


def suffix_of(filename: str) -> str:
    """The known image suffix of a client file name ('' if none), lower case."""
    name = filename.lower()
    return next((s for s in KNOWN_SUFFIXES if name.endswith(s)), "")


def multipart_boundary(request: Request, subtype: str) -> tuple[bytes, dict[bytes, bytes]]:
    """The boundary of a ``multipart/<subtype>`` request, and the Content-Type parameters.

    The boundary must be 1 to :data:`MAX_BOUNDARY_CHARS` (256) characters of RFC 2046's
    ``bchars``, not ending in a space (RFC 2046's 70 is exceeded by Orthanc, which sends 73).

    Raises:
        Problem: 415 for another media type, 400 without a boundary or with one that is too long
            or has characters RFC 2046 does not allow.
    """
    media, params = parse_options_header(request.headers.get("content-type", ""))
    if media.lower() != f"multipart/{subtype}".encode():
        raise Problem(
            415,
            "unsupported-media-type",
            f"expected a multipart/{subtype} body, got '{media.decode('latin-1') or 'none'}'",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "bad-request", "multipart body without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY_CHARS:
        raise Problem(
            400,
            "bad-request",
            f"multipart boundary of {len(boundary)} characters; at most {MAX_BOUNDARY_CHARS} are accepted",
        )
    if not _BOUNDARY.fullmatch(boundary):
        raise Problem(400, "bad-request", "multipart boundary with characters RFC 2046 does not allow")
    return boundary, params


def check_declared_size(request: Request, settings: Settings) -> None:
    """Reject a body whose ``Content-Length`` exceeds the upload limit before reading it.

    Raises:
        InputTooLargeError: 413.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise InputTooLargeError(
            f"upload of {int(declared)} bytes exceeds the limit of {settings.max_upload_bytes} bytes"
        )


async def receive_multipart(
    request: Request, dest: Path, settings: Settings, subtype: str, file_field: str | None = "file"
) -> Received:
    """Stream a multipart body into ``dest`` (created); on any error ``dest`` is removed.

    ``subtype`` is ``form-data`` (parts named ``file_field`` are files, others are fields) or
    ``related`` (every part is a file). Raises :class:`InputTooLargeError` (413) past the size or
    file-count limits, :class:`Problem` 400/408/415/422 for malformed, slow or unexpected bodies.
    """
    check_declared_size(request, settings)
    boundary, _ = multipart_boundary(request, subtype)
    sink = _Sink(dest, settings, subtype, file_field)
    dest.mkdir(parents=True, exist_ok=False)
    try:  # from here on, whatever is raised (even a cancellation) removes dest
        parser = MultipartParser(boundary, sink.callbacks())
        with anyio.fail_after(settings.request_timeout_s):
            async for chunk in request.stream():
                sink.received += len(chunk)
                if sink.received > settings.max_upload_bytes:
                    raise InputTooLargeError(f"upload exceeds the limit of {settings.max_upload_bytes} bytes")
                parser.write(chunk)
            parser.finalize()
        if sink.error is not None:
            raise sink.error
        if not sink.finished:
            raise Problem(400, "bad-request", "truncated multipart body (no closing boundary)")
    except TimeoutError:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise Problem(
            408, "request-timeout", f"request body not received within {settings.request_timeout_s:g} s"
        ) from None
    except Exception as error:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(error, (Problem, InputTooLargeError)):
            raise
        if sink.error is not None:
            raise sink.error from None
        if isinstance(error, OSError):  # writing the parts failed: our storage, not the client
            raise
        raise Problem(400, "bad-request", f"malformed multipart body ({type(error).__name__})") from None
    except BaseException:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise
    sink.close()
    return sink.result


class _Sink:
    """python-multipart callbacks writing file parts to disk as they arrive."""

    def __init__(self, dest: Path, settings: Settings, subtype: str, file_field: str | None):
        self.dest, self.settings, self.subtype, self.file_field = dest, settings, subtype, file_field
        self.result = Received()
        self.received = 0
        self.finished = False
        self.error: Exception | None = None
        self._headers: dict[str, str] = {}
        self._name = self._value = b""
        self._file: BinaryIO | None = None
        self._current: ReceivedFile | None = None
        self._field_name: str | None = None
        self._field = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_name", self._name + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": lambda: setattr(self, "finished", True),
        }

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        raise error

    def _part_begin(self) -> None:
        self._headers = {}
        self._name = self._value = b""

    def _header_end(self) -> None:
        self._headers[self._name.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._name = self._value = b""

    def _headers_finished(self) -> None:
        content_type = self._headers.get("content-type", "")
        _, disposition = parse_options_header(self._headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename", b"").decode("utf-8", "replace")
        is_file = self.subtype == "related" or name == self.file_field
        if not is_file:
            if filename and self.file_field is not None:
                self._fail(
                    Problem(
                        422, "invalid-request", f"unexpected file field '{name[:40]}' (files go in '{self.file_field}')"
                    )
                )
            if sum(len(v) for v in self.result.fields.values()) >= self.settings.max_form_fields:
                self._fail(Problem(422, "invalid-request", "too many form fields"))
            self._field_name, self._field = name, bytearray()
            return
        if len(self.result.files) >= self.settings.max_instances:
            self._fail(InputTooLargeError(f"more than {self.settings.max_instances} files in one request"))
        index = len(self.result.files)
        path = self.dest / f"{index:05d}{suffix_of(filename)}"
        self._file = open(path, "wb")
        self._current = ReceivedFile(path, filename or path.name, content_type, 0)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            self._current.size += end - start
        elif self._field_name is not None:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                self._fail(Problem(422, "invalid-request", f"form field '{self._field_name[:40]}' too long"))

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self.result.files.append(self._current)
            self.result.size += self._current.size
            self._file, self._current = None, None
        elif self._field_name is not None:
            value = self._field.decode("utf-8", "replace")
            self.result.fields.setdefault(self._field_name, []).append(value)
            self._field_name = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def display_name(filename: str) -> str:
    """A client file name reduced to its last component and safe characters, for messages."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return _SAFE.sub("_", base)[:80] or "unnamed"
