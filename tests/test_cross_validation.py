"""``medseg train --fold all`` / ``--cross-validate`` on six real hippocampus cases in three folds with
a tiny network: every fold trained once and skipped after, an interrupted fold resumed, each case
predicted once by the fold that did not see it, and the ensemble package (3 folds, TTA by default)
through ``medseg predict`` and the Predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import shared_path

from medseg.cli import main
from medseg.data.plan import Plan
from medseg.inference import Predictor
from medseg.io import read_image
from medseg.package import ModelCard, resolve_model

CONFIG = {
    "name": "tiny_cv",
    "data": {"data_card": "hippocampus", "max_cases": 6, "num_folds": 3, "patch_size": [16, 16, 16]},
    "network": {"name": "unet", "config": {"filters": [4, 8, 16], "strides": [1, 2, 2], "deep_supervision": 0}},
    "loss": {"name": "dice_ce", "kwargs": {"include_background": False, "batch": True}},
    "optimizer": {"name": "adamw", "lr": 0.01},
    "scheduler": {"name": "poly", "warmup_iterations": 1},
    "training": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "num_threads": 1, "seed": 5},
    "validation": {"patch_size": [40, 56, 40], "every": 2},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Config path and the root of its three trained folds (``--fold all`` once)."""
    tmp = tmp_path_factory.mktemp("cv")
    config = {**CONFIG, "data": {**CONFIG["data"], "dataset_dir": str(shared_path("hippocampus"))}}
    path = tmp / "tiny_cv.yaml"
    path.write_text(yaml.safe_dump(config))
    root = tmp / "runs"
    assert main(["train", str(path), "--fold", "all", "--output", str(root), "--no-progress"]) == 0
    return path, root


def _logs(root: Path) -> list[str]:
    return [(root / f"fold_{k}" / "log.csv").read_text() for k in range(3)]


def test_fold_all_trains_every_fold_then_skips_or_resumes(runs, capsys):
    config, root = runs
    for k in range(3):
        card = resolve_model(root / f"fold_{k}" / "model").card
        assert card.training["fold"] == k and card.folds is None and not card.tta_default
    before = _logs(root)
    capsys.readouterr()
    assert main(["train", str(config), "--fold", "all", "--output", str(root), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ""  # nothing trained, no fold summary
    assert [line for line in out.err.splitlines() if "already trained" in line and "skipped" in line] == [
        f"fold {k}: already trained ({root / f'fold_{k}'}), skipped" for k in range(3)
    ]
    assert _logs(root) == before
    # fold 2 interrupted after its last checkpoint (no summary yet): resumed, re-validated, re-exported
    (root / "fold_2" / "summary.json").unlink()
    assert main(["train", str(config), "--fold", "all", "--output", str(root), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "fold 0: already trained" in out.err and "fold 1: already trained" in out.err
    assert json.loads(out.out)["output"] == str(root / "fold_2")
    after = _logs(root)
    assert after[:2] == before[:2] and after[2].startswith(before[2]) and len(after[2]) > len(before[2])
    assert (root / "fold_2" / "summary.json").is_file()


def test_cross_validation_needs_every_fold(runs, tmp_path, capsys):
    config = {**CONFIG, "data": {**CONFIG["data"], "dataset_dir": str(shared_path("hippocampus"))}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--cross-validate", "--output", str(tmp_path / "none")]) == 2
    assert "fold 0 of 3 is not trained" in capsys.readouterr().err
    with pytest.raises(ValueError, match="relative path"):
        ModelCard.model_validate({**resolve_model(runs[1] / "fold_0" / "model").card.model_dump(), "folds": ["../x"]})


@pytest.fixture(scope="module")
def cross_validated(runs):
    config, root = runs
    assert main(["train", str(config), "--cross-validate", "--output", str(root), "--no-progress"]) == 0
    return root, json.loads((root / "cross_validation.json").read_text())


def test_every_case_is_predicted_once_by_the_fold_that_did_not_see_it(cross_validated):
    root, report = cross_validated
    plan = Plan.load(root / "fold_0" / "plan.json")
    all_cases = sorted({c for f in plan.folds for c in f.train + f.val})
    assert len(all_cases) == 6
    assert sorted(row["case"] for row in report["cases"]) == all_cases  # each exactly once
    for row in report["cases"]:
        assert row["case"] not in plan.folds[row["fold"]].train and row["case"] in plan.folds[row["fold"]].val
        assert set(row["dice"]) == {"anterior hippocampus", "posterior hippocampus"} and set(row["hd95_mm"]) == {
            "anterior hippocampus",
            "posterior hippocampus",
        }
    summary = report["summary"]
    assert summary["num_cases"] == 6 and summary["folds"] == [0, 1, 2] and report["num_folds"] == 3
    assert set(summary["dice"]) == {"anterior hippocampus", "posterior hippocampus", "mean"}
    dice = [row["dice"]["anterior hippocampus"] for row in report["cases"]]
    assert summary["dice"]["anterior hippocampus"] == pytest.approx(np.mean(dice), abs=1e-5)
    # the protocol of the trainer's validation: fold 0's card metrics are its cases' means here
    validation = resolve_model(root / "fold_0" / "model").card.metrics["validation"]
    mine = [row for row in report["cases"] if row["fold"] == 0]
    assert validation["num_cases"] == len(mine) == 2
    assert validation["dice"]["posterior hippocampus"] == pytest.approx(
        np.mean([r["dice"]["posterior hippocampus"] for r in mine]), abs=1e-5
    )


def test_ensemble_package_predicts_with_three_folds_and_tta(cross_validated, tmp_path, capsys):
    root, report = cross_validated
    ensemble = resolve_model(root / "ensemble")
    card = ensemble.card
    assert card.folds == ["folds/fold_1", "folds/fold_2"] and card.tta_default
    assert card.metrics["cross_validation"] == report["summary"]
    assert card.weights_sha256 == resolve_model(root / "fold_0" / "model").weights_sha256
    assert [p.card.training["fold"] for p in ensemble.fold_packages()] == [1, 2]

    image_path = shared_path("hippocampus", "imagesTr", "hippocampus_004.nii.gz")
    passes = {}
    for flag in ([], ["--no-tta"]):
        out = tmp_path / ("default" if not flag else "no_tta")
        args = ["predict", str(image_path), "--model", str(root / "ensemble"), "--output", str(out)]
        code = main([*args, "--formats", "nifti,json", "--runtime", "eager", *flag])
        assert code == 0, capsys.readouterr()
        settings = json.loads((out / "hippocampus_004.json").read_text())["settings"]
        passes[tuple(flag)] = (settings["folds"], settings["mirror_passes"], settings["passes"], settings["tta"])
    assert passes[()] == (3, 8, 24, True)
    assert passes[("--no-tta",)] == (3, 1, 3, False)

    image = read_image(image_path)
    folds = [root / f"fold_{k}" / "model" for k in range(3)]
    explicit = Predictor(folds[0], folds=folds[1:], tta=True, runtime="eager").predict(image)
    assert explicit.settings["passes"] == 24
    from_cli = read_image(tmp_path / "default" / "hippocampus_004.nii.gz").array
    np.testing.assert_array_equal(from_cli, explicit.label_map.array)
    packaged = Predictor(root / "ensemble", runtime="eager", tta=False)
    assert packaged.network.passes == 3
