"""``medseg evaluate PRED_DIR LABEL_DIR``: Dice and HD95 per class and their mean (MONAI metrics);
for binary tasks (one foreground label) also clDice and the Betti-0 error (:mod:`medseg.metrics`).

Predictions and labels pair by file name (``case.nii.gz`` in both folders; a prediction may also
be named ``case_seg.nii.gz`` / ``case.label.nii.gz`` / ``case.label.tif``). Both must be on the same
grid. TIFF stacks without ImageJ/OME voxel size need ``--spacing`` (X,Y,Z mm; HD95 is in its unit);
0/255 or 0/254 label stacks are read as 0/1 (:mod:`medseg.io.tiff`).
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
    parser.add_argument(
        "--spacing", help="voxel size of TIFF stacks along X,Y,Z in mm (or e.g. 0.99,0.99,5um), when they state none"
    )
    parser.add_argument(
        "--topology",
        choices=("auto", "on", "off"),
        default="auto",
        help="clDice and Betti-0 error: auto = for binary tasks (one foreground label)",
    )
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


def evaluate(
    pred_dir: Path, label_dir: Path, spacing: tuple[float, float, float] | None = None, topology: str = "auto"
) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Per-case and summary metrics for every case present in both folders.

    Args:
        spacing: mm along X, Y, Z for TIFF stacks (:func:`medseg.io.tiff.read_tiff`).
        topology: ``"auto"`` (clDice, Betti-0 error when there is one foreground class), ``"on"``, ``"off"``.

    Raises:
        DatasetError: no case pairs, or a pair on different grids.
        MissingGeometryError: a TIFF without voxel size and no ``spacing``.
    """
    import numpy as np

    from medseg.io import read_image
    from medseg.metrics import label_map_metrics, summarize

    predictions, labels = _index(pred_dir), _index(label_dir)
    cases = sorted(set(predictions) & set(labels))
    if not cases:
        raise DatasetError(f"no prediction in {pred_dir} has a label of the same name in {label_dir}")
    loaded = {
        case: (read_image(predictions[case], spacing=spacing), read_image(labels[case], spacing=spacing))
        for case in cases
    }
    num_classes = int(max(max(p.array.max(), y.array.max()) for p, y in loaded.values())) + 1
    with_topology = topology == "on" or (topology == "auto" and max(num_classes, 2) == 2)
    per_case = {}
    for case, (prediction, label) in loaded.items():
        if prediction.shape != label.shape or not np.allclose(prediction.affine, label.affine, atol=1e-3):
            raise DatasetError(f"{case}: prediction and label are on different grids")
        metrics = label_map_metrics(
            np.rint(prediction.array), np.rint(label.array), max(num_classes, 2), label.spacing, topology=with_topology
        )
        per_case[case] = metrics
    return per_case, summarize(list(per_case.values()))


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.io.tiff import parse_spacing

    try:
        spacing = parse_spacing(args.spacing)
    except ValueError as error:
        raise ConfigError(f"--spacing: {error}") from None
    per_case, summary = evaluate(args.pred_dir, args.label_dir, spacing, args.topology)
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
    topology = any("cldice" in values for values in summary.values())
    print(f"{'class':<24}{'Dice':>8}{'HD95 (mm)':>12}" + (f"{'clDice':>8}{'Betti-0 err':>13}" if topology else ""))
    for key, values in summary.items():
        name = "mean" if key == "mean" else f"{key} {names.get(int(key), '')}".strip()
        line = f"{name:<24}{values['dice']:>8.4f}{values['hd95']:>12.2f}"
        if topology:
            line += f"{values['cldice']:>8.4f}{values['betti0_error']:>13.1f}"
        print(line)
    return 0
