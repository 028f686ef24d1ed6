"""The service-hardening figures: a hostile tenant and a busy PACS against a real ``medseg serve``.

Starts the service with an untrained 3-class 3D U-Net (the tests' ``tiny-hippocampus``: MR, 1 mm,
32^3 patch, no declared field of view, so a long real volume fits it; a subprocess on a free
loopback port, its own temporary data dir) and prints one table:

- file reads through headers: MetaImage/NRRD headers naming a server file, or ``../``, or LIST,
  and a NIfTI pair header -> every one refused (status, problem type), the secret never returned;
- 5xx count over every hostile / malformed request sent here;
- DELETE of a running job (real aorta angiography at overlap 0.9, ~31,000 windows) -> seconds
  until the next queued job starts on the single worker;
- three concurrent 64-byte ``.nii.gz`` uploads claiming 1000 x 1000 x 400 float32 -> the
  server's peak RSS rise (VmHWM after resetting it through ``/proc/<pid>/clear_refs``);
- 50 concurrent valid uploads -> how many got 202.

Usage::

    python benchmarks/service_hardening.py
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))

from tests.test_service_support import Server, build_tiny_model, create_key, zip_bytes  # noqa: E402


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _lying_nifti() -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 400))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + bytes(4))


def _hostile(secret: Path) -> list[tuple[str, str, bytes]]:
    import nibabel as nib

    mha = "ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_UCHAR\nElementDataFile = {}\n"
    nhdr = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nencoding: raw\ndata file: {}\n\n"
    pair = nib.Nifti1Pair(np.zeros((8, 8, 8), np.float32), np.eye(4)).header.binaryblock
    return [
        ("mha -> absolute path", "a.mha", mha.format(secret).encode()),
        ("mhd -> ../../jobs.sqlite", "a.mhd", mha.format("../../jobs.sqlite").encode()),
        ("mha -> LIST", "a.mha", (mha.format("LIST") + f"{secret}\n").encode()),
        ("nhdr -> absolute path", "a.nhdr", nhdr.format(secret).encode()),
        ("nrrd -> ../../jobs.sqlite", "a.nrrd", nhdr.format("../../jobs.sqlite").encode()),
        ("zip of mhd -> absolute path", "a.zip", zip_bytes({"a.mhd": mha.format(secret).encode()})),
        ("NIfTI pair header (ni1)", "a.nii", pair + bytes(2048)),
    ]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="medseg-hardening-"))
    data = root / "data"
    key = create_key(data, "submit", "bench")
    secret = root / "secret.raw"
    secret.write_bytes(b"SECRET-" * 1000)
    server = Server(data, build_tiny_model(root / "models")).start()
    rows: list[tuple[str, str]] = []
    statuses: list[int] = []
    try:
        with server.client(key, timeout=300) as client:
            refused = []
            for name, filename, content in _hostile(secret):
                response = client.post("/v1/jobs", files=[("file", (filename, content, "x"))])
                statuses.append(response.status_code)
                leaked = b"SECRET" in response.content or str(root).encode() in response.content
                refused.append(response.status_code == 422 and not leaked)
                rows.append(
                    (
                        f"read through header: {name}",
                        f"{response.status_code} {response.json().get('type', '').rsplit('/', 1)[-1]}",
                    )
                )
            rows.append(("header reads refused, nothing leaked", f"{sum(refused)} / {len(refused)}"))

            for name, data_fields in [
                ("overlap 0.99", {"overlap": "0.99"}),
                ("model=../models/tiny-hippocampus", {"model": "../models/tiny-hippocampus"}),
            ]:
                case = DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
                response = client.post(
                    "/v1/jobs", data=data_fields, files=[("file", ("c.nii.gz", case.read_bytes(), "application/gzip"))]
                )
                statuses.append(response.status_code)
                rows.append((name, str(response.status_code)))
            response = client.post(
                "/v1/jobs", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data; boundary=" + "b" * 300}
            )
            statuses.append(response.status_code)
            rows.append(("300-character multipart boundary", str(response.status_code)))

            pid = server.process.pid
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            idle = _rss_kib(pid, "VmRSS")
            liar = _lying_nifti()

            def lie(_):
                with server.client(key, timeout=300) as c:
                    return c.post("/v1/jobs", files=[("file", ("l.nii.gz", liar, "x"))]).status_code

            with ThreadPoolExecutor(3) as pool:
                lies = list(pool.map(lie, range(3)))
            statuses += lies
            rise = (_rss_kib(pid, "VmHWM") - idle) / 1024
            rows.append(("3 concurrent lying headers (1.6 GB each): statuses", " ".join(map(str, lies))))
            rows.append(("  peak RSS rise during them", f"{rise:.0f} MB"))

            aorta = DATA / "vessels" / "aorta_angiography" / "aorta.mha"
            long = client.post(
                "/v1/jobs",
                data={"overlap": "0.9", "formats": "report"},
                files=[("file", ("aorta.mha", aorta.read_bytes(), "x"))],
            )
            long_id = long.json()["id"]
            while client.get(f"/v1/jobs/{long_id}").json()["progress"] <= 0:
                time.sleep(0.1)
            case = DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
            short = client.post(
                "/v1/jobs",
                data={"formats": "report"},
                files=[("file", ("c.nii.gz", case.read_bytes(), "application/gzip"))],
            ).json()["id"]
            client.delete(f"/v1/jobs/{long_id}")
            deleted = time.time()
            while (job := client.get(f"/v1/jobs/{short}").json())["started_at"] is None:
                time.sleep(0.05)
            started = datetime.fromisoformat(job["started_at"]).timestamp()
            rows.append(("DELETE running job -> next job starts", f"{started - deleted:.2f} s"))

        def upload(_):
            with server.client(key, timeout=300) as c:
                return c.post(
                    "/v1/jobs",
                    data={"formats": "report"},
                    files=[("file", ("c.nii.gz", case.read_bytes(), "application/gzip"))],
                ).status_code

        barrier = threading.Barrier(50)

        def synchronised(i):
            barrier.wait()
            return upload(i)

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(synchronised, range(50)))
        statuses += results
        rows.append(("50 concurrent uploads -> 202", f"{results.count(202)} / 50"))
        rows.append(("5xx responses over all requests above", str(sum(s >= 500 for s in statuses))))
    finally:
        server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
