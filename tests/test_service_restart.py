"""Jobs survive a crash: SIGKILL ``medseg serve`` while a job runs, start it again on the same
data dir; the interrupted job and the queued one complete, finished results stay downloadable.
Then automatic retention clean-up deletes results of old jobs. Each test makes the jobs it needs in
its own data dir, so each passes alone and in any order."""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.conftest import shared_path
from tests.test_service_support import Server, assert_problem, build_tiny_model, create_key, dicom_files, wait_for


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-restart")
    models = build_tiny_model(root / "models")
    data = root / "data"
    return data, models, create_key(data, "submit")


def test_sigkill_while_running_then_restart_completes_the_job(setup):
    data, models, key = setup
    series = shared_path("dicom", "hippocampus_crop_study1")
    first = Server(data, models).start()
    try:
        with first.client(key) as client:
            done = wait_for(client, client.post("/v1/jobs", files=dicom_files(series)).json()["id"])
            assert done["state"] == "succeeded"
            done_seg = hashlib.sha256(client.get(f"/v1/jobs/{done['id']}/result/seg").content).hexdigest()
            # mirroring TTA (8 passes) keeps the job running long enough to be killed mid-way
            slow = client.post("/v1/jobs", files=dicom_files(series), data={"tta": "true"}).json()
            queued = client.post("/v1/jobs", files=dicom_files(series), data={"formats": "nifti,report"}).json()
            running = wait_for(client, slow["id"], states=("running", "succeeded", "failed"))
            assert running["state"] == "running", running
            assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 1
    finally:
        first.kill()  # SIGKILL: no shut-down code runs; the store says "running"

    second = Server(data, models).start()
    try:
        with second.client(key) as client:
            resumed = wait_for(client, slow["id"])
            assert resumed["state"] == "succeeded", resumed
            assert resumed["attempts"] == 2  # it was interrupted once and run again
            assert set(resumed["results"]) == {"seg", "nifti", "report", "preview"}
            assert client.get(f"/v1/jobs/{slow['id']}/result/seg").status_code == 200
            later = wait_for(client, queued["id"])
            assert later["state"] == "succeeded" and set(later["results"]) == {"nifti", "report"}
            # the job finished before the crash is unchanged and its results still download
            again = client.get(f"/v1/jobs/{done['id']}").json()
            assert again["state"] == "succeeded" and again["finished_at"] == done["finished_at"]
            seg = client.get(f"/v1/jobs/{done['id']}/result/seg").content
            assert hashlib.sha256(seg).hexdigest() == done_seg
            listed = client.get("/v1/jobs", params={"state": "succeeded"}).json()
            assert listed["total"] == 3
    finally:
        second.stop()
    assert not any((data / "jobs").glob("*/output.partial"))


@pytest.fixture
def finished_jobs(setup, tmp_path):
    """Two jobs finished by a server with the default retention, in a data dir of their own."""
    _, models, _ = setup
    data = tmp_path / "data"
    key = create_key(data, "submit")
    series = shared_path("dicom", "hippocampus_crop_study1")
    server = Server(data, models).start()
    try:
        with server.client(key) as client:
            ids = [
                client.post("/v1/jobs", files=dicom_files(series), data={"formats": formats}).json()["id"]
                for formats in ("seg,nifti,report,preview", "nifti,report")
            ]
            jobs = [wait_for(client, job_id) for job_id in ids]
    finally:
        server.stop()
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded"], jobs
    assert len(list((data / "jobs").iterdir())) == len(jobs)
    return data, models, key, jobs


def test_retention_removes_old_results_automatically(finished_jobs):
    data, models, key, jobs = finished_jobs
    server = Server(data, models, env={"MEDSEG_SERVICE_RETENTION_S": "1"}).start()
    try:
        with server.client(key) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                page = client.get("/v1/jobs").json()
                if page["items"] and all(j["state"] == "expired" for j in page["items"]):
                    break
                time.sleep(0.3)
            assert page["total"] == len(jobs) and all(j["state"] == "expired" for j in page["items"]), page
            assert {j["id"] for j in page["items"]} == {j["id"] for j in jobs}
            job = page["items"][0]
            assert job["results"] == {}
            assert_problem(client.get(f"/v1/jobs/{job['id']}/result/nifti"), 410, "gone")
        assert not any((data / "jobs").iterdir())
    finally:
        server.stop()
