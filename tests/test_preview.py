"""The preview PNG (issue 17): orientation letters from the affine, slices through the
segmentation, legend with volumes (ml), series, model identity, "not for diagnostic use"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medseg.cli import main
from medseg.io import read_image
from medseg.io.image import Image
from medseg.labels import Code, Label
from medseg.package import resolve_model
from medseg.preview import (
    _plane,
    orientation_letters,
    preview_annotations,
    preview_slices,
    render_view,
    view_geometry,
    write_preview,
)
from tests.conftest import shared_path

SAMPLE = Path(__file__).resolve().parents[1] / "medseg" / "samples" / "hippocampus_mr"
EXPECTED = {  # radiological convention: patient right on the viewer's left
    "sagittal": {"left": "P", "right": "A", "bottom": "I", "top": "S"},
    "coronal": {"left": "R", "right": "L", "bottom": "I", "top": "S"},
    "axial": {"left": "R", "right": "L", "bottom": "P", "top": "A"},
}
RAS = np.diag([1.0, 1.0, 1.0, 1.0])
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's usual storage: +i to the left, +j posterior
LABELS = [
    Label(id=1, name="left thing", type=Code(value="1", meaning="x"), color=(255, 0, 0)),
    Label(id=2, name="right thing", type=Code(value="2", meaning="y"), color=(0, 0, 255)),
]


@pytest.mark.parametrize("affine", [RAS, LPS, np.diag([0.5, -0.7, 3.0, 1.0])], ids=["RAS", "LPS", "anisotropic RPS"])
def test_orientation_letters_for_ras_and_lps_images(affine):
    assert orientation_letters(affine) == EXPECTED


def test_orientation_letters_follow_the_affine_not_the_storage_order():
    # a sagittal acquisition: i -> anterior, j -> inferior, k -> left
    sagittal = np.array([[0, 0, -1.2, 0], [0.9, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1.0]])
    assert orientation_letters(sagittal) == EXPECTED
    axial = {v["name"]: v for v in view_geometry(sagittal)}["axial"]
    assert axial["through"] == 1 and axial["right"] == (2, +1) and axial["up"] == (0, +1)
    with pytest.raises(ValueError):
        orientation_letters(np.zeros((4, 4)))


@pytest.mark.parametrize("affine", [RAS, LPS], ids=["RAS", "LPS"])
def test_views_put_the_patients_right_anterior_superior_corner_where_the_letters_say(affine):
    """A marker at the patient's right-anterior-superior corner, stored in RAS or LPS order,
    lands on the R, A and S edges of every view (rows go up with origin='lower')."""
    shape = (6, 8, 10)
    volume = np.zeros(shape)
    corner = tuple(s - 1 if affine[a, a] > 0 else 0 for a, s in enumerate(shape))  # +x +y +z
    volume[corner] = 1
    for view in view_geometry(affine):
        plane = _plane(volume, view, corner[view["through"]])
        row, col = np.argwhere(plane == 1)[0]
        letters = view["letters"]
        horizontal = letters["right"] if col == plane.shape[1] - 1 else letters["left"]
        vertical = letters["top"] if row == plane.shape[0] - 1 else letters["bottom"]
        assert {horizontal, vertical} <= {"R", "A", "S"}, (view["name"], row, col)


def test_slices_go_through_the_segmentation():
    labels = np.zeros((20, 30, 40), np.uint8)
    assert preview_slices(labels, RAS) == {"sagittal": 10, "coronal": 15, "axial": 20}
    labels[2:5, 20:23, 30:33] = 1
    assert preview_slices(labels, RAS) == {"sagittal": 3, "coronal": 21, "axial": 31}
    assert preview_slices(labels, LPS) == {"sagittal": 3, "coronal": 21, "axial": 31}
    labels[15:18, 20:23, 30:33] = 2  # centre of mass (i = 9.5) between two structures
    assert preview_slices(labels, RAS)["sagittal"] in (4, 15)


def test_annotations_name_the_model_and_warn_unless_validated():
    image = Image(array=np.zeros((4, 4, 4)), affine=LPS, meta={"series_description": "T1 MPRAGE", "modality": "MR"})
    card = resolve_model("hippocampus").card
    stats = [{"id": 1, "volume_ml": 1.234}]
    text = preview_annotations(image, LABELS, stats, card)
    assert text["series"] == "MR · T1 MPRAGE"
    assert text["model"] == f"hippocampus 0.1.0 · sha256 {card.weights_sha256[:12]} · trained {card.trained_at[:10]}"
    assert text["notice"].lower() == "not for diagnostic use"
    assert [entry for _, entry in text["legend"]] == ["left thing: 1.23 ml", "right thing: 0.00 ml"]
    validated = card.model_copy(update={"clinically_validated": True, "trained_at": "2027-01-02T03:04:05Z"})
    text = preview_annotations(image, LABELS, stats, validated)
    assert text["notice"] is None and text["model"].endswith("· trained 2027-01-02")
    many = [Label(id=i, name=f"l{i}", type=Code(value="1", meaning="x")) for i in range(1, 31)]
    text = preview_annotations(image, many, [{"id": i, "volume_ml": float(i % 2)} for i in range(1, 31)])
    assert len(text["legend"]) == 12 and text["more"] == 18  # only labels with volume, 12 at most


def _check_png(path: Path, notice: bool = True) -> np.ndarray:
    png = PILImage.open(path)
    assert png.format == "PNG"
    width, height = png.size
    assert 1000 <= width <= 1400 and 450 <= height <= 1000 and width > height
    text = png.text
    assert ("not for diagnostic use" in text.get("Disclaimer", "").lower()) is notice
    pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20  # not blank
    return pixels


def test_preview_of_the_bundled_sample_is_legible(tmp_path):
    assert (
        main(["predict", str(SAMPLE), "--model", "hippocampus", "--output", str(tmp_path), "--formats", "png,json"])
        == 0
    )
    path = next(tmp_path.glob("*.png"))
    pixels = _check_png(path)
    text = PILImage.open(path).text
    card = resolve_model("hippocampus").card
    assert card.weights_sha256[:12] in text["Description"]
    assert "anterior hippocampus: " in text["Description"] and " ml" in text["Description"]
    assert "T1 hippocampus crop" in text["Title"]
    # the red banner, and the overlay colours blended into the grey image
    assert (np.abs(pixels[5] - [176, 0, 32]).sum(axis=-1) < 30).mean() > 0.5
    red = (pixels[..., 0] - pixels[..., 2] > 60) & (pixels[..., 0] > 120)
    blue = (pixels[..., 2] - pixels[..., 0] > 60) & (pixels[..., 2] > 120)
    assert red[60:].sum() > 500 and blue.sum() > 500


def test_preview_of_a_real_lps_dicom_series_and_a_validated_card(tmp_path):
    image = read_image(shared_path("dicom", "hippocampus_crop_study1"))
    assert image.orientation == "LPS"
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 20:30, 10:20] = 1
    card = resolve_model("hippocampus").card.model_copy(update={"clinically_validated": True})
    path = write_preview(labels, image, card.labels, tmp_path / "p.png", card=card)
    pixels = _check_png(path, notice=False)
    assert (np.abs(pixels[5] - [176, 0, 32]).sum(axis=-1) < 30).mean() < 0.01  # no banner
    assert "anterior hippocampus: 1.00 ml" in PILImage.open(path).text["Description"]
    with pytest.raises(Exception, match="grid"):
        write_preview(labels[:-1], image, card.labels, tmp_path / "bad.png")


def test_overlay_colours_are_exactly_where_the_label_map_has_labels():
    data = np.linspace(0, 100, 6 * 8 * 10).reshape(6, 8, 10)
    seg = np.zeros(data.shape, np.uint8)
    seg[1:3, 2:5, 4:7] = 1
    seg[4, 6, 4:7] = 2
    colours = np.zeros((3, 4))
    colours[1] = [255, 0, 0, 0.45]
    colours[2] = [0, 0, 255, 0.45]
    for view in view_geometry(LPS):
        index = 5 if view["name"] == "axial" else 1 if view["name"] == "sagittal" else 2
        pixels = render_view(data, seg, view, index, (0.0, 100.0), colours).astype(int)
        labelled = _plane(seg, view, index)[::-1] > 0
        assert pixels.shape == (*labelled.shape, 3) and labelled.any()
        grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
        assert grey[~labelled].all() and not grey[labelled].any()
        red = pixels[..., 0] - pixels[..., 2] > 60
        assert (red == (_plane(seg, view, index)[::-1] == 1)).all()
