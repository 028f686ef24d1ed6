"""Cross-validation of a run's folds and the ensemble package that holds them all.

Behind ``medseg train CONFIG --fold all`` (every fold of the plan, each in ``ROOT/fold_<K>``) and
``medseg train CONFIG --cross-validate``, with ``ROOT`` = ``runs/<config name>`` (or ``--output``):

- :func:`fold_dirs` / :func:`check_folds_trained`: the fold run folders and whether each is done
  (:func:`medseg.training.trainer.run_finished`).
- :func:`cross_validate`: each fold's exported package (``ROOT/fold_<K>/model``) predicts that
  fold's validation cases, as ``medseg predict`` does (:class:`medseg.inference.Predictor` on the
  image read by :func:`medseg.io.read_image`, label map on the input grid); Dice and HD95 (mm) per
  class by :func:`medseg.metrics.label_map_metrics` against the label map on the input grid (the
  trainer's validation protocol). The plan's folds partition the cases, so every case is predicted
  exactly once, by the one fold that did not train on it. Written to ``ROOT/cross_validation.json``.
- :func:`write_ensemble`: ``ROOT/ensemble``, one model package with fold 0's weights
  (``models/model.pt``) holding the other folds' packages under ``folds/fold_<K>/``; its card lists
  them (:attr:`medseg.package.ModelCard.folds`), turns mirroring TTA on by default
  (``tta_default``) and records the cross-validation summary in ``metrics.cross_validation``.
  ``Predictor(ROOT/ensemble)`` averages all folds per window.
- :func:`format_table`: the summary as a text table.

Report (``cross_validation.json``)::

    {"name", "num_folds", "folds": [0, 1, ...], "num_cases", "protocol",
     "packages": {"0": {"path", "weights_sha256"}, ...},
     "cases": [{"case", "fold", "dice": {label: x}, "hd95_mm": {label: x | null}}, ...],
     "summary": {"num_cases", "folds", "dice": {label: mean, ..., "mean": x},
                 "hd95_mm": {label: mean, ..., "mean": x}, "protocol"}}

HD95 is ``null`` for a case and class where prediction or reference is empty (MONAI convention); the
means skip those (NaN-aware, :func:`medseg.metrics.summarize`), and are ``null`` if none is left.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.plan import Plan, write_json_atomic
from medseg.errors import ConfigError, DatasetError
from medseg.training.config import TrainConfig
from medseg.training.trainer import VALIDATION_PROTOCOL, dataset_cases, run_finished

REPORT = "cross_validation.json"
ENSEMBLE = "ensemble"


def run_root(config: TrainConfig, output: str | os.PathLike | None = None) -> Path:
    """The folder of a config's folds: ``output`` when given, else ``runs/<config name>``."""
    return Path(output) if output else Path("runs") / config.name


def fold_dirs(config: TrainConfig, root: str | os.PathLike) -> list[Path]:
    """``ROOT/fold_<K>`` for ``K`` in ``0 .. data.num_folds - 1``."""
    return [Path(root) / f"fold_{k}" for k in range(config.data.num_folds)]


def check_folds_trained(config: TrainConfig, root: str | os.PathLike) -> list[Path]:
    """The fold run folders, each finished (:func:`~medseg.training.trainer.run_finished`).

    Raises:
        ConfigError: a fold is not trained (or not to the end), naming the first such fold.
    """
    dirs = fold_dirs(config, root)
    missing = [k for k, folder in enumerate(dirs) if not run_finished(config, folder)]
    if missing:
        raise ConfigError(
            f"--cross-validate: fold {missing[0]} of {config.data.num_folds} is not trained "
            f"({dirs[missing[0]].name} has no finished run"
            + (f"; and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "); run `medseg train CONFIG --fold all` first"
        )
    return dirs


def _fold_plan(folder: Path) -> Plan:
    try:
        return Plan.load(folder / "plan.json")
    except Exception as error:  # noqa: BLE001 - any unreadable plan is the same problem
        raise ConfigError(f"--cross-validate: {folder.name}/plan.json cannot be read ({error})") from None


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def cross_validate(
    config: TrainConfig,
    root: str | os.PathLike,
    device: str | torch.device = "cpu",
    runtime: str = "eager",
    tta: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict every case once with the fold that did not train on it; write and return the report.

    Args:
        config: the experiment config the folds were trained with (its data card, dataset, folds).
        root: the folder holding ``fold_<K>/`` (see :func:`run_root`); the report is written to
            ``root/cross_validation.json``.
        device: where the networks run.
        runtime: the Predictor's runtime (default ``eager``: the trainer's validation numbers).
        tta: mirroring TTA (default off, as the trainer's validation).
        progress: one line per case on stderr.

    Returns:
        The report (module docstring): per case Dice and HD95 (mm) per label name, and the
        summary (means per label and ``"mean"`` over labels, number of cases, folds).

    Raises:
        ConfigError: a fold is not trained, or the folds' plans disagree (different splits).
        DatasetError: the folds' validation sets do not cover every case of the plan exactly once,
            a validation case was in its fold's training set, or a case is not in the dataset.
        ModelNotFoundError, UnreadableFileError: a fold's package cannot be read.
    """
    from medseg.inference import Predictor
    from medseg.io import read_image
    from medseg.metrics import label_map_metrics, summarize
    from medseg.package import ModelPackage

    root = Path(root)
    dirs = check_folds_trained(config, root)
    plans = [_fold_plan(folder) for folder in dirs]
    splits = [[(sorted(f.train), sorted(f.val)) for f in plan.folds] for plan in plans]
    if any(split != splits[0] for split in splits[1:]) or len(plans[0].folds) != len(dirs):
        raise ConfigError("--cross-validate: the folds were trained with different plans (case splits differ)")
    folds = plans[0].folds
    all_cases = sorted({c for f in folds for c in f.train + f.val})
    seen: dict[str, int] = {}
    for k, fold in enumerate(folds):
        leaked = sorted(set(fold.val) & set(fold.train))
        if leaked:
            raise DatasetError(f"fold {k}: validation case {leaked[0]} is also a training case")
        for case in fold.val:
            if case in seen:
                raise DatasetError(f"case {case} is a validation case of folds {seen[case]} and {k}")
            seen[case] = k
    unseen = sorted(set(all_cases) - set(seen))
    if unseen:
        raise DatasetError(f"case {unseen[0]} is in no fold's validation set (and {len(unseen) - 1} more)")
    cases = {case.case_id: case for case in dataset_cases(config)}
    absent = sorted(set(all_cases) - set(cases))
    if absent:
        raise DatasetError(f"case {absent[0]} of the plan is not in {Path(config.data.dataset_dir).name}")

    packages = [ModelPackage(folder / "model") for folder in dirs]
    card = packages[0].card
    names = {str(label.id): label.name for label in card.labels}
    rows: list[dict[str, Any]] = []
    per_case: list[dict[int, dict[str, float]]] = []
    t0 = time.perf_counter()
    for k, (package, fold) in enumerate(zip(packages, folds)):
        predictor = Predictor(package, device=device, tta=tta, runtime=runtime)
        for case_id in fold.val:
            case = cases[case_id]
            image = read_image(case.image, spacing=case.spacing)
            label = read_image(case.label, spacing=case.spacing).array.astype(np.int64)
            prediction = predictor.predict(image).label_map.array
            metrics = label_map_metrics(prediction, label, package.card.num_classes, image.spacing)
            per_case.append(metrics)
            rows.append(
                {
                    "case": case_id,
                    "fold": k,
                    "dice": {names.get(str(c), str(c)): round(v["dice"], 6) for c, v in metrics.items()},
                    "hd95_mm": {names.get(str(c), str(c)): _finite(round(v["hd95"], 4)) for c, v in metrics.items()},
                }
            )
            if progress:
                dice = np.mean([v["dice"] for v in metrics.values()])
                print(f"fold {k} {case_id}: mean Dice {dice:.4f}", file=sys.stderr, flush=True)
    summary = summarize(per_case)
    fold_ids = list(range(len(dirs)))
    report = {
        "name": config.name,
        "num_folds": len(dirs),
        "folds": fold_ids,
        "num_cases": len(rows),
        "protocol": VALIDATION_PROTOCOL + ("; mirroring TTA" if tta else ""),
        "seconds": round(time.perf_counter() - t0, 1),
        "packages": {str(k): {"path": str(p.path), "weights_sha256": p.weights_sha256} for k, p in enumerate(packages)},
        "cases": sorted(rows, key=lambda row: row["case"]),
        "summary": {
            "num_cases": len(rows),
            "folds": fold_ids,
            "dice": {names.get(k, k): _finite(v["dice"]) for k, v in summary.items()},
            "hd95_mm": {names.get(k, k): _finite(v["hd95"]) for k, v in summary.items()},
            "protocol": VALIDATION_PROTOCOL + ("; mirroring TTA" if tta else ""),
        },
    }
    write_json_atomic(root / REPORT, report)
    return report


def write_ensemble(root: str | os.PathLike, report: dict[str, Any]):
    """Write ``root/ensemble``: fold 0's package (card and weights) holding every other fold's
    package under ``folds/fold_<K>/``, with the card's ``folds`` listing them, ``tta_default``
    on and ``metrics.cross_validation`` = ``report["summary"]``. Replaces an earlier ensemble; the
    new one is built beside it and renamed into place.

    Args:
        root: the folder holding ``fold_<K>/model`` (the folds :func:`cross_validate` used).
        report: what :func:`cross_validate` returned.

    Returns:
        The ensemble's :class:`~medseg.package.ModelPackage`.

    Raises:
        UnreadableFileError: a fold's package cannot be read.
    """
    import tempfile

    from medseg.package import ModelPackage

    root = Path(root)
    folds = list(report["folds"])
    packages = [ModelPackage(root / f"fold_{k}" / "model") for k in folds]
    first = packages[0]
    card = first.card.model_copy(
        update=dict(
            description=f"{len(folds)}-fold cross-validation ensemble: " + (first.card.description or first.card.name),
            folds=[f"folds/fold_{k}" for k in folds[1:]],
            tta_default=True,
            metrics={**first.card.metrics, "cross_validation": report["summary"]},
            training={**first.card.training, "ensemble_folds": folds},
            trained_at=None,  # the time this ensemble was put together
        )
    )
    weights = torch.load(first.path / "models" / "model.pt", map_location="cpu", weights_only=True)
    target = root / ENSEMBLE
    staging = Path(tempfile.mkdtemp(prefix=f".{ENSEMBLE}.", dir=root))
    try:
        built = staging / ENSEMBLE
        ModelPackage.save(built, card, weights)
        if first.runtime_dir.is_dir():  # fold 0's converted models belong to the same weights
            shutil.copytree(first.runtime_dir, built / first.runtime_dir.relative_to(first.path))
        for k, package in zip(folds[1:], packages[1:]):
            shutil.copytree(package.path, built / "folds" / f"fold_{k}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelPackage(target)


def format_table(report: dict[str, Any]) -> str:
    """The report's summary as a text table: one row per label and ``mean``, mean Dice and mean
    HD95 (mm), then the number of cases and folds."""
    summary = report["summary"]
    labels = list(summary["dice"])
    width = max([len(name) for name in labels] + [5])

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [f"{'label':<{width}}  {'Dice':>7}  {'HD95 mm':>8}"]
    for name in labels:
        lines.append(
            f"{name:<{width}}  {number(summary['dice'][name], 4):>7}  {number(summary['hd95_mm'].get(name), 2):>8}"
        )
    lines.append(f"{summary['num_cases']} cases, folds {', '.join(str(k) for k in summary['folds'])}")
    return "\n".join(lines)
