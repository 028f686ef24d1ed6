"""``docker-compose.yml`` checked without Docker images (none can be pulled here).

- ``docker-compose config`` (Debian's docker-compose, installed by ``.ci/run``) validates the file
  against the Compose schema, anchors and variable substitution included.
- The two medseg services run as the file declares them: the API replica with the image's
  entry point (``Dockerfile``) and the worker with its ``entrypoint``, each with the file's
  environment (the ``x-medseg-env`` anchor merged with its own), against a real PostgreSQL and a
  real Redis started on loopback ports (the fixtures of :mod:`tests.test_service_scale_out`).
  Host names, the data volume and the published port are mapped onto those; nothing else is
  changed. Their health checks, run verbatim, pass; a real DICOM series submitted to the API is
  segmented by the worker, and its SEG references the series.

Skips, saying why, without docker-compose, redis-server, PostgreSQL or the shared data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.conftest import shared_path
from tests.test_service_scale_out import (  # noqa: F401  (pytest fixtures)
    _fresh_database,
    _wait,
    postgres_url,
    redis_url,
)
from tests.test_service_support import REPO, dicom_files, free_port

COMPOSE = REPO / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_validates_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    run = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    services = _compose()["services"]
    assert {"medseg", "medseg-worker", "redis", "postgres", "orthanc"} <= set(services)
    for name in ("medseg", "medseg-worker", "redis", "postgres", "orthanc"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name in ("medseg", "medseg-worker"):
        assert "medseg-data:/data" in services[name]["volumes"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def _environment(service: dict, mapping: dict[str, str]) -> dict[str, str]:
    """The service's environment as Compose computes it (anchors are merged by the YAML loader),
    with ``mapping``'s values substituted into it."""
    env = {}
    for name, value in service["environment"].items():
        value = str(value)
        for old, new in mapping.items():
            value = value.replace(old, new)
        env[name] = value
    return env


def _health_check(service: dict, mapping: dict[str, str]) -> subprocess.CompletedProcess:
    test = list(service["healthcheck"]["test"])
    assert test[0] == "CMD", test
    command = [part.replace("python", sys.executable, 1) if i == 0 else part for i, part in enumerate(test[1:])]
    for old, new in mapping.items():
        command = [part.replace(old, new) for part in command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def _entrypoint() -> list[str]:
    """The Dockerfile's ``ENTRYPOINT`` (exec form)."""
    import json

    line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    return json.loads(line.split(None, 1)[1])


def test_compose_medseg_services_run_as_declared(redis_url, postgres_url, tmp_path):  # noqa: F811
    import pydicom

    from service.auth import create_key
    from service.store import Store

    series = shared_path("dicom", "hippocampus_crop_study1")
    services = _compose()["services"]
    api, worker = services["medseg"], services["medseg-worker"]
    data = tmp_path / "data"
    data.mkdir()
    database = _fresh_database(postgres_url, "compose")
    port = free_port()
    health_file = tmp_path / "medseg-worker.alive"
    mapping = {  # compose host names, volume and port -> this machine's
        "postgresql+psycopg://medseg:medseg@postgres:5432/medseg": database,
        "redis://redis:6379/0": redis_url,
        "/tmp/medseg-worker.alive": str(health_file),
        "http://127.0.0.1:8000/": f"http://127.0.0.1:{port}/",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_SERVICE_")}
    base["OMP_NUM_THREADS"] = "1"
    api_env = {**base, **_environment(api, mapping), "MEDSEG_SERVICE_DATA_DIR": str(data)}
    worker_env = {**base, **_environment(worker, mapping), "MEDSEG_SERVICE_DATA_DIR": str(data)}
    for env in (api_env, worker_env):  # no Orthanc here (tests/test_service_pacs.py has one)
        env.pop("MEDSEG_SERVICE_PACS_URL")
        env.pop("MEDSEG_SERVICE_PACS_HEADERS")
    assert api_env["MEDSEG_SERVICE_WORKERS"] == "0" and api_env["MEDSEG_SERVICE_DEFAULT_MODEL"] == "hippocampus"

    entry = _entrypoint()  # medseg serve --host 0.0.0.0 --public --port 8000
    assert entry[:2] == ["medseg", "serve"] and entry[-2:] == ["--port", "8000"]
    serve = [sys.executable, "-m", "medseg", "serve", "--host", "127.0.0.1", "--port", str(port)]
    work = [sys.executable, "-m", *worker["entrypoint"]]
    assert worker["entrypoint"] == ["medseg", "worker"]
    logs = [open(tmp_path / f"{name}.log", "ab") for name in ("api", "worker")]
    processes = [
        subprocess.Popen(serve, cwd=REPO, env=api_env, stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen(work, cwd=REPO, env=worker_env, stdout=logs[1], stderr=subprocess.STDOUT),
    ]

    def logs_text() -> str:
        return "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("api", "worker"))

    try:
        _wait(lambda: _health_check(api, mapping).returncode == 0, 120, "the API's health check\n" + logs_text())
        _wait(lambda: _health_check(worker, mapping).returncode == 0, 120, "the worker's health check")
        store = Store(database)
        key = create_key(store, "submit", "compose")[0]
        store.dispose()
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        response = httpx.post(url + "/v1/jobs", files=dicom_files(series), headers=headers, timeout=60)
        assert response.status_code == 202, response.text
        job_url = f"{url}/v1/jobs/{response.json()['id']}"
        job = _wait(
            lambda: (
                (j := httpx.get(job_url, headers=headers, timeout=30).json())["state"] in ("succeeded", "failed") and j
            ),
            180,
            "the job to finish",
        )
        assert job["state"] == "succeeded", job
        link = job["results"]["seg"]  # relative to the API unless a public base URL is set
        seg = httpx.get(link if link.startswith("http") else url + link, headers=headers, timeout=30)
        assert seg.status_code == 200, seg.text
        path = tmp_path / "result.seg.dcm"
        path.write_bytes(seg.content)
        source_uid = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
        assert pydicom.dcmread(path).ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
