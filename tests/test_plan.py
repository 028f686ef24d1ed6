"""Dataset discovery, fingerprint and plan on the real hippocampus data, and bad datasets built from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_path

from medseg.cli import main
from medseg.data.cases import find_cases
from medseg.data.plan import Plan, make_folds, make_plan, plan_patch_size
from medseg.errors import DatasetError

CASES = [
    "hippocampus_001",
    "hippocampus_004",
    "hippocampus_006",
    "hippocampus_007",
    "hippocampus_008",
    "hippocampus_011",
]


def hippocampus() -> Path:
    return shared_path("hippocampus")


def small_dataset(tmp_path: Path, cases=CASES) -> Path:
    """A dataset folder of a few real cases (symbolic links) with the real dataset.json."""
    source = hippocampus()
    root = tmp_path / "ds"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for case in cases:
            os.symlink(source / folder / f"{case}.nii.gz", root / folder / f"{case}.nii.gz")
    (root / "dataset.json").write_text((source / "dataset.json").read_text())
    return root


def replace_label(root: Path, case: str, edit) -> None:
    path = root / "labelsTr" / f"{case}.nii.gz"
    nii = nib.load(path)
    data, affine = edit(np.asarray(nii.dataobj), nii.affine.copy())
    path.unlink()
    nib.save(nib.Nifti1Image(data, affine), path)


def test_find_cases_pairs_all_real_cases():
    cases = find_cases(hippocampus())
    assert len(cases) == 217
    assert all(c.image.name == c.label.name for c in cases)
    assert cases[0].case_id == "hippocampus_001"


def test_plan_on_real_cases(tmp_path):
    plan = make_plan(small_dataset(tmp_path), label_ids=[1, 2], modality=["MR"], divisor=(8, 8, 8), num_folds=3)
    fp = plan.fingerprint
    assert len(fp.cases) == len(CASES)
    assert plan.spacing == pytest.approx((1.0, 1.0, 1.0))
    # the median shape rounded up to multiples of 8
    median = np.median([c.shape for c in fp.cases], axis=0)
    assert all(p % 8 == 0 and m <= p < m + 8 for p, m in zip(plan.patch_size, median))
    assert plan.normalization.scheme == "zscore"  # MR: per-image z-score
    assert plan.batch_size >= 2
    assert fp.intensity.percentile_00_5 <= fp.intensity.median <= fp.intensity.percentile_99_5
    all_cases = sorted(CASES)
    for fold in plan.folds:
        assert sorted(fold.train + fold.val) == all_cases and not set(fold.train) & set(fold.val)
    assert sorted(case for f in plan.folds for case in f.val) == all_cases
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_ct_plan_clips_to_foreground_percentiles(tmp_path):
    plan = make_plan(small_dataset(tmp_path, CASES[:3]), label_ids=[1, 2], modality=["CT"], num_folds=2)
    s = plan.fingerprint.intensity
    assert plan.normalization.scheme == "ct"
    assert plan.normalization.clip == pytest.approx((s.percentile_00_5, s.percentile_99_5))
    assert (plan.normalization.mean, plan.normalization.std) == pytest.approx((s.mean, s.std))


def test_folds_are_seeded():
    ids = [f"case_{i:03d}" for i in range(20)]
    assert make_folds(ids, 5, seed=0) == make_folds(ids, 5, seed=0)
    assert make_folds(ids, 5, seed=0) != make_folds(ids, 5, seed=1)
    assert all(len(f.val) == 4 for f in make_folds(ids, 5))


def test_patch_size_is_capped():
    assert plan_patch_size((35, 50, 36), (8, 8, 8)) == (40, 56, 40)
    patch = plan_patch_size((300, 300, 300), (16, 16, 16), max_voxels=128**3)
    assert np.prod(patch) <= 128**3 and all(p % 16 == 0 for p in patch)


def test_unpaired_image_is_named(tmp_path):
    root = small_dataset(tmp_path)
    (root / "labelsTr" / "hippocampus_006.nii.gz").unlink()
    with pytest.raises(DatasetError, match="hippocampus_006.nii.gz has no label"):
        find_cases(root)


def test_label_without_image_is_named(tmp_path):
    root = small_dataset(tmp_path)
    (root / "imagesTr" / "hippocampus_007.nii.gz").unlink()
    with pytest.raises(DatasetError, match="hippocampus_007.nii.gz has no image"):
        find_cases(root)


def test_label_values_outside_the_card_are_named(tmp_path):
    root = small_dataset(tmp_path)
    replace_label(root, "hippocampus_004", lambda d, a: (np.where(d == 2, 5, d).astype(np.uint8), a))
    with pytest.raises(DatasetError, match=r"case hippocampus_004: label values \[5\]"):
        make_plan(root, label_ids=[1, 2], num_folds=2)


def test_image_label_grid_mismatch_is_named(tmp_path):
    root = small_dataset(tmp_path)
    replace_label(root, "hippocampus_008", lambda d, a: (d[:-2], a))
    with pytest.raises(DatasetError, match="case hippocampus_008: image grid"):
        make_plan(root, label_ids=[1, 2], num_folds=2)
    root2 = small_dataset(tmp_path / "b")

    def shift(d, a):
        a[:3, 3] += 5.0  # same shape, origin moved 5 mm
        return d, a

    replace_label(root2, "hippocampus_011", shift)
    with pytest.raises(DatasetError, match="case hippocampus_011: image and label affines differ"):
        make_plan(root2, label_ids=[1, 2], num_folds=2)


def test_empty_dataset(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(DatasetError, match="no cases"):
        find_cases(tmp_path)
    with pytest.raises(DatasetError, match="imagesTr"):
        find_cases(tmp_path / "missing")


def test_plan_command_writes_a_plan(tmp_path, capsys):
    root = small_dataset(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", str(root), "--data-card", "hippocampus", "--output", str(out), "--folds", "3"]) == 0
    plan = Plan.load(out)
    assert plan.fingerprint.label_ids == [1, 2] and plan.modality == ["MR"] and len(plan.folds) == 3
    assert json.loads(capsys.readouterr().out)["patch_size"] == list(plan.patch_size)


def test_plan_command_reports_bad_data_in_one_line(tmp_path, capsys):
    root = small_dataset(tmp_path)
    replace_label(root, "hippocampus_001", lambda d, a: (np.where(d == 1, 3, d).astype(np.uint8), a))
    assert main(["plan", str(root), "--data-card", "hippocampus", "--output", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hippocampus_001" in err and "[3]" in err
    assert not (tmp_path / "p.json").exists()
