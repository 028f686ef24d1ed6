"""Nuclei networks through their fastest runtime that gives the same result: ``benchmarks/nuclei_runtimes.py``.

1. The bundled ``nuclei`` model (U-Net, HoVer outputs) on the 14 MoNuSeg 2018 test tiles
   (``../shared/data/nuclei/monuseg_test``, never used for training or tuning) through
   :class:`medseg.nuclei.NucleiPredictor` (what ``medseg predict --model nuclei`` runs), runtime
   ``auto`` (OpenVINO on the CPU, from the IR shipped in the package) and ``eager``, no TTA: median
   seconds per tile (tiles read before the clock starts; one untimed warm-up tile each, where the
   auto predictor loads and verifies the shipped IR), mean PQ / AJI / Dice over tiles
   (:func:`medseg.metrics.instance_metrics`, as ``benchmarks/nuclei_test.py``) and the share of
   pixels whose instance id is equal in both runtimes' maps (all tiles together; minimum over tiles).
2. Each nuclei network config under ``configs/nuclei/`` (CellVTA; the U-Net config too with
   ``--all``) as a package in a temporary folder with **seeded random weights** (as
   ``benchmarks/runtimes.py`` builds them): seconds of :func:`medseg.inference.runtime.prepare_package`
   (conversion of the HoVer head for ``(1, 3, *patch)`` in a child process, verified within
   ``VERIFY_TOLERANCE`` of the eager output range), or why it failed; then the median seconds of
   one window call eager vs the auto runtime on a seeded input, and max |auto - eager| / range.

``--threads`` (default 1) is set for PyTorch and OpenVINO and exported as ``OMP_NUM_THREADS`` for
the conversion children; ``$MEDSEG_CACHE`` is a temporary folder. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def bundled_rows(test_dir: Path, limit: int | None) -> dict:
    """Part 1: the bundled model on the test tiles, auto vs eager."""
    import numpy as np

    from medseg.io.tile import read_instance_map, read_tile
    from medseg.metrics import instance_metrics, summarize_instances
    from medseg.nuclei.predictor import NucleiPredictor

    paths = sorted((test_dir / "images").glob("*.png"))[:limit]
    tiles = [read_tile(p) for p in paths]
    labels = [read_instance_map(test_dir / "labels" / p.name) for p in paths]
    predictors = {name: NucleiPredictor("nuclei", runtime=name) for name in ("auto", "eager")}
    for predictor in predictors.values():
        predictor.predict(tiles[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    metrics: dict[str, list[dict]] = {name: [] for name in predictors}
    equal, pixels, worst = 0, 0, 1.0
    ran = {}
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        maps = {}
        for name in ("auto", "eager") if i % 2 == 0 else ("eager", "auto"):
            started = time.perf_counter()
            prediction = predictors[name].predict(tile)
            seconds[name].append(time.perf_counter() - started)
            maps[name] = prediction.instances
            metrics[name].append(instance_metrics(prediction.instances, label))
            ran[name] = (prediction.runtime, prediction.runtime_fallback)
        same = int(np.sum(maps["auto"] == maps["eager"]))
        equal, pixels = equal + same, pixels + maps["auto"].size
        worst = min(worst, same / maps["auto"].size)
    rows = {
        name: {
            "runtime": ran[name][0],
            "fallback": ran[name][1],
            "s_per_tile": statistics.median(seconds[name]),
            **summarize_instances(metrics[name]),
        }
        for name in predictors
    }
    return {"tiles": len(tiles), "rows": rows, "equal": equal / pixels, "equal_min": worst}


def seeded_package(config_path: Path, folder: Path, seed: int):
    """A nuclei package of ``config_path``'s network with seeded random weights."""
    import torch

    from medseg.networks import create_network
    from medseg.package import ModelPackage, NetworkSpec, resolve_model
    from medseg.training import load_config

    config = load_config(config_path)
    bundled = resolve_model("nuclei").card
    network_config = dict(config.network.config)
    if config.network.name == "unet":
        network_config = {"spatial_dims": 2, "in_channels": 3, "out_channels": 4, **network_config}
    torch.manual_seed(seed)
    network = create_network(config.network.name, **network_config).eval()
    card = bundled.model_copy(
        update={
            "name": f"seeded_{config_path.stem}",
            "description": f"untrained (seed {seed}) {config.network.name}: benchmark only",
            "network": NetworkSpec(name=config.network.name, config=network_config),
            "patch_size": tuple(int(p) for p in config.data.patch_size),
            "training": {"untrained": True, "seed": seed},
            "metrics": {},
            "trained_at": None,
        }
    )
    return ModelPackage.save(folder / config_path.stem, card, network.state_dict()), network


def network_row(config_path: Path, folder: Path, seed: int, calls: int) -> dict:
    """Part 2: export, then one window eager vs auto."""
    import numpy as np
    from runtimes import export_cost, interleaved_calls, relative_error  # benchmarks/runtimes.py

    from medseg.inference.runtime import NetworkRuntime
    from medseg.networks.hover import HoVerHead

    package, network = seeded_package(config_path, folder, seed)
    row: dict = {"config": config_path.stem, "network": package.card.network.name}
    row["parameters"] = sum(p.numel() for p in network.parameters())
    row["export_s"], row["export_failure"] = export_cost(package)
    shape = (1, 3, *package.card.patch_size)
    runners = {
        "eager": NetworkRuntime(HoVerHead(network).eval(), "eager", spatial_dims=2),
        "auto": NetworkRuntime(
            None,
            "auto",
            spatial_dims=2,
            cache_key=package.check_weights(),
            shipped_dir=package.runtime_dir,
            load_network=lambda: HoVerHead(package.load_network("cpu")).eval(),
            package_path=package.path,
        ),
    }
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    outputs, row["seconds"] = interleaved_calls(runners, x, calls)
    row["auto_runtime"], row["fallback"] = runners["auto"].name, runners["auto"].fallback_reason
    row["error"] = relative_error(outputs["auto"], outputs["eager"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-dir", type=Path, default=SHARED / "nuclei" / "monuseg_test")
    parser.add_argument("--limit", type=int, default=None, help="first N test tiles only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", type=int, default=5, help="timed window calls per runtime")
    parser.add_argument("--all", action="store_true", help="every configs/nuclei network, not only CellVTA")
    parser.add_argument("--skip-tiles", action="store_true", help="part 2 only")
    args = parser.parse_args(argv)
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(args.threads)))
    with tempfile.TemporaryDirectory(prefix="medseg-nuclei-runtimes-") as tmp:
        os.environ["MEDSEG_CACHE"] = str(Path(tmp) / "cache")
        import openvino
        import torch

        from medseg.inference.runtime import set_cpu_threads

        torch.set_num_threads(args.threads)
        set_cpu_threads(args.threads)
        print(f"{args.threads} thread(s), torch {torch.__version__}, openvino {openvino.__version__.split('-')[0]}")
        if not args.skip_tiles:
            part = bundled_rows(args.test_dir, args.limit)
            print(f"\nBundled `nuclei` U-Net, MoNuSeg 2018 test, {part['tiles']} tiles, no TTA")
            print("| runtime | ran | s/tile (median) | PQ | AJI | Dice | nuclei/tile |")
            print("|---|---|---|---|---|---|---|")
            for name, r in part["rows"].items():
                ran = r["runtime"] + (f" (fallback: {r['fallback']})" if r["fallback"] else "")
                print(
                    f"| {name} | {ran} | {r['s_per_tile']:.2f} | {r['pq']:.4f} | {r['aji']:.4f} | "
                    f"{r['dice']:.4f} | {r['num_predicted']:.0f} |"
                )
            equal, worst = 100 * part["equal"], 100 * part["equal_min"]
            print(f"instance ids equal: {equal:.3f} % of pixels (worst tile {worst:.3f} %)")
        configs = sorted((REPO / "configs" / "nuclei").glob("*.yaml"))
        configs = [c for c in configs if args.all or "cellvta" in c.stem]
        rows = [network_row(c, Path(tmp), args.seed, args.calls) for c in configs]
        print(f"\nSeeded random weights (seed {args.seed}), one (1, 3, *patch) window")
        print("| config | network | params | export s | conversion | auto ran | eager s | auto s | speed-up | error |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            s = r["seconds"]
            print(
                f"| {r['config']} | {r['network']} | {r['parameters'] / 1e6:.1f} M | {r['export_s']:.1f} | "
                f"{r['export_failure'] or 'verified'} | {r['auto_runtime']}"
                f"{' (fallback)' if r['fallback'] else ''} | {s['eager']:.3f} | {s['auto']:.3f} | "
                f"{s['eager'] / s['auto']:.2f}x | {r['error']:.1e} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
