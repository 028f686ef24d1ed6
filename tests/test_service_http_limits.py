"""HTTP-level limits of a real ``medseg serve`` (uvicorn), over real sockets: multipart boundary
length, storage faults as 503 + Retry-After, slow or idle connections (header timeout, connection
limit), many concurrent uploads, the served OpenAPI document, 405 ``Allow`` and ``/metrics`` roles.
"""

from __future__ import annotations

import os
import select
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import shared_path
from tests.test_service_support import Server, assert_problem, build_tiny_model, create_key, free_port

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 100
CONCURRENT_UPLOADS = 50


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server with no workers (jobs stay queued: nothing is trained or inferred), a 2 s header
    deadline and at most 100 connections."""
    root = tmp_path_factory.mktemp("service-limits")
    models = build_tiny_model(root / "models")
    data = root / "data"
    keys = {role: create_key(data, role, role) for role in ("read", "submit", "admin")}
    server = Server(
        data,
        models,
        workers=0,
        env={
            "MEDSEG_SERVICE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
            "MEDSEG_SERVICE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
    ).start()
    yield server, keys
    server.stop()


def _nifti() -> bytes:
    return shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz").read_bytes()


def _multipart(boundary: str, data: bytes, formats: str = "report") -> bytes:
    """A ``multipart/form-data`` body with one NIfTI ``file`` part and a ``formats`` field."""
    b = boundary.encode()
    return (
        b"--"
        + b
        + b'\r\nContent-Disposition: form-data; name="formats"\r\n\r\n'
        + formats.encode()
        + b"\r\n--"
        + b
        + b'\r\nContent-Disposition: form-data; name="file"; filename="case.nii.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n" + data + b"\r\n--" + b + b"--\r\n"
    )


def _upload(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post(
        "/v1/jobs", files=[("file", ("case.nii.gz", data, "application/gzip"))], data={"formats": "report"}
    )


def _incoming(server: Server) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "incoming").iterdir())


# --- 1. multipart boundary ----------------------------------------------------------------------
@pytest.mark.parametrize("length", [257, 300])
def test_a_boundary_longer_than_256_characters_is_a_400_and_leaves_nothing(service, length):
    server, keys = service
    boundary = "b" * length
    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/jobs",
            content=_multipart(boundary, _nifti()),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        body = assert_problem(response, 400, "bad-request")
        assert "boundary" in body["detail"]
        response = client.post(
            "/dicomweb/studies",
            content=_multipart(boundary, b"x"),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        assert_problem(response, 400, "bad-request")
    assert _incoming(server) == []


@pytest.mark.parametrize(
    "boundary",
    [
        "'()+_,-./:=?" + "a" * 58,  # RFC 2046's longest, every special bchar
        "d8cb0e1c-add3-4b32-af83-ee45e5fae8c8-d8cb0e1c-add3-4b32-af83-ee45e5fae8c8",  # Orthanc's form, 73
        "b" * 256,
    ],
)
def test_boundaries_that_real_senders_use_are_accepted(service, boundary):
    server, keys = service
    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/jobs",
            content=_multipart(boundary, _nifti()),
            headers={"Content-Type": f'multipart/form-data; boundary="{boundary}"'},
        )
        assert response.status_code == 202, response.text
        assert client.delete(f"/v1/jobs/{response.json()['id']}").status_code == 204
    assert _incoming(server) == []


# --- 2. storage faults --------------------------------------------------------------------------
def test_an_unwritable_upload_folder_is_a_503_with_retry_after_then_recovers(service):
    server, keys = service
    incoming = server.data_dir / "incoming"
    aside = server.data_dir / f"incoming-aside-{uuid.uuid4().hex[:8]}"
    as_root = os.geteuid() == 0  # chmod does not stop root: replace the folder by a file instead
    mode = incoming.stat().st_mode & 0o7777
    if as_root:
        incoming.rename(aside)
        incoming.write_bytes(b"not a folder")
    else:
        incoming.chmod(0o500)
    try:
        with server.client(keys["submit"]) as client:
            response = _upload(client, _nifti())
        body = assert_problem(response, 503, "unavailable")
        assert response.headers["retry-after"] == "5"
        assert body["instance"] == "/v1/jobs" and "Traceback" not in response.text
    finally:
        if as_root:
            incoming.unlink()
            aside.rename(incoming)
        else:
            incoming.chmod(mode)
    log = server.log()
    assert '"storage fault"' in log
    assert "Not a directory" not in log and "Permission denied" not in log  # type only
    with server.client(keys["submit"]) as client:
        response = _upload(client, _nifti())
        assert response.status_code == 202, response.text
        assert client.delete(f"/v1/jobs/{response.json()['id']}").status_code == 204
    assert _incoming(server) == []


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """A real uvicorn (in a thread, with ``medseg serve``'s limits) serving an app with the
    service's error handlers and routes that fail the way broken storage does."""
    import errno
    import sqlite3
    import threading

    import uvicorn
    from fastapi import FastAPI
    from sqlalchemy.exc import OperationalError

    from medseg.commands.serve import uvicorn_limits
    from service.config import Settings
    from service.problems import install_handlers

    settings = Settings.load({"data_dir": tmp_path_factory.mktemp("faults"), "retry_after_s": 7}, environ={})
    app = FastAPI()
    app.state.settings = settings
    install_handlers(app)

    @app.get("/db")
    def locked():
        raise OperationalError("UPDATE jobs SET state='SECRET-SQL'", {}, sqlite3.OperationalError("database is locked"))

    @app.get("/full")
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/secret/upload/path")

    @app.get("/read-only")
    def read_only():
        raise OSError(errno.EROFS, "Read-only file system", "/secret/upload/path")

    @app.get("/bug")
    def bug():
        raise FileNotFoundError(errno.ENOENT, "No such file", "/secret/upload/path")

    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="off", **uvicorn_limits(settings)
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(30)


@pytest.mark.parametrize("path", ["/db", "/full", "/read-only"])
def test_storage_faults_are_503_with_retry_after_and_logged_by_type_only(fault_server, path, caplog):
    with caplog.at_level("INFO", logger="medseg.service"):
        response = httpx.get(fault_server + path, timeout=30)
    assert_problem(response, 503, "unavailable")
    assert response.headers["retry-after"] == "7"
    assert "SECRET" not in response.text and "secret" not in response.text
    records = [r for r in caplog.records if r.name == "medseg.service"]
    assert [r.getMessage() for r in records] == ["storage fault"]
    assert records[0].exc_info is None
    assert records[0].error in ("OperationalError", "OSError")
    text = repr({k: v for k, v in records[0].__dict__.items() if k not in ("pathname", "filename")})
    for leaked in ("SECRET", "/secret/", "database is locked", "No space", "Read-only"):
        assert leaked not in text, (leaked, text)


def test_other_os_errors_stay_500(fault_server):
    response = httpx.get(fault_server + "/bug", timeout=30)
    assert_problem(response, 500, "internal-error")
    assert "retry-after" not in response.headers and "secret" not in response.text


# --- 3. slow and idle clients, concurrency ------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> float | None:
    """Send ``dribble`` one byte a second; the seconds until the server closed the connection
    (None if it is still open after ``seconds``). Anything the server sends is read and dropped."""
    start = time.monotonic()
    sent = 0
    next_byte = start
    while time.monotonic() - start < seconds:
        if sent < len(dribble) and time.monotonic() >= next_byte:
            try:
                sock.sendall(dribble[sent : sent + 1])
            except OSError:  # reset / broken pipe: closed by the server
                return time.monotonic() - start
            sent += 1
            next_byte += 1.0
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                if not sock.recv(65536):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def test_a_client_dribbling_its_headers_is_cut_off_after_the_header_timeout(service):
    server, _ = service
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # never finished (no blank line)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        closed = _closed_within(sock, HEADER_TIMEOUT + 4, dribble=request)
    assert closed is not None, "the slow client still holds its connection"
    assert HEADER_TIMEOUT - 0.5 <= closed <= HEADER_TIMEOUT + 3, closed


def test_a_connection_that_sends_nothing_is_closed(service):
    server, _ = service
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        closed = _closed_within(sock, HEADER_TIMEOUT + 4)
    assert closed is not None and closed <= HEADER_TIMEOUT + 3, closed


def test_headers_in_time_and_a_slow_body_are_not_cut_off(service):
    """The deadline is for the headers only: a body may take longer (it has its own limit), and
    headers sent in pieces within the deadline are fine."""
    server, keys = service
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHo", b"st: x\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT / 4)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    body = _multipart("slowbody", _nifti())
    third = len(body) // 3

    def slowly():
        for start in (0, third, 2 * third):
            yield body[start : start + third] if start < 2 * third else body[start:]
            time.sleep(HEADER_TIMEOUT * 0.75)

    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/jobs", content=slowly(), headers={"Content-Type": "multipart/form-data; boundary=slowbody"}
        )
        assert response.status_code == 202, response.text
        assert client.delete(f"/v1/jobs/{response.json()['id']}").status_code == 204


def test_past_max_connections_requests_get_503_until_idle_ones_are_closed(service):
    server, _ = service
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(MAX_CONNECTIONS + 5)]
    try:
        time.sleep(0.3)  # all accepted by the server
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 503
        deadline = time.monotonic() + HEADER_TIMEOUT + 5  # the idle ones time out and free slots
        while time.monotonic() < deadline:
            if httpx.get(server.url + "/healthz", timeout=10).status_code == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("idle connections were not closed")
    finally:
        for sock in idle:
            sock.close()


def test_50_concurrent_uploads_are_all_accepted(service):
    server, keys = service
    data = _nifti()

    def upload(_):
        with server.client(keys["submit"], timeout=300) as client:
            return _upload(client, data)

    with ThreadPoolExecutor(CONCURRENT_UPLOADS) as pool:
        responses = list(pool.map(upload, range(CONCURRENT_UPLOADS)))
    ids = [r.json()["id"] for r in responses if r.status_code == 202]
    try:
        assert [r.status_code for r in responses] == [202] * CONCURRENT_UPLOADS, [
            r.text[:200] for r in responses if r.status_code != 202
        ][:3]
    finally:
        with server.client(keys["submit"]) as client:
            for job_id in ids:
                assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert _incoming(server) == []


# --- 4. OpenAPI and 405 -------------------------------------------------------------------------
def test_the_served_openapi_documents_problems_for_every_422(service):
    server, keys = service
    with server.client(keys["read"]) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    problem = {"$ref": "#/components/schemas/Problem"}
    seen = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if status == "422":
                    assert answer["content"] == {"application/problem+json": {"schema": problem}}, (
                        method,
                        path,
                        status,
                        answer,
                    )
                    seen += status == "422"
    assert seen >= 5
    text = response.text
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text
    for ref in {part.split('"')[0] for part in text.split('"$ref":"')[1:]} | {
        part.split('"')[0] for part in text.split('"$ref": "')[1:]
    }:
        assert ref.split("/")[-1] in schema["components"]["schemas"], ref
    upload = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["file"]["minItems"] == 1
    assert "503" in schema["paths"]["/v1/jobs"]["post"]["responses"]


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("PUT", "/v1/jobs", "GET, POST"),
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("POST", "/v1/jobs/0123", "GET, DELETE"),
        ("PUT", "/v1/jobs/0123/result/seg", "GET"),
        ("GET", "/dicomweb/studies", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_lists_every_method_served_at_the_path(service, method, path, allow):
    server, keys = service
    with server.client(keys["admin"]) as client:
        response = client.request(method, path)
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == allow


# --- 5. /metrics --------------------------------------------------------------------------------
def test_metrics_need_an_admin_key(service):
    server, keys = service
    for role in ("read", "submit"):
        with server.client(keys[role]) as client:
            assert_problem(client.get("/metrics"), 403, "forbidden")
    with server.client(keys["admin"]) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
