"""``medseg evaluate PRED_DIR LABEL_DIR``: Dice and HD95 per class and their mean (MONAI metrics).

Predictions and labels pair by file name (``case.nii.gz`` in both folders; a prediction may also
be named ``case_seg.nii.gz`` / ``case.label.nii.gz``). Both must be on the same grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medseg.errors import DatasetError
from medseg.formats import strip_suffix, volume_suffix

# numpy and medseg.metrics (torch, MONAI) are imported in evaluate(), so that `medseg --help` stays fast


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="Dice and HD95 of predicted label maps against labels")
    parser.add_argument("pred_dir", type=Path, help="folder of predicted label maps")
    parser.add_argument("label_dir", type=Path, help="folder of reference label maps (same file names)")
    parser.add_argument("--labels", help="data card or model (name or path) giving label names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _case(path: Path) -> str | None:
    if not volume_suffix(path.name):
        return None
    stem = strip_suffix(path.name)
    for tag in ("_seg", ".label", "_label"):
        stem = stem.removesuffix(tag)
    return stem


def _index(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    return {case: p for p in sorted(folder.iterdir()) if (case := _case(p))}


def _label_names(spec: str | None) -> dict[int, str]:
    if not spec:
        return {}
    from medseg.errors import MedsegError
    from medseg.package import resolve_model

    try:
        return {label.id: label.name for label in resolve_model(spec).card.labels}
    except MedsegError:
        from medseg.data_cards import load_data_card

        return {label.id: label.name for label in load_data_card(spec).labels}


def evaluate(pred_dir: Path, label_dir: Path) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Per-case and summary metrics for every case present in both folders.

    Raises:
        DatasetError: no case pairs, or a pair on different grids.
    """
    import numpy as np

    from medseg.io import read_image
    from medseg.metrics import label_map_metrics, summarize

    predictions, labels = _index(pred_dir), _index(label_dir)
    cases = sorted(set(predictions) & set(labels))
    if not cases:
        raise DatasetError(f"no prediction in {pred_dir} has a label of the same name in {label_dir}")
    loaded = {case: (read_image(predictions[case]), read_image(labels[case])) for case in cases}
    num_classes = int(max(max(p.array.max(), y.array.max()) for p, y in loaded.values())) + 1
    per_case = {}
    for case, (prediction, label) in loaded.items():
        if prediction.shape != label.shape or not np.allclose(prediction.affine, label.affine, atol=1e-3):
            raise DatasetError(f"{case}: prediction and label are on different grids")
        metrics = label_map_metrics(np.rint(prediction.array), np.rint(label.array), max(num_classes, 2), label.spacing)
        per_case[case] = metrics
    return per_case, summarize(list(per_case.values()))


def run(args: argparse.Namespace) -> int:
    per_case, summary = evaluate(args.pred_dir, args.label_dir)
    names = _label_names(args.labels)
    if args.json:
        print(
            json.dumps(
                {"cases": {c: {str(k): v for k, v in m.items()} for c, m in per_case.items()}, "summary": summary},
                indent=2,
            )
        )
        return 0
    print(f"{len(per_case)} cases")
    print(f"{'class':<24}{'Dice':>8}{'HD95 (mm)':>12}")
    for key, values in summary.items():
        name = "mean" if key == "mean" else f"{key} {names.get(int(key), '')}".strip()
        print(f"{name:<24}{values['dice']:>8.4f}{values['hd95']:>12.2f}")
    return 0
