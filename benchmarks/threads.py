"""Thread and runtime settings on a shared CPU: ``python benchmarks/threads.py [--cases N]``.

Seconds per case of the bundled ``hippocampus`` model (:class:`medseg.inference.Predictor`, first
``--cases`` images of ``../shared/data/hippocampus/imagesTr`` sorted, read with
:func:`medseg.io.read_image` before timing; one warm-up case first, which also compiles the
OpenVINO model) for each configuration:

- runtime ``eager`` and ``openvino`` (``--runtimes eager,openvino,channels_last`` adds the
  channels-last runtime);
- PyTorch threads 1 and 2 (``Predictor(threads=...)``; the ``openvino`` runtime passes the same
  count to OpenVINO as ``INFERENCE_NUM_THREADS``);
- ``OMP_WAIT_POLICY`` unset, ``PASSIVE`` or ``ACTIVE`` (at 1 thread only unset: no OpenMP team
  is formed, nothing waits; ``--full`` runs all three there too, which confirmed it): PyTorch's
  OpenMP runtime (GNU libgomp) reads it once at start-up, so each configuration runs in a fresh
  subprocess. OpenVINO's CPU plugin schedules with oneTBB, not OpenMP: the policy can reach it
  only through PyTorch code in the same process (a Predictor on a shipped OpenVINO model loads
  no PyTorch at all: the "PyTorch / OpenMP loaded" column says, from ``sys.modules`` and
  ``/proc/self/maps``). The "net" column times the network call alone (one window through the
  runtime) to tell the network from the steps around it;
- OpenVINO's own knobs (``--no-openvino-knobs`` skips them), each on top of 2 threads and
  ``OMP_WAIT_POLICY=PASSIVE``: ``ENABLE_CPU_PINNING`` off (on by default on Linux), window
  batching (``sw_batch_size`` 4: one OpenVINO call per 4 windows, a batch-4 model converted once
  into ``$MEDSEG_CACHE`` by an untimed run first). Compile-time properties are passed by
  wrapping the runtime's ``ov.Core`` in the worker (the benchmark's own patch; medseg passes
  none of them).

under two conditions: **quiet** (nothing else of this script's running) and **contended** (a
competing CPU-bound process started by this script for the whole block: a Python busy loop, or
``--competitor eager``: a second eager PyTorch run of the same network at default threads, no
pinning). Whatever else runs on the machine (e.g. a training run) is shown by the load average
before and after in the header; it is not stopped.

Columns: min and median seconds per case (wall, end to end ``Predictor.predict``), CPU seconds
the process used per case (user + system, all its threads: spin-waiting shows up here), and the
median seconds of one network call. Prints one markdown table; ``--json`` prints the raw results.
About 5-6 minutes at the defaults on a 2-core machine with one core busy, 7-8 with ``--full``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hippocampus" / "imagesTr"
POLICIES = ("unset", "PASSIVE", "ACTIVE")
#: how many single-window network calls the "net" column times (after one untimed call)
NET_CALLS = 5

BUSY_LOOP = "while True:\n    pass\n"
EAGER_LOOP = """
import torch
from medseg.inference import Predictor
p = Predictor("hippocampus", runtime="eager")
x = torch.randn(1, 1, *p.card.patch_size)
with torch.inference_mode():
    while True:
        p.runtimes[0](x)
"""


# ------------------------------------------------------------------------------------------
# worker: one configuration, in a fresh process (OMP_WAIT_POLICY is set by the parent)


class _CoreWithConfig:
    """``ov.Core`` whose ``compile_model`` adds ``extra`` to the config medseg passes."""

    def __init__(self, core, extra: dict):
        self._core = core
        self._extra = extra

    def compile_model(self, model, device, config=None):
        return self._core.compile_model(model, device, {**(config or {}), **self._extra})

    def __getattr__(self, name):
        return getattr(self._core, name)


def _patch_openvino(extra: dict) -> None:
    from medseg.inference import runtime

    init = runtime._OpenVINOForward.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.core = _CoreWithConfig(self.core, extra)

    runtime._OpenVINOForward.__init__ = __init__


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime (GNU libgomp, LLVM libomp, Intel libiomp) is mapped in this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(name in maps for name in ("libgomp", "libomp.so", "libiomp5"))


def worker(config: dict) -> dict:
    """Time one configuration. Imports only what the Predictor imports: a Predictor on a shipped
    OpenVINO model needs no PyTorch (and so loads no OpenMP runtime)."""
    import resource

    import numpy as np

    from medseg.inference import Predictor
    from medseg.io import read_image

    if config.get("ov_config"):
        _patch_openvino(config["ov_config"])
    files = sorted(DATA.glob("*.nii.gz"))[: config["cases"]]
    images = [read_image(path) for path in files]
    predictor = Predictor(
        "hippocampus", runtime=config["runtime"], threads=config["threads"], sw_batch_size=config.get("sw_batch_size")
    )
    torch = sys.modules.get("torch")
    medseg_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and medseg_threads != config["threads"]:
        # Predictor(threads=...) reached PyTorch only if it was loaded by then: measure what the
        # row says, and report what medseg had set (the "PyTorch threads" column)
        torch.set_num_threads(config["threads"])
    predictor.predict(images[0])  # warm-up (OpenVINO: load, compile and verify the model)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    seconds = []
    cpu_start = cpu()
    for image in images:
        start = time.perf_counter()
        predictor.predict(image)
        seconds.append(time.perf_counter() - start)
    cpu_per_case = (cpu() - cpu_start) / len(images)

    network = predictor.runtimes[0]
    window = np.zeros((network.batch_size, 1, *predictor.card.patch_size), dtype=np.float32)
    net = []
    network(window)
    for _ in range(NET_CALLS):
        start = time.perf_counter()
        network(window)
        net.append((time.perf_counter() - start) / network.batch_size)
    torch = sys.modules.get("torch")
    result = {
        "seconds": seconds,
        "cpu_per_case": cpu_per_case,
        "net_per_window": statistics.median(net),
        "torch_loaded": torch is not None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "medseg_torch_threads": medseg_threads,
        "openmp_loaded": _openmp_loaded(),
        "runtime": network.name,
    }
    forward = getattr(network, "_forward", None)
    compiled = next(iter(getattr(forward, "compiled", {}).values()), None)
    if compiled is not None:
        result["openvino"] = {
            key: str(compiled.get_property(key))
            for key in ("INFERENCE_NUM_THREADS", "ENABLE_CPU_PINNING", "NUM_STREAMS")
        }
    return result


# ------------------------------------------------------------------------------------------
# parent


def configurations(args) -> list[dict]:
    configs = []
    for runtime in args.runtimes:
        for threads in args.threads:
            # one thread: no OpenMP team, nothing waits, so the policy cannot matter (--full checks)
            policies = args.policies if threads > 1 or args.full else args.policies[:1]
            for policy in policies:
                configs.append({"runtime": runtime, "threads": threads, "policy": policy, "knob": ""})
    if "openvino" in args.runtimes and args.openvino_knobs:
        base = {"runtime": "openvino", "threads": 2, "policy": "PASSIVE"}
        configs += [
            {**base, "knob": "ENABLE_CPU_PINNING=NO", "ov_config": {"ENABLE_CPU_PINNING": False}},
            {**base, "knob": "sw_batch_size=4", "sw_batch_size": 4},
        ]
    return configs


def run_config(config: dict, cases: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT"):  # keep the comparison clean
        env.pop(name, None)
    if config["policy"] != "unset":
        env["OMP_WAIT_POLICY"] = config["policy"]
    payload = json.dumps({**config, "cases": cases})
    result = subprocess.run(
        [sys.executable, __file__, "--worker", payload],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_competitor(kind: str) -> subprocess.Popen:
    code = EAGER_LOOP if kind == "eager" else BUSY_LOOP
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(5 if kind == "eager" else 1)  # let it load and reach its loop
    return process


def label(config: dict) -> str:
    return config["knob"] or "-"


def _loaded(result: dict) -> str:
    """``yes (N) / yes``: PyTorch loaded (its threads while timed) / an OpenMP runtime loaded; a ``*``
    marks a thread count medseg's Predictor(threads=...) had not applied (set by the worker)."""
    if not result.get("torch_loaded"):
        torch = "no"
    else:
        unapplied = result.get("medseg_torch_threads") not in (None, result.get("torch_threads"))
        torch = f"yes ({result.get('torch_threads')}{'*' if unapplied else ''})"
    return f"{torch} / {'yes' if result.get('openmp_loaded') else 'no'}"


def table(configs: list[dict], results: dict, conditions: list[str]) -> list[str]:
    head = "| runtime | threads | OMP_WAIT_POLICY | OpenVINO knob | PyTorch (threads) / OpenMP loaded |"
    rule = "|---|---:|---|---|---|"
    for condition in conditions:
        head += f" {condition} min s | {condition} median s | {condition} CPU s/case | {condition} net s/window |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for index, config in enumerate(configs):
        first = next((results[(c, index)] for c in conditions if (c, index) in results), {})
        loaded = _loaded(first)
        row = f"| {config['runtime']} | {config['threads']} | {config['policy']} | {label(config)} | {loaded} |"
        for condition in conditions:
            result = results.get((condition, index))
            if result is None:
                row += " - | - | - | - |"
                continue
            seconds = result["seconds"]
            row += (
                f" {min(seconds):.3f} | {statistics.median(seconds):.3f} | {result['cpu_per_case']:.2f} |"
                f" {result['net_per_window']:.3f} |"
            )
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5, help="timed cases per configuration (default 5)")
    parser.add_argument("--runtimes", default="eager,openvino", help="comma-separated (default eager,openvino)")
    parser.add_argument("--threads", default="1,2", help="comma-separated PyTorch thread counts (default 1,2)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="OMP_WAIT_POLICY values; 'unset' for none")
    parser.add_argument("--conditions", default="quiet,contended", help="quiet, contended or both (default)")
    parser.add_argument("--competitor", choices=("busy", "eager"), default="busy", help="the contended load")
    parser.add_argument("--no-openvino-knobs", dest="openvino_knobs", action="store_false")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also every OMP_WAIT_POLICY at 1 thread (about 2 more minutes)",
    )
    parser.add_argument(
        "--note",
        default="a 1-thread training run occupies one core throughout",
        help="what else runs on the machine, for the header",
    )
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe

    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.policies = [p for p in args.policies.split(",") if p]
    conditions = [c for c in args.conditions.split(",") if c]
    configs = configurations(args)
    machine = describe(("medseg", "torch", "openvino"))
    medseg_dir = subprocess.run(
        [sys.executable, "-c", "import medseg, pathlib; print(pathlib.Path(medseg.__file__).parent)"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,  # as the workers see it (the script's folder first)
        check=False,
    ).stdout.strip()
    started = time.perf_counter()
    results: dict = {}
    samples: dict = {}
    for config in configs:  # convert models the package does not ship, once, untimed
        if config.get("sw_batch_size"):
            run_config(config, 1)
    for condition in conditions:
        competitor = start_competitor(args.competitor) if condition == "contended" else None
        try:
            samples[condition] = {"load_before": [round(v, 2) for v in os.getloadavg()]}
            for index, config in enumerate(configs):
                results[(condition, index)] = run_config(config, args.cases)
                seconds = results[(condition, index)]["seconds"]
                print(
                    f"{condition:9} {config['runtime']:13} threads {config['threads']} {config['policy']:7} "
                    f"{label(config):40} median {statistics.median(seconds):.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
            samples[condition]["load_after"] = [round(v, 2) for v in os.getloadavg()]
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    elapsed = time.perf_counter() - started
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine,
                    "conditions": samples,
                    "results": [
                        {"condition": c, **{k: v for k, v in configs[i].items()}, **r} for (c, i), r in results.items()
                    ],
                },
                indent=1,
            )
        )
        return 0
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    print(
        f"Machine: {machine['cpu']}, {machine['physical_cores_in_cpuinfo']} cores / "
        f"{machine['logical_cpus_in_cpuinfo']} logical CPUs, {machine['usable_cpus']} usable, "
        f"{machine['memory_gib']} GiB, Python {machine['python']}, {machine['system']}; {versions}."
    )
    print()
    print(
        f"hippocampus model, {args.cases} cases (+1 warm-up) per configuration, each configuration in a fresh "
        f"process (medseg from {medseg_dir}). Already on the machine, not stopped: {args.note}; "
        f"load average "
        + "; ".join(f"{c}: before {samples[c]['load_before']}, after {samples[c].get('load_after')}" for c in samples)
        + ". contended = plus one competing CPU-bound process ("
        + ("a Python busy loop" if args.competitor == "busy" else "a second eager PyTorch run, default threads")
        + f", unpinned). OpenVINO knobs run with 2 threads and OMP_WAIT_POLICY=PASSIVE. Total {elapsed:.0f} s."
    )
    print()
    print("\n".join(table(configs, results, conditions)))
    applied = {
        f"threads {configs[i]['threads']}, {label(configs[i])}": r["openvino"]
        for (c, i), r in results.items()
        if "openvino" in r and c == conditions[0] and configs[i]["policy"] in ("unset", "PASSIVE")
    }
    unapplied = sorted(
        {
            f"{configs[i]['runtime']} threads {configs[i]['threads']} (medseg left {r['medseg_torch_threads']})"
            for (c, i), r in results.items()
            if r.get("medseg_torch_threads") not in (None, r.get("torch_threads"))
        }
    )
    if unapplied:
        print()
        print(
            "* Predictor(threads=...) had not reached PyTorch (loaded after the Predictor set its threads); "
            "the worker set torch.set_num_threads itself: " + "; ".join(unapplied)
        )
    if applied:
        print()
        print(
            "OpenVINO compiled-model properties: "
            + "; ".join(f"{k}: {', '.join(f'{p}={v}' for p, v in props.items())}" for k, props in applied.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
