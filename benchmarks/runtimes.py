"""Every seed network through its fastest runtime that gives the same labels: ``python benchmarks/runtimes.py``.

For each seed network config under ``configs/hippocampus/`` (network name and config from the
YAML, :func:`medseg.training.config.load_config`; the window is ``data.patch_size``; the 2D
TransUNet runs slice by slice as the Predictor runs every 2D package; the ``*_dsd`` configs train
the same networks as their base configs and are skipped), in this process:

1. A model package in a temporary folder: the network built with **seeded random weights**
   (``torch.manual_seed(--seed)``; ``--trained NAME=PACKAGE_DIR`` uses a trained package
   instead, copied without its ``runtime/`` folder), the bundled ``hippocampus`` label card,
   1 mm spacing, z-score normalisation. Random weights: speed does not depend on the weights, and
   label agreement is a stricter test with them than with trained ones, since their logits lie
   close together (a tiny numerical difference flips more argmaxes).
2. Export cost: seconds of :func:`medseg.inference.runtime.prepare_package` (OpenVINO conversion
   of the CPU window ``(1, C, *patch)`` in a child process, verification against the eager
   network within ``VERIFY_TOLERANCE`` = 1e-3 of its output range, IR written into the package).
   A conversion that crashes or fails verification is recorded (``failed.json``) and the
   Predictor falls back with that reason.
3. Seconds per case of :class:`medseg.inference.Predictor` ``.predict(image)`` with runtime
   ``auto`` and ``eager`` on the first ``--cases`` hippocampus MRI
   (``../shared/data/hippocampus/imagesTr``, sorted, read with :func:`medseg.io.read_image`
   before the clock starts): one untimed warm-up case each (the auto Predictor loads and
   verifies the shipped IR there), then ``--repeat`` rounds, auto and eager interleaved per case;
   the median over all timed cases and rounds. What ``auto`` ran is the prediction's
   ``settings["runtime"]`` (``runtime_fallback`` = the reason when it fell back), the speed-up is
   eager s / auto s, and labels equal is the share of voxels where auto's label map equals
   eager's (minimum over cases).
4. One window, in process (the second table): median seconds of one network call on a seeded
   ``(1, C, *patch)`` input through the eager runtime, the auto runtime and, where the
   ``onnxruntime`` package is installed (``--no-onnxruntime`` skips it), ONNX Runtime (CPU
   execution provider, the network exported by ``torch.onnx.export``, TorchScript exporter,
   opset 17), with each one's max |output - eager| / range(eager) (the OpenVINO verification
   measure). ONNX Runtime is measured only; medseg does not offer it as a runtime.

``--threads`` (default 1) is set for PyTorch, OpenVINO and ONNX Runtime and exported as
``OMP_NUM_THREADS`` (and MKL/OpenBLAS) for the conversion child processes. The converted-model
cache (``$MEDSEG_CACHE``) is a temporary folder, so nothing is reused from earlier runs and the
user's cache is untouched. Prints the machine line (:mod:`benchmarks.machine`) and two markdown
tables; ``--json`` prints the results as JSON instead. ``--networks unet,swin_unetr`` picks
networks by network name or config file stem.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "hippocampus"
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "hippocampus" / "imagesTr"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: table order of the seed networks (any other config under configs/hippocampus follows)
ORDER = ("unet", "stunet", "dformer", "transunet3d", "swin_unetr", "transunet")
#: timed single-window calls per runtime (at least; ``--repeat`` if larger)
WINDOW_CALLS = 5


# --- the networks ----------------------------------------------------------------------------
def seed_networks(selected: list[str] | None) -> list[dict]:
    """``{"config": stem, "name", "config_path", "network_config", "patch_size", "overlap"}`` of
    each seed network config (``loss.dsd`` configs skipped: same network as their base config),
    in :data:`ORDER`; only those whose network name or file stem is in ``selected`` if given."""
    from medseg.training.config import load_config

    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        if config.task != "segmentation" or config.loss.dsd is not None or config.data.patch_size is None:
            continue
        if selected and config.network.name not in selected and path.stem not in selected:
            continue
        patch = tuple(int(p) for p in config.data.patch_size)
        network_config = {"spatial_dims": len(patch), "in_channels": 1, "out_channels": 3, **config.network.config}
        found.append(
            {
                "config": path.stem,
                "name": config.network.name,
                "config_path": str(path.relative_to(REPO)),
                "network_config": network_config,
                "patch_size": patch,
                "overlap": float(config.validation.overlap),
            }
        )
    rank = {name: i for i, name in enumerate(ORDER)}
    found.sort(key=lambda entry: (rank.get(entry["config"], len(ORDER)), entry["config"]))
    return found


def seeded_package(entry: dict, folder: Path, seed: int):
    """A package of ``entry``'s network with seeded random weights; returns ``(package, network)``."""
    import torch

    from medseg.networks import create_network
    from medseg.package import ModelCard, ModelPackage, NetworkSpec, resolve_model

    labels = resolve_model("hippocampus").card.labels
    card = ModelCard(
        name=f"seeded_{entry['config']}",
        description=f"untrained (seed {seed}) {entry['name']} of {entry['config_path']}: benchmark only",
        network=NetworkSpec(name=entry["name"], config=entry["network_config"]),
        modality=["MR"],
        labels=list(labels),
        spacing=(1.0, 1.0, 1.0),
        patch_size=entry["patch_size"],
        overlap=entry["overlap"],
        training={"untrained": True, "seed": seed},
    )
    torch.manual_seed(seed)
    network = create_network(entry["name"], **entry["network_config"]).eval()
    return ModelPackage.save(folder / entry["config"], card, network.state_dict()), network


def trained_package(source: str, folder: Path):
    """A copy of a trained package (without its ``runtime/``, so the export is measured afresh)."""
    from medseg.package import ModelPackage, resolve_model

    original = resolve_model(source)
    target = folder / original.path.name
    shutil.copytree(original.path, target, ignore=lambda d, names: ["runtime"] if Path(d) == original.path else [])
    package = ModelPackage(target)
    return package, package.load_network("cpu")


# --- the measurements ------------------------------------------------------------------------
def relative_error(got, expected) -> float:
    """max |got - expected| / range(expected) (the OpenVINO verification measure)."""
    import numpy as np

    got, expected = np.asarray(got, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    if got.shape != expected.shape:
        return float("inf")
    span = float(expected.max() - expected.min()) or 1.0
    return float(np.abs(got - expected).max()) / span


def export_cost(package) -> tuple[float, str | None]:
    """Seconds of :func:`prepare_package` and the reason it failed (``None`` if it did not)."""
    from medseg.inference.runtime import ConversionFailedError, prepare_package

    started = time.perf_counter()
    try:
        prepare_package(package)
        reason = None
    except ConversionFailedError as error:
        reason = str(error)
    except ImportError as error:  # OpenVINO missing: auto runs channels_last
        reason = f"OpenVINO not installed ({error})"
    return time.perf_counter() - started, reason


@contextlib.contextmanager
def _no_stdout():
    """File descriptor 1 to /dev/null: the TorchScript exporter's C++ log writes the whole graph
    there when an export fails (thousands of lines in the middle of the tables)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnxruntime_session(network, shape: tuple[int, ...], threads: int):
    """An ONNX Runtime CPU session of ``network`` for input ``shape``; raises where export fails."""
    import onnxruntime
    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _no_stdout():
        warnings.simplefilter("ignore")  # tracer warnings about the networks' shape checks
        torch.onnx.export(network, (torch.zeros(shape),), buffer, dynamo=False, opset_version=17, input_names=["x"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def interleaved_calls(runners: dict, x, calls: int) -> tuple[dict, dict]:
    """Each runner's output on ``x`` (a warm-up call, which also loads or converts) and its median
    seconds over ``calls`` calls, interleaved (A, B, A, B, ...) so that load affects all alike."""
    import numpy as np

    outputs = {name: np.asarray(run(x)) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(calls):
        for name, run in runners.items():
            started = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - started)
    return outputs, {name: statistics.median(values) for name, values in times.items()}


def window_timings(auto, eager, network, shape: tuple[int, ...], calls: int, threads: int, ort: bool) -> dict:
    """Median seconds of one network call per runtime and max error vs eager on a seeded input."""
    import numpy as np

    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    runners = {"eager": eager.runtimes[0], "auto": auto.runtimes[0]}
    result: dict = {"auto_runtime": auto.runtimes[0].name}
    if ort:
        try:
            started = time.perf_counter()
            session = onnxruntime_session(network, shape, threads)
            result["onnxruntime_export_s"] = time.perf_counter() - started
            runners["onnxruntime"] = lambda x: session.run(None, {"x": x})[0]
        except Exception as error:  # an export the TorchScript exporter cannot do
            result["onnxruntime_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    outputs, result["seconds"] = interleaved_calls(runners, x, calls)
    result["error_vs_eager"] = {name: relative_error(out, outputs["eager"]) for name, out in outputs.items()}
    return result


def measure_network(entry: dict, images: dict, args, folder: Path) -> dict:
    """One row: export, per-case seconds of auto and eager, agreement, one-window timings."""
    import numpy as np

    from medseg.inference import Predictor

    row: dict = {"config": entry.get("config"), "network": entry.get("name")}
    if entry.get("trained"):
        package, network = trained_package(entry["trained"], folder)
        row.update(weights=f"trained ({entry['trained']})", network=package.card.network.name)
    else:
        package, network = seeded_package(entry, folder, args.seed)
        row["weights"] = f"random (seed {args.seed})"
    card = package.card
    row["parameters"] = int(sum(p.numel() for p in network.parameters()))
    row["window"] = [int(p) for p in card.patch_size]
    row["export_s"], row["export_failure"] = export_cost(package)

    auto = Predictor(package, runtime="auto", threads=args.threads)
    eager = Predictor(package, runtime="eager", threads=args.threads)
    names = list(images)
    started = time.perf_counter()
    first = auto.predict(images[names[0]])  # warm-up: shipped IR loaded and verified (or fallback)
    row["auto_first_case_s"] = time.perf_counter() - started
    eager.predict(images[names[0]])
    times: dict[str, list[float]] = {"auto": [], "eager": []}
    agreement: dict[str, float] = {}
    settings = first.settings
    for round_ in range(args.repeat):
        for name in names:
            labels = {}
            order = ("auto", "eager") if round_ % 2 == 0 else ("eager", "auto")
            for variant in order:
                predictor = auto if variant == "auto" else eager
                started = time.perf_counter()
                prediction = predictor.predict(images[name])
                times[variant].append(time.perf_counter() - started)
                labels[variant] = np.asarray(prediction.label_map.array)
                if variant == "auto":
                    settings = prediction.settings
            equal = float(np.mean(labels["auto"] == labels["eager"]))
            agreement[name] = min(agreement.get(name, 1.0), equal)
    row["runtime_auto"] = settings.get("runtime")
    row["runtime_fallback"] = settings.get("runtime_fallback")
    forward = getattr(auto.runtimes[0], "_forward", None)
    row["openvino_ir_source"] = sorted(set(getattr(forward, "sources", {}).values()))
    row["auto_s"] = statistics.median(times["auto"])
    row["eager_s"] = statistics.median(times["eager"])
    row["speedup"] = row["eager_s"] / row["auto_s"]
    worst = min(agreement, key=agreement.get)
    row["labels_equal"] = agreement[worst]
    row["labels_equal_worst_case"] = worst
    row["labels_equal_per_case"] = agreement
    channels = int(card.network.config.get("in_channels", 1))
    shape = (1, channels, *row["window"])
    row["one_window"] = window_timings(
        auto, eager, network, shape, max(WINDOW_CALLS, args.repeat), args.threads, args.onnxruntime
    )
    del auto, eager, network
    gc.collect()
    return row


def load_cases(n: int) -> dict:
    from medseg.io import read_image

    paths = sorted(DATA.glob("*.nii.gz"))[:n]
    if len(paths) < n:
        raise SystemExit(f"{DATA}: {len(paths)} cases, {n} asked for (set MEDSEG_SHARED_DATA)")
    return {path.name.removesuffix(".nii.gz"): read_image(path) for path in paths}


def measure(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe  # benchmarks/machine.py

    results: dict = {"machine": describe(("medseg", "torch", "openvino", "onnxruntime", "monai"))}
    import torch

    from medseg.inference.runtime import set_cpu_threads

    torch.set_num_threads(args.threads)
    set_cpu_threads(args.threads)
    trained = dict(item.split("=", 1) for item in args.trained)
    entries = seed_networks(args.networks)
    known = {e["name"] for e in entries} | {e["config"] for e in entries}
    for name, source in trained.items():
        if name not in known:
            raise SystemExit(f"--trained {name}=...: no seed network or config named {name!r}")
        for entry in entries:
            if name in (entry["name"], entry["config"]):
                entry["trained"] = source
    if not entries:
        raise SystemExit(f"no seed network config matches {args.networks} under {CONFIGS}")
    images = load_cases(args.cases)
    results.update(
        threads=args.threads,
        repeat=args.repeat,
        seed=args.seed,
        cases=list(images),
        onnxruntime=args.onnxruntime,
        rows=[],
    )
    with tempfile.TemporaryDirectory(prefix="medseg-runtimes-") as tmp:
        os.environ["MEDSEG_CACHE"] = str(Path(tmp) / "cache")
        for entry in entries:
            print(f"[runtimes] {entry['config']} ({entry['name']}) ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                row = measure_network(entry, images, args, Path(tmp))
            except Exception as error:  # one network's failure is a row, not the end of the run
                traceback.print_exc()
                row = {"config": entry["config"], "network": entry["name"], "error": f"{type(error).__name__}: {error}"}
            row["benchmark_s"] = time.perf_counter() - started
            results["rows"].append(row)
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return results


# --- the tables -----------------------------------------------------------------------------
def _cell(text) -> str:
    return "-" if text in (None, "") else str(text).replace("|", "\\|").replace("\n", " ")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def table(results: dict) -> str:
    m = results["machine"]
    rows = results["rows"]
    n = len(results["cases"])
    weights = sorted({row.get("weights", "-") for row in rows})
    lines = [
        f"machine: {m['cpu']}; {m['logical_cpus_in_cpuinfo']} logical CPUs in /proc/cpuinfo "
        f"({m['physical_cores_in_cpuinfo']} physical cores), usable by this process: {m['usable_cpus']}; "
        f"load average before {m['load_average_before']}, after {m['load_average_after']}",
        f"software: Python {m['python']}, {m['system']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"{n} hippocampus case(s) ({results['cases'][0]} .. {results['cases'][-1]}), {results['threads']} "
        f"thread(s), {results['repeat']} interleaved round(s) after one warm-up case; weights: {', '.join(weights)}",
        "Random weights: speed does not depend on the weights, and label agreement is a stricter test "
        "with them (logits lie close together, so small numerical differences flip more argmaxes).",
        "",
        "| network | config | parameters | window | runtime (auto) | fallback reason | export s "
        "| auto s/case | eager s/case | speed-up (eager/auto) | labels equal (min over cases) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['network']} | {row['config']} | - | - | failed | {_cell(row['error'])} | - | - | - | - | - |"
            )
            continue
        reason = row["runtime_fallback"] or (f"export: {row['export_failure']}" if row["export_failure"] else None)
        lines.append(
            f"| {row['network']} | {row['config']} | {_millions(row['parameters'])} | "
            f"{'x'.join(map(str, row['window']))} | {row['runtime_auto']} | {_cell(reason)} | "
            f"{row['export_s']:.1f} | {row['auto_s']:.3f} | {row['eager_s']:.3f} | {row['speedup']:.2f}x | "
            f"{100 * row['labels_equal']:.3f} % |"
        )
    ort = results.get("onnxruntime")
    lines += [
        "",
        "One window (1, C, *window), in process, median of "
        f"{max(WINDOW_CALLS, results['repeat'])} calls after a warm-up; error: max |out - eager| / range(eager) "
        "on a seeded input (OpenVINO's verification accepts <= 1e-3)"
        + ("; ONNX Runtime measured only, not a medseg runtime" if ort else "; ONNX Runtime not measured"),
        "",
        "| network | eager s | auto s (runtime) | auto error | speed-up auto "
        + ("| ONNX Runtime s | ONNX Runtime error | speed-up ONNX Runtime " if ort else "")
        + "|",
        "|---|---|---|---|---|" + ("---|---|---|" if ort else ""),
    ]
    for row in rows:
        window = row.get("one_window")
        if not window:
            continue
        s, err = window["seconds"], window["error_vs_eager"]
        line = (
            f"| {row['network']} | {s['eager']:.4f} | {s['auto']:.4f} ({window['auto_runtime']}) | "
            f"{err['auto']:.1e} | {s['eager'] / s['auto']:.2f}x |"
        )
        if ort:
            if "onnxruntime" in s:
                line += f" {s['onnxruntime']:.4f} | {err['onnxruntime']:.1e} | {s['eager'] / s['onnxruntime']:.2f}x |"
            else:
                line += f" export failed: {_cell(window.get('onnxruntime_error'))} | - | - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--networks", help="comma-separated network names or config stems (default: every seed network)"
    )
    parser.add_argument("--cases", type=int, default=5, help="the first N hippocampus cases, sorted (default 5)")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds over the cases (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every runtime (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--trained",
        action="append",
        default=[],
        metavar="NAME=PACKAGE_DIR",
        help="use this trained package (name or folder) for network or config NAME; repeatable",
    )
    parser.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false", help="skip ONNX Runtime")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()] if args.networks else None
    args.cases, args.repeat, args.threads = max(1, args.cases), max(1, args.repeat), max(1, args.threads)
    if any("=" not in item for item in args.trained):
        parser.error("--trained takes NAME=PACKAGE_DIR")
    if args.onnxruntime:
        import importlib.util

        args.onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(args.threads)))  # before PyTorch starts
    results = measure(args)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
