"""Nuclei outputs (:mod:`medseg.nuclei.outputs`) from a real MoNuSeg tile and its real instance labels."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid

import numpy as np
import pytest
import tifffile
from conftest import shared_path
from PIL import Image as PILImage
from skimage.draw import polygon
from skimage.segmentation import find_boundaries

from medseg.errors import ConfigError
from medseg.io import read_instance_map, read_tile
from medseg.nuclei.outputs import OVERLAY_COLOR, write_nuclei_outputs

MPP = 0.25  # MoNuSeg: 40x, 0.25 um/px


@pytest.fixture
def case():
    images = shared_path("nuclei", "monuseg_test", "images")
    image = sorted(images.glob("*.png"))[0]
    label = shared_path("nuclei", "monuseg_test", "labels", image.name)
    return image, read_tile(image, mpp=MPP), read_instance_map(label)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_all_four_outputs(case, tmp_path):
    image, tile, instances = case
    before = _sha(image)
    model = {"name": "hovernet-test", "version": "0.0.1"}
    start = time.perf_counter()
    paths = write_nuclei_outputs(tile, instances, tmp_path / "out", "tile", model=model)
    elapsed = time.perf_counter() - start
    assert elapsed < 5  # ~0.5 s on an idle core; generous for a loaded CI machine
    assert {k: p.name for k, p in paths.items()} == {
        "tiff": "tile.instances.tif",
        "geojson": "tile.geojson",
        "png": "tile.overlay.png",
        "json": "tile.json",
    }
    assert not [p for p in (tmp_path / "out").iterdir() if "partial" in p.name]
    assert _sha(image) == before

    # instance TIFF: identical ids, uint16, 0.25 um/px in centimetre resolution tags
    with tifffile.TiffFile(paths["tiff"]) as tif:
        page = tif.pages[0]
        stored = page.asarray()
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        numerator, denominator = page.tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(MPP)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, instances)

    # overlay: the tile's size; green exactly on the inner boundaries, the tile elsewhere
    overlay = np.array(PILImage.open(paths["png"]))
    assert overlay.shape == tile.shape and overlay.dtype == np.uint8
    boundary = find_boundaries(instances, mode="inner")
    assert boundary.any()
    assert (overlay[boundary] == OVERLAY_COLOR).all()
    np.testing.assert_array_equal(overlay[~boundary], tile.array[~boundary])

    # report
    report = json.loads(paths["json"].read_text())
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    nuclei = report["nuclei"]
    assert nuclei["count"] == len(ids) > 100
    assert nuclei["area_px"]["mean"] == pytest.approx(counts.mean(), abs=0.01)
    assert nuclei["area_px"]["median"] == pytest.approx(np.median(counts), abs=0.01)
    assert nuclei["area_um2"]["mean"] == pytest.approx(counts.mean() * MPP**2, abs=1e-3)
    assert nuclei["area_um2"]["total"] == pytest.approx(counts.sum() * MPP**2, abs=1e-2)
    image_mm2 = 1000 * 1000 * MPP**2 / 1e6
    assert report["image"] == {"name": image.name, "width": 1000, "height": 1000, "mpp": MPP, "area_mm2": image_mm2}
    assert nuclei["density_per_mm2"] == pytest.approx(len(ids) / image_mm2, abs=0.01)
    assert 0 < nuclei["tissue_fraction"] <= 1
    assert report["model"] == model
    assert report["outputs"] == {k: p.name for k, p in paths.items()}
    assert "density_per_mm2" in report["definitions"]


def test_geojson_polygons_match_the_labels(case, tmp_path):
    _, tile, instances = case
    paths = write_nuclei_outputs(tile, instances, tmp_path, "tile", formats=("geojson",))
    assert list(paths) == ["geojson"]
    collection = json.loads(paths["geojson"].read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    ids = np.unique(instances[instances > 0])
    assert sorted(f["properties"]["instance_id"] for f in features) == ids.tolist()
    assert len({f["id"] for f in features}) == len(features)
    from scipy.ndimage import find_objects

    boxes = find_objects(instances)
    ious = []
    for feature in features:
        assert feature["type"] == "Feature"
        uuid.UUID(feature["id"])
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"] == {"name": "Nucleus", "color": list(OVERLAY_COLOR)}
        nucleus = properties["instance_id"]
        area = int((instances == nucleus).sum())
        assert properties["measurements"]["area_px"] == area
        assert properties["measurements"]["area_um2"] == pytest.approx(area * MPP**2, abs=1e-3)
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = np.array(geometry["coordinates"][0])
        assert len(ring) >= 4 and np.array_equal(ring[0], ring[-1])  # closed
        # x = column, y = row, QuPath pixel-corner coordinates: pixel centres at +0.5
        rows, cols = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, instances.shape)
        drawn = np.zeros(instances.shape, bool)
        drawn[rows, cols] = True
        box = boxes[nucleus - 1]
        pad = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
        truth = instances[pad] == nucleus
        ious.append((drawn[pad] & truth).sum() / (drawn[pad] | truth).sum())
        assert drawn.sum() == drawn[pad].sum()  # the outline stays within the nucleus' box
    ious = np.array(ious)
    assert (ious > 0.8).mean() >= 0.99
    assert np.median(ious) > 0.95


def test_unknown_mpp_gives_null_physical_fields(case, tmp_path):
    image, tile, instances = case
    tile = read_tile(image)  # MoNuSeg PNGs state no pixel size
    assert tile.mpp is None
    paths = write_nuclei_outputs(tile, instances, tmp_path, "tile")
    report = json.loads(paths["json"].read_text())
    assert report["image"]["mpp"] is None and report["image"]["area_mm2"] is None
    nuclei = report["nuclei"]
    assert nuclei["count"] == len(np.unique(instances[instances > 0]))
    assert nuclei["area_um2"] is None and nuclei["density_per_mm2"] is None and nuclei["tissue_area_mm2"] is None
    assert nuclei["area_px"]["mean"] > 0
    assert any("pixel size unknown" in w for w in report["warnings"])
    feature = json.loads(paths["geojson"].read_text())["features"][0]
    assert set(feature["properties"]["measurements"]) == {"area_px"}
    with tifffile.TiffFile(paths["tiff"]) as tif:
        unit = tif.pages[0].tags.get("ResolutionUnit")
        assert unit is None or unit.value != tifffile.RESUNIT.CENTIMETER


def test_empty_map_says_count_zero(case, tmp_path):
    _, tile, instances = case
    paths = write_nuclei_outputs(tile, np.zeros_like(instances), tmp_path, "empty")
    report = json.loads(paths["json"].read_text())
    assert report["nuclei"]["count"] == 0
    assert report["nuclei"]["area_px"] == {"mean": None, "median": None, "total": 0}
    assert report["nuclei"]["density_per_mm2"] == 0
    assert any("count 0" in w for w in report["warnings"])
    assert json.loads(paths["geojson"].read_text()) == {"type": "FeatureCollection", "features": []}
    np.testing.assert_array_equal(np.array(PILImage.open(paths["png"])), tile.array)
    assert not tifffile.imread(paths["tiff"]).any()


def test_large_ids_are_written_as_uint32(case, tmp_path):
    _, tile, instances = case
    shifted = np.where(instances > 0, instances.astype(np.int64) + 70000, 0)
    paths = write_nuclei_outputs(tile, shifted, tmp_path, "big", formats=("tiff", "geojson", "json"))
    stored = tifffile.imread(paths["tiff"])
    assert stored.dtype == np.uint32
    np.testing.assert_array_equal(stored, shifted)
    features = json.loads(paths["geojson"].read_text())["features"]
    assert min(f["properties"]["instance_id"] for f in features) > 70000
    assert json.loads(paths["json"].read_text())["nuclei"]["count"] == len(np.unique(instances)) - 1


def test_shape_mismatch_and_bad_formats_raise(case, tmp_path):
    _, tile, instances = case
    with pytest.raises(ValueError, match="shape"):
        write_nuclei_outputs(tile, instances[:-1], tmp_path, "tile")
    with pytest.raises(ValueError, match="shape"):
        write_nuclei_outputs(tile, instances.T[None], tmp_path, "tile")
    with pytest.raises(ValueError, match="format"):
        write_nuclei_outputs(tile, instances, tmp_path, "tile", formats=("nifti",))
    with pytest.raises(ValueError, match="integer"):
        write_nuclei_outputs(tile, instances.astype(np.float32), tmp_path, "tile")
    assert not list(tmp_path.iterdir())


def test_never_overwrites_the_input_tile(case, tmp_path):
    image, _, instances = case
    copy = tmp_path / "slide.overlay.png"
    shutil.copy(image, copy)
    before = _sha(copy)
    tile = read_tile(copy, mpp=MPP)
    with pytest.raises(ConfigError, match="overwrite the input"):
        write_nuclei_outputs(tile, instances, tmp_path, "slide")
    assert _sha(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.overlay.png"]
