"""One exception hierarchy for bad input.

The CLI turns any :class:`MedsegError` into a one-line message and a non-zero exit; the service
turns it into an RFC 9457 problem+json response with ``status`` = :attr:`MedsegError.http_status`
and ``type`` = ``https://medseg.dev/problems/<code>``. Messages name the file or series concerned
but never patient identifiers.
"""

from __future__ import annotations

import re

# an absolute POSIX path inside a message: everything from a leading "/" to the next separator
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~-])/[^\s'"(),;]*""")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path reduced to its last component (``/srv/a/b.mha`` ->
    ``b.mha``), so messages name files but never reveal server folders."""

    def last(match: re.Match) -> str:
        parts = [p for p in match.group(0).split("/") if p]
        return parts[-1] if parts else "/"

    return _ABSOLUTE_PATH.sub(last, text)


class MedsegError(Exception):
    """Base class of every error caused by the user's input or configuration.

    The message is one line, and absolute paths in it are reduced to their file names
    (:func:`redact_paths`): errors reach service clients, which must never learn server paths.
    """

    code = "invalid-input"
    http_status = 400

    def __init__(self, message: str):
        super().__init__(redact_paths(" ".join(str(message).split())))


class UnreadableFileError(MedsegError):
    """A file is corrupt, truncated, or of an unknown format."""

    code = "unreadable-file"
    http_status = 422


class NoImageDataError(MedsegError):
    """A folder or archive holds no readable image series."""

    code = "no-image-data"
    http_status = 422


class MixedSeriesError(MedsegError):
    """Several series were found where exactly one was asked for."""

    code = "mixed-series"
    http_status = 422


class MissingGeometryError(MedsegError):
    """Geometry tags (position, orientation, spacing) are missing or inconsistent."""

    code = "missing-geometry"
    http_status = 422


class UnsupportedInputError(MedsegError):
    """The input is valid but medseg does not support it (transfer syntax, tilt, modality...)."""

    code = "unsupported-input"
    http_status = 422


class UnsafeArchiveError(MedsegError):
    """An archive has path traversal names, or an absurd uncompressed size or ratio."""

    code = "unsafe-archive"
    http_status = 422


class UnsafeInputError(MedsegError):
    """An input file points outside itself (detached pixel data of a MetaImage/NRRD header, a
    NIfTI pair) where that is not allowed; refused before anything is read."""

    code = "unsafe-input"
    http_status = 422


class InputTooLargeError(MedsegError):
    """An input exceeds a configured size limit."""

    code = "too-large"
    http_status = 413


class WorkBudgetError(MedsegError):
    """A prediction would need more sliding-window evaluations than the configured budget."""

    code = "too-much-work"
    http_status = 422


class ModalityMismatchError(MedsegError):
    """A series' modality does not fit the model."""

    code = "modality-mismatch"
    http_status = 422


class SeriesMismatchError(MedsegError):
    """A series does not fit the model: channels or training field of view
    (:func:`medseg.inference.matching.image_mismatch`)."""

    code = "does-not-fit"
    http_status = 422


class InputShapeError(MedsegError):
    """A tensor's shape does not fit a network (channels, dimensions, divisibility)."""

    code = "input-shape"
    http_status = 422


class ConfigError(MedsegError):
    """A configuration file or override is invalid; the message names the bad key."""

    code = "invalid-config"
    http_status = 400


class DatasetError(MedsegError):
    """A training dataset is empty, unpaired, or inconsistent with its data card."""

    code = "invalid-dataset"
    http_status = 400


class ModelNotFoundError(MedsegError):
    """A model package name or path cannot be resolved."""

    code = "model-not-found"
    http_status = 404


class PretrainedWeightsError(MedsegError):
    """A pretrained weight file cannot be loaded (wrong format or shape mismatch)."""

    code = "pretrained-weights"
    http_status = 422


def config_error(error, source: str) -> ConfigError:
    """One :class:`ConfigError` listing every problem of a pydantic ``ValidationError`` at once
    (``source: a.b: msg; c: msg``), so a user fixes a config or card in one pass, not one per run."""
    problems = [f"{'.'.join(str(part) for part in item['loc']) or '(root)'}: {item['msg']}" for item in error.errors()]
    return ConfigError(f"{source}: " + "; ".join(problems))
