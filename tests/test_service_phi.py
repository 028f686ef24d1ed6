"""Patient data never reaches the service's log, and real-world patient values never fail a job.

A real ``medseg serve`` segments the real hippocampus MR series whose headers carry what PACS
exports do carry: a PatientName without ``^``, ``PatientBirthDate=1970-03-21`` and
``PatientSex=female``. The job succeeds, the SEG holds the repaired values, and the server's
log (stderr) holds none of the values. Also the JSON log formatter and ``logs.configure`` alone.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pydicom
import pytest

from tests.test_io_seg_lenient import REAL_WORLD, real_world_series
from tests.test_service_support import REPO, Server, build_tiny_model, create_key, dicom_files, wait_for

#: what may never appear in a log line
SECRETS = ("Zebedee", "Quixote", "Marple", "1970-03-21", "female", "Avasarala", "PGBM-002")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-phi")
    models = build_tiny_model(root / "models")
    data = root / "data"
    key = create_key(data, "submit", "phi")
    server = Server(data, models).start()
    yield server, key
    server.stop()


@pytest.fixture(scope="module")
def finished_job(service, tmp_path_factory):
    """The real-world series uploaded and segmented: (server, key, job)."""
    server, key = service
    series = real_world_series(tmp_path_factory.mktemp("phi-series") / "series")
    with server.client(key) as client:
        response = client.post("/v1/jobs", files=dicom_files(series))
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
    return server, key, job


def _log_after(server: Server, job_id: str, timeout: float = 15.0) -> str:
    """The server log once it has the job's ``job finished`` line."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = server.log_path.read_text(errors="replace")
        if any('"job finished"' in line and job_id in line for line in text.splitlines()):
            break
        time.sleep(0.1)
    return text


def test_real_world_patient_values_do_not_fail_the_job(finished_job):
    server, key, job = finished_job
    assert job["state"] == "succeeded", job
    with server.client(key) as client:
        seg = client.get(f"/v1/jobs/{job['id']}/result/seg")
        report = client.get(f"/v1/jobs/{job['id']}/result/report")
    assert seg.status_code == 200 and report.status_code == 200
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert ds.Modality == "SEG"
    assert ds.PatientBirthDate == "19700321" and ds.PatientSex == "F"
    warnings = report.json()["input"]["warnings"]
    assert {"PatientBirthDate", "PatientSex"} <= {w.split(":")[0] for w in warnings}, warnings
    assert not any(value in report.text for value in REAL_WORLD.values())
    shown = {w.split(":")[0] for w in job["input"]["warnings"]}  # the job shows them too
    assert {"PatientBirthDate", "PatientSex"} <= shown, job["input"]


def test_patient_values_never_reach_the_server_log(finished_job):
    server, _, job = finished_job
    text = _log_after(server, job["id"])
    assert '"job finished"' in text, text[-3000:]
    leaked = [secret for secret in SECRETS if secret.lower() in text.lower()]
    assert not leaked, (leaked, text[-3000:])
    for line in text.splitlines():  # one JSON record per line, tracebacks included
        if line.strip():
            json.loads(line)


def _record(exc_info=None, name="medseg.service.worker", msg="job failed", **extra):
    record = logging.LogRecord(name, logging.ERROR, __file__, 42, msg, (), exc_info)
    record.__dict__.update(extra)
    return record


def test_formatter_keeps_frames_and_types_but_no_exception_messages():
    from service.logs import JsonFormatter

    def parse_birth_date():
        try:
            int("MARKER-cause Zebedee")
        except ValueError as error:
            raise KeyError("MARKER-context female") from error

    def write_seg():
        try:
            parse_birth_date()
        except KeyError:
            raise RuntimeError("MARKER-outer 1970-03-21")  # noqa: B904 (an implicit __context__ on purpose)

    try:
        write_seg()
    except RuntimeError:
        exc_info = sys.exc_info()
    line = JsonFormatter().format(_record(exc_info, job_id="j-1", error_type="RuntimeError"))
    entry = json.loads(line)
    assert "MARKER" not in line and "Zebedee" not in line and "female" not in line
    assert "1970-03-21" not in line
    assert entry["job_id"] == "j-1" and entry["msg"] == "job failed"  # medseg's own fields kept
    assert entry["exc_type"] == "RuntimeError"
    trace = entry["traceback"]
    for part in (
        "parse_birth_date",
        "write_seg",
        "ValueError",
        "KeyError",
        "RuntimeError",
        "direct cause",
        "During handling",
        __file__,
    ):
        assert part in trace, (part, trace)

    # a library's record: level, logger and place, never its text or extra fields
    library = json.loads(
        JsonFormatter().format(_record(name="pydicom", msg="Invalid value for VR DA: '1970-03-21'", value="1970-03-21"))
    )
    assert "1970-03-21" not in json.dumps(library) and library["logger"] == "pydicom"
    assert library["source"].endswith(":42")


CONFIGURED = r"""
import logging, threading, warnings
from service import logs
logs.configure()
warnings.warn("PatientName Zebedee Quixote-Marple has one component")
warnings.warn("Invalid value for VR CS: 'female'", DeprecationWarning)
logging.getLogger("highdicom.base").warning('patient_name is potentially invalid: "Zebedee"')
logging.getLogger("medseg.service.jobs").info("job queued", extra={"job_id": "j-7"})
try:
    raise ValueError("Unable to convert '1970-03-21' to 'DA' object")
except ValueError:
    logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
thread = threading.Thread(target=lambda: int("Zebedee"), name="medseg-worker-0")
thread.start(); thread.join()
raise RuntimeError("Zebedee 1970-03-21 female")
"""


def test_configured_logging_withholds_warning_texts_and_uncaught_exceptions():
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", CONFIGURED], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0  # the uncaught RuntimeError
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is a JSON record
    assert not [s for s in SECRETS if s.lower() in result.stderr.lower()], result.stderr
    warned = [e for e in entries if e["logger"] == "py.warnings"]
    assert [e["warning_category"] for e in warned] == ["UserWarning", "DeprecationWarning"]
    assert all(e["msg"] == "library warning" and e["warning_source"].startswith("<string>:") for e in warned)
    assert {"job_id": "j-7", "msg": "job queued"}.items() <= next(
        e for e in entries if e["logger"] == "medseg.service.jobs"
    ).items()
    assert any(e["logger"] == "highdicom.base" and "source" in e for e in entries)
    asgi = next(e for e in entries if e["logger"] == "uvicorn.error")
    assert asgi["exc_type"] == "ValueError" and "ValueError" in asgi["traceback"]
    uncaught = [e for e in entries if e["msg"] == "uncaught exception"]
    assert [e["exc_type"] for e in uncaught] == ["ValueError", "RuntimeError"]
    assert uncaught[0]["thread_name"] == "medseg-worker-0"
