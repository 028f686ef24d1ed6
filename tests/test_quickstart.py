"""The README's main job: the bundled sample through the bundled default model, via the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO, shared_path

from medseg.io import read_image, read_seg
from medseg.metrics import label_map_metrics
from medseg.package import resolve_model

SAMPLE = REPO / "medseg" / "samples" / "hippocampus_mr"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    command = [sys.executable, "-m", "medseg", "predict", str(SAMPLE), "--model", "hippocampus", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    files = {path.name.split(".", 1)[1]: path for path in out.iterdir()}
    return files


def test_main_job_writes_all_four_outputs(outputs):
    assert set(outputs) == {"nii.gz", "seg.dcm", "json", "png"}
    assert outputs["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_land_on_the_source_grid_and_reference_the_series(outputs):
    source = read_image(SAMPLE)
    label_map = nib.load(outputs["nii.gz"])
    np.testing.assert_array_equal(label_map.affine, source.affine)
    assert label_map.shape == source.shape
    seg = pydicom.dcmread(outputs["seg.dcm"])
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_uid"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior hippocampus", "posterior hippocampus"]
    np.testing.assert_array_equal(read_seg(outputs["seg.dcm"], source).array, np.asarray(label_map.dataobj))
    report = json.loads(outputs["json"].read_text())
    volumes = {label["id"]: label["volume_ml"] for label in report["labels"]}
    array = np.asarray(label_map.dataobj)
    assert volumes == {1: pytest.approx((array == 1).sum() / 1000), 2: pytest.approx((array == 2).sum() / 1000)}


def test_default_model_segments_the_held_out_case_accurately(outputs):
    """hippocampus_001 is in the model's held-out fold 0; nnU-Net reaches about 0.90 / 0.89."""
    reference = nib.load(shared_path("hippocampus", "labelsTr", "hippocampus_001.nii.gz"))
    prediction = np.asarray(nib.load(outputs["nii.gz"]).dataobj)
    dice = label_map_metrics(prediction, np.rint(reference.get_fdata()), 3)
    assert dice[1]["dice"] > 0.85 and dice[2]["dice"] > 0.8, dice


def test_bundled_model_card_is_complete():
    card = resolve_model("hippocampus").card
    assert card.network.name == "unet" and card.modality == ["MR"]
    assert [label.name for label in card.labels] == ["anterior hippocampus", "posterior hippocampus"]
    assert card.data_card["licence"] == "CC-BY-SA-4.0"
    assert card.metrics and card.training
    weights = REPO / "medseg" / "models" / "hippocampus" / "models" / "model.pt"
    assert weights.stat().st_size < 30 * 2**20


def test_study_export_segments_the_crop_and_skips_whole_brain_series(tmp_path, capsys):
    """The bundled card's field of view (from the data card) decides which MR series fit."""
    from medseg.cli import main

    export = shared_path("dicom", "mr_brain_study3_export")
    assert main(["predict", str(export), "--model", "hippocampus", "--output", str(tmp_path), "--formats", "json"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "1 segmented" in text and "4 skipped" in text
    assert text.count("field of view") == 4
    assert len(list(tmp_path.glob("*.json"))) == 1
