"""2D tile input (:mod:`medseg.io.tile`) on real MoNuSeg H&E tiles and the StarDist fluorescence TIFF."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tifffile
from conftest import shared_path
from PIL import Image as PILImage

from medseg.errors import UnreadableFileError, UnsupportedInputError
from medseg.io import Tile, is_tile_file, read_instance_map, read_tile

MONUSEG = ("nuclei", "monuseg_test")
STARDIST = ("nuclei", "stardist_dsb_sample")


def _monuseg_pair() -> tuple:
    images = shared_path(*MONUSEG, "images")
    image = sorted(images.glob("*.png"))[0]
    label = shared_path(*MONUSEG, "labels", image.name)
    return image, label


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_is_tile_file():
    assert is_tile_file("a.png") and is_tile_file("B.TIFF") and is_tile_file("x.jpeg") and is_tile_file("x.jpg")
    assert not is_tile_file("ct.nii.gz") and not is_tile_file("scan.dcm")


def test_read_monuseg_png_is_uint8_rgb_and_unchanged():
    image, _ = _monuseg_pair()
    before = _sha(image)
    tile = read_tile(image)
    assert isinstance(tile, Tile)
    assert tile.shape == (1000, 1000, 3) and tile.array.dtype == np.uint8
    assert tile.name == image.name and tile.mpp is None  # MoNuSeg PNGs carry no pHYs chunk
    np.testing.assert_array_equal(tile.array, np.array(PILImage.open(image).convert("RGB")))
    assert read_tile(image, mpp=0.25).mpp == 0.25
    assert _sha(image) == before


def test_read_stardist_grey_tiff_becomes_three_rescaled_channels():
    path = shared_path(*STARDIST, "img2d.tif")
    raw = tifffile.imread(path)
    assert raw.ndim == 2 and raw.dtype == np.uint16
    tile = read_tile(path)
    assert tile.shape == (*raw.shape, 3) and tile.array.dtype == np.uint8
    grey = tile.array[..., 0]
    assert np.array_equal(grey, tile.array[..., 1]) and np.array_equal(grey, tile.array[..., 2])
    # the documented rule: round(v * 255 / max)
    np.testing.assert_array_equal(tile.array[..., 0], np.rint(raw * (255.0 / raw.max())).astype(np.uint8))
    assert tile.mpp is None  # ResolutionUnit NONE is not trusted


def test_tiff_resolution_tags_give_mpp(tmp_path):
    image, _ = _monuseg_pair()
    rgb = np.array(PILImage.open(image).convert("RGB"))[:200, :300]
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, rgb, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    tile = read_tile(cm)
    assert tile.mpp == pytest.approx(0.25) and tile.shape == (200, 300, 3)
    np.testing.assert_array_equal(tile.array, rgb)
    assert read_tile(cm, mpp=0.5).mpp == 0.5  # the argument wins over the file
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, rgb, photometric="rgb", resolution=(101600, 101600), resolutionunit="INCH")
    assert read_tile(inch).mpp == pytest.approx(0.25)
    none = tmp_path / "none.tif"
    tifffile.imwrite(none, rgb, photometric="rgb", resolution=(4, 4), resolutionunit="NONE")
    assert read_tile(none).mpp is None
    dpi72 = tmp_path / "dpi72.tif"  # a screen default, not a microscope scale
    tifffile.imwrite(dpi72, rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert read_tile(dpi72).mpp is None
    nearly = tmp_path / "nearly.tif"  # 0.25 x 0.2512 um: < 1 % apart -> the mean
    tifffile.imwrite(nearly, rgb, photometric="rgb", resolution=(40000, 1e4 / 0.2512), resolutionunit="CENTIMETER")
    assert read_tile(nearly).mpp == pytest.approx((0.25 + 0.2512) / 2, rel=1e-4)
    skewed = tmp_path / "skewed.tif"
    tifffile.imwrite(skewed, rgb, photometric="rgb", resolution=(40000, 20000), resolutionunit="CENTIMETER")
    with pytest.raises(UnsupportedInputError, match="not square"):
        read_tile(skewed)
    assert read_tile(skewed, mpp=0.25).mpp == 0.25
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_tile(planar).array, rgb)


@pytest.mark.parametrize("bad", [0, -0.25, float("nan"), float("inf")])
def test_bad_mpp_argument(bad):
    image, _ = _monuseg_pair()
    with pytest.raises(ValueError, match="mpp"):
        read_tile(image, mpp=bad)


def test_png_phys_in_metres_gives_mpp_and_alpha_is_dropped(tmp_path):
    image, _ = _monuseg_pair()
    rgb = np.array(PILImage.open(image).convert("RGB"))[:128, :160]
    path = tmp_path / "tile.png"
    PILImage.fromarray(rgb).save(path, dpi=(101600, 101600))  # pHYs: 4,000,000 px/m = 0.25 um/px
    assert PILImage.open(path).info.get("dpi") is not None
    tile = read_tile(path)
    assert tile.mpp == pytest.approx(0.25, rel=1e-6)
    np.testing.assert_array_equal(tile.array, rgb)
    plain = tmp_path / "plain.png"
    PILImage.fromarray(rgb).save(plain)
    assert read_tile(plain).mpp is None
    rgba = tmp_path / "rgba.png"
    PILImage.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(rgba)
    tile = read_tile(rgba)
    assert tile.shape == (128, 160, 3)
    np.testing.assert_array_equal(tile.array, rgb)


def test_stack_tiff_is_refused_as_not_2d(tmp_path):
    raw = tifffile.imread(shared_path(*STARDIST, "img2d.tif"))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([raw, raw, raw]), photometric="minisblack")
    with pytest.raises(UnsupportedInputError, match="2D tile is needed"):
        read_tile(stack)


def test_corrupt_and_non_image_files(tmp_path):
    image, _ = _monuseg_pair()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:5000])
    with pytest.raises(UnreadableFileError, match="truncated.png"):
        read_tile(truncated)
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(UnreadableFileError, match="garbage.tif"):
        read_tile(garbage)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UnreadableFileError):
        read_tile(text)
    with pytest.raises(UnreadableFileError, match="no such file"):
        read_tile(tmp_path / "missing.png")
    volume = tmp_path / "ct.nii.gz"
    volume.write_bytes(b"\x1f\x8b" + b"\x00" * 32)
    with pytest.raises(UnsupportedInputError, match="2D tile is needed"):
        read_tile(volume)
    try:
        read_tile(truncated)
    except UnreadableFileError as error:
        assert str(tmp_path) not in str(error)  # the file name only, never the folder


def test_read_instance_map_matches_the_label_png_and_tiff(tmp_path):
    image, label = _monuseg_pair()
    before = _sha(label)
    ids = read_instance_map(label)
    expected = np.array(PILImage.open(label))
    assert expected.dtype == np.uint16
    assert ids.dtype == np.int32 and ids.shape == (1000, 1000)
    np.testing.assert_array_equal(ids, expected)
    assert ids.max() > 255  # all 16 bits kept
    assert _sha(label) == before
    mask = shared_path(*STARDIST, "mask2d.tif")
    np.testing.assert_array_equal(read_instance_map(mask), tifffile.imread(mask).astype(np.int32))
    with pytest.raises(UnsupportedInputError):
        read_instance_map(image)  # an RGB tile is not an instance map
    rgb_tiff = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb_tiff, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(UnsupportedInputError):
        read_instance_map(rgb_tiff)
