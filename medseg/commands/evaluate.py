"""``medseg evaluate PRED_DIR LABEL_DIR``: Dice and HD95 per class and their mean (MONAI metrics);
for binary tasks (one foreground label) also clDice and the Betti-0 error (:mod:`medseg.metrics`).

Predictions and labels pair by file name (``case.nii.gz`` in both folders; a prediction may also
be named ``case_seg.nii.gz`` / ``case.label.nii.gz`` / ``case.label.tif``). Both must be on the same
grid. TIFF stacks without ImageJ/OME voxel size need ``--spacing`` (X,Y,Z mm; HD95 is in its unit);
0/255 or 0/254 label stacks are read as 0/1 (:mod:`medseg.io.tiff`).

Instance maps (nuclei): with ``--instances``, or automatically when PRED_DIR holds
``*.instances.tif`` files, each prediction ``<stem>.instances.tif`` (2D uint16/uint32 TIFF, 0
background, one id per nucleus) pairs with the 2D instance label ``<stem>.png`` (read with Pillow),
else ``<stem>.tif`` / ``<stem>.tiff`` (tifffile), in LABEL_DIR; the table gives PQ, DQ, SQ, AJI,
foreground Dice and the instance counts per image and their mean over images
(:func:`medseg.metrics.instance_metrics`, :func:`medseg.metrics.summarize_instances`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medseg.errors import DatasetError
from medseg.formats import strip_suffix, volume_suffix

# numpy and medseg.metrics (torch, MONAI) are imported in evaluate(), so that `medseg --help` stays fast

#: suffixes of predicted instance maps, and of instance labels in the order they are looked for
INSTANCE_SUFFIXES = (".instances.tif", ".instances.tiff")
INSTANCE_LABEL_SUFFIXES = (".png", ".tif", ".tiff")


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
    parser.add_argument(
        "--instances",
        action="store_true",
        help="2D instance maps: PQ, DQ, SQ, AJI of <stem>.instances.tif against <stem>.png/.tif "
        "(automatic when PRED_DIR holds *.instances.tif)",
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


def _instance_stem(path: Path) -> str | None:
    lower = path.name.lower()
    suffix = next((s for s in INSTANCE_SUFFIXES if lower.endswith(s)), None)
    return path.name[: len(path.name) - len(suffix)] if suffix else None


def has_instance_maps(folder: Path) -> bool:
    """Whether ``folder`` holds predicted instance maps (``*.instances.tif``)."""
    return folder.is_dir() and any(_instance_stem(p) for p in folder.iterdir() if p.is_file())


def evaluate_instances(pred_dir: Path, label_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-image :func:`~medseg.metrics.instance_metrics` and their mean over images for every
    ``<stem>.instances.tif`` in ``pred_dir`` with a label ``<stem>.png`` / ``.tif`` / ``.tiff`` in
    ``label_dir`` (first found in that order).

    Raises:
        DatasetError: a folder is missing, no pairs, an image is not 2D, or a pair differs in size.
        UnreadableFileError: a file cannot be read.
    """
    from medseg.io.tile import read_instance_map
    from medseg.metrics import instance_metrics, summarize_instances

    for folder in (pred_dir, label_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: not a folder")
    pairs = {}
    for path in sorted(pred_dir.iterdir()):
        stem = _instance_stem(path)
        if stem is None or stem in pairs:
            continue
        labels = [label_dir / (stem + suffix) for suffix in INSTANCE_LABEL_SUFFIXES]
        label = next((candidate for candidate in labels if candidate.is_file()), None)
        if label is not None:
            pairs[stem] = (path, label)
    if not pairs:
        raise DatasetError(
            f"no instance map <stem>.instances.tif in {pred_dir} has a label <stem>.png/.tif/.tiff in {label_dir}"
        )
    per_image = {}
    for stem, (pred_path, label_path) in pairs.items():
        prediction, label = read_instance_map(pred_path), read_instance_map(label_path)
        if prediction.shape != label.shape:
            raise DatasetError(
                f"{stem}: prediction is {prediction.shape[0]}x{prediction.shape[1]} pixels "
                f"but label is {label.shape[0]}x{label.shape[1]}"
            )
        per_image[stem] = instance_metrics(prediction, label)
    return per_image, summarize_instances(list(per_image.values()))


def _print_instances(per_image: dict[str, dict[str, float]], summary: dict[str, float]) -> None:
    width = max(len("mean"), *(len(stem) for stem in per_image)) + 2
    print(f"{len(per_image)} images")
    print(f"{'image':<{width}}" + "".join(f"{h:>8}" for h in ("PQ", "DQ", "SQ", "AJI", "Dice", "#pred", "#ref")))
    for stem, m in [*per_image.items(), ("mean", summary)]:
        counts = (
            f"{m['num_predicted']:>8.1f}{m['num_reference']:>8.1f}"
            if stem == "mean"
            else f"{m['num_predicted']:>8d}{m['num_reference']:>8d}"
        )
        print(f"{stem:<{width}}" + "".join(f"{m[k]:>8.4f}" for k in ("pq", "dq", "sq", "aji", "dice")) + counts)


def run(args: argparse.Namespace) -> int:
    if args.instances or has_instance_maps(args.pred_dir):
        per_image, instance_summary = evaluate_instances(args.pred_dir, args.label_dir)
        if args.json:
            print(json.dumps({"cases": per_image, "summary": instance_summary}, indent=2))
        else:
            _print_instances(per_image, instance_summary)
        return 0
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
