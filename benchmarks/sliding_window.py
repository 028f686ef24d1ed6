"""Sliding-window inference benchmark: medseg vs MONAI (and nnU-Net v2), one process, same
network, weights, input and settings. Prints tables; asserts nothing.

Tables:

1. **engine** — the predictor is an opaque callable (the eager network):
   :func:`medseg.inference.sliding_window_inference` vs :func:`monai.inferers.sliding_window_inference`
   at ``sw_batch_size`` 1 and 4: voxels/s (wall and CPU time), ratio to MONAI's best, max abs
   difference to MONAI, peak RSS growth during the call.
2. **predictor** — end to end from an :class:`~medseg.io.Image` to the label map on its grid:
   :class:`medseg.inference.Predictor` (``runtime=auto``: OpenVINO on the CPU) vs the MONAI-only
   pipeline (:func:`medseg.inference.reference.monai_reference`: Orientation, Spacing,
   ``sliding_window_inference`` with the eager network, softmax, inverse, argmax) vs nnU-Net v2's
   ``nnUNetPredictor.predict_single_npy_array`` (``--nnunet-site``, optional). Probabilities
   max difference and label agreement are against MONAI; nnU-Net places its windows and Gaussian
   differently, so only its throughput is comparable.
4. **trained model** (``--trained hippocampus``) — the bundled trained U-Net on real MSD
   hippocampus images, every Predictor runtime vs the MONAI pipeline. Random-weight networks
   are ill-conditioned (near-uniform softmax, instance norms of near-constant deep features), so
   tables 1-2 overstate runtime differences that a trained network does not show.
3. **memory** (``--memory``) — stitching 100 classes with a cheap predictor: peak RSS growth of
   MONAI vs medseg (float32 and float16 accumulators) against the formula
   :func:`medseg.inference.engine.stitching_bytes`, and that formula for a 512 x 512 x 300 CT.

Defaults follow the issue: 160 x 160 x 96 input, 96^3 window, overlap 0.5, Gaussian blending,
``unet`` (nnU-Net 3d_fullres reference) and ``swin_unetr`` (BTCV reference), one repeat.

    python benchmarks/sliding_window.py                    # both networks, tables 1-2
    python benchmarks/sliding_window.py --networks unet --memory --threads 1
    python benchmarks/sliding_window.py --tables none --trained hippocampus --threads 1
    python benchmarks/sliding_window.py --nnunet-site /tmp/nnunet_site   # add nnU-Net v2

nnU-Net v2 is not a project dependency. To include it without touching the environment:
``pip install --no-deps --target /tmp/nnunet_site nnunetv2 acvl-utils batchgenerators
dynamic-network-architectures threadpoolctl blosc2 numexpr msgpack ndindex pandas`` (no
torch, no torchvision) and pass ``--nnunet-site /tmp/nnunet_site``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from medseg.inference import Predictor, sliding_window_inference
from medseg.inference.engine import stitching_bytes
from medseg.inference.reference import monai_reference
from medseg.io.image import Image
from medseg.labels import Code, Label
from medseg.networks import create_network, network_entry
from medseg.package import ModelCard, ModelPackage, NetworkSpec, Normalization

NETWORKS = {
    # deep_supervision=1: medseg's unet builder fails with 0 heads on MONAI 1.6.1; the extra
    # 1x1x1 head is not used for the logits and costs <1 %
    "unet": ("unet", "3d_fullres", {"deep_supervision": 1}),
    "swin_unetr": ("swin_unetr", "BTCV", {}),
}


def _vm_hwm() -> int:
    """Peak resident set size of this process (VmHWM, bytes)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size growth (bytes) while the ``with`` block runs (sampled every 2 ms
    from /proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        gc.collect()
        _malloc_trim()  # give freed heap back, so growth is measured from what is really in use
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False

    @property
    def growth(self) -> int:
        return self.peak - self.base


def timed(fn, repeats: int):
    """Best (wall s, CPU s, peak RSS growth bytes) over ``repeats`` calls, and the last result."""
    best_wall = best_cpu = float("inf")
    peak = 0
    result = None
    for _ in range(repeats):
        result = None
        gc.collect()
        with PeakRSS() as rss:
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best_wall, best_cpu, peak = min(best_wall, wall), min(best_cpu, cpu), max(peak, rss.growth)
    return best_wall, best_cpu, peak, result


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    sys.stdout.flush()


def make_package(folder: Path, name: str, roi: int, seed: int = 0) -> ModelPackage:
    network_name, reference, extra = NETWORKS[name]
    config = {**network_entry(network_name).references[reference], **extra}
    torch.manual_seed(seed)
    network = create_network(network_name, **config)
    classes = int(config["out_channels"])
    labels = [
        Label(id=i, name=f"structure {i}", type=Code(value="123037004", meaning="Anatomical Structure"))
        for i in range(1, classes)
    ]
    card = ModelCard(
        name=f"bench-{name}",
        network=NetworkSpec(name=network_name, config=config),
        modality=["CT"],
        labels=labels,
        spacing=(1.0, 1.0, 1.0),
        patch_size=(roi,) * 3,
        overlap=0.5,
        normalization=Normalization(scheme="zscore"),
    )
    return ModelPackage.save(folder / name, card, network.state_dict())


def real_input(shape: tuple[int, int, int]) -> Image:
    """A real CT (TotalSegmentator's example, 122 x 101 x 112) resampled (linear) onto a 1 mm RAS
    grid of ``shape``: dense anatomy and noise, no constant padding. (Windows of constant input
    are ill-conditioned for instance normalisation: (x - mean) / sqrt(var + eps) amplifies
    rounding differences between any two implementations, eager PyTorch included.)"""
    from scipy import ndimage

    data = Path(os.environ.get("MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = data / "ct_mr_multilabel" / "example_ct.nii.gz"
    if not path.is_file():
        rng = np.random.default_rng(0)
        return Image(rng.normal(0, 100, shape).astype(np.float32), np.eye(4), {"modality": "CT"})
    import nibabel as nib

    volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    zoomed = ndimage.zoom(volume, [t / s for t, s in zip(shape, volume.shape)], order=1)
    return Image(zoomed.astype(np.float32), np.eye(4), {"modality": "CT", "series_description": "example CT"})


def engine_table(network: torch.nn.Module, x: torch.Tensor, roi: int, repeats: int, name: str) -> None:
    voxels = x[0, 0].numel()
    results = {}
    for engine in ("monai", "medseg"):
        for batch in (1, 4):
            if engine == "monai":
                from monai.inferers import sliding_window_inference as monai_swi

                def run(batch=batch):
                    with torch.no_grad():
                        return monai_swi(x, (roi,) * 3, batch, network, 0.5, "gaussian")
            else:

                def run(batch=batch):
                    return sliding_window_inference(x, (roi,) * 3, batch, network, 0.5, "gaussian")

            results[(engine, batch)] = timed(run, repeats)
            print(f"  [{name}] engine {engine} sw_batch_size={batch}: {results[(engine, batch)][0]:.1f} s", flush=True)
    reference = results[("monai", 1)][3]
    best_monai = min(results[("monai", b)][0] for b in (1, 4))
    best_monai_cpu = min(results[("monai", b)][1] for b in (1, 4))
    rows = []
    for (engine, batch), (wall, cpu, peak, out) in results.items():
        span = float(reference.max() - reference.min()) or 1.0
        rows.append(
            [
                engine,
                batch,
                f"{voxels / wall / 1e3:.1f}",
                f"{voxels / cpu / 1e3:.1f}",
                f"{best_monai / wall:.2f}",
                f"{best_monai_cpu / cpu:.2f}",
                f"{float((out - reference).abs().max()) / span:.1e}",
                f"{peak / 2**20:.0f}",
            ]
        )
    table(
        f"1. engine, {name}: input {tuple(x.shape[2:])}, window {roi}^3, overlap 0.5, gaussian, "
        f"{torch.get_num_threads()} thread(s)",
        [
            "engine",
            "sw_batch",
            "kvox/s wall",
            "kvox/s cpu",
            "x MONAI best (wall)",
            "x (cpu)",
            "max diff / range",
            "peak RSS +MiB",
        ],
        rows,
    )


def nnunet_predict(package: ModelPackage, image: Image, site: str):
    """nnU-Net v2's predictor on the same weights (no mirroring, step 0.5, Gaussian)."""
    if site not in sys.path:
        sys.path.insert(0, site)
    os.environ.setdefault("nnUNet_raw", tempfile.gettempdir())
    os.environ.setdefault("nnUNet_preprocessed", tempfile.gettempdir())
    os.environ.setdefault("nnUNet_results", tempfile.gettempdir())
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    card = package.card
    classes = card.num_classes
    patch = list(card.patch_size)
    plans = {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(image.shape[::-1]),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.0,
                "median": 0.0,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 1.0,
            }
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "bench",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 1,
                "patch_size": patch,
                "median_image_size_in_voxels": list(image.shape[::-1]),
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
                "batch_dice": False,
            }
        },
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz",
        "numTraining": 1,
        "labels": {"background": 0, **{f"c{i}": i for i in range(1, classes)}},
    }
    network = package.load_network()
    plans_manager = PlansManager(plans)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        plans_manager.get_configuration("3d_fullres"),
        [network.state_dict()],
        dataset_json,
        "nnUNetTrainer",
        None,
    )
    volume = np.asarray(image.array, dtype=np.float32).transpose(2, 1, 0)[None]  # (c, z, y, x)

    def run():
        return predictor.predict_single_npy_array(volume, {"spacing": [1.0, 1.0, 1.0]})

    return run


def predictor_table(package: ModelPackage, image: Image, repeats: int, name: str, nnunet_site: str | None) -> None:
    voxels = int(np.prod(image.shape))
    rows = []
    network = package.load_network()
    started = time.perf_counter()
    predictor = Predictor(package)  # runtime auto
    predictor.predict(Image(image.array[: package.card.patch_size[0]], image.affine, dict(image.meta)))  # warm-up
    setup = time.perf_counter() - started
    print(f"  [{name}] medseg Predictor ready ({predictor.runtime}, setup + warm-up {setup:.0f} s)", flush=True)
    m_wall, m_cpu, m_peak, (labels, probabilities) = timed(
        lambda: monai_reference(network, package.card, image), repeats
    )
    print(f"  [{name}] MONAI pipeline: {m_wall:.1f} s", flush=True)
    o_wall, o_cpu, o_peak, prediction = timed(lambda: predictor.predict(image, return_probabilities=True), repeats)
    print(f"  [{name}] medseg Predictor: {o_wall:.1f} s", flush=True)
    diff = float(np.abs(prediction.probabilities - probabilities).max())
    agree = float((prediction.label_map.array == labels).mean())
    rows.append(
        [
            "MONAI (eager)",
            f"{voxels / m_wall / 1e3:.1f}",
            f"{voxels / m_cpu / 1e3:.1f}",
            "1.00",
            "1.00",
            "-",
            "-",
            f"{m_peak / 2**20:.0f}",
        ]
    )
    rows.append(
        [
            f"medseg Predictor ({predictor.runtime})",
            f"{voxels / o_wall / 1e3:.1f}",
            f"{voxels / o_cpu / 1e3:.1f}",
            f"{m_wall / o_wall:.2f}",
            f"{m_cpu / o_cpu:.2f}",
            f"{diff:.1e}",
            f"{100 * agree:.3f} %",
            f"{o_peak / 2**20:.0f}",
        ]
    )
    del prediction, probabilities
    if nnunet_site:
        try:
            run = nnunet_predict(package, image, nnunet_site)
            n_wall, n_cpu, n_peak, _ = timed(run, repeats)
            print(f"  [{name}] nnU-Net v2: {n_wall:.1f} s", flush=True)
            rows.append(
                [
                    "nnU-Net v2 predictor",
                    f"{voxels / n_wall / 1e3:.1f}",
                    f"{voxels / n_cpu / 1e3:.1f}",
                    f"{m_wall / n_wall:.2f}",
                    f"{m_cpu / n_cpu:.2f}",
                    "n/a (own grid)",
                    "-",
                    f"{n_peak / 2**20:.0f}",
                ]
            )
        except Exception as error:  # report, do not hide, why it could not run
            rows.append(
                ["nnU-Net v2 predictor", f"failed: {type(error).__name__}: {error}"[:80], "", "", "", "", "", ""]
            )
    table(
        f"2. predictor end to end, {name}: {image.shape} image -> label map, window "
        f"{package.card.patch_size[0]}^3, overlap 0.5, gaussian, {torch.get_num_threads()} thread(s)",
        [
            "pipeline",
            "kvox/s wall",
            "kvox/s cpu",
            "x MONAI (wall)",
            "x (cpu)",
            "prob max diff",
            "labels equal",
            "peak RSS +MiB",
        ],
        rows,
    )


def trained_table(name: str, cases: int) -> None:
    """The bundled trained model on real MSD hippocampus images: medseg Predictor runtimes vs the
    MONAI pipeline (CPU seconds summed over ``cases`` images, worst-case agreement)."""
    from medseg.io import read_image
    from medseg.package import resolve_model

    package = resolve_model(name)
    data = Path(os.environ.get("MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    files = sorted((data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:cases]
    if not files:
        print("4. skipped: no hippocampus images")
        return
    network = package.load_network()
    predictors = {runtime: Predictor(package, runtime=runtime) for runtime in ("eager", "channels_last", "openvino")}
    for predictor in predictors.values():
        predictor.predict(read_image(files[0]))  # conversion / warm-up outside the timing
    cpu = dict.fromkeys([*predictors, "monai"], 0.0)
    wall = dict.fromkeys([*predictors, "monai"], 0.0)
    worst = {runtime: [0.0, 1.0] for runtime in predictors}
    voxels = 0
    for path in files:
        image = read_image(path)
        voxels += int(np.prod(image.shape))
        w, c, _, (labels, probabilities) = timed(lambda: monai_reference(network, package.card, image), 1)  # noqa: B023 (called at once)
        wall["monai"] += w
        cpu["monai"] += c
        for runtime, predictor in predictors.items():
            w, c, _, prediction = timed(lambda: predictor.predict(image, return_probabilities=True), 1)  # noqa: B023
            wall[runtime] += w
            cpu[runtime] += c
            worst[runtime][0] = max(worst[runtime][0], float(np.abs(prediction.probabilities - probabilities).max()))
            worst[runtime][1] = min(worst[runtime][1], float((prediction.label_map.array == labels).mean()))
    rows = [
        [
            "MONAI (eager)",
            f"{voxels / wall['monai'] / 1e3:.0f}",
            f"{voxels / cpu['monai'] / 1e3:.0f}",
            "1.00",
            "1.00",
            "-",
            "-",
        ]
    ]
    for runtime in predictors:
        rows.append(
            [
                f"medseg Predictor ({runtime})",
                f"{voxels / wall[runtime] / 1e3:.0f}",
                f"{voxels / cpu[runtime] / 1e3:.0f}",
                f"{wall['monai'] / wall[runtime]:.2f}",
                f"{cpu['monai'] / cpu[runtime]:.2f}",
                f"{worst[runtime][0]:.1e}",
                f"{100 * worst[runtime][1]:.3f} %",
            ]
        )
    card = package.card
    table(
        f"4. bundled trained model '{name}' ({card.network.name} {card.network.config.get('filters')}, window "
        f"{tuple(card.patch_size)}), {len(files)} real MSD hippocampus images, end to end, "
        f"{torch.get_num_threads()} thread(s)",
        [
            "pipeline",
            "kvox/s wall",
            "kvox/s cpu",
            "x MONAI (wall)",
            "x (cpu)",
            "prob max diff (worst)",
            "labels equal (worst)",
        ],
        rows,
    )


MEMORY_VARIANTS = ("MONAI", "medseg float32", "medseg float16")


def memory_child(variant: str, shape: tuple[int, int, int], roi: int, classes: int = 100) -> None:
    """Run one stitching variant in this (fresh) process; print its peak RSS growth in bytes."""
    from monai.inferers import sliding_window_inference as monai_swi

    torch.manual_seed(0)
    head = torch.nn.Conv3d(1, classes, 1).eval()  # cheap predictor: the stitching dominates
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        head(x[..., :roi, :roi, :roi])  # allocator and kernels warm
    gc.collect()
    _malloc_trim()
    base = PeakRSS()._rss()
    wall = time.perf_counter()
    with torch.no_grad():
        if variant == "MONAI":
            out = monai_swi(x, (roi,) * 3, 1, head, 0.5, "gaussian")
        else:
            dtype = torch.float16 if variant.endswith("16") else torch.float32
            out = sliding_window_inference(x, (roi,) * 3, 1, head, 0.5, "gaussian", accumulator_dtype=dtype)
    wall = time.perf_counter() - wall
    peak = _vm_hwm()  # this process's own high-water mark (ru_maxrss survives exec)
    print(f"{peak - base} {wall:.3f} {out.dtype}")


def memory_table(shape: tuple[int, int, int], roi: int, classes: int = 100) -> None:
    import subprocess

    rows = []
    for variant in MEMORY_VARIANTS:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                variant,
                "--shape",
                *map(str, shape),
                "--roi",
                str(roi),
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peak, wall, dtype = result.stdout.split()[-3:]
        dtype = torch.float16 if dtype.endswith("float16") else torch.float32
        rows.append(
            [
                variant,
                f"{int(peak) / 2**20:.0f}",
                f"{stitching_bytes(shape, classes, 1, dtype) / 2**20:.0f}",
                f"{float(wall):.1f}",
            ]
        )
    table(
        f"3. stitching memory: {classes} classes, input {shape}, window {roi}^3, overlap 0.5, sw_batch_size 1, "
        "cheap 1x1x1 predictor, one fresh process each",
        ["engine", "peak RSS +MiB", "formula MiB (output + weight map)", "wall s"],
        rows,
    )
    ct = (512, 512, 300)
    print(
        f"   512 x 512 x 300 CT, 100 classes: float32 {stitching_bytes(ct, 100) / 1e9:.1f} GB, "
        f"float16 {stitching_bytes(ct, 100, 1, torch.float16) / 1e9:.1f} GB of stitching buffers "
        "(one K x voxels buffer + a float32 weight map) plus window-sized temporaries; the Predictor "
        "then softmaxes in place, resamples 8 channels at a time and keeps a running argmax on the "
        "input grid (2 x input voxels x 4 bytes)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="unet,swin_unetr")
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 96))
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--tables", default="engine,predictor", help="engine,predictor")
    parser.add_argument("--memory", action="store_true", help="add the stitching memory table")
    parser.add_argument(
        "--trained",
        default=None,
        metavar="MODEL",
        help="add table 4 for a trained model package (e.g. the bundled 'hippocampus')",
    )
    parser.add_argument("--cases", type=int, default=6, help="images for table 4 (default 6)")
    parser.add_argument(
        "--memory-shape",
        type=int,
        nargs=3,
        default=(192, 192, 96),
        help="input of the memory table (default 192 192 96, window 64^3)",
    )
    parser.add_argument("--nnunet-site", default=None, help="folder with nnunetv2 installed (--target)")
    parser.add_argument("--memory-child", default=None, choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    if args.memory_child:
        memory_child(args.memory_child, shape, args.roi)
        return 0
    tables = args.tables.split(",")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU: "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("MEDSEG_CACHE", str(Path(folder) / "cache"))
        image = real_input(shape)
        for name in args.networks.split(","):
            package = make_package(Path(folder), name, args.roi)
            if "engine" in tables:
                network = package.load_network()
                x = torch.from_numpy((image.array - image.array.mean()) / image.array.std())[None, None].float()
                engine_table(network, x, args.roi, args.repeats, name)
            if "predictor" in tables:
                predictor_table(package, image, args.repeats, name, args.nnunet_site)
        if args.trained:
            trained_table(args.trained, args.cases)
        if args.memory:
            memory_table(tuple(args.memory_shape), 64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
