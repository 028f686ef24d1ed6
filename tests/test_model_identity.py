"""Model identity (issue 17): packages carry the sha256 of their weights and a training time, and
every output (JSON report, DICOM SEG, ``medseg models``) shows them, so a retrained package with the
same name and version is distinguishable from the bundled one."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
from pathlib import Path

import pydicom
import pytest
import torch

from medseg.cli import main
from medseg.errors import UnreadableFileError
from medseg.package import BUNDLED_MODELS, METADATA, WEIGHTS, ModelCard, ModelPackage, resolve_model
from tests.test_inference_predictor import make_package

SAMPLE = Path(__file__).resolve().parents[1] / "medseg" / "samples" / "hippocampus_mr"
MONAI_KEYS = {
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_packages(tmp_path_factory):
    """Two packages with one name and version ('hippocampus 0.1.0', like a retraining of the
    bundled model) but different weights."""
    root = tmp_path_factory.mktemp("models")
    return [
        make_package(root / f"run{seed}" / "hippocampus", seed=seed, name="hippocampus", version="0.1.0")
        for seed in (0, 1)
    ]


def _predict(model: str, out: Path) -> tuple[dict, pydicom.Dataset]:
    assert main(["predict", str(SAMPLE), "--model", model, "--output", str(out), "--formats", "json,seg"]) == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    return report, pydicom.dcmread(next(out.glob("*.seg.dcm")))


def _algorithm(seg: pydicom.Dataset) -> pydicom.Dataset:
    return seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]


def test_save_records_the_weights_hash_and_a_utc_training_time(two_packages):
    for package in two_packages:
        card = package.card
        assert card.weights_sha256 == _sha256(package.path / WEIGHTS) == package.weights_sha256
        assert card.weights_short == card.weights_sha256[:12]
        assert package.hash_source == "metadata"
        moment = dt.datetime.fromisoformat(card.trained_at)
        assert card.trained_at.endswith("Z") and moment.utcoffset() == dt.timedelta(0)
        assert abs(dt.datetime.now(dt.timezone.utc) - moment) < dt.timedelta(hours=1)
        metadata = json.loads((package.path / METADATA).read_text())
        assert MONAI_KEYS <= set(metadata)  # still a MONAI bundle metadata file
        assert metadata["version"] == "0.1.0"
        assert metadata["medseg"]["weights_sha256"] == card.weights_sha256
        assert metadata["medseg"]["trained_at"] == card.trained_at
        assert card.identity == f"hippocampus 0.1.0 sha256:{card.weights_short}"
    first, second = (p.card for p in two_packages)
    assert (first.name, first.version) == (second.name, second.version)
    assert first.weights_sha256 != second.weights_sha256


def test_save_replaces_a_stale_hash_and_keeps_a_given_training_time(two_packages, tmp_path):
    card = two_packages[0].card.model_copy(update={"trained_at": "2026-11-22T05:52:58+01:00"})
    weights = torch.load(two_packages[1].path / WEIGHTS, weights_only=True)
    copy = ModelPackage.save(tmp_path / "copy", card, weights)
    assert copy.card.weights_sha256 == _sha256(copy.path / WEIGHTS) != card.weights_sha256
    assert copy.card.trained_at == "2026-11-22T04:52:58Z"
    assert card.weights_sha256 == two_packages[0].card.weights_sha256  # the argument is unchanged


def test_trained_at_must_be_iso_8601_with_a_time_zone(two_packages):
    fields = two_packages[0].card.model_dump()
    assert (
        ModelCard(**{**fields, "trained_at": dt.datetime(2027, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)}).trained_at
        == "2027-01-02T03:04:05Z"
    )
    for bad in ("2027-01-02T03:04:05", "yesterday"):
        with pytest.raises(ValueError, match="time zone|ISO 8601"):
            ModelCard(**{**fields, "trained_at": bad})
    with pytest.raises(ValueError, match="hex"):
        ModelCard(**{**fields, "weights_sha256": "abc"})


def test_weights_changed_after_export_are_refused(two_packages, tmp_path):
    package = ModelPackage.save(
        tmp_path / "p", two_packages[0].card, torch.load(two_packages[0].path / WEIGHTS, weights_only=True)
    )
    package.load_network()
    (package.path / WEIGHTS).write_bytes((two_packages[1].path / WEIGHTS).read_bytes())
    with pytest.raises(UnreadableFileError, match="does not match"):
        ModelPackage(package.path).load_network()


def test_two_packages_with_one_name_and_version_differ_in_report_and_seg(two_packages, tmp_path):
    seen = []
    for index, package in enumerate(two_packages):
        report, seg = _predict(str(package.path), tmp_path / str(index))
        card = package.card
        model = report["model"]
        assert (model["name"], model["version"]) == ("hippocampus", "0.1.0")
        assert model["weights_sha256"] == card.weights_sha256
        assert model["weights_sha256_short"] == card.weights_short
        assert model["trained_at"] == card.trained_at
        assert model["clinically_validated"] is False
        algorithm = _algorithm(seg)
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hippocampus", "0.1.0")
        assert f"weights_sha256={card.weights_sha256}" in algorithm.AlgorithmParameters
        assert f"trained_at={card.trained_at}" in algorithm.AlgorithmParameters
        assert seg.ContentDescription == f"hippocampus 0.1.0 sha256:{card.weights_short}"
        seen.append((model["weights_sha256"], seg.ContentDescription, str(algorithm.AlgorithmParameters)))
    assert all(a != b for a, b in zip(*seen))


def test_bundled_model_shows_its_hash_and_is_not_modified(tmp_path):
    folder = BUNDLED_MODELS / "hippocampus"
    weights_before = _sha256(folder / WEIGHTS)
    metadata_before = (folder / METADATA).read_bytes()
    package = resolve_model("hippocampus")
    assert package.card.weights_sha256 == weights_before
    assert package.hash_source == "metadata" and package.card.trained_at == "2026-12-03T15:05:35Z"
    report, seg = _predict("hippocampus", tmp_path)
    assert report["model"]["weights_sha256"] == weights_before
    assert report["model"]["trained_at"] == package.card.trained_at
    assert seg.ContentDescription == f"hippocampus 0.1.0 sha256:{weights_before[:12]}"
    assert f"weights_sha256={weights_before}" in _algorithm(seg).AlgorithmParameters
    assert _sha256(folder / WEIGHTS) == weights_before
    assert (folder / METADATA).read_bytes() == metadata_before


def _models(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["models", *argv])
    return code, out.getvalue(), err.getvalue()


def test_models_lists_installed_packages(two_packages, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    (broken / METADATA).parent.mkdir(parents=True)
    (broken / METADATA).write_text("{}")
    folders = [p.path.parent for p in two_packages]
    monkeypatch.setenv("MEDSEG_MODEL_PATH", ":".join(str(f) for f in folders))
    code, out, err = _models(["--packages", "--json"])
    assert code == 0 and err == ""
    rows = json.loads(out)
    names = (
        "hippocampus",
        "hippocampus_transunet",
        "hippocampus_transunet3d",
        "hippocampus_unet_dsd",
        "nuclei",
        "vessels",
    )
    bundled = [str(BUNDLED_MODELS / name) for name in names]
    assert [r["path"] for r in rows] == [str(p.path) for p in two_packages] + bundled
    assert [r["weights_sha256"] for r in rows[:2]] == [p.card.weights_sha256 for p in two_packages]
    assert [r["shadowed"] for r in rows] == [False, True, True] + [False] * (len(names) - 1)
    assert rows[2]["hash_source"] == "metadata" and rows[2]["trained_at"] == "2026-12-03T15:05:35Z"
    assert rows[0]["trained_at"] == two_packages[0].card.trained_at

    code, out, _ = _models([])  # packages table, then the networks table
    lines = out.splitlines()
    assert lines[0].split() == ["model", "version", "sha256", "trained_at", "path"]
    for package in two_packages:
        assert any(
            line.split()[:4] == ["hippocampus", "0.1.0", package.card.weights_short, package.card.trained_at]
            for line in lines
        )
    assert lines[lines.index("") + 1].split() == ["network", "reference", "parameters", "config"]

    monkeypatch.setenv("MEDSEG_MODEL_PATH", str(tmp_path))
    code, out, err = _models(["--packages"])
    assert code == 1 and "broken" in err and "error" in out
