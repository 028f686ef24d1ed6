"""Data cards: the bundled hippocampus card, lookup by name or path, clear errors."""

from __future__ import annotations

import os

import pytest
from pydicom.sr.codedict import codes

from medseg.data_cards import DataCard, available_data_cards, load_data_card
from medseg.errors import ConfigError


def test_hippocampus_card_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    card = load_data_card("hippocampus")
    assert isinstance(card, DataCard) and "hippocampus" in available_data_cards()
    assert card.licence == "CC-BY-SA-4.0" and card.modality == ["MR"]
    assert [(label.id, label.name) for label in card.labels] == [
        (1, "anterior hippocampus"),
        (2, "posterior hippocampus"),
    ]
    # the type code is DICOM's (PS3.16) SNOMED CT code for the hippocampus
    assert {label.type.value for label in card.labels} == {codes.SCT.Hippocampus.value}
    assert card.spacing == (1.0, 1.0, 1.0)
    assert any("1902.09063" in c for c in card.citation)
    assert any("Nature" in c for c in card.citation)


def test_card_by_path_and_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text(
        "source: here\nlicence: CC0-1.0\nmodality: [CT]\nlabels:\n"
        "  - {id: 1, name: liver, type: {value: '10200004', meaning: Liver}}\n"
    )
    card = load_data_card(good)
    assert card.name == "mine" and card.labels[0].category.value == "123037004"
    with pytest.raises(ConfigError, match="hippocampus"):
        load_data_card("no-such-card")
    with pytest.raises(ConfigError, match="no such file"):
        load_data_card(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "source: here\nlicence: x\nmodality: [CT]\nlabels:\n"
        "  - {id: 0, name: background, type: {value: '1', meaning: x}}\n"
    )
    with pytest.raises(ConfigError, match=r"labels\.0\.id"):
        load_data_card(bad)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(
        "source: s\nlicence: x\nmodality: [CT]\nlabels:\n"
        "  - {id: 1, name: a, type: {value: '1', meaning: x}}\n"
        "  - {id: 1, name: b, type: {value: '1', meaning: x}}\n"
    )
    with pytest.raises(ConfigError, match="unique"):
        load_data_card(duplicate)
    broken = tmp_path / "broken.yaml"
    broken.write_text("labels: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_data_card(broken)
    assert os.path.basename(str(broken)) == "broken.yaml"
