"""An upload is checked from its headers; its pixels are decoded once, by the worker.

The service runs in this process (``create_app`` with no worker threads, FastAPI's test client),
so the pixel readers can be spied on: ``POST /v1/jobs`` of a real DICOM series and a real NIfTI
file decodes no pixel, running the job decodes each instance once, and a series whose headers
are fine but whose pixels cannot be decoded is accepted and then fails its job with the reader's
reason (never a crashed worker).
"""

from __future__ import annotations

import io
from collections import Counter

import pydicom
import pytest

from tests.conftest import shared_path
from tests.test_service_support import TINY_MODEL, build_tiny_model, create_key, dicom_files


@pytest.fixture
def app_client(tmp_path, monkeypatch):
    """(test client with a submit key, app state) of an in-process service without workers."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    models = build_tiny_model(tmp_path / "models")
    monkeypatch.setenv("MEDSEG_MODEL_PATH", str(models))
    data = tmp_path / "data"
    key = create_key(data, "submit", "tester")
    settings = Settings.load({"data_dir": data, "workers": 0, "default_model": TINY_MODEL}, environ={})
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, app.state


@pytest.fixture
def pixel_reads(monkeypatch):
    """Counts of every way :mod:`medseg.io` decodes pixels: ``SeriesInfo.read`` (each series read),
    ``decode_pixels`` (each DICOM instance), nibabel's ``ArrayProxy`` (NIfTI voxels) and
    SimpleITK's ``ImageFileReader.Execute`` (NRRD / MetaImage voxels)."""
    import nibabel.arrayproxy
    import SimpleITK as sitk

    import medseg.io.dicom_volume as dicom_volume
    from medseg.io.series_info import SeriesInfo

    counts: Counter = Counter()

    def spy(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(SeriesInfo, "read", spy("series", SeriesInfo.read))
    monkeypatch.setattr(dicom_volume, "decode_pixels", spy("dicom", dicom_volume.decode_pixels))
    proxy = nibabel.arrayproxy.ArrayProxy
    monkeypatch.setattr(proxy, "__array__", spy("nifti", proxy.__array__))
    monkeypatch.setattr(proxy, "get_unscaled", spy("nifti", proxy.get_unscaled))
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", spy("itk", sitk.ImageFileReader.Execute))
    return counts


def _run(state, job_id: str):
    """Run one queued job the way a worker does; returns its row afterwards."""
    from service.pipeline import PredictorCache

    job = state.store.claim(job_id, state.settings.node_id, state.settings.lease_s)
    assert job is not None
    state.pool.run_claimed(job, PredictorCache("cpu"))
    return state.store.get_job(job_id)


def test_upload_reads_headers_only_and_the_worker_decodes_each_instance_once(app_client, pixel_reads):
    client, state = app_client
    series = shared_path("dicom", "hippocampus_crop_study1")
    volume = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")

    response = client.post("/v1/jobs", files=dicom_files(series), data={"formats": "seg,report"})
    assert response.status_code == 202, response.text
    nifti = client.post("/v1/jobs", files=[("file", ("case.nii.gz", volume.read_bytes(), "application/gzip"))])
    assert nifti.status_code == 202, nifti.text
    assert sum(pixel_reads.values()) == 0, pixel_reads  # validated from the headers alone

    submitted = response.json()
    assert submitted["input"]["instances"] == 32 and submitted["input"]["modality"] == "MR"
    assert submitted["input"]["shape"] == [35, 51, 32] and submitted["input"]["spacing"] == [1.0, 1.0, 1.0]
    assert submitted["options"] == {"tta": False, "overlap": None, "formats": ["seg", "report"]}

    job = _run(state, submitted["id"])
    assert job.state == "succeeded", job.error
    assert pixel_reads == Counter({"series": 1, "dicom": 32})  # once, in the worker
    shown = client.get(f"/v1/jobs/{job.id}").json()
    assert set(shown["results"]) == {"seg", "report"}
    assert {s["name"] for s in shown["statistics"]} == {"anterior", "posterior"}
    assert shown["timings"]["read_s"] >= 0 and shown["timings"]["validate_s"] >= 0


def test_pixels_that_cannot_be_decoded_fail_the_job_with_the_reason(app_client, pixel_reads):
    """Headers intact, pixel data shorter than Rows x Columns (the file as long as it says):
    accepted at upload, then the job fails with ``unreadable-file`` naming the file."""
    client, state = app_client
    files = sorted(shared_path("dicom", "hippocampus_crop_study1").iterdir())
    broken = pydicom.dcmread(files[7])
    broken.PixelData = broken.PixelData[:100]
    buffer = io.BytesIO()
    broken.save_as(buffer, enforce_file_format=True)
    parts = [("file", (p.name, p.read_bytes(), "application/dicom")) for p in files]
    parts[7] = ("file", (files[7].name, buffer.getvalue(), "application/dicom"))

    response = client.post("/v1/jobs", files=parts)
    assert response.status_code == 202, response.text
    assert sum(pixel_reads.values()) == 0

    job = _run(state, response.json()["id"])
    assert job.state == "failed"
    shown = client.get(f"/v1/jobs/{job.id}").json()
    assert shown["error"]["type"].endswith("/unreadable-file"), shown["error"]
    # the service's name of the part (uploaded parts are saved as 00000.dcm, 00001.dcm...)
    assert "00007.dcm" in shown["error"]["detail"] and "pixel data" in shown["error"]["detail"], shown["error"]
    assert shown["results"] == {}


def test_a_truncated_instance_is_still_refused_at_upload_from_its_header(app_client, pixel_reads):
    """A file shorter than its pixel data element declares: 422 at upload, no pixel decoded."""
    client, _ = app_client
    files = sorted(shared_path("dicom", "hippocampus_crop_study1").iterdir())
    parts = dicom_files(files[0].parent)
    data = files[5].read_bytes()
    parts[5] = ("file", (files[5].name, data[: len(data) - 200], "application/dicom"))
    response = client.post("/v1/jobs", files=parts)
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/unreadable-file")
    assert "00005.dcm: truncated" in response.json()["detail"], response.json()
    assert sum(pixel_reads.values()) == 0
