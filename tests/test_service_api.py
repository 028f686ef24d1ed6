"""The REST API of a real ``medseg serve`` over HTTP: uploads of the real series (DICOM files,
DICOM zip, NIfTI), results on the input grid, listing, cancelling, metrics, logs, CORS, and a
bounded schemathesis fuzz of the OpenAPI schema that must find no 5xx."""

from __future__ import annotations

import gzip
import io
import json
import time

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.io import read_image
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

ORIGIN = "https://viewer.example.org"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-api")
    data = root / "data"
    keys = {role: create_key(data, role, role) for role in ("read", "submit", "admin")}
    server = Server(
        data,
        build_tiny_model(root / "models"),
        env={"MEDSEG_SERVICE_CORS_ORIGINS": ORIGIN, "MEDSEG_SERVICE_STOW_QUIET_S": "1"},
    ).start()
    yield server, keys
    server.stop()


@pytest.fixture(scope="module")
def dicom_job(service):
    server, keys = service
    series = shared_path("dicom", "hippocampus_crop_study1")
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=dicom_files(series))
        assert response.status_code == 202, response.text
        submitted = response.json()
        assert response.headers["location"] == f"/v1/jobs/{submitted['id']}"
        assert submitted["state"] == "queued" and submitted["queue_position"] >= 1
        return submitted, wait_for(client, submitted["id"])


def test_dicom_upload_gives_seg_nifti_report_preview_on_the_source_grid(service, dicom_job):
    server, keys = service
    submitted, job = dicom_job
    series = shared_path("dicom", "hippocampus_crop_study1")
    source = read_image(series)
    assert job["state"] == "succeeded", job
    assert job["input"]["series_uid"] == source.meta["series_uid"]
    assert job["input"]["modality"] == "MR" and job["input"]["instances"] == 32
    assert job["progress"] == 1.0 and job["attempts"] == 1
    for step in ("validate_s", "queued_s", "read_s", "predict_s", "write_s", "total_s"):
        assert job["timings"][step] >= 0
    assert {s["name"] for s in job["statistics"]} == {"anterior", "posterior"}
    with server.client(keys["submit"]) as client:
        nifti = client.get(f"/v1/jobs/{job['id']}/result/nifti")
        seg = client.get(f"/v1/jobs/{job['id']}/result/seg")
        report = client.get(f"/v1/jobs/{job['id']}/result/report")
        preview = client.get(f"/v1/jobs/{job['id']}/result/preview")
    assert nifti.headers["content-type"] == "application/gzip"
    label_map = _nifti(nifti.content)
    assert label_map.shape == source.shape
    assert np.allclose(label_map.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label_map.dataobj))) <= {0, 1, 2}
    assert seg.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    assert report.headers["content-type"] == "application/json"
    assert {entry["name"] for entry in report.json()["labels"]} == {"anterior", "posterior"}
    assert preview.headers["content-type"] == "image/png" and preview.content[:8] == b"\x89PNG\r\n\x1a\n"


def _nifti(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content)


def test_zip_with_two_series_and_a_chosen_series_uid(service):
    server, keys = service
    hippo = shared_path("dicom", "hippocampus_crop_study1")
    other = shared_path("dicom", "mr_brain_study3_export", "11_HCropVolume")
    entries = {f"a/{p.name}": p.read_bytes() for p in hippo.iterdir()}
    entries.update({f"b/{p.name}": p.read_bytes() for p in other.iterdir()})
    chosen = read_image(other).meta["series_uid"]
    with server.client(keys["submit"]) as client:
        upload = [("file", ("study.zip", zip_bytes(entries), "application/zip"))]
        assert_problem(client.post("/v1/jobs", files=upload), 422, "mixed-series")
        response = client.post("/v1/jobs", files=upload, data={"series_uid": chosen, "formats": "seg,report"})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["input"]["series_uid"] == chosen and job["input"]["instances"] == 40
    assert set(job["results"]) == {"seg", "report"}


def test_nifti_upload_gives_a_label_map_on_the_input_grid(service):
    server, keys = service
    path = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    source = nib.load(path)
    with server.client(keys["submit"]) as client:
        response = client.post("/v1/jobs", files=[("file", (path.name, path.read_bytes(), "application/gzip"))])
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "succeeded", job
        assert set(job["results"]) == {"nifti", "report", "preview"}  # no SEG without DICOM
        assert_problem(client.get(f"/v1/jobs/{job['id']}/result/seg"), 404, "not-found")
        nifti = client.get(f"/v1/jobs/{job['id']}/result/nifti").content
    label_map = _nifti(nifti)
    assert label_map.shape == source.shape[:3]
    assert np.allclose(label_map.affine, source.affine, atol=1e-4)


def test_stow_rs_from_a_dicomweb_client_makes_one_job_per_matching_series(service):
    """dicomweb-client stores the MR series and three CT instances: all acknowledged; only the
    MR series (the model's modality) becomes a job. An undecodable part, or an instance without
    UIDs (the anonymised JPEG 2000 CT), is a failed SOP with reason 0xC000 (202)."""
    from dicomweb_client.api import DICOMwebClient

    server, keys = service
    mr = sorted(shared_path("dicom", "hippocampus_crop_study1").iterdir())
    ct = sorted(shared_path("dicom", "dcm_qa_ct_gantry_tilt", "In", "GE").glob("*.dcm"))[:3]
    datasets = [pydicom.dcmread(p) for p in mr + ct]
    stow = DICOMwebClient(f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {keys['submit']}"})
    result = stow.store_instances(datasets)
    assert len(result.ReferencedSOPSequence) == len(datasets)
    assert "FailedSOPSequence" not in result
    no_uids = sorted(shared_path("dicom", "ct_jpeg2000_series").iterdir())[0]
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + ct[0].read_bytes() + b"\r\n"
        b"--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n"
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + no_uids.read_bytes() + b"\r\n--b--\r\n"
    )
    with server.client(keys["submit"]) as client:
        partial = client.post(
            "/dicomweb/studies",
            content=body,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        )
        assert partial.status_code == 202, partial.text
        assert partial.headers["content-type"] == "application/dicom+json"
        failed = partial.json()["00081198"]["Value"]
        assert [item["00081197"]["Value"] for item in failed] == [[0xC000], [0xC000]]
        assert len(partial.json()["00081199"]["Value"]) == 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stowed = [j for j in client.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["source"] == "stow"]
            if stowed and stowed[0]["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
    assert len(stowed) == 1, stowed
    assert stowed[0]["state"] == "succeeded", stowed[0]
    assert stowed[0]["input"]["series_uid"] == datasets[0].SeriesInstanceUID
    assert stowed[0]["input"]["instances"] == len(mr)


def test_cancel_a_running_job_and_delete_a_finished_one(service, dicom_job):
    server, keys = service
    series = shared_path("dicom", "hippocampus_crop_study1")
    with server.client(keys["submit"]) as client:
        slow = client.post("/v1/jobs", files=dicom_files(series), data={"tta": "true"}).json()
        queued = client.post("/v1/jobs", files=dicom_files(series), data={"formats": "report"}).json()
        state = wait_for(client, slow["id"], states=("running", "succeeded"))
        assert state["state"] == "running"
        assert_problem(client.get(f"/v1/jobs/{slow['id']}/result/seg"), 409, "not-ready")
        assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 1
        assert client.delete(f"/v1/jobs/{slow['id']}").status_code == 204
        assert_problem(client.get(f"/v1/jobs/{slow['id']}"), 404, "not-found")
        # the worker drops the cancelled job and goes on with the queue
        assert wait_for(client, queued["id"])["state"] == "succeeded"
        assert not (server.data_dir / "jobs" / slow["id"]).exists()
        assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 204
        assert not (server.data_dir / "jobs" / queued["id"]).exists()
        assert_problem(client.delete(f"/v1/jobs/{queued['id']}"), 404, "not-found")
        # the first job is still there
        assert client.get(f"/v1/jobs/{dicom_job[1]['id']}").json()["state"] == "succeeded"


def test_list_pages_and_filters_by_state(service, dicom_job):
    server, keys = service
    with server.client(keys["admin"]) as client:
        everything = client.get("/v1/jobs", params={"limit": 200}).json()
        assert everything["total"] == len(everything["items"]) >= 1
        first = client.get("/v1/jobs", params={"limit": 1, "offset": 0}).json()
        second = client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
        assert len(first["items"]) == 1 and first["total"] == everything["total"]
        if everything["total"] > 1:
            assert first["items"][0]["id"] != second["items"][0]["id"]
        succeeded = client.get("/v1/jobs", params={"state": "succeeded"}).json()
        assert succeeded["items"] and all(j["state"] == "succeeded" for j in succeeded["items"])
        assert client.get("/v1/jobs", params={"state": "failed"}).json()["total"] == 0


def test_models_health_metrics(service, dicom_job):
    server, keys = service
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and set(ready["checks"].values()) == {"ok"}
    with server.client(keys["read"]) as client:
        models = {model["name"]: model for model in client.get("/v1/models").json()}
        assert {"tiny-hippocampus", "hippocampus"} <= set(models)  # the test's package and the bundled one
        model = models["tiny-hippocampus"]
        assert model["default"] and model["modality"] == ["MR"] and not models["hippocampus"]["default"]
        assert client.get("/metrics").status_code == 403  # every tenant's counts: admin only
    with server.client(keys["admin"]) as client:
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'medseg_jobs{state="succeeded"}' in text
    assert "medseg_job_latency_seconds_count" in text and 'medseg_jobs_submitted_total{source="upload"}' in text


def test_logs_are_json_lines_with_job_ids_and_no_patient_identifiers(service, dicom_job):
    server, _ = service
    job = dicom_job[1]
    source = pydicom.dcmread(next(shared_path("dicom", "hippocampus_crop_study1").iterdir()))
    lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    finished = [e for e in entries if e["msg"] == "job finished" and e.get("job_id") == job["id"]]
    assert finished and finished[0]["timings"]["total_s"] > 0
    text = server.log_path.read_text()
    for identifier in (str(source.get("PatientName") or ""), str(source.get("PatientID") or "")):
        if len(identifier) > 2:
            assert identifier not in text


def test_cors_allows_only_the_configured_origin(service):
    server, _ = service
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(server.url + "/v1/jobs", headers={"Origin": ORIGIN, **preflight})
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(server.url + "/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert other.headers.get("access-control-allow-origin") is None


# --- bounded fuzzing of the OpenAPI schema ------------------------------------------------------
@schemathesis.serializer('multipart/related; type="application/dicom"')
def _stow_body(ctx, value):
    """STOW-RS bodies as generated bytes (schemathesis has no multipart/related serializer)."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def api_schema(service):
    server, keys = service
    document = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {keys['read']}"}).json()
    return schemathesis.openapi.from_dict(document)


def test_fuzzed_requests_never_get_a_server_error(api_schema, service):
    """Every operation, a few generated requests each (schemathesis + hypothesis), with valid keys:
    no 5xx, and every 4xx is problem+json. (Driven directly: schemathesis' pytest fixture loader
    does not work with pytest 9.)"""
    server, keys = service
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9
    seen: list[tuple[str, str, int]] = []
    for operation in operations:
        key = keys["submit"] if operation.method.upper() in ("POST", "DELETE") else keys["read"]

        strategies = [operation.as_strategy(mode) for mode in schemathesis.GenerationMode]
        if operation.path == "/v1/jobs" and operation.method.upper() == "POST":
            strategies = strategies[:1]  # negative multipart bodies cannot be serialised

        @given(case=st.one_of(strategies))
        @settings(
            max_examples=10, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)  # noqa: B023
            seen.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                content_type = {k.lower(): v for k, v in response.headers.items()}["content-type"]
                content_type = content_type[0] if isinstance(content_type, list) else content_type
                assert content_type.startswith("application/problem+json"), (
                    case.method,
                    case.path,
                    response.text[:300],
                )
                assert response.json()["type"].startswith("https://medseg.dev/problems/")

        check()
    assert len({(method, path) for method, path, _ in seen}) == len(operations)
