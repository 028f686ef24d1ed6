"""The nuclei path through the fastest runtime (issue 20): the bundled `nuclei` model runs its
HoVer head from the OpenVINO model shipped in the package, converting nothing, and segments a
real MoNuSeg test tile as the eager network does. Skips when ../shared/data is absent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path

pytest.importorskip("openvino")

TEST_TILE = "TCGA-2Z-A9J9-01A-01-TS1"


def _no_conversion(self, shape):
    raise AssertionError(f"converted {shape} although the package ships a verified OpenVINO model")


def test_bundled_nuclei_model_runs_its_shipped_openvino_model_like_eager(monkeypatch, tmp_path):
    from medseg.inference.runtime import _OpenVINOForward
    from medseg.io.tile import Tile
    from medseg.nuclei.predictor import NucleiPredictor
    from medseg.package import resolve_model

    image = Image.open(shared_path("nuclei", "monuseg_test", "images", f"{TEST_TILE}.png")).convert("RGB")
    tile = Tile(np.ascontiguousarray(np.asarray(image)[250:762, 250:762]), 0.25, "crop.png")
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    package = resolve_model("nuclei")
    fast = NucleiPredictor(package, runtime="openvino")
    assert fast.sw_batch_size == 1  # the shipped model is compiled for one (1, 3, *patch) window
    got = fast.predict(tile)
    assert (got.runtime, got.runtime_fallback) == ("openvino", None)
    shape = (1, 3, *package.card.patch_size)
    assert fast._runtime._forward.sources == {shape: "shipped"}
    assert fast._runtime._forward.verified_by == {shape: "reference"}  # the network was never built
    assert fast._runtime._network is None and not (tmp_path / "cache").exists()

    eager = NucleiPredictor(package, runtime="eager").predict(tile)
    assert eager.runtime == "eager"
    # measured: 100.00 % of the crop's pixels equal (a 512 x 512 crop, 9 windows)
    assert float(np.mean(got.instances == eager.instances)) >= 0.995
    assert abs(got.count - eager.count) <= 2
