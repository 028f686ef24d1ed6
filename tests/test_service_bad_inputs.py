"""Bad requests to a real ``medseg serve``: each gets the right 4xx problem+json and leaves the
store, the other jobs and their results untouched. Also: authentication and roles."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import pydicom
import pytest

from tests.conftest import shared_path
from tests.test_service_support import (
    Server,
    assert_problem,
    build_tiny_model,
    create_key,
    dicom_files,
    wait_for,
    zip_bytes,
)

MAX_UPLOAD = 24 * 1024**2
MAX_INSTANCES = 100
BODY_TIMEOUT = 8


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-bad")
    models = build_tiny_model(root / "models")
    data = root / "data"
    keys = {role: create_key(data, role, role) for role in ("read", "submit", "admin")}
    keys["other"] = create_key(data, "submit", "another submitter")
    keys["revoked"] = create_key(data, "submit", "revoked")
    from service.auth import revoke_key
    from service.config import Settings
    from service.store import Store

    store = Store(Settings.load({"data_dir": data}, environ={}).db_url)
    revoke_key(store, keys["revoked"].split("_")[1])
    store.dispose()
    server = Server(
        data,
        models,
        env={
            "MEDSEG_SERVICE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "MEDSEG_SERVICE_MAX_INSTANCES": str(MAX_INSTANCES),
            "MEDSEG_SERVICE_REQUEST_TIMEOUT_S": str(BODY_TIMEOUT),
        },
    ).start()
    yield server, keys
    server.stop()


@pytest.fixture(scope="module")
def good_job(service):
    """A real job that succeeded before the bad requests; they must not touch it."""
    server, keys = service
    series = shared_path("dicom", "hippocampus_crop_study1")
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=dicom_files(series))
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "succeeded", job
        seg = client.get(f"/v1/jobs/{job['id']}/result/seg")
        assert seg.status_code == 200
    return job, hashlib.sha256(seg.content).hexdigest()


def _truncated(path, fraction=0.6) -> bytes:
    data = path.read_bytes()
    return data[: int(len(data) * fraction)]


def _bad_uploads():
    """(name, multipart files builder, form data, expected status, expected problem code)."""
    hippo = lambda: shared_path("dicom", "hippocampus_crop_study1")  # noqa: E731
    one = lambda: sorted(hippo().iterdir())[0]  # noqa: E731
    return [
        (
            "garbage bytes",
            lambda: [("file", ("scan.dcm", os.urandom(20000), "application/dicom"))],
            {},
            422,
            "unreadable-file",
        ),
        (
            "truncated DICOM file",
            lambda: [("file", ("1.dcm", _truncated(one()), "application/dicom"))],
            {},
            422,
            "unreadable-file",
        ),
        (
            "series with a truncated slice",
            lambda: [
                ("file", (p.name, _truncated(p) if i == 5 else p.read_bytes(), "application/dicom"))
                for i, p in enumerate(sorted(hippo().iterdir()))
            ],
            {},
            422,
            None,
        ),
        (
            "zip bomb",
            lambda: [("file", ("study.zip", zip_bytes({"bomb.dcm": bytes(30 * 1024**2)}), "application/zip"))],
            {},
            422,
            "unsafe-archive",
        ),
        (
            "zip path traversal",
            lambda: [
                ("file", ("study.zip", zip_bytes({"../../../../tmp/evil.dcm": one().read_bytes()}), "application/zip"))
            ],
            {},
            422,
            "unsafe-archive",
        ),
        (
            "wrong modality (CT for an MR model)",
            lambda: dicom_files(shared_path("dicom", "ct_jpeg2000_series")),
            {},
            422,
            "modality-mismatch",
        ),
        (
            "two series, none chosen",
            lambda: (
                dicom_files(hippo()) + dicom_files(shared_path("dicom", "mr_brain_study3_export", "11_HCropVolume"))
            ),
            {},
            422,
            "mixed-series",
        ),
        ("no file", lambda: [("model", (None, b"tiny-hippocampus"))], {}, 422, "no-image-data"),
        ("unknown form field", lambda: dicom_files(hippo()), {"colour": "red"}, 422, "invalid-request"),
        ("overlap out of range", lambda: dicom_files(hippo()), {"overlap": "2"}, 422, "invalid-request"),
        ("unknown format", lambda: dicom_files(hippo()), {"formats": "seg,stl"}, 422, "invalid-request"),
        ("unknown model", lambda: dicom_files(hippo()), {"model": "no-such-model"}, 404, "model-not-found"),
        (
            "DICOM SEG asked for a NIfTI input",
            lambda: [
                (
                    "file",
                    (
                        "case.nii.gz",
                        shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz").read_bytes(),
                        "application/gzip",
                    ),
                )
            ],
            {"formats": "seg"},
            422,
            "unsupported-input",
        ),
        (
            "too many files",
            lambda: [("file", (f"{i}.dcm", b"x", "application/dicom")) for i in range(MAX_INSTANCES + 1)],
            {},
            413,
            "too-large",
        ),
        (
            "oversize body",
            lambda: [("file", ("big.nii.gz", os.urandom(MAX_UPLOAD + 1024), "application/gzip"))],
            {},
            413,
            "too-large",
        ),
    ]


@pytest.mark.parametrize("case", _bad_uploads(), ids=lambda c: c[0])
def test_bad_upload_is_refused_with_a_problem_and_touches_nothing(service, good_job, case):
    server, keys = service
    name, files, data, status, code = case
    before = _store_snapshot(server, keys["admin"])
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=files(), data=data)
    if code is None:  # the truncated slice: refused as unreadable or as bad geometry, never 5xx
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    else:
        body = assert_problem(response, status, code)
        assert body["instance"] == "/v1/jobs"
    assert "Traceback" not in response.text
    assert _store_snapshot(server, keys["admin"]) == before
    _assert_good_job_untouched(server, keys, good_job)


def test_oversize_is_refused_from_the_declared_length_before_reading(service):
    """Only the headers and the start of a body declared too large are sent: 413 at once."""
    server, keys = service
    response = _raw_request(
        server,
        keys["submit"],
        {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(MAX_UPLOAD + 1)},
        [b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\n'],
    )
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"https://medseg.dev/problems/too-large" in response


def test_oversize_chunked_body_is_cut_off_while_streaming(service):
    """No Content-Length (chunked): the limit is enforced as the bytes arrive."""
    server, keys = service
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\n'
    block = os.urandom(1024**2)
    chunks = [head] + [block] * (MAX_UPLOAD // len(block) + 2)
    response = _raw_request(
        server,
        keys["submit"],
        {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked"},
        chunks,
    )
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert not any((server.data_dir / "incoming").iterdir())  # the partial upload is gone


def test_a_body_sent_too_slowly_times_out_with_408(service):
    """A client that stops sending mid-body gets 408 after the request time limit."""
    import socket

    server, keys = service
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {keys['submit']}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
        '--x\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT + 60) as sock:
        sock.sendall(head.encode() + b"\0" * 1000)  # ... and then nothing more
        answer = sock.recv(65536)
        while answer and not answer.rstrip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"https://medseg.dev/problems/request-timeout" in answer
    assert not any((server.data_dir / "incoming").iterdir())


def _raw_request(server: Server, key: str, headers: dict[str, str], chunks: list[bytes]) -> bytes:
    """POST /v1/jobs over a plain socket; stops sending once the server has answered."""
    import socket

    chunked = headers.get("Transfer-Encoding") == "chunked"
    lines = [
        "POST /v1/jobs HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        f"Authorization: Bearer {key}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        answer = b""
        for chunk in chunks:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
            try:
                sock.setblocking(True)
                sock.sendall(data)
                sock.setblocking(False)
            except OSError:  # the server closed the connection after answering
                break
        sock.setblocking(True)
        sock.settimeout(60)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
    return answer


def test_not_multipart_is_unsupported_media_type(service):
    server, keys = service
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", json={"file": "abc"})
        assert_problem(response, 415, "unsupported-media-type")
        response = client.post(
            "/v1/jobs", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}
        )
        assert_problem(response, 400, "bad-request")


def test_validation_errors_are_problems_not_fastapi_defaults(service):
    server, keys = service
    with server.client(keys["read"]) as client:
        body = assert_problem(client.get("/v1/jobs", params={"limit": "many"}), 422, "invalid-request")
        assert body["errors"][0]["loc"] == ["query", "limit"]
        assert_problem(client.get("/v1/jobs", params={"state": "exploded"}), 422, "invalid-request")
        assert_problem(client.get("/v1/nothing-here"), 404, "not-found")
        assert_problem(client.put("/v1/jobs"), 405, "method-not-allowed")


# --- authentication and roles -------------------------------------------------------------------
PROTECTED = [
    ("GET", "/v1/jobs"),
    ("GET", "/v1/models"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/0123"),
    ("DELETE", "/v1/jobs/0123"),
    ("GET", "/v1/jobs/0123/result/seg"),
    ("POST", "/dicomweb/studies"),
]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_endpoint_but_health_needs_a_valid_key(service, method, path):
    server, keys = service
    for header in (
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer msk_0123456789ab_" + "A" * 43,
        f"Bearer {keys['revoked']}",
    ):
        headers = {"Authorization": header} if header else {}
        response = httpx.request(method, server.url + path, headers=headers, timeout=30)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200


def test_roles_and_ownership(service, good_job):
    server, keys = service
    job, _ = good_job
    series = shared_path("dicom", "hippocampus_crop_study1")
    with server.client(keys["read"]) as client:
        assert_problem(client.post("/v1/jobs", files=dicom_files(series)), 403, "forbidden")
        assert_problem(client.delete(f"/v1/jobs/{job['id']}"), 403, "forbidden")
        assert_problem(
            client.post(
                "/dicomweb/studies",
                content=b"",
                headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
            ),
            403,
            "forbidden",
        )
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/jobs").json()["total"] == 0  # sees only its own jobs
    with server.client(keys["other"]) as client:  # another submitter: the job does not exist
        assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404, "not-found")
        assert_problem(client.get(f"/v1/jobs/{job['id']}/result/seg"), 404, "not-found")
        assert_problem(client.delete(f"/v1/jobs/{job['id']}"), 404, "not-found")
        assert job["id"] not in [j["id"] for j in client.get("/v1/jobs").json()["items"]]
    with server.client(keys["admin"]) as client:  # admin sees every job
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
        assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()["items"]]
    _assert_good_job_untouched(server, keys, good_job)


def test_keys_cli_creates_lists_and_revokes(tmp_path):
    from medseg.cli import main

    data = tmp_path / "data"
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["keys", "create", "--role", "read", "--name", "viewer", "--data-dir", str(data)]) == 0
    key = out.getvalue().strip()
    assert key.startswith("msk_")
    key_id = key.split("_")[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["keys", "list", "--data-dir", str(data)]) == 0
    assert key_id in out.getvalue() and "viewer" in out.getvalue() and key not in out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["keys", "revoke", key_id, "--data-dir", str(data)]) == 0
        assert main(["keys", "revoke", key_id, "--data-dir", str(data)]) == 2  # already revoked
    from service.auth import authenticate
    from service.config import Settings
    from service.problems import Problem
    from service.store import ApiKey, Store

    store = Store(Settings.load({"data_dir": data}, environ={}).db_url)
    with store.session() as session:
        row = session.get(ApiKey, key_id)
        assert row.sha256 == hashlib.sha256(key.encode()).hexdigest()  # only the hash is stored
    with pytest.raises(Problem):
        authenticate(store, f"Bearer {key}")
    store.dispose()


def test_serve_refuses_a_public_address_without_the_flag(capsys):
    from medseg.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--public" in capsys.readouterr().err


# --- helpers ------------------------------------------------------------------------------------
def _store_snapshot(server: Server, admin_key: str):
    """Jobs (id, state, results) and the files under jobs/ and incoming/."""
    with server.client(admin_key) as client:
        jobs = client.get("/v1/jobs", params={"limit": 200}).json()["items"]
    files = sorted(
        str(p.relative_to(server.data_dir))
        for folder in ("jobs", "incoming", "stow")
        for p in (server.data_dir / folder).rglob("*")
    )
    return [(j["id"], j["state"], sorted(j["results"])) for j in jobs], files


def _assert_good_job_untouched(server: Server, keys, good_job):
    job, seg_sha = good_job
    with server.client(keys["submit"]) as client:
        now = client.get(f"/v1/jobs/{job['id']}").json()
        assert (now["state"], now["results"], now["finished_at"]) == (job["state"], job["results"], job["finished_at"])
        seg = client.get(f"/v1/jobs/{job['id']}/result/seg")
        assert hashlib.sha256(seg.content).hexdigest() == seg_sha
        ds = pydicom.dcmread(io.BytesIO(seg.content))
        assert ds.Modality == "SEG"
