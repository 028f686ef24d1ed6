"""Training on your own data: labels and modality from a real MSD ``dataset.json`` when no data
card is given (and the nnU-Net v2 form), and every problem of a card reported at once."""

from __future__ import annotations

import json

import pytest

from medseg.data_cards import load_data_card
from medseg.errors import ConfigError
from medseg.training.cards import card_from_dataset_json, load_training_data_card
from tests.conftest import shared_path


def test_msd_dataset_json_gives_labels_and_modality():
    dataset = shared_path("hippocampus")
    card = load_training_data_card(None, dataset)
    assert [(label.id, label.name) for label in card.labels] == [(1, "anterior"), (2, "posterior")]
    assert card.modality == ["MR"]
    assert card.raw["licence"] == "CC-BY-SA 4.0"
    assert len({label.color for label in card.labels}) == 2


def test_nnunet_v2_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "tumour": 2},
                "numTraining": 3,
                "file_ending": ".nii.gz",
            }
        )
    )
    card = card_from_dataset_json(tmp_path / "dataset.json")
    assert [(label.id, label.name) for label in card.labels] == [(1, "liver"), (2, "tumour")]
    assert card.modality == ["CT"]


def test_no_card_and_no_dataset_json_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.json"):
        load_training_data_card(None, tmp_path)


def test_every_missing_field_of_a_card_is_reported_at_once(tmp_path):
    card = tmp_path / "mine.yaml"
    card.write_text("description: my data\nlabels:\n  - {id: 1, name: liver}\n")
    with pytest.raises(ConfigError) as error:
        load_data_card(card)
    message = str(error.value)
    for field in ("source", "licence", "modality", "labels.0.type"):
        assert field in message, message
    assert "\n" not in message


def test_bundled_cards_live_in_the_package_and_are_packaged():
    """A normal (non-editable) install carries the cards: they sit under the package folder and
    pyproject's package-data names them."""
    from pathlib import Path

    import tomllib

    import medseg
    from medseg.data_cards import CARDS_DIR, available_data_cards

    assert Path(medseg.__file__).parent in CARDS_DIR.parents or CARDS_DIR.parent == Path(medseg.__file__).parent
    assert {"hippocampus", "sample_hippocampus_mr"} <= set(available_data_cards())
    pyproject = tomllib.loads((Path(medseg.__file__).parents[1] / "pyproject.toml").read_text())
    assert "data_card_files/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["medseg"]
    assert load_data_card("hippocampus").licence
