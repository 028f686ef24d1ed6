"""Nuclei models on the 14 MoNuSeg 2018 test tiles: PQ, DQ, SQ, AJI, Dice and seconds per tile.

Every package (a registered name such as ``nuclei`` or a package folder) segments each test tile
through :class:`medseg.nuclei.NucleiPredictor` (what ``medseg predict`` runs), without and with
mirroring TTA, and is scored against the tile's instance labels with
:func:`medseg.metrics.instance_metrics` (PQ per tile, then the mean over tiles, as HoVer-Net's
protocol does). The test tiles are never used for training or tuning. HoVer-Net's published
figures (Graham et al. 2019, Kumar split, ImageNet-pretrained on a GPU) are printed alongside as
the peer reference; its weights cannot be run here (no download).

Prints a markdown table. Usage (the rows in the README)::

    python benchmarks/nuclei_test.py nuclei runs/nuclei_cellvta/fold_0/model --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REFERENCE = {"name": "HoVer-Net (Graham et al. 2019, published)", "pq": 0.597, "aji": 0.618, "dice": 0.826}


def measure(spec: str, test_dir: Path, tta: bool, limit: int | None, runtime: str = "auto") -> dict:
    """Mean metrics and seconds per tile of the package ``spec`` on the test tiles."""
    from medseg.io.tile import read_instance_map, read_tile
    from medseg.metrics import instance_metrics, summarize_instances
    from medseg.networks.base import count_parameters
    from medseg.nuclei.predictor import NucleiPredictor

    predictor = NucleiPredictor(spec, tta=tta, runtime=runtime)
    images = sorted((test_dir / "images").glob("*.png"))[:limit]
    per_tile, seconds = [], []
    for path in images:
        tile = read_tile(path)
        start = time.perf_counter()
        prediction = predictor.predict(tile)
        seconds.append(time.perf_counter() - start)
        per_tile.append(instance_metrics(prediction.instances, read_instance_map(test_dir / "labels" / path.name)))
    card = predictor.package.card
    summary = summarize_instances(per_tile)
    return {
        "name": f"{card.network.name} ({card.name})",
        "params": count_parameters(predictor.head.network) / 1e6,
        "minutes": card.training.get("train_seconds", 0) / 60,
        "tta": tta,
        "tiles": len(per_tile),
        **summary,
        "s_per_tile": statistics.median(seconds),
        "runtime": predictor.runtime
        + (f" (fallback: {predictor.runtime_fallback})" if predictor.runtime_fallback else ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", help="nuclei model names or package folders")
    parser.add_argument(
        "--test-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/nuclei/monuseg_test"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N tiles only (a quick look)")
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA rows")
    parser.add_argument("--runtime", default="auto", help="NucleiPredictor runtime (auto: OpenVINO on the CPU)")
    args = parser.parse_args()
    import torch

    from medseg.inference.runtime import set_cpu_threads

    torch.set_num_threads(args.threads)
    set_cpu_threads(args.threads)  # OpenVINO's threads too
    rows = [
        measure(spec, args.test_dir, tta, args.limit, args.runtime)
        for spec in args.packages
        for tta in (False, True)[: 1 if args.no_tta else 2]
    ]
    print(
        f"MoNuSeg 2018 test, {rows[0]['tiles']} tiles, {args.threads} threads, runtime {rows[0]['runtime']}, "
        f"{torch.__version__} on CPU"
    )
    print("| model | params | training | TTA | PQ | DQ | SQ | AJI | Dice | nuclei/tile (ref) | s/tile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['params']:.2f} M | {r['minutes']:.0f} min | {'yes' if r['tta'] else 'no'} | "
            f"{r['pq']:.3f} | {r['dq']:.3f} | {r['sq']:.3f} | {r['aji']:.3f} | {r['dice']:.3f} | "
            f"{r['num_predicted']:.0f} ({r['num_reference']:.0f}) | {r['s_per_tile']:.2f} |"
        )
    ref = REFERENCE
    print(
        f"| {ref['name']} | 54.7 M | GPU | - | {ref['pq']:.3f} | - | - | {ref['aji']:.3f} | {ref['dice']:.3f} | - | - |"
    )


if __name__ == "__main__":
    main()
