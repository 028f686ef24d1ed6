"""The hippocampus leaderboard: every exported package re-measured on its fold, side by side.

For each ``CONFIG=PACKAGE`` pair (the experiment YAML and the package it exported: a registered
model name or a package folder), on the config's fold:

- Dice per label and mean, HD95 (mm) mean: :func:`medseg.training.evaluation.validate_package`,
  i.e. the trainer's validation through ``Predictor.from_network`` on every validation case;
- parameters, training minutes and epochs from the package's card (what the run recorded);
- inference seconds per case over ``--cases`` validation cases (min and median after one warm-up):
  the :class:`~medseg.inference.Predictor` with ``runtime="auto"`` (its pick is printed) and the
  plain MONAI pipeline (:func:`medseg.inference.reference.monai_reference`, eager PyTorch) in the
  same run, and the share of voxels on which their label maps agree.

Prints a markdown table. Usage (the rows committed in the README)::

    python benchmarks/leaderboard.py configs/hippocampus/unet.yaml=hippocampus \\
        configs/hippocampus/stunet.yaml=runs/hippocampus_stunet/fold_0/package
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(config: str, spec: str, cases: int, threads: int) -> dict:
    """One leaderboard row for the package ``spec`` trained from ``config``."""
    import numpy as np
    import torch

    from medseg.inference import Predictor
    from medseg.inference.reference import monai_reference
    from medseg.package import resolve_model
    from medseg.training.evaluation import validate_package

    torch.set_num_threads(threads)
    package = resolve_model(spec)
    summary, images = validate_package(config, package, keep_images=True)
    network = package.load_network()
    predictor = Predictor(package)
    images = [image for image, _ in images[:cases]]
    predictor.predict(images[0])  # warm-up (runtime compile) outside the timings
    monai_reference(network, package.card, images[0])
    ours, theirs, agree = [], [], []
    for image in images:
        t_ours, prediction = _timed(lambda image=image: predictor.predict(image), 1)
        t_monai, (labels, _) = _timed(lambda image=image: monai_reference(network, package.card, image), 1)
        ours.append(t_ours)
        theirs.append(t_monai)
        agree.append(float(np.mean(np.asarray(prediction.label_map.array) == labels)))
    training = package.card.training
    dice = summary["dice"]
    return {
        "network": package.card.network.name,
        "package": package.card.name,
        "parameters_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "train_min": training.get("train_seconds", float("nan")) / 60,
        "epochs": training.get("epochs"),
        "dice": dice,
        "hd95_mm": summary["hd95_mm"]["mean"],
        "runtime": predictor.runtime,
        "ours_s": (min(ours), statistics.median(ours)),
        "monai_s": (min(theirs), statistics.median(theirs)),
        "agreement": min(agree),
        "num_cases": summary["num_cases"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", metavar="CONFIG=PACKAGE")
    parser.add_argument("--cases", type=int, default=10, help="validation cases timed per package")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for row in args.rows:
        config, _, spec = row.partition("=")
        rows.append(measure(config, spec, args.cases, args.threads))
    labels = [name for name in rows[0]["dice"] if name != "mean"]
    print(
        "| network | package | params (M) | train min | epochs | "
        + " | ".join(f"Dice {name}" for name in labels)
        + " | Dice mean | HD95 mean (mm) | runtime | s/case (min / median) | MONAI eager s/case"
        + " | speed-up | labels equal |"
    )
    print("|" + "---|" * (11 + len(labels)))
    for r in rows:
        speed = r["monai_s"][1] / r["ours_s"][1]
        print(
            f"| {r['network']} | {r['package']} | {r['parameters_m']:.2f} | {r['train_min']:.1f} | {r['epochs']} | "
            + " | ".join(f"{r['dice'][name]:.4f}" for name in labels)
            + f" | {r['dice']['mean']:.4f} | {r['hd95_mm']:.3f} | {r['runtime']} | "
            f"{r['ours_s'][0]:.3f} / {r['ours_s'][1]:.3f} | {r['monai_s'][0]:.3f} / {r['monai_s'][1]:.3f} | "
            f"{speed:.2f}x | {100 * r['agreement']:.2f} % |"
        )
    print(f"\n{rows[0]['num_cases']} validation cases for Dice/HD95; {args.cases} timed; {args.threads} threads.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
