"""DICOM SEG from real-world headers: patient/study values that break their VR (PS3.5 6.2) are
repaired or emptied in the SEG, never an error, and reported by keyword, never by value."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests.conftest import shared_path

#: what real PACS exports carry (and highdicom refused)
REAL_WORLD = {"PatientName": "Zebedee Quixote-Marple", "PatientBirthDate": "1970-03-21", "PatientSex": "female"}
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _set_raw(ds: Dataset, keyword: str, value: str) -> None:
    """Set ``value`` as it is, without pydicom's validation (as a PACS export would hold it)."""
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


def real_world_series(destination: Path, values: dict[str, str] = REAL_WORLD) -> Path:
    """The real hippocampus MR series, rewritten into ``destination`` with ``values``."""
    source = shared_path("dicom", "hippocampus_crop_study1")
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            _set_raw(ds, keyword, value)
        ds.save_as(destination / path.name)
    return destination


def repair_patient_study(ds: Dataset) -> list[str]:
    from medseg.io.seg import repair_patient_study as repair

    return repair(ds)


def _dataset(**values: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MR_IMAGE
    for keyword, value in values.items():
        _set_raw(ds, keyword, value)
    return ds


def test_unrepairable_values_are_emptied_and_named_by_keyword_only():
    values = {
        "PatientBirthDate": "sometime in spring",
        "PatientSex": "unknown",
        "PatientAge": "forty-two",
        "StudyTime": "25:61",
        "StudyDate": "1970-02-31",
        "OtherPatientNames": "A^B^C^D^E^F^G",
        "PatientID": "x" * 80,
    }
    ds = _dataset(**values)
    messages = repair_patient_study(ds)
    for keyword in values:
        assert ds[keyword].value in ("", None), keyword
        assert any(m.startswith(f"{keyword}:") and "empty" in m for m in messages), (keyword, messages)
    text = " ".join(messages)
    assert not any(value in text for value in values.values())
    assert "spring" not in text and "unknown" not in text


def test_common_export_values_are_repaired():
    ds = _dataset(
        PatientBirthDate="1970.03.21",
        StudyDate="2020-01-19",
        PatientSex="male",
        PatientAge="45Y",
        StudyTime="01:03:13",
        PatientIdentityRemoved="yes",
        PatientName="Zebedee Quixote-Marple",
    )
    messages = repair_patient_study(ds)
    assert ds.PatientBirthDate == "19700321" and ds.StudyDate == "20200119"
    assert ds.PatientSex == "M" and ds.PatientAge == "045Y" and ds.StudyTime == "010313"
    assert ds.PatientIdentityRemoved == "YES"
    assert str(ds.PatientName) == "Zebedee Quixote-Marple^"  # a family name alone, explicitly
    assert len(messages) == 7 and all("repaired" in m or "trailing" in m for m in messages)
    for sex, code in (("F", "F"), ("woman", "F"), ("f", "F"), ("Other", "O"), ("o", "O"), ("man", "M"), ("", "")):
        ds = _dataset(PatientSex=sex)
        repair_patient_study(ds)
        assert ds.PatientSex == code, sex


def test_valid_values_are_left_alone():
    ds = _dataset(
        PatientName="Avasarala^Chrisjen",
        PatientBirthDate="19700321",
        PatientSex="F",
        PatientAge="045Y",
        StudyTime="010313.5",
        PatientID="PGBM-002",
    )
    assert repair_patient_study(ds) == []
    assert str(ds.PatientName) == "Avasarala^Chrisjen" and ds.PatientBirthDate == "19700321"


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_write_seg_repairs_copies_and_leaves_the_files_alone(tmp_path):
    from medseg.data_cards import load_data_card
    from medseg.io import read_image, write_seg

    series = real_world_series(tmp_path / "series")
    before = _hashes(series)
    image = read_image(series)
    labels = np.zeros(image.array.shape[:3], dtype=np.int64)
    labels[4:12, 4:12, 4:12] = 1
    warnings: list[str] = []
    path = write_seg(
        image.with_array(labels), image, load_data_card("hippocampus").labels, tmp_path / "seg.dcm", warnings=warnings
    )
    seg = pydicom.dcmread(path)
    assert seg.PatientBirthDate == "19700321" and seg.PatientSex == "F"
    assert str(seg.PatientName) == "Zebedee Quixote-Marple^"
    assert [m.split(":")[0] for m in warnings] == ["PatientName", "PatientBirthDate", "PatientSex"]
    assert _hashes(series) == before  # the repair worked on copies of the headers
    source = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
    assert source.PatientBirthDate == "1970-03-21" and source.PatientSex == "female"


@pytest.mark.slow
def test_cli_predict_writes_the_seg_for_real_world_values(tmp_path, capsys):
    from medseg.cli import main

    series = real_world_series(tmp_path / "series")
    out = tmp_path / "out"
    code = main(["predict", str(series), "--model", "hippocampus", "--output", str(out), "--formats", "seg,json"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    seg_path = next(out.glob("*.seg.dcm"))
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG"
    assert seg.PatientBirthDate == "19700321" and seg.PatientSex == "F"
    report = json.loads(next(out.glob("*.json")).read_text())
    keywords = {w.split(":")[0] for w in report["input"]["warnings"]}
    assert {"PatientBirthDate", "PatientSex"} <= keywords
    text = json.dumps(report)
    assert "1970-03-21" not in text and "female" not in text and "Zebedee" not in text
