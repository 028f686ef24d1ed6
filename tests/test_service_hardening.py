"""A hostile tenant and a busy PACS against a real ``medseg serve`` over HTTP: no file outside the
upload is ever read, work per request is bounded, DELETE stops a running job, a lying header
costs no memory, and storage faults are 503s that a retry recovers from."""

from __future__ import annotations

import gzip
import io
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import shared_path
from tests.test_service_support import Server, assert_problem, build_tiny_model, create_key, wait_for, zip_bytes

MAX_WINDOWS = 100_000
SECRET = "medseg-secret-file-contents-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-hardening")
    data = root / "data"
    keys = {role: create_key(data, role, role) for role in ("submit", "admin")}
    secret = root / "secret.raw"  # a server file outside every upload
    secret.write_bytes((SECRET * 64).encode()[:4096])
    server = Server(
        data,
        build_tiny_model(root / "models"),
        env={"MEDSEG_SERVICE_MAX_WINDOWS": str(MAX_WINDOWS), "MEDSEG_SERVICE_STOW_QUIET_S": "1"},
    ).start()
    yield server, keys, secret
    server.stop()


def _nifti_upload() -> list:
    case = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    return [("file", ("case.nii.gz", case.read_bytes(), "application/gzip"))]


def _mha_header(data_file: str) -> bytes:
    return (
        "ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementSpacing = 1 1 1\n"
        f"ElementType = MET_UCHAR\nElementDataFile = {data_file}\n"
    ).encode()


def _nhdr(data_file: str) -> bytes:
    return (
        "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nspacings: 1 1 1\n"
        f"encoding: raw\ndata file: {data_file}\n\n"
    ).encode()


def _detached_uploads(secret: Path):
    """(name, file name, bytes): headers whose pixel data lies in another file."""
    jobs_db = "../../jobs.sqlite"
    return [
        ("MetaImage, absolute ElementDataFile", "scan.mha", _mha_header(str(secret))),
        ("MetaImage .mhd, relative ../", "scan.mhd", _mha_header(jobs_db)),
        ("MetaImage, LIST", "scan.mha", _mha_header("LIST") + str(secret).encode() + b"\n"),
        ("NRRD, absolute data file", "scan.nhdr", _nhdr(str(secret))),
        ("NRRD, relative data file", "scan.nrrd", _nhdr(jobs_db)),
        ("NRRD, LIST", "scan.nhdr", _nhdr("LIST").rstrip(b"\n") + b"\n" + str(secret).encode()),
        ("ZIP of an .mhd pointing outside", "study.zip", zip_bytes({"a/scan.mhd": _mha_header(str(secret))})),
        (
            "ZIP of an .mhd with its .raw",
            "study.zip",
            zip_bytes({"scan.mhd": _mha_header("scan.raw"), "scan.raw": bytes(16**3)}),
        ),
    ]


def test_detached_pixel_data_is_refused_before_any_read(service):
    server, keys, secret = service
    with server.client(keys["admin"]) as admin:
        before = admin.get("/v1/jobs", params={"limit": 200}).json()["total"]
    with server.client(keys["submit"]) as client:
        for name, filename, content in _detached_uploads(secret):
            response = client.post("/v1/jobs", files=[("file", (filename, content, "text/plain"))])
            body = assert_problem(response, 422, "unsafe-input")
            assert "scan." in body["detail"] or "study.zip" in body["detail"], (name, body)
            for leak in (str(server.data_dir), str(secret), SECRET, "/tmp"):
                assert leak not in response.text, (name, leak)
    with server.client(keys["admin"]) as admin:
        assert admin.get("/v1/jobs", params={"limit": 200}).json()["total"] == before
    assert not any((server.data_dir / "incoming").iterdir())


def test_a_nifti_pair_header_is_refused(service):
    import nibabel as nib

    server, keys, _ = service
    pair = nib.Nifti1Pair(np.zeros((8, 8, 8), np.float32), np.eye(4))
    header = pair.header.binaryblock  # magic "ni1": the pixels live in a partner .img file
    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/jobs", files=[("file", ("scan.nii", header + bytes(8**3 * 4), "application/octet-stream"))]
        )
    assert_problem(response, 422, "unsafe-input")


def test_error_details_name_the_uploaded_file_never_a_server_path(service):
    server, keys, _ = service
    broken = (
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_NOPE\nElementDataFile = LOCAL\n" + bytes(64)
    )
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=[("file", ("my-scan.mha", broken, "text/plain"))])
        body = assert_problem(response, 422, "unreadable-file")
        assert body["detail"].startswith("my-scan.mha"), body
        assert str(server.data_dir) not in response.text and "incoming" not in response.text
        response = client.post("/v1/jobs", files=_nifti_upload(), data={"series_uid": "1.2.3"})
        body = assert_problem(response, 422, "mixed-series")
        assert str(server.data_dir) not in response.text, body


@pytest.mark.parametrize("model", ["../models/tiny-hippocampus", "/etc", "tiny-hippocampus/..", "..", "a\\b"])
def test_model_is_a_registered_name_never_a_path(service, model):
    server, keys, _ = service
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=_nifti_upload(), data={"model": model})
    assert_problem(response, 422, "invalid-request")
    assert str(server.data_dir) not in response.text


def test_overlap_is_bounded_and_the_window_budget_refuses_huge_work(service):
    server, keys, _ = service
    aorta = shared_path("vessels", "aorta_angiography", "aorta.mha")
    with server.client(keys["submit"]) as client:
        for overlap in ("0.95", "0.99", "1"):
            response = client.post("/v1/jobs", files=_nifti_upload(), data={"overlap": overlap})
            assert_problem(response, 422, "invalid-request")
        files = [("file", ("aorta.mha", aorta.read_bytes(), "application/octet-stream"))]
        # 157 x 393 x 34 at 0.88 x 0.88 x 1.5 mm -> about 31,000 windows at overlap 0.9; x 8 TTA
        response = client.post("/v1/jobs", files=files, data={"overlap": "0.9", "tta": "true"})
        body = assert_problem(response, 422, "too-much-work")
        assert str(MAX_WINDOWS) in body["detail"] and "aorta.mha" in body["detail"]


def test_delete_stops_a_running_job_within_two_seconds(service):
    """One worker: a long job (about 31,000 windows) runs; DELETE it, and the next job starts
    within 2 s."""
    server, keys, _ = service
    aorta = shared_path("vessels", "aorta_angiography", "aorta.mha")
    with server.client(keys["submit"]) as client:
        long = client.post(
            "/v1/jobs",
            files=[("file", ("aorta.mha", aorta.read_bytes(), "application/octet-stream"))],
            data={"overlap": "0.9", "formats": "report"},
        )
        assert long.status_code == 202, long.text
        long_id = long.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{long_id}").json()
            if job["state"] == "running" and job["progress"] > 0:
                break
            time.sleep(0.1)
        assert job["state"] == "running", job
        short = client.post("/v1/jobs", files=_nifti_upload(), data={"formats": "report"})
        assert short.status_code == 202, short.text
        assert client.delete(f"/v1/jobs/{long_id}").status_code == 204
        deleted_at = time.time()
        started = wait_for(client, short.json()["id"], states=("running", "succeeded", "failed"))
        from datetime import datetime

        started_at = datetime.fromisoformat(started["started_at"]).timestamp()
        assert started_at - deleted_at < 2.0, (started_at - deleted_at, started)
        assert wait_for(client, short.json()["id"])["state"] == "succeeded"
        assert_problem(client.get(f"/v1/jobs/{long_id}"), 404, "not-found")
    assert not (server.data_dir / "jobs" / long_id).exists()


def _lying_nifti() -> bytes:
    """A 370-byte .nii.gz whose header claims 1000 x 1000 x 400 float32 (1.6 GB)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 400))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + bytes(4) + bytes(1000))


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_a_lying_header_is_refused_without_allocating_it(service):
    """Three concurrent 1.6 GB claims: refused, and the server's peak RSS (VmHWM, reset first
    through clear_refs) rises by less than 300 MB."""
    server, keys, _ = service
    pid = server.process.pid
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    except OSError:
        pytest.skip("cannot reset the server's peak RSS (/proc/<pid>/clear_refs)")
    idle = _rss_kib(pid, "VmRSS")
    liar = _lying_nifti()
    results = []

    def upload():
        with server.client(keys["submit"]) as client:
            results.append(client.post("/v1/jobs", files=[("file", ("liar.nii.gz", liar, "application/gzip"))]))

    threads = [threading.Thread(target=upload) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 3
    for response in results:
        body = assert_problem(response, 422, "unreadable-file")
        assert "truncated" in body["detail"] and body["detail"].startswith("liar.nii.gz")
    peak = _rss_kib(pid, "VmHWM")
    assert (peak - idle) / 1024 < 300, f"peak RSS rose by {(peak - idle) / 1024:.0f} MB"


def test_what_the_worker_would_refuse_is_refused_at_upload(service):
    """A singular affine (zero sform and qform) and an RGB NIfTI: 4xx at upload, not 500 later."""
    import nibabel as nib

    server, keys, _ = service
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"], header["vox_offset"] = 1, 0, 352
    header["srow_x"][:] = header["srow_y"][:] = header["srow_z"][:] = 0
    singular = header.binaryblock + bytes(4) + np.ones(512, np.float32).tobytes()
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    buffer = io.BytesIO()
    image = nib.Nifti1Image(rgb, np.eye(4))
    buffer.write(image.header.binaryblock + bytes(4) + rgb.tobytes(order="F"))
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=[("file", ("zero.nii", singular, "x"))])
        assert_problem(response, 422, "missing-geometry")
        response = client.post("/v1/jobs", files=[("file", ("rgb.nii", buffer.getvalue(), "x"))])
        assert_problem(response, 422, "unsupported-input")


# --- storage faults -----------------------------------------------------------------------------
@contextmanager
def _locked_store(data_dir: Path):
    """Another process holds the SQLite job store's write lock."""
    connection = sqlite3.connect(data_dir / "jobs.sqlite", timeout=30, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def _stow_body(paths: list[Path]) -> tuple[bytes, str]:
    boundary = "medseg-stow-boundary"
    parts = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_a_locked_store_gives_503_and_a_stow_retry_ends_in_one_job(service):
    server, keys, _ = service
    series = sorted(shared_path("dicom", "hippocampus_crop_study1").iterdir())
    body, content_type = _stow_body(series)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    with server.client(keys["submit"]) as client:
        before = {j["id"] for j in client.get("/v1/jobs", params={"limit": 200}).json()["items"]}
        with _locked_store(server.data_dir):
            response = client.post("/dicomweb/studies", content=body, headers=headers)
            assert_problem(response, 503, "unavailable")
            assert int(response.headers["retry-after"]) > 0
            response = client.post("/v1/jobs", files=_nifti_upload())
            assert_problem(response, 503, "unavailable")
            assert "retry-after" in response.headers
            ready = httpx.get(server.url + "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        assert not any((server.data_dir / "incoming").iterdir())
        assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200
        for _ in range(2):  # the PACS's retry, and a duplicate of it: same SOPInstanceUIDs
            response = client.post("/dicomweb/studies", content=body, headers=headers)
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = [
                j
                for j in client.get("/v1/jobs", params={"limit": 200}).json()["items"]
                if j["id"] not in before and j["source"] == "stow"
            ]
            if jobs:
                break
            time.sleep(0.2)
        assert len(jobs) == 1, jobs
        assert jobs[0]["input"]["instances"] == len(series)
        assert wait_for(client, jobs[0]["id"])["state"] == "succeeded"


def test_readyz_reports_an_unwritable_jobs_folder(service):
    server, _, _ = service
    jobs = server.data_dir / "jobs"
    moved = server.data_dir / "jobs.moved"
    jobs.rename(moved)
    jobs.write_text("not a folder")  # breaks writes even for root, unlike chmod
    try:
        ready = httpx.get(server.url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["jobs_dir"] == "not writable"
    finally:
        jobs.unlink()
        moved.rename(jobs)
    assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200


def test_a_series_predict_skips_is_refused_at_upload_with_the_same_reason(service, tmp_path, capsys):
    """One series-fit rule: the whole-brain T1 of a study export does not fit the bundled
    hippocampus-crop model (its card declares the training field of view)."""
    from medseg.cli import main

    server, keys, _ = service
    series = shared_path("dicom", "mr_brain_study3_export", "26401-T1prereg-52906")
    assert main(["predict", str(series), "--model", "hippocampus", "--output", str(tmp_path / "out")]) == 1
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "field of view" in skipped[0], skipped
    reason = skipped[0].split(": ", 1)[1]
    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/jobs",
            data={"model": "hippocampus"},
            files=[("file", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(series.iterdir())],
        )
    body = assert_problem(response, 422, "does-not-fit")
    assert body["detail"].endswith(reason), (body["detail"], reason)
