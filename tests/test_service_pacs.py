"""The service next to a real PACS: Debian's Orthanc with its DICOMweb plugin, on loopback.

The real series is uploaded to Orthanc; once stable, Orthanc forwards it to the service over
STOW-RS (the deployment's Lua script ``deploy/orthanc/forward-to-medseg.lua`` calling Orthanc's
DICOMweb client, with the service's API key); the service groups the instances into a series
after the quiet period, segments it, and pushes the DICOM SEG back to Orthanc over STOW-RS. The
SEG is then read back from Orthanc and checked against the source series.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from tests.conftest import shared_path
from tests.test_service_support import REPO, Server, build_tiny_model, create_key, free_port

ORTHANC = shutil.which("Orthanc")
PLUGIN_DIRS = [Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc")]


def _dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []:
            return path
    return None


@pytest.fixture(scope="module")
def orthanc_and_service(tmp_path_factory):
    if ORTHANC is None or _dicomweb_plugin() is None:
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (apt-get install -y orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("pacs")
    data = root / "service"
    key = create_key(data, "submit", "orthanc")
    admin = create_key(data, "admin", "test")
    orthanc_port = free_port()
    service = Server(
        data,
        build_tiny_model(root / "models"),
        env={
            "MEDSEG_SERVICE_STOW_QUIET_S": "1",
            "MEDSEG_SERVICE_PACS_URL": f"http://127.0.0.1:{orthanc_port}/dicom-web",
        },
    )
    config = {
        "Name": "medseg-test-pacs",
        "StorageDirectory": str(root / "orthanc-db"),
        "IndexDirectory": str(root / "orthanc-db"),
        "HttpPort": orthanc_port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": False,
        "Plugins": [str(_dicomweb_plugin())],
        "LuaScripts": [str(REPO / "deploy" / "orthanc" / "forward-to-medseg.lua")],
        "StableAge": 1,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "medseg": {"Url": f"{service.url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {key}"}}
            },
        },
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    orthanc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    pacs = f"http://127.0.0.1:{orthanc_port}"
    try:
        service.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(pacs + "/system", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if orthanc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Orthanc did not start: " + (root / "orthanc.log").read_text()[-3000:])
            time.sleep(0.2)
        yield pacs, service, admin, root / "orthanc.log"
    finally:
        service.stop()
        orthanc.terminate()
        orthanc.wait(30)


def test_orthanc_forwards_a_study_and_gets_a_seg_back_on_the_source_grid(orthanc_and_service):
    pacs, service, admin, orthanc_log = orthanc_and_service
    series_dir = shared_path("dicom", "hippocampus_crop_study1")
    sources = {}
    for path in sorted(series_dir.iterdir()):
        response = httpx.post(pacs + "/instances", content=path.read_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    series_uid = next(iter(sources.values())).SeriesInstanceUID

    # Orthanc -> service over STOW-RS when the series is stable (Lua script, Orthanc's DICOMweb
    # client, with our key); the service makes one job of the series, segments it and pushes the SEG back
    with service.client(admin) as client:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            jobs = client.get("/v1/jobs").json()["items"]
            if jobs and (
                jobs[0]["state"] == "failed" or (jobs[0].get("push") or {}).get("state") in ("done", "failed")
            ):
                break
            time.sleep(0.3)
        assert len(jobs) == 1, (
            f"jobs: {jobs}\n--- service log ---\n{service.log()}\n"
            f"--- Orthanc log ---\n{orthanc_log.read_text(errors='replace')[-5000:]}"
        )
        job = jobs[0]
        assert job["source"] == "stow" and job["state"] == "succeeded", job
        assert job["input"]["series_uid"] == series_uid and job["input"]["instances"] == len(sources)
        assert job["push"]["state"] == "done", job["push"]
        local_seg = client.get(f"/v1/jobs/{job['id']}/result/seg").content
        # the SEG pushed back is a new stable series in Orthanc: it must not start another job
        time.sleep(4)
        assert client.get("/v1/jobs").json()["total"] == 1

    found = httpx.post(
        pacs + "/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG"}}, timeout=30
    ).json()
    assert len(found) == 1, found
    seg_bytes = httpx.get(f"{pacs}/instances/{found[0]}/file", timeout=60).content
    seg = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert seg_bytes == local_seg or seg.SOPInstanceUID == pydicom.dcmread(io.BytesIO(local_seg)).SOPInstanceUID

    # the SEG references the source series and study, and its frames lie on the source grid
    source = next(iter(sources.values()))
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= set(sources)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source.ImageOrientationPatient],
        atol=1e-4,
    )
    assert np.allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in source.PixelSpacing],
        atol=1e-4,
    )
    assert seg.NumberOfFrames >= 1
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid in sources
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
    labels = {item.SegmentLabel for item in seg.SegmentSequence}
    assert labels <= {"anterior", "posterior"}
