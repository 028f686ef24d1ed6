"""Structured JSON logs, one object per line on stderr.

Records carry job ids, key ids, routes, states and timings (``extra={...}``); by rule they never
carry patient names or IDs, and request logs show the route template and status, not bodies.

No DICOM attribute value may reach a log line, and libraries put values in their texts
(pydicom: ``Invalid value for VR DA: '1970-03-21'``; highdicom: the patient's name). So:

- library warnings (``warnings.warn``) are logged as ``{"msg": "library warning",
  "warning_category", "warning_source": "<module path>:<line>"}``, never with their text;
- records of loggers outside ``medseg``/``uvicorn`` (pydicom, highdicom, asyncio, ...) keep their
  level, logger and source line, but not their message or extra fields;
- tracebacks keep the frames (file, line, function) and exception types, also of chained causes
  and contexts, but never exception messages (nor source lines);
- uncaught exceptions in threads and the main thread are logged the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}


#: loggers whose messages and extra fields are medseg's own (written to carry no patient data)
TRUSTED_LOGGERS = ("medseg", "uvicorn")
WARNINGS_LOGGER = "py.warnings"
WITHHELD = "library log message withheld"


def _trusted(record: logging.LogRecord) -> bool:
    if record.name == WARNINGS_LOGGER:  # ours (below) or the stock captureWarnings text
        return hasattr(record, "warning_category")
    return any(record.name == name or record.name.startswith(name + ".") for name in TRUSTED_LOGGERS)


def _short_path(filename: str) -> str:
    """``pydicom/valuerep.py`` for a file in site-packages, the path below the repo otherwise."""
    path = str(filename).replace(os.sep, "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))).replace(os.sep, "/") + "/"
    return path[len(root) :] if path.startswith(root) else os.path.basename(path)


def _type_name(exc_type: type | None) -> str:
    if exc_type is None:
        return "None"
    module = getattr(exc_type, "__module__", "")
    name = getattr(exc_type, "__qualname__", exc_type.__name__)
    return name if module in ("builtins", "__main__", "") else f"{module}.{name}"


def format_traceback(exc_info) -> str:
    """A traceback with its frames (file, line, function) and exception types, chained causes
    and contexts included, in the layout of :func:`traceback.format_exception`, but without
    exception messages, notes or source lines (any of them may quote a value)."""
    exc_type, value, tb = exc_info
    if value is None and exc_type is None:
        return ""
    summary = traceback.TracebackException(exc_type, value, tb, lookup_lines=False, capture_locals=False)
    lines: list[str] = []
    seen: set[int] = set()

    def emit(te: traceback.TracebackException, indent: str = "") -> None:
        if id(te) in seen:
            return
        seen.add(id(te))
        if te.__cause__ is not None:
            emit(te.__cause__, indent)
            lines.append(f"{indent}\nThe above exception was the direct cause of the following exception:\n\n")
        elif te.__context__ is not None and not te.__suppress_context__:
            emit(te.__context__, indent)
            lines.append(f"{indent}\nDuring handling of the above exception, another exception occurred:\n\n")
        if te.stack:
            lines.append(f"{indent}Traceback (most recent call last):\n")
            for frame in te.stack:
                lines.append(f'{indent}  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        lines.append(f"{indent}{_type_name(te.exc_type)} (message withheld)\n")
        for number, sub in enumerate(getattr(te, "exceptions", None) or [], start=1):
            lines.append(f"{indent}  +-- sub-exception {number}:\n")
            emit(sub, indent + "  | ")

    emit(summary)
    return "".join(lines).rstrip("\n")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra}`` as one JSON line.

    Records of untrusted (library) loggers get ``msg`` :data:`WITHHELD` and ``source``
    (``file:line``) instead of their text and extra fields; tracebacks never carry exception
    messages (:func:`format_traceback`).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if _trusted(record):
            entry["msg"] = record.getMessage()
            for key, value in record.__dict__.items():
                if key not in _STANDARD and not key.startswith("_"):
                    entry[key] = value
        else:
            entry["msg"] = WITHHELD
            entry["source"] = f"{_short_path(record.pathname)}:{record.lineno}"
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["traceback"] = format_traceback(record.exc_info)
        return json.dumps(entry, default=str)

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return format_traceback(ei)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning``: a ``py.warnings`` record naming the category and the source
    location, never the text (which may quote DICOM values)."""
    if file is not None:  # an explicit file: not a log line, the stock behaviour
        _stock_showwarning(message, category, filename, lineno, file, line)
        return
    logging.getLogger(WARNINGS_LOGGER).warning(
        "library warning",
        extra={"warning_category": _type_name(category), "warning_source": f"{_short_path(filename)}:{lineno}"},
    )


_stock_showwarning = warnings.showwarning


def _log_uncaught(exc_type, value, tb, thread_name: str | None = None) -> None:
    """``sys.excepthook`` / ``threading.excepthook``: a JSON record, not a raw traceback."""
    logging.getLogger("medseg.service").error(
        "uncaught exception", exc_info=(exc_type, value, tb), extra={"thread_name": thread_name} if thread_name else {}
    )


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else None)


def configure(level: int = logging.INFO) -> None:
    """Route medseg's, uvicorn's and the libraries' loggers, warnings and uncaught exceptions to
    one JSON handler on stderr (see the module docstring for what is withheld)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("medseg", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(level)
    logging.getLogger(WARNINGS_LOGGER).propagate = True
    # library warnings become JSON records too, without their text
    logging.captureWarnings(False)
    warnings.showwarning = _show_warning
    logging.getLogger("uvicorn.access").disabled = True  # replaced by the request log middleware
    threading.excepthook = _thread_excepthook
    sys.excepthook = _log_uncaught
