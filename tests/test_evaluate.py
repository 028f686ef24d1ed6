"""``medseg evaluate`` and the shared metrics on real hippocampus label maps."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, shared_path

from medseg.cli import main
from medseg.metrics import label_map_metrics


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture
def folders(tmp_path):
    labels = shared_path("hippocampus", "labelsTr")
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir(), label_dir.mkdir()
    expected = {}
    for case in ("hippocampus_001", "hippocampus_004"):
        src = labels / f"{case}.nii.gz"
        shutil.copy(src, label_dir / src.name)
        image = nib.load(src)
        label = np.rint(image.get_fdata()).astype(np.uint8)
        prediction = label.copy()
        prediction[:, :, : label.shape[2] // 2][prediction[:, :, : label.shape[2] // 2] == 2] = (
            0  # drop half of posterior
        )
        nib.save(nib.Nifti1Image(prediction, image.affine), pred_dir / src.name)
        expected[case] = {c: _dice(prediction == c, label == c) for c in (1, 2)}
    return pred_dir, label_dir, expected


def test_evaluate_reports_dice_per_class(folders, capsys):
    pred_dir, label_dir, expected = folders
    assert main(["evaluate", str(pred_dir), str(label_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for case, dice in expected.items():
        for c in (1, 2):
            assert report["cases"][case][str(c)]["dice"] == pytest.approx(dice[c], abs=1e-5)
    assert report["cases"]["hippocampus_001"]["1"]["hd95"] == pytest.approx(0.0)
    assert report["summary"]["mean"]["dice"] == pytest.approx(
        np.mean([np.mean([d[1] for d in expected.values()]), np.mean([d[2] for d in expected.values()])]), abs=1e-5
    )


def test_evaluate_table_and_errors(folders, capsys, tmp_path):
    pred_dir, label_dir, _ = folders
    assert main(["evaluate", str(pred_dir), str(label_dir)]) == 0
    assert "mean" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty), str(label_dir)]) == 2
    assert "no prediction" in capsys.readouterr().err


def test_hd95_in_mm_uses_spacing():
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    shifted = np.roll(label, 2, axis=0)
    voxels = label_map_metrics(shifted, label, 2)[1]["hd95"]
    millimetres = label_map_metrics(shifted, label, 2, spacing=(1.5, 1.0, 1.0))[1]["hd95"]
    assert voxels == pytest.approx(2.0)
    assert millimetres == pytest.approx(3.0)


def test_bundled_sample_matches_its_source_case():
    """The shipped DICOM sample holds exactly MSD hippocampus_001, on the same grid."""
    from medseg.data_cards import load_data_card
    from medseg.io import read_image

    source = nib.load(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    sample = read_image(REPO / "medseg" / "samples" / "hippocampus_mr")
    assert sample.meta["modality"] == "MR"
    np.testing.assert_allclose(sample.affine, source.affine, atol=1e-6)
    np.testing.assert_array_equal(sample.array, np.asarray(source.dataobj))
    card = load_data_card("sample_hippocampus_mr")
    assert card.licence == "CC-BY-SA-4.0" and [label.id for label in card.labels] == [1, 2]
