"""The times the README quotes, measured: ``python benchmarks/readme_times.py [--repeat N]``.

From the repository root, as a user pasting the README would run them (the installed ``medseg``
command, default settings, no thread limits):

- ``medseg --help`` and ``medseg predict --help`` (start-up of the CLI);
- the main job, ``medseg predict medseg/samples/hippocampus_mr --model hippocampus --output <tmp>``,
  first with an empty model cache (``$MEDSEG_CACHE``: the converted OpenVINO model is built once,
  as on a fresh machine), then with the cache filled;
- the Quickstart's serve example: ``medseg serve`` start -> ``/readyz`` ready, then for each job
  upload (all 35 files of the sample, as the README's curl does) -> 202, upload -> job
  ``succeeded``, upload -> SEG downloaded; the first job after start-up (what the README's
  block does) and later ones on the warm server.

Prints the machine (CPU model and cores from /proc/cpuinfo, ``os.cpu_count()``, the cores this
process may use, load average, versions) and one table; ``--json`` prints the same as JSON.
Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "medseg" / "samples" / "hippocampus_mr"
MEDSEG = shutil.which("medseg", path=str(Path(sys.executable).parent)) or shutil.which("medseg")


def machine() -> dict:
    """What the figures were measured on (:func:`machine.describe`)."""
    return describe(("torch", "monai", "openvino", "fastapi", "uvicorn"))


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_times(env: dict[str, str], work: Path, jobs: int) -> dict:
    """Start ``medseg serve`` as the README does, then upload the sample ``jobs`` times, one after another."""
    import httpx

    data = work / "medseg-data"
    key = subprocess.run(
        [MEDSEG, "keys", "create", "--role", "submit", "--data-dir", str(data)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "wb")
    started = time.perf_counter()
    server = subprocess.Popen(
        [MEDSEG, "serve", "--data-dir", str(data), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"medseg serve exited with {server.returncode}: see {work / 'serve.log'}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 300:
                raise RuntimeError("medseg serve not ready after 300 s")
            time.sleep(0.1)
        ready = time.perf_counter() - started
        files = [("file", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(SAMPLE.glob("*.dcm"))]
        rows = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            for _ in range(jobs):
                t0 = time.perf_counter()
                response = client.post("/v1/jobs", files=files, data={"model": "hippocampus"})
                accepted = time.perf_counter() - t0
                response.raise_for_status()
                job_id = response.json()["id"]
                while True:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    if job["state"] in ("succeeded", "failed"):
                        break
                    time.sleep(0.05)
                done = time.perf_counter() - t0
                if job["state"] != "succeeded":
                    raise RuntimeError(f"job {job_id} failed: {job.get('error')}")
                seg = client.get(f"/v1/jobs/{job_id}/result/seg")
                seg.raise_for_status()
                rows.append(
                    {
                        "upload_to_202_s": accepted,
                        "upload_to_succeeded_s": done,
                        "upload_to_seg_s": time.perf_counter() - t0,
                        "seg_bytes": len(seg.content),
                    }
                )
        return {"start_to_ready_s": ready, "jobs": rows}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def measure(repeat: int, jobs: int) -> dict:
    if MEDSEG is None:
        raise SystemExit("the medseg command is not installed (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="medseg-readme-times-") as tmp:
        work = Path(tmp)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MEDSEG_SERVICE_") and k not in ("MEDSEG_MODEL_PATH", "OMP_NUM_THREADS")
        }
        env["MEDSEG_CACHE"] = str(work / "cache")  # empty: the first predict builds the converted model
        results: dict = {"machine": machine(), "repeat": repeat}
        results["help_s"] = [timed([MEDSEG, "--help"], env) for _ in range(repeat)]
        results["predict_help_s"] = [timed([MEDSEG, "predict", "--help"], env) for _ in range(repeat)]
        predict = [MEDSEG, "predict", str(SAMPLE), "--model", "hippocampus", "--output"]
        results["predict_cold_cache_s"] = timed([*predict, str(work / "out-cold")], env)
        results["predict_s"] = [timed([*predict, str(work / f"out-{i}")], env) for i in range(repeat)]
        results["serve"] = serve_times(env, work, jobs)
        results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        return results


def table(results: dict) -> str:
    m = results["machine"]
    median = statistics.median
    lines = [
        f"machine: {m['cpu']}; {m['logical_cpus_in_cpuinfo']} logical CPUs in /proc/cpuinfo "
        f"({m['physical_cores_in_cpuinfo']} physical cores), os.cpu_count() = {m['os_cpu_count']}, "
        f"usable by this process: {m['usable_cpus']}; {m['memory_gib']} GiB; load average before "
        f"{m['load_average_before']}, after {m['load_average_after']}",
        f"software: Python {m['python']}, {m['system']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
        f"{'what':<58}{'median':>9}{'min':>9}{'max':>9}{'n':>4}",
    ]

    def row(name: str, values: list[float]) -> None:
        lines.append(f"{name:<58}{median(values):>8.2f}s{min(values):>8.2f}s{max(values):>8.2f}s{len(values):>4}")

    row("medseg --help", results["help_s"])
    row("medseg predict --help", results["predict_help_s"])
    row("main job: medseg predict (empty model cache)", [results["predict_cold_cache_s"]])
    row("main job: medseg predict (model cache filled)", results["predict_s"])
    serve = results["serve"]
    jobs = serve["jobs"]
    row("medseg serve: start -> /readyz ready", [serve["start_to_ready_s"]])
    row("first job: upload -> 202", [jobs[0]["upload_to_202_s"]])
    row("first job: upload -> succeeded", [jobs[0]["upload_to_succeeded_s"]])
    row("first job: upload -> SEG downloaded", [jobs[0]["upload_to_seg_s"]])
    if len(jobs) > 1:
        row("later jobs (warm server): upload -> 202", [j["upload_to_202_s"] for j in jobs[1:]])
        row("later jobs (warm server): upload -> SEG downloaded", [j["upload_to_seg_s"] for j in jobs[1:]])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each CLI command (default 3)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs sent one after another to the server (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    results = measure(max(1, args.repeat), max(1, args.jobs))
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
