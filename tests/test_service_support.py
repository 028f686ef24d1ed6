"""Helpers for the service tests (no tests here): a tiny model package, keys, and a real
``medseg serve`` subprocess on a free loopback port, spoken to over real HTTP (httpx)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny-hippocampus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_model(root: Path, name: str = TINY_MODEL) -> Path:
    """An untrained 3-class 3D U-Net package with the hippocampus label card (MR, 1 mm)."""
    import torch

    from medseg.labels import Code, Label
    from medseg.networks import create_network
    from medseg.package import ModelCard, ModelPackage, NetworkSpec

    # deep_supervision=1: unet.py fails with 0 on MONAI 1.6.1 (DynUNet has no heads to delete)
    config = dict(
        spatial_dims=3, in_channels=1, out_channels=3, filters=(8, 16, 32), strides=(1, 2, 2), deep_supervision=1
    )
    torch.manual_seed(0)
    network = create_network("unet", **config)
    hippocampus = Code(value="5976003", meaning="Hippocampus")
    card = ModelCard(
        name=name,
        description="tiny untrained test model",
        network=NetworkSpec(name="unet", config=config),
        modality=["MR"],
        spacing=(1.0, 1.0, 1.0),
        patch_size=(32, 32, 32),
        labels=[
            Label(id=1, name="anterior", type=hippocampus, color=(255, 0, 0)),
            Label(id=2, name="posterior", type=hippocampus, color=(0, 0, 255)),
        ],
    )
    ModelPackage.save(root / name, card, network.state_dict())
    return root


def create_key(data_dir: Path, role: str, name: str = "") -> str:
    """A key in the service's store (in-process, as ``medseg keys create`` does)."""
    from service.auth import create_key as make
    from service.config import Settings
    from service.store import Store

    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(Settings.load({"data_dir": data_dir}, environ={}).db_url)
    try:
        return make(store, role, name)[0]
    finally:
        store.dispose()


class Server:
    """``medseg serve`` as a subprocess; ``client(key)`` gives an httpx client for it."""

    def __init__(
        self,
        data_dir: Path,
        model_path: Path,
        env: dict[str, str] | None = None,
        workers: int = 1,
        args: tuple[str, ...] = (),
    ):
        self.data_dir, self.model_path = data_dir, model_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "MEDSEG_MODEL_PATH": str(model_path),
            "MEDSEG_SERVICE_DEFAULT_MODEL": TINY_MODEL,
            "MEDSEG_SERVICE_MAINTENANCE_INTERVAL_S": "0.5",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.workers, self.args = workers, args
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 120.0) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medseg",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--workers",
                str(self.workers),
                *self.args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"medseg serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"medseg serve not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def dicom_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``file`` parts for every file of a DICOM folder."""
    return [("file", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(folder.iterdir())]


def zip_bytes(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def wait_for(client: httpx.Client, job_id: str, states=("succeeded", "failed"), timeout: float = 300.0) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        job = response.json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    """The response is RFC 9457 problem+json with this status and type."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == f"https://medseg.dev/problems/{code}", body
    assert body["status"] == status and body["title"] and body["detail"]
    return body
