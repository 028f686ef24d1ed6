"""``medseg predict`` next to MONAI on the same cases, weights and machine: ``python benchmarks/predict_vs_monai.py``.

On the first ``--cases`` real hippocampus MRI (``imagesTr`` of the shared data, sorted) and the
bundled ``hippocampus`` package (``medseg/models/hippocampus``, a MONAI-Bundle-compatible
folder: ``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``), in one run;
or, with ``--package PATH --images GLOB``, on another ``unet`` package and the first ``--cases``
files matching the glob (sorted), e.g. a bigger network on a CT volume::

    python benchmarks/ct_package.py /tmp/ct_unet   # untrained 5-stage U-Net, CT normalisation, 3 mm
    python benchmarks/predict_vs_monai.py --package /tmp/ct_unet \\
        --images '../shared/data/ct_mr_multilabel/example_ct_sm.nii.gz' --cases 1 --repeat 2

1. Whole process: wall time of a fresh process segmenting all cases, five commands interleaved
   (A, B, C, D, E, A, B, ...) ``--repeat`` times after one untimed warm-up round (which also
   writes the label maps compared in 3.):

   - ``medseg predict CASES... --model hippocampus --output OUT`` (``--model PATH`` with
     ``--package``; default outputs; for NIfTI
     input ``nifti,json,png``: DICOM SEG only for DICOM input);
   - the same with an empty ``$MEDSEG_CACHE`` each run: a first use right after install (the
     package's shipped OpenVINO model is all there is);
   - the same with ``--formats nifti``;
   - MONAI's bundle runner on the package, as ``tests/test_monai_bundle.py`` runs it:
     ``python -m monai.bundle run --config_file configs/inference.json --meta_file
     configs/metadata.json --bundle_root <package> --dataset_dir <folder of links to the cases>
     --output_dir OUT2``;
   - a plain MONAI script (:func:`plain_monai_main`, run in a fresh ``python -c``; it imports MONAI,
     never medseg): LoadImage -> EnsureChannelFirst -> Orientation (the card's, RAS) -> Spacing
     (the card's, bilinear) -> the card's normalisation (``zscore``: NormalizeIntensity;
     ``ct``: ThresholdIntensity twice, i.e. clip to the card's HU range, then
     NormalizeIntensity with the card's mean and std as subtrahend and divisor: nnU-Net's
     ``(clip(x) - mean) / std``, as medseg computes it; the bundle's ``inference.json`` does the
     same map as one ScaleIntensityRanged) ->
     ``monai.inferers.sliding_window_inference`` (the card's patch, overlap 0.5, gaussian, one
     window per call) with ``monai.networks.nets.DynUNet`` (:func:`medseg.package.dynunet_kwargs`)
     loaded from ``models/model.pt`` (``net.`` key prefix removed) -> argmax -> inverse of the
     spatial transforms (nearest, as ``Invertd(nearest_interp=True)``) -> SaveImage.

2. In process (``--no-in-process`` skips it): seconds per case of
   ``medseg.inference.Predictor(package).predict(image)`` with runtime ``auto`` (OpenVINO
   on the CPU) and ``eager``, and of the plain MONAI pipeline above without its file reading and
   writing, in this process, warm (one untimed warm-up case each), interleaved per case. Images
   are read before the clock starts.

3. Label agreement: the fraction of voxels where medseg's label map (``--formats nifti`` run,
   and the in-process Predictors) equals MONAI's (bundle runner, plain script), per case; the
   table gives the minimum over cases and the case where it is reached.

Columns: ``min s`` / ``median s`` over the ``--repeat`` runs (whole process: all cases of one
process; in process: the mean per case of one round); ``s per case``: median divided by the
number of cases; ``speed-up``: MONAI seconds / medseg seconds (median; min / min in brackets),
above 1 where medseg is faster. The machine (CPU model from /proc/cpuinfo, cores, load average
before and after, versions) is printed above the tables; the model cache is the user's default
(``$MEDSEG_CACHE`` as set, else ``~/.cache/medseg``), and the output says whether the OpenVINO
model shipped in the package (``runtime/openvino/``) was the one run (a medseg report's
``settings.runtime`` gives the runtime; the in-process Predictor says where its IR came from).

``--threads`` (default 1) is passed to every process as ``OMP_NUM_THREADS`` (and MKL/OpenBLAS)
and set with ``torch.set_num_threads`` here and in the plain script; OpenVINO takes PyTorch's
thread count. ``--json`` prints the results as JSON instead. Everything written goes to a
temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATA = SHARED / "hippocampus" / "imagesTr"
PACKAGE = REPO / "medseg" / "models" / "hippocampus"
IMAGES = str(DATA / "*.nii.gz")
MEDSEG = shutil.which("medseg", path=str(Path(sys.executable).parent)) or shutil.which("medseg")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: the plain MONAI script's process: loads this file by path (no medseg import) and runs plain_monai_main
CHILD = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('predict_vs_monai', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
    "module.plain_monai_main(sys.argv[2:])"
)


# --- the plain MONAI pipeline (MONAI and PyTorch only) ----------------------------------------
def plain_monai_build(settings: dict):
    """``(load, preprocess, network)`` of the plain MONAI pipeline for ``settings`` (see :func:`monai_settings`)."""
    import torch
    from monai.networks.nets import DynUNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        EnsureType,
        LoadImage,
        NormalizeIntensity,
        Orientation,
        Spacing,
        ThresholdIntensity,
    )

    torch.set_num_threads(int(settings["threads"]))
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst()])
    norm = settings.get("normalization", {"scheme": "zscore"})
    if norm["scheme"] == "ct":  # nnU-Net CT: clip to the HU range, then (x - mean) / std
        low, high = norm["clip"]
        normalise = [
            ThresholdIntensity(threshold=high, above=False, cval=high),
            ThresholdIntensity(threshold=low, above=True, cval=low),
            NormalizeIntensity(subtrahend=norm["mean"], divisor=norm["std"], nonzero=False, channel_wise=False),
        ]
    else:  # zscore per image
        normalise = [NormalizeIntensity(nonzero=False, channel_wise=True)]
    preprocess = Compose(
        [
            Orientation(axcodes=settings["orientation"]),
            Spacing(pixdim=settings["spacing"], mode="bilinear"),
            EnsureType(dtype=torch.float32),
            *normalise,
        ]
    )
    network = DynUNet(**settings["dynunet"]).eval()
    state = torch.load(settings["weights"], map_location="cpu", weights_only=True)
    network.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    return load, preprocess, network


def plain_monai_segment(image, preprocess, network, settings: dict):
    """The label map ``(1, I, J, K)`` (a MetaTensor on ``image``'s grid) of a loaded channel-first image."""
    from copy import deepcopy

    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms.utils import convert_applied_interp_mode

    x = preprocess(image)
    with torch.no_grad():
        logits = sliding_window_inference(
            x[None].as_tensor(), settings["roi"], 1, network, overlap=settings["overlap"], mode="gaussian"
        )
    labels = logits[0].argmax(0, keepdim=True).to(torch.uint8)
    operations = convert_applied_interp_mode(deepcopy(x.applied_operations), mode="nearest", align_corners=None)
    pred = MetaTensor(labels, meta=deepcopy(x.meta), applied_operations=operations)
    return preprocess.inverse(pred)


def plain_monai_main(argv: list[str]) -> None:
    """``SETTINGS_JSON OUT_DIR CASE...``: segment each case and save ``<name>_seg.nii.gz`` into ``OUT_DIR``."""
    import numpy as np
    from monai.transforms import SaveImage

    settings = json.loads(argv[0])
    load, preprocess, network = plain_monai_build(settings)
    save = SaveImage(
        output_dir=argv[1],
        output_postfix="seg",
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        print_log=False,
    )
    for path in argv[2:]:
        save(plain_monai_segment(load(path), preprocess, network, settings))


# --- the machine and the runs ---------------------------------------------------------------
def machine() -> dict:
    """What the figures were measured on (:func:`machine.describe`; load average after is added at the end)."""
    from machine import describe  # benchmarks/machine.py (this file is also loaded by path, alone)

    return describe(("medseg", "torch", "monai", "openvino", "nibabel"))


def monai_settings(package_path: Path, threads: int) -> dict:
    """What the plain MONAI script needs of the package, from its card (JSON-serialisable)."""
    from medseg.package import WEIGHTS, dynunet_kwargs, resolve_model

    package = resolve_model(package_path)
    card = package.card
    norm = card.normalization
    if card.network.name != "unet":
        raise SystemExit(f"the plain MONAI script builds DynUNet: medseg's unet only, not {card.network.name}")
    if norm.window_max or not (
        (norm.scheme == "zscore" and norm.clip is None)
        or (norm.scheme == "ct" and norm.clip is not None and norm.mean is not None and norm.std)
    ):
        raise SystemExit(f"the plain MONAI script does z-score and ct (clip, mean, std) only; the card says {norm}")
    return {
        "dynunet": dynunet_kwargs(card.network.config),
        "normalization": norm.model_dump(mode="json"),
        "weights": str(package.path / WEIGHTS),
        "orientation": card.orientation,
        "spacing": [float(s) for s in card.spacing],
        "roi": [int(p) for p in card.patch_size],
        "overlap": float(card.overlap),
        "threads": threads,
    }


def shipped_ir(package_path: Path) -> dict:
    """Whether the package ships an OpenVINO model for the window shape medseg runs on the CPU."""
    from medseg.package import resolve_model

    package = resolve_model(package_path)
    try:
        import openvino

        from medseg.inference.runtime import openvino_ir_tag
    except ImportError:
        return {"openvino": None, "shipped_ir_present": False}
    channels = int(package.card.network.config.get("in_channels", 1))
    shape = (1, channels, *(int(p) for p in package.card.patch_size))
    tag = openvino_ir_tag(package.weights_sha256, shape, openvino.__version__)
    path = package.runtime_dir / tag / "model.xml"
    return {
        "openvino": openvino.__version__,
        "window_shape": list(shape),
        "shipped_ir": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "shipped_ir_present": path.is_file(),
    }


def run(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``command`` in a fresh process, and its stderr."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return elapsed, result.stderr


def commands(package: Path, cases: list[Path], links: Path, threads: int) -> dict[str, Callable[[Path], list[str]]]:
    """``{name: out_dir -> argv}`` of the four whole-process runs."""
    settings = json.dumps(monai_settings(package, threads))
    model = "hippocampus" if package == PACKAGE else str(package)
    medseg = [MEDSEG, "predict", *map(str, cases), "--model", model, "--output"]
    bundle = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(package / "configs" / "inference.json"),
        "--meta_file",
        str(package / "configs" / "metadata.json"),
        "--bundle_root",
        str(package),
        "--dataset_dir",
        str(links),
        "--output_dir",
    ]
    plain = [sys.executable, "-c", CHILD, str(Path(__file__).resolve()), settings]
    inputs = [str(links / case.name) for case in cases]
    return {
        "medseg_default": lambda out: [*medseg, str(out)],
        "medseg_first_use": lambda out: [*medseg, str(out)],  # with an empty model cache, see whole_process
        "medseg_nifti": lambda out: [*medseg, str(out), "--formats", "nifti"],
        "monai_bundle": lambda out: [*bundle, str(out)],
        "monai_plain": lambda out: [*plain, str(out), *inputs],
    }


def _stem(case: Path) -> str:
    """``hippocampus_001`` of ``hippocampus_001.nii.gz``: the name medseg and MONAI give its outputs."""
    return case.name.removesuffix(".gz").removesuffix(".nii")


def read_labels(path: Path):
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    return np.asarray(image.dataobj).squeeze(), image.affine


def agreement(ours: dict, theirs: dict) -> dict:
    """Per case: fraction of equal voxels of two ``{case: (labels, affine or None)}``; min over cases."""
    import numpy as np

    per_case, differing = {}, 0
    for name, (a, affine_a) in ours.items():
        b, affine_b = theirs[name]
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or (
            affine_a is not None and affine_b is not None and not np.allclose(affine_a, affine_b, atol=1e-4)
        ):
            per_case[name] = 0.0  # another grid: nothing agrees
            differing += a.size
            continue
        equal = a == b
        per_case[name] = float(equal.mean())
        differing += int(equal.size - equal.sum())
    worst = min(per_case, key=per_case.get)
    return {"min": per_case[worst], "worst_case": worst, "differing_voxels": differing, "per_case": per_case}


def whole_process(package: Path, cases: list[Path], repeat: int, threads: int, work: Path, env: dict[str, str]) -> dict:
    links = work / "cases"
    links.mkdir()
    for case in cases:
        (links / case.name).symlink_to(case)
    runs = commands(package, cases, links, threads)
    times: dict[str, list[float]] = {name: [] for name in runs}
    warnings: dict[str, list[str]] = {name: [] for name in runs}
    for round_ in range(repeat + 1):  # round 0: warm-up (disk cache, imports), outputs kept
        for name, argv in runs.items():
            out = work / f"{name}-{round_}"
            run_env = env
            if name == "medseg_first_use":  # as right after install: nothing cached, nothing converted before
                run_env = {**env, "MEDSEG_CACHE": tempfile.mkdtemp(prefix="cache-", dir=work)}
            elapsed, stderr = run(argv(out), run_env)
            if round_:
                times[name].append(elapsed)
                shutil.rmtree(out)
            warnings[name] += [line for line in stderr.splitlines() if "stored OpenVINO model" in line]

    stems = [_stem(case) for case in cases]
    label_maps = {
        "medseg": {s: read_labels(work / "medseg_nifti-0" / f"{s}.nii.gz") for s in stems},
        "monai_bundle": {s: read_labels(work / "monai_bundle-0" / f"{s}_seg.nii.gz") for s in stems},
        "monai_plain": {s: read_labels(work / "monai_plain-0" / f"{s}_seg.nii.gz") for s in stems},
    }
    reports = [json.loads((work / "medseg_default-0" / f"{s}.json").read_text()) for s in stems]
    return {
        "times_s": times,
        "medseg_report_runtimes": sorted({r["settings"]["runtime"] for r in reports}),
        "openvino_ir_warnings": warnings["medseg_default"] + warnings["medseg_nifti"],
        "agreement": {
            "medseg predict vs monai.bundle run": agreement(label_maps["medseg"], label_maps["monai_bundle"]),
            "medseg predict vs plain MONAI script": agreement(label_maps["medseg"], label_maps["monai_plain"]),
            "monai.bundle run vs plain MONAI script": agreement(label_maps["monai_bundle"], label_maps["monai_plain"]),
        },
    }


def in_process(package: Path, cases: list[Path], repeat: int, threads: int) -> dict:
    import numpy as np
    import torch

    from medseg.inference import Predictor
    from medseg.io import read_image

    torch.set_num_threads(threads)
    settings = monai_settings(package, threads)
    load, preprocess, network = plain_monai_build(settings)
    predictors = {"auto": Predictor(package, runtime="auto"), "eager": Predictor(package, runtime="eager")}
    ours = {_stem(case): read_image(case) for case in cases}
    theirs = {_stem(case): load(str(case)) for case in cases}
    variants = {
        "medseg_auto": lambda name: predictors["auto"].predict(ours[name]).label_map.array,
        "medseg_eager": lambda name: predictors["eager"].predict(ours[name]).label_map.array,
        "monai_plain": lambda name: plain_monai_segment(theirs[name], preprocess, network, settings)[0].numpy(),
    }
    first = _stem(cases[0])
    for segment in variants.values():
        segment(first)  # warm-up: runtimes loaded and compiled
    times: dict[str, list[float]] = {name: [] for name in variants}
    labels: dict[str, dict] = {name: {} for name in variants}
    for _ in range(repeat):
        total = dict.fromkeys(variants, 0.0)
        for case in cases:
            for name, segment in variants.items():
                started = time.perf_counter()
                result = segment(_stem(case))
                total[name] += time.perf_counter() - started
                labels[name][_stem(case)] = (np.asarray(result), None)
        for name in variants:
            times[name].append(total[name] / len(cases))
    forward = getattr(predictors["auto"].runtimes[0], "_forward", None)
    sources = sorted(set(getattr(forward, "sources", {}).values()))
    return {
        "seconds_per_case": times,
        "runtime_auto": predictors["auto"].runtime,
        "openvino_ir_source": sources,
        "agreement": {
            "Predictor (auto) vs plain MONAI": agreement(labels["medseg_auto"], labels["monai_plain"]),
            "Predictor (eager) vs plain MONAI": agreement(labels["medseg_eager"], labels["monai_plain"]),
        },
    }


def measure(
    n_cases: int,
    repeat: int,
    threads: int,
    with_in_process: bool,
    package: Path = PACKAGE,
    images: str = IMAGES,
) -> dict:
    if MEDSEG is None:
        raise SystemExit("the medseg command is not installed (pip install -e .)")
    from medseg.package import resolve_model

    package = resolve_model(package).path.resolve()  # a folder, or a registered name
    cases = [Path(path).resolve() for path in sorted(glob.glob(images))][:n_cases]
    if len(cases) < n_cases:
        raise SystemExit(f"{images}: {len(cases)} cases, {n_cases} asked for")
    if len({_stem(case) for case in cases}) < len(cases):
        raise SystemExit(f"{images}: two cases with the same file name (outputs are named by it)")
    env = dict(os.environ)
    env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    results: dict = {
        "machine": machine(),
        "package": _display(package),
        "model": _model_summary(package),
        "threads": threads,
        "repeat": repeat,
        "cases": [case.name for case in cases],
        "medseg_cache": os.environ.get("MEDSEG_CACHE") or str(Path.home() / ".cache" / "medseg"),
        "openvino_ir": shipped_ir(package),
    }
    with tempfile.TemporaryDirectory(prefix="medseg-vs-monai-") as tmp:
        results["whole_process"] = whole_process(package, cases, repeat, threads, Path(tmp), env)
    if with_in_process:
        results["in_process"] = in_process(package, cases, repeat, threads)
    results["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return results


def _display(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _model_summary(package_path: Path) -> dict:
    """The package's name, network, parameters (from the weights file), window, spacing and normalisation."""
    import torch

    from medseg.package import WEIGHTS, resolve_model

    card = resolve_model(package_path).card
    state = torch.load(package_path / WEIGHTS, map_location="cpu", weights_only=True)
    return {
        "name": card.name,
        "network": card.network.name,
        "filters": card.network.config.get("filters"),
        # DynUNet's state dict names its modules twice (skip_layers): count each tensor once
        "parameters": int(sum({v.data_ptr(): v.numel() for v in state.values()}.values())),
        "patch_size": [int(p) for p in card.patch_size],
        "spacing": [float(s) for s in card.spacing],
        "normalization": card.normalization.scheme,
        "untrained": bool(card.training.get("untrained", False)),
    }


# --- the tables -----------------------------------------------------------------------------
def _speedup(monai: list[float], medseg: list[float]) -> str:
    median = statistics.median
    return f"{median(monai) / median(medseg):.2f}x ({min(monai) / min(medseg):.2f}x)"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def table(results: dict) -> str:
    m = results["machine"]
    n = len(results["cases"])
    median = statistics.median
    ir = results["openvino_ir"]
    model = results["model"]
    whole = results["whole_process"]
    ir_used = (
        "yes"
        if ir["shipped_ir_present"]
        and whole["medseg_report_runtimes"] == ["openvino"]
        and not whole["openvino_ir_warnings"]
        else "no"
    )
    lines = [
        f"machine: {m['cpu']}; {m['logical_cpus_in_cpuinfo']} logical CPUs in /proc/cpuinfo "
        f"({m['physical_cores_in_cpuinfo']} physical cores), os.cpu_count() = {m['os_cpu_count']}, "
        f"usable by this process: {m['usable_cpus']}; load average before {m['load_average_before']}, "
        f"after {m['load_average_after']}",
        f"software: Python {m['python']}, {m['system']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"model: {model['name']} ({results['package']}): {model['network']} filters {model['filters']}, "
        f"{model['parameters'] / 1e6:.2f} M parameters (weights file), "
        f"window {'x'.join(map(str, model['patch_size']))}, "
        f"spacing {'x'.join(f'{s:g}' for s in model['spacing'])} mm, {model['normalization']} normalisation"
        + ("; UNTRAINED (seeded random weights)" if model["untrained"] else ""),
        f"{n} case(s) ({results['cases'][0]} .. {results['cases'][-1]}), {results['threads']} thread(s), "
        f"{results['repeat']} interleaved runs after one warm-up round; model cache {results['medseg_cache']}",
        f"medseg runtime (report settings.runtime): {', '.join(whole['medseg_report_runtimes'])}; "
        f"shipped OpenVINO model {ir.get('shipped_ir', '-')} (OpenVINO {ir['openvino']}): "
        f"{'present' if ir['shipped_ir_present'] else 'absent'}, used by medseg predict: {ir_used}",
        "",
        f"| whole process, {n} case(s) | min s | median s | median s per case |",
        "|---|---|---|---|",
    ]
    names = {
        "medseg_default": "`medseg predict` (default outputs: nifti, json, png)",
        "medseg_first_use": "`medseg predict`, default outputs, empty model cache (first use after install)",
        "medseg_nifti": "`medseg predict --formats nifti`",
        "monai_bundle": "`python -m monai.bundle run` (configs/inference.json)",
        "monai_plain": "plain MONAI script",
    }
    times = whole["times_s"]
    for key, name in names.items():
        values = times[key]
        lines.append(f"| {name} | {min(values):.2f} | {median(values):.2f} | {median(values) / n:.2f} |")
    lines += [
        "",
        "| speed-up of medseg: MONAI s / medseg s, median (min) | medseg default outputs | medseg --formats nifti |",
        "|---|---|---|",
    ]
    for key in ("monai_bundle", "monai_plain"):
        lines.append(
            f"| vs {names[key]} | {_speedup(times[key], times['medseg_default'])} "
            f"| {_speedup(times[key], times['medseg_nifti'])} |"
        )
    first, warm = times["medseg_first_use"], times["medseg_default"]
    lines += [
        "",
        f"first use after install (empty model cache) / warm: {median(first) / median(warm):.2f}x median "
        f"({min(first) / min(warm):.2f}x min)",
    ]
    agreements = dict(whole["agreement"])
    inner = results.get("in_process")
    if inner:
        seconds = inner["seconds_per_case"]
        source = ", ".join(inner["openvino_ir_source"]) or "-"
        lines += [
            "",
            "| in process, warm, per case | min s | median s | speed-up vs plain MONAI, median (min) |",
            "|---|---|---|---|",
        ]
        rows = {
            "medseg_auto": f"`Predictor.predict` runtime auto ({inner['runtime_auto']}, IR: {source})",
            "medseg_eager": "`Predictor.predict` runtime eager",
            "monai_plain": "plain MONAI pipeline (eager DynUNet), no file I/O",
        }
        for key, name in rows.items():
            values = seconds[key]
            speed = "-" if key == "monai_plain" else _speedup(seconds["monai_plain"], values)
            lines.append(f"| {name} | {min(values):.3f} | {median(values):.3f} | {speed} |")
        agreements.update({f"in process: {k}": v for k, v in inner["agreement"].items()})
    lines += [
        "",
        f"| label agreement (voxels equal), min over {n} case(s) | agreement | worst case | voxels differing (all) |",
        "|---|---|---|---|",
    ]
    for name, value in agreements.items():
        lines.append(f"| {name} | {_percent(value['min'])} | {value['worst_case']} | {value['differing_voxels']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--package",
        type=Path,
        default=PACKAGE,
        help="a unet model package: folder or registered name (default: the bundled hippocampus)",
    )
    parser.add_argument(
        "--images", default=IMAGES, help="glob of the cases, sorted (default: the hippocampus imagesTr *.nii.gz)"
    )
    parser.add_argument("--cases", type=int, default=10, help="the first N cases of the glob, sorted (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each variant (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="threads of every process (default 1)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process comparison")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    results = measure(
        max(1, args.cases), max(1, args.repeat), max(1, args.threads), not args.no_in_process, args.package, args.images
    )
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
