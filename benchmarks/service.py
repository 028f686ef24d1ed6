"""Service throughput and latency: ``medseg serve`` on this machine, the real hippocampus series.

Starts the service (a subprocess on a free loopback port, its own temporary data dir), then
1. latency: uploads the series ``--sequential`` times one after another and measures, per job,
   upload -> 202, upload -> SEG downloadable (job succeeded + GET result/seg 200);
2. throughput: uploads ``--jobs`` copies at once and measures jobs/min from the first upload to
   the last SEG available.

Usage::

    python benchmarks/service.py [--model hippocampus] [--workers 1] [--jobs 8] [--sequential 3]
    python benchmarks/service.py --broker redis://127.0.0.1:6379/0 --workers 2   # scale-out mode

Without ``--model`` the bundled ``hippocampus`` model is used if installed, else an untrained
stand-in with the same architecture and window (``configs/hippocampus/unet.yaml``: network and
validation patch size) - speed does not depend on the weights. The table says which was used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SERIES = (
    Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "dicom" / "hippocampus_crop_study1"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stand_in_model(root: Path) -> str:
    """An untrained package with the bundled hippocampus model's planned architecture and window."""
    import torch
    import yaml

    from medseg.labels import Code, Label
    from medseg.networks import create_network
    from medseg.package import ModelCard, ModelPackage, NetworkSpec

    plan = yaml.safe_load((REPO / "configs" / "hippocampus" / "unet.yaml").read_text())
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, **plan["network"]["config"]}
    torch.manual_seed(0)
    network = create_network(plan["network"]["name"], **config)
    hippocampus = Code(value="5976003", meaning="Hippocampus")
    card = ModelCard(
        name="hippocampus-stand-in",
        network=NetworkSpec(name=plan["network"]["name"], config=config),
        modality=["MR"],
        spacing=(1.0, 1.0, 1.0),
        patch_size=tuple(plan["validation"]["patch_size"]),
        labels=[
            Label(id=1, name="anterior", type=hippocampus),
            Label(id=2, name="posterior", type=hippocampus, color=(0, 0, 255)),
        ],
    )
    ModelPackage.save(root / card.name, card, network.state_dict())
    return card.name


def _files() -> list:
    return [("file", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(SERIES.iterdir())]


def _run_one(client: httpx.Client) -> dict[str, float]:
    start = time.perf_counter()
    response = client.post("/v1/jobs", files=_files())
    response.raise_for_status()
    accepted = time.perf_counter() - start
    job_id = response.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.05)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job failed: {job['error']}")
    seg = client.get(f"/v1/jobs/{job_id}/result/seg")
    seg.raise_for_status()
    return {
        "accepted_s": accepted,
        "seg_s": time.perf_counter() - start,
        "predict_s": job["timings"].get("predict_s", 0.0),
        "write_s": job["timings"].get("write_s", 0.0),
        "end": time.perf_counter(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model name (default: bundled hippocampus, else tiny)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=8, help="jobs submitted at once (throughput)")
    parser.add_argument("--sequential", type=int, default=3, help="jobs one after another (latency)")
    parser.add_argument("--threads", type=int, help="OMP/torch threads for the service")
    parser.add_argument(
        "--broker",
        help="Celery broker URL (e.g. redis://127.0.0.1:6379/0): the API enqueues only and --workers "
        "`medseg worker` processes run the jobs (same data dir and job store)",
    )
    parser.add_argument("--database-url", help="job store URL (default: SQLite in the data dir)")
    args = parser.parse_args()
    if not SERIES.is_dir():
        print(f"real data not available: {SERIES}")
        return 1

    root = Path(tempfile.mkdtemp(prefix="medseg-service-bench-"))
    env = dict(os.environ)
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO))
        from medseg.package import list_models

        model = "hippocampus" if "hippocampus" in list_models() else None
    note = ""
    if model is None:
        model = _stand_in_model(root / "models")
        env["MEDSEG_MODEL_PATH"] = str(root / "models")
        note = (
            " (untrained, same architecture and window as configs/hippocampus/unet.yaml: "
            "the bundled hippocampus model is not installed yet)"
        )
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["MEDSEG_SERVICE_DEFAULT_MODEL"] = model
    sys.path.insert(0, str(REPO))
    from service.auth import create_key
    from service.config import Settings
    from service.store import Store

    data = root / "data"
    data.mkdir(parents=True)
    store = Store(Settings.load({"data_dir": data}, environ={}).db_url)
    key = create_key(store, "submit", "benchmark")[0]
    store.dispose()
    port = _free_port()
    log = open(root / "server.log", "wb")
    shared = ["--data-dir", str(data)] + (["--database-url", args.database_url] if args.database_url else [])
    workers = []
    if args.broker:
        env["MEDSEG_SERVICE_BROKER_URL"] = args.broker
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "medseg", "worker", "--broker", args.broker, "--node-id", f"w{i}", *shared],
                cwd=REPO,
                env=env,
                stdout=open(root / f"worker{i}.log", "wb"),
                stderr=subprocess.STDOUT,
            )
            for i in range(args.workers)
        ]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medseg",
            "serve",
            "--port",
            str(port),
            *shared,
            "--workers",
            "0" if args.broker else str(args.workers),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        _run_one(client)  # warm-up: model load, first-call overheads
        sequential = [_run_one(client) for _ in range(args.sequential)]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            batch = list(
                pool.map(
                    lambda _: _run_one(
                        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
                    ),
                    range(args.jobs),
                )
            )
        span = max(r["end"] for r in batch) - start
    finally:
        for process in [server, *workers]:
            process.send_signal(signal.SIGTERM)
        for process in [server, *workers]:
            process.wait(60)
        shutil.rmtree(root, ignore_errors=True)

    cpu = f"{os.cpu_count()} CPU cores (load {os.getloadavg()[0]:.1f})"
    print(f"medseg service benchmark: {SERIES.name} (32 DICOM slices, 35x51x32), model {model}{note}")
    mode = f"Celery workers (broker {args.broker})" if args.broker else "in-process worker thread(s)"
    print(f"{cpu}, {args.workers} {mode}\n")
    median = statistics.median
    print("| measure | value |\n|---|---|")
    print(
        f"| upload -> 202 accepted (median of {len(sequential)}) | {median(r['accepted_s'] for r in sequential):.2f} s |"  # noqa: E501
    )
    print(
        f"| upload -> SEG available, idle service (median of {len(sequential)}) | {median(r['seg_s'] for r in sequential):.2f} s |"  # noqa: E501
    )
    print(
        f"| of which predict / write outputs (median) | {median(r['predict_s'] for r in sequential):.2f} s / {median(r['write_s'] for r in sequential):.2f} s |"  # noqa: E501
    )
    print(f"| throughput, {args.jobs} jobs submitted at once | {args.jobs / span * 60:.1f} jobs/min |")
    print(
        f"| upload -> SEG available under that load (median / max) | {median(r['seg_s'] for r in batch):.2f} s / {max(r['seg_s'] for r in batch):.2f} s |"  # noqa: E501
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
