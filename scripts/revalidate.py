"""Re-measure a model package's validation metrics with the trainer's own validation.

Builds the :class:`medseg.training.trainer.Trainer` of ``CONFIG`` for ``--fold`` (same plan, same
validation cases), loads the package's weights into its network and runs the trainer's
validation: every case read by ``medseg.io`` and segmented by ``Predictor.from_network`` on its own
grid, Dice and HD95 (mm) on that grid. Prints the per-label figures and the package card's stored
ones side by side. Usage::

    python scripts/revalidate.py configs/hippocampus/unet.yaml --fold 0 --model hippocampus
"""

from __future__ import annotations

import argparse
import json


def main() -> int:
    from medseg.package import resolve_model
    from medseg.training.evaluation import validate_package

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--model", required=True, help="package name or path")
    args = parser.parse_args()
    package = resolve_model(args.model)
    now, _ = validate_package(args.config, package, args.fold)
    stored = package.card.metrics.get("validation", {})
    print(
        f"| label | Dice stored ({stored.get('num_cases')} cases) | Dice via Predictor ({now['num_cases']} cases) "
        "| HD95 stored (mm) | HD95 via Predictor (mm) |\n|---|---|---|---|---|"
    )
    for name, dice in now["dice"].items():
        print(
            f"| {name} | {stored.get('dice', {}).get(name, float('nan')):.4f} | {dice:.4f} | "
            f"{stored.get('hd95_mm', {}).get(name, float('nan')):.3f} | {now['hd95_mm'][name]:.3f} |"
        )
    print(json.dumps(now, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
