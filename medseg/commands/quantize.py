"""``medseg quantize PACKAGE --dataset DIR [--fold K] [--cases N]``: an int8 runtime for a package,
with its Dice change measured on the validation fold and stated in the card.

1. The model's cross-validation split is made again from DIR as training made it (the card's
   ``training.config``: case list, ``data.num_folds``, ``training.seed``; the fold is the card's
   ``training.fold``), and checked against the card's case counts.
2. The package's OpenVINO model is quantised to int8 (:func:`medseg.inference.int8.quantize_package`,
   NNCF post-training quantisation) on windows of ``--cases`` TRAINING cases of the fold (evenly
   spaced over the sorted case ids), never validation cases, and written to
   ``PACKAGE/runtime/openvino-int8/``.
3. Every validation case of the fold is segmented through the Predictor with runtime ``openvino``
   (float32) and ``openvino_int8``: Dice and HD95 (mm) per label and their mean
   (:mod:`medseg.metrics`), the percentage of voxels both label alike, and wall-clock seconds per
   case of ``Predictor.predict`` at ``--threads`` threads (one warm-up case first, not counted).
4. The card gets ``int8`` (:class:`medseg.package.Int8Runtime`): the figures, ``dice_change`` =
   100 x (int8 mean Dice - float32 mean Dice) in points, and ``enabled`` only when
   ``|dice_change| <= 0.5`` on the whole validation fold. Only then does the Predictor's ``auto``
   runtime choose ``openvino_int8``; ``--runtime openvino_int8`` can always be asked for.

PACKAGE is written into: quantise a copy, never a bundled model. Needs NNCF
(``pip install 'medseg[int8]'``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError, DatasetError
from medseg.hardware import cpu_model

#: ``enabled`` only within this many Dice points (100 x mean Dice) of the float32 runtime
MAX_DICE_CHANGE_POINTS = 0.5
RUNTIMES = ("openvino", "openvino_int8")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="add an int8 OpenVINO runtime to a model package (NNCF), with its measured Dice change",
        description="Quantise a package's OpenVINO model to int8 on training cases of its fold, measure "
        "Dice, HD95, label agreement and seconds per case against float32 on the fold's validation "
        "cases, and write the figures to the model card (int8 enabled only within 0.5 Dice points).",
    )
    parser.add_argument("package", help="model package folder (written into: use a copy)")
    parser.add_argument("--dataset", required=True, type=Path, help="the training dataset (MSD / nnU-Net layout)")
    parser.add_argument("--fold", type=int, default=None, help="cross-validation fold (default: the model's)")
    parser.add_argument("--cases", type=int, default=32, help="training cases to calibrate on (default: 32)")
    parser.add_argument(
        "--subset-size", type=int, default=300, help="calibration windows at most (default: 300, NNCF's)"
    )
    parser.add_argument(
        "--preset",
        choices=("mixed", "performance"),
        default="mixed",
        help="NNCF preset: mixed = asymmetric activations (default), performance = symmetric",
    )
    parser.add_argument(
        "--validation-cases",
        type=int,
        default=None,
        help="measure on the first N validation cases only (a quick look: int8 is then not enabled)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, for quantising and timing (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the card's int8 entry as JSON instead of a table")
    parser.set_defaults(func=run)


class _LazyImages(Sequence):
    """The cases' images, read when iterated (so host memory holds one at a time)."""

    def __init__(self, cases: list):
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index):
        from medseg.io import read_image

        case = self.cases[index]
        return read_image(case.image, spacing=case.spacing)


def fold_cases(card, dataset: Path, fold: int | None) -> tuple[int, list, list]:
    """``(fold, training cases, validation cases)`` of the model's split made again from ``dataset``.

    Raises:
        ConfigError: ``fold`` is not the fold the model was trained on.
        DatasetError: the dataset cannot be read, or its split does not reproduce the card's counts.
    """
    from medseg.data.cases import find_cases, read_case_manifest
    from medseg.data.plan import make_folds

    config = card.training.get("config") or {}
    data, training = config.get("data") or {}, config.get("training") or {}
    trained_fold = card.training.get("fold")
    if fold is None:
        fold = int(trained_fold if trained_fold is not None else 0)
    elif trained_fold is not None and int(fold) != int(trained_fold):
        raise ConfigError(
            f"--fold {fold}: the model was trained on fold {trained_fold}; another fold's validation cases "
            "were its training cases"
        )
    fixed = None
    if data.get("manifest"):
        cases, fixed = read_case_manifest(data["manifest"], dataset, data.get("input_spacing"))
    else:
        cases = find_cases(dataset)
    if data.get("max_cases"):
        cases = cases[: int(data["max_cases"])]
    folds = make_folds([c.case_id for c in cases], int(data.get("num_folds", 5)), int(training.get("seed", 0)), fixed)
    if not 0 <= fold < len(folds):
        raise ConfigError(f"--fold {fold}: the split has folds 0 to {len(folds) - 1}")
    by_id = {c.case_id: c for c in cases}
    train, val = [by_id[i] for i in folds[fold].train], [by_id[i] for i in folds[fold].val]
    expected = (card.training.get("num_training_cases"), card.training.get("num_validation_cases"))
    if any(n is not None and int(n) != len(got) for n, got in zip(expected, (train, val))):
        raise DatasetError(
            f"{dataset}: fold {fold} has {len(train)} training / {len(val)} validation cases, the model card "
            f"{expected[0]} / {expected[1]}: not the dataset the model was trained on"
        )
    return fold, train, val


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is not smaller)."""
    if count >= len(items):
        return list(items)
    step = len(items) / max(count, 1)
    return [items[int(i * step)] for i in range(max(count, 1))]


def measure(package, cases: list, threads: int) -> dict[str, Any]:
    """Dice, HD95 (mm), label agreement (%) and seconds per case of ``openvino`` and ``openvino_int8``
    over ``cases`` (:mod:`medseg.metrics`; both runtimes on each case in turn, after one warm-up).

    Raises:
        RuntimeError: the int8 runtime fell back to float32 (its model does not load).
    """
    import numpy as np

    from medseg.inference.predictor import Predictor
    from medseg.io import read_image
    from medseg.metrics import label_map_metrics, summarize

    predictors = {name: Predictor(package, runtime=name, threads=threads) for name in RUNTIMES}
    warm = read_image(cases[0].image, spacing=cases[0].spacing)
    for name, predictor in predictors.items():
        settings = predictor.predict(warm).settings
        if settings["runtime"] != name:
            raise RuntimeError(f"runtime {name} ran as {settings['runtime']}: {settings['runtime_fallback']}")
    ids = [label.id for label in package.card.labels]
    per_case: dict[str, list] = {name: [] for name in RUNTIMES}
    seconds = dict.fromkeys(RUNTIMES, 0.0)
    same = total = 0
    for case in cases:
        image = read_image(case.image, spacing=case.spacing)
        label = read_image(case.label, spacing=case.spacing)
        reference = np.rint(label.array).astype(np.int64)
        classes = int(max(max(ids), reference.max())) + 1
        maps = {}
        for name, predictor in predictors.items():
            start = time.perf_counter()
            prediction = predictor.predict(image)
            seconds[name] += time.perf_counter() - start
            maps[name] = prediction.label_map.array
            metrics = label_map_metrics(maps[name], reference, classes, label.spacing)
            per_case[name].append({i: metrics[i] for i in ids})
        same += int(np.count_nonzero(maps["openvino"] == maps["openvino_int8"]))
        total += maps["openvino"].size
    names = {str(label.id): label.name for label in package.card.labels}
    result: dict[str, Any] = {"dice": {}, "hd95_mm": {}, "cases": len(cases)}
    for name in RUNTIMES:
        summary = summarize(per_case[name])
        result["dice"][name] = {names.get(k, k): round(v["dice"], 5) for k, v in summary.items()}
        result["hd95_mm"][name] = {names.get(k, k): round(v["hd95"], 4) for k, v in summary.items()}
    result["label_agreement"] = round(100.0 * same / max(total, 1), 4)
    result["seconds_per_case"] = {name: round(seconds[name] / len(cases), 4) for name in RUNTIMES}
    return result


def write_int8_card(package, entry: dict[str, Any]) -> None:
    """Set the card's ``int8`` in ``configs/metadata.json`` (validated, written atomically)."""
    from medseg.io.atomic import atomic_write
    from medseg.package import METADATA, ModelCard

    path = package.path / METADATA
    metadata = json.loads(path.read_text())
    metadata["medseg"]["int8"] = entry
    ModelCard.model_validate(metadata["medseg"])
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2)))


def _print_table(card, entry: dict[str, Any], result) -> None:
    fp, q = RUNTIMES
    print(
        f"int8 model {result.path.parent.name}: {result.windows} windows of {result.images} training cases of "
        f"fold {entry['calibration']['fold']}, preset {result.preset}, NNCF {result.nncf_version}, "
        f"{result.seconds:.1f} s"
    )
    print(f"measured on {entry['measured_on']}, {entry['threads']} thread(s), {entry['cpu']}")
    print(f"{'':<34}{fp:>10}{q:>15}{'change':>12}")
    for metric, unit, scale, digits, suffix in (("dice", "Dice", 100.0, 2, " pts"), ("hd95_mm", "HD95", 1.0, 3, " mm")):
        for name in entry[metric][fp]:
            a, b = entry[metric][fp][name], entry[metric][q][name]
            print(f"{unit + ' ' + name:<34}{a:>10.4f}{b:>15.4f}{(b - a) * scale:>+8.{digits}f}{suffix}")
    print(f"{'label agreement %':<34}{'':>10}{entry['label_agreement']:>15.3f}")
    s = entry["seconds_per_case"]
    print(f"{'seconds per case':<34}{s[fp]:>10.3f}{s[q]:>15.3f}{s[fp] / max(s[q], 1e-9):>11.2f}x")
    state = "enabled: auto uses openvino_int8" if entry["enabled"] else "not enabled: auto stays openvino"
    print(f"int8 runtime {state} (Dice change {entry['dice_change']:+.2f} points, limit {MAX_DICE_CHANGE_POINTS})")


def run(args: argparse.Namespace) -> int:
    from medseg.package import BUNDLED_MODELS, Int8Runtime, resolve_model, utc_timestamp

    package = resolve_model(args.package)
    if package.path.resolve().is_relative_to(BUNDLED_MODELS.resolve()):
        raise ConfigError(f"{package.path.name}: a bundled model; quantise a copy (cp -r {package.path} DIR)")
    if args.cases < 1 or args.subset_size < 1 or args.threads < 1:
        raise ConfigError("--cases, --subset-size and --threads must be at least 1")
    try:
        from medseg.inference.int8 import import_nncf, quantize_package

        import_nncf()
    except ImportError as error:
        raise ConfigError(f"medseg quantize needs NNCF: pip install 'medseg[int8]' ({error})") from None
    from medseg.inference.runtime import set_cpu_threads

    set_cpu_threads(args.threads)
    card = package.card
    fold, train, val = fold_cases(card, args.dataset, args.fold)
    calibration = evenly_spaced(train, args.cases)
    result = quantize_package(package, _LazyImages(calibration), args.subset_size, args.preset)
    measured = val[: args.validation_cases] if args.validation_cases else val
    figures = measure(package, measured, args.threads)
    fp, q = RUNTIMES
    change = 100.0 * (figures["dice"][q]["mean"] - figures["dice"][fp]["mean"])
    full = len(measured) == len(val)
    dataset = card.data_card.get("name") or card.name
    entry = Int8Runtime(
        enabled=full and abs(change) <= MAX_DICE_CHANGE_POINTS,
        dice_change=round(change, 3),
        measured_on=f"{dataset} fold {fold} validation, {len(measured)}{'' if full else f' of {len(val)}'} cases",
        weights_sha256=card.weights_sha256,
        dice=figures["dice"],
        hd95_mm=figures["hd95_mm"],
        label_agreement=figures["label_agreement"],
        seconds_per_case=figures["seconds_per_case"],
        threads=args.threads,
        cpu=cpu_model(),
        calibration={
            "fold": fold,
            "training_cases": result.images,
            "windows": result.windows,
            "preset": result.preset,
            "seconds": result.seconds,
            "nncf": result.nncf_version,
            "openvino": result.openvino_version,
            "model": str(result.path.relative_to(package.path)),
        },
        measured_at=utc_timestamp(),
    ).model_dump(mode="json")
    write_int8_card(package, entry)
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        _print_table(card, entry, result)
    return 0
