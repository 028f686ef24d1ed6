"""float16 weight storage does not change segmentation: a package against its float16 copy.

For a model package (default: the bundled ``hippocampus``), on the validation cases of the fold
it was trained on (the trainer's split made again from ``--dataset``: the card's
``training.config`` case list, ``data.num_folds``, ``training.seed``; checked against the card's
``num_validation_cases``):

1. a float16 copy is installed in a temporary folder (:func:`medseg.package.install_package`:
   weights stored in float16, card sha256 and ``weights_dtype`` updated, the OpenVINO model made
   again from the copy's weights);
2. every case is segmented by the :class:`~medseg.inference.Predictor` of each package, per
   runtime (``eager``: PyTorch with the float16 weights cast to float32 at load; ``auto``: what
   ``medseg predict`` runs on this machine, OpenVINO from the shipped model);
3. Dice per label and mean over cases (:mod:`medseg.metrics`, on the input grid, as the trainer
   validates), the voxels whose labels differ between the two packages, the cases where any do,
   and the largest difference of a class probability.

Prints a markdown table. Usage::

    OMP_NUM_THREADS=1 python benchmarks/fp16_weights.py [--model hippocampus] \\
        [--dataset ../shared/data/hippocampus] [--runtimes eager auto] [--cases N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure(model: str, dataset: Path, runtimes: list[str], cases: int | None, threads: int) -> dict:
    import numpy as np
    import torch

    from medseg.commands.quantize import fold_cases
    from medseg.inference import Predictor
    from medseg.io import read_image
    from medseg.metrics import label_map_metrics, summarize
    from medseg.package import WEIGHTS, install_package, resolve_model

    torch.set_num_threads(threads)
    package = resolve_model(model)
    card = package.card
    fold, _, val = fold_cases(card, dataset, None)
    val = val[:cases] if cases else val
    names = {str(label.id): label.name for label in card.labels}
    with tempfile.TemporaryDirectory(prefix="medseg-fp16-") as tmp:
        start = time.perf_counter()
        half = install_package(package, f"{package.path.name}_fp16", tmp, "float16")
        install_s = time.perf_counter() - start
        packages = {"float32": package, "float16": half}
        report: dict = {
            "model": card.identity,
            "fp16_copy": half.card.identity,
            "measured_on": f"{dataset.name} fold {fold} validation, {len(val)} cases",
            "install_seconds": round(install_s, 1),
            "packages": {
                dtype: {
                    "weights_dtype": p.card.weights_dtype,
                    "weights_mb": round((p.path / WEIGHTS).stat().st_size / 1e6, 3),
                    "package_mb": round(folder_mb(p.path), 3),
                    "sha256": p.weights_sha256,
                    "sha256_matches_file": p.check_weights() == p.weights_sha256,
                }
                for dtype, p in packages.items()
            },
            "runtimes": {},
        }
        images = [(read_image(c.image), read_image(c.label).array.astype(np.int64)) for c in val]
        for runtime in runtimes:
            predictors = {dtype: Predictor(p, runtime=runtime, threads=threads) for dtype, p in packages.items()}
            per_case: dict[str, list] = {dtype: [] for dtype in packages}
            differing = total = cases_differing = 0
            max_probability_change = 0.0
            used = {}
            for image, label in images:
                outputs = {
                    dtype: predictor.predict(image, return_probabilities=True)
                    for dtype, predictor in predictors.items()
                }
                for dtype, prediction in outputs.items():
                    used[dtype] = prediction.settings.get("runtime")
                    per_case[dtype].append(
                        label_map_metrics(prediction.label_map.array, label, card.num_classes, image.spacing)
                    )
                a, b = (np.asarray(outputs[d].label_map.array) for d in ("float32", "float16"))
                changed = int(np.count_nonzero(a != b))
                differing += changed
                total += a.size
                cases_differing += changed > 0
                max_probability_change = max(
                    max_probability_change,
                    float(np.max(np.abs(outputs["float32"].probabilities - outputs["float16"].probabilities))),
                )
            rows = {}
            for dtype in packages:
                summary = summarize(per_case[dtype])
                rows[dtype] = {
                    "runtime_used": used[dtype],
                    "dice": {names.get(k, k): v["dice"] for k, v in summary.items()},
                    "hd95_mm": {names.get(k, k): v["hd95"] for k, v in summary.items()},
                }
            report["runtimes"][runtime] = {
                **rows,
                "voxels_differing": differing,
                "voxels": total,
                "label_agreement_pct": 100.0 * (1 - differing / total),
                "cases_differing": cases_differing,
                "cases": len(images),
                "max_probability_change": max_probability_change,
            }
    return report


def table(report: dict) -> str:
    labels = [k for k in next(iter(report["runtimes"].values()))["float32"]["dice"] if k != "mean"]
    header = [
        "runtime",
        "weights",
        "model.pt MB",
        "package MB",
        *(f"Dice {name}" for name in labels),
        "Dice mean",
        "HD95 mean (mm)",
        "voxels differing",
        "label agreement",
        "max prob. change",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runtime, result in report["runtimes"].items():
        for dtype in ("float32", "float16"):
            p, row = report["packages"][dtype], result[dtype]
            diff = (
                [
                    f"{result['voxels_differing']:,} / {result['voxels']:,} "
                    f"({result['cases_differing']} of {result['cases']} cases)",
                    f"{result['label_agreement_pct']:.4f} %",
                    f"{result['max_probability_change']:.1e}",
                ]
                if dtype == "float16"
                else ["", "", ""]
            )
            cells = [
                f"{runtime} ({row['runtime_used']})",
                dtype,
                f"{p['weights_mb']:.2f}",
                f"{p['package_mb']:.2f}",
                *(f"{row['dice'][name]:.4f}" for name in labels),
                f"{row['dice']['mean']:.4f}",
                f"{row['hd95_mm']['mean']:.3f}",
                *diff,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hippocampus", help="package name or folder (default: hippocampus)")
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--runtimes", nargs="+", default=["eager", "auto"], help="Predictor runtimes to compare")
    parser.add_argument("--cases", type=int, default=None, help="first N validation cases only (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = measure(args.model, args.dataset, args.runtimes, args.cases, args.threads)
    print(f"{report['model']} vs its float16 copy ({report['fp16_copy']}), {report['measured_on']}")
    print(table(report))
    print(
        f"sha256 of each card = sha256 of its models/model.pt: "
        f"{all(p['sha256_matches_file'] for p in report['packages'].values())}; "
        f"fp16 install (copy + OpenVINO conversion) {report['install_seconds']} s; "
        f"total {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
