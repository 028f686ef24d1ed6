"""float16 weight storage for model packages: a float16 copy of the bundled hippocampus package is
half the size, its card names its weights file, it loads as a float32 network and segments the
bundled sample as the float32 package does; ``medseg models install`` writes such a copy (with its
own OpenVINO model), refuses to overwrite, and ``medseg models`` lists what it installed."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.errors import UnsupportedInputError
from medseg.package import (
    METADATA,
    WEIGHTS,
    ModelPackage,
    PackageExistsError,
    cast_weights,
    dynunet_kwargs,
    file_sha256,
    load_weights,
    resolve_model,
)

SAMPLE = Path(__file__).resolve().parents[1] / "medseg" / "samples" / "hippocampus_mr"
#: least share of the sample's voxels the float16 copy must label as the float32 package does
AGREEMENT = 0.999


@pytest.fixture(scope="module")
def bundled() -> ModelPackage:
    return resolve_model("hippocampus")


@pytest.fixture(scope="module")
def half(bundled, tmp_path_factory) -> ModelPackage:
    """A float16 copy of the bundled package (no OpenVINO model: fast)."""
    return bundled.copy_to(tmp_path_factory.mktemp("fp16") / "hippocampus_fp16", "float16")


@pytest.fixture(scope="module")
def sample():
    from medseg.io import find_series, read_image

    [series] = find_series(SAMPLE)
    return read_image(SAMPLE, series.uid)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_copy_is_half_the_size_and_its_card_names_the_file(bundled, half):
    ratio = (half.path / WEIGHTS).stat().st_size / (bundled.path / WEIGHTS).stat().st_size
    assert 0.45 < ratio < 0.55
    assert half.card.weights_sha256 == file_sha256(half.path / WEIGHTS) != bundled.card.weights_sha256
    assert half.hash_source == "metadata" and half.check_weights() == half.card.weights_sha256
    assert (half.card.weights_dtype, bundled.card.weights_dtype) == ("float16", "float32")
    state = torch.load(half.path / WEIGHTS, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    # the rest of the card is the model's identity and record, unchanged; no runtime copied
    same = {"weights_sha256", "weights_dtype"}
    assert half.card.model_dump(exclude=same) == bundled.card.model_dump(exclude=same)
    assert not (half.path / "runtime").exists()
    assert [p.name for p in half.path.parent.iterdir()] == [half.path.name]  # no temporary folder left
    # the source is untouched
    assert bundled.check_weights() == file_sha256(bundled.path / WEIGHTS)
    # older metadata without the field reads as float32
    metadata = json.loads((bundled.path / METADATA).read_text())
    metadata["medseg"].pop("weights_dtype", None)
    assert type(bundled.card).model_validate(metadata["medseg"]).weights_dtype == "float32"


def test_float16_weights_load_as_a_float32_network(bundled, half):
    network = half.load_network()
    tensors = [*network.parameters(), *network.buffers()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
    reference = bundled.load_network().state_dict()
    for key, value in network.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key].half().float(), rtol=0, atol=0)


def test_monai_bundle_loading_gets_float32_parameters(half):
    """The MONAI bundle's load_weights (configs/inference.json) loads the raw float16 state dict
    into DynUNet: load_state_dict copies into the float32 parameters."""
    from monai.networks.nets import DynUNet

    network = DynUNet(**dynunet_kwargs(half.card.network.config)).eval()
    state = torch.load(half.path / WEIGHTS, map_location="cpu", weights_only=True)
    network.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    assert {p.dtype for p in network.parameters()} == {torch.float32}


def test_float16_copy_segments_the_sample_as_the_float32_package(bundled, half, sample):
    from medseg.inference import Predictor

    labels = [Predictor(p, runtime="eager").predict(sample).label_map.array for p in (bundled, half)]
    assert labels[0].shape == sample.shape and labels[1].any()
    assert np.mean(labels[0] == labels[1]) >= AGREEMENT


def test_cast_leaves_integer_and_bool_buffers_and_refuses_overflow():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    state = network.state_dict()
    state["mask"] = torch.tensor([True, False])
    half = cast_weights(dict(state), "float16")
    assert half["1.num_batches_tracked"].dtype == torch.int64 and half["mask"].dtype == torch.bool
    assert half["0.weight"].dtype == torch.float16
    back = cast_weights(dict(half), "float32")
    assert back["0.weight"].dtype == torch.float32 and back["1.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(UnsupportedInputError, match="float16"):
        cast_weights({"w": torch.tensor([1.0, 1e6])}, "float16")


def test_load_weights_casts_float16(tmp_path):
    torch.save({"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(4)}, tmp_path / "m.pt")
    state = load_weights(tmp_path / "m.pt")
    assert state["w"].dtype == torch.float32 and state["n"].dtype == torch.int64


def test_copy_refuses_an_existing_destination_and_itself(bundled, half, tmp_path):
    with pytest.raises(PackageExistsError, match="already exists"):
        bundled.copy_to(half.path)
    with pytest.raises(PackageExistsError, match="itself or inside it"):
        half.copy_to(half.path, overwrite=True)
    with pytest.raises(PackageExistsError, match="itself or inside it"):
        half.copy_to(half.path / "inner")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PackageExistsError, match="not a model package"):
        bundled.copy_to(tmp_path / "folder", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.fixture(scope="module")
def installed(bundled, tmp_path_factory):
    """``medseg models install`` of the bundled package with float16 weights, OpenVINO model included."""
    dest = tmp_path_factory.mktemp("models")
    argv = ["models", "install", str(bundled.path), "--name", "hippo16", "--fp16", "--dest", str(dest), "--json"]
    code, out, err = _cli(argv)
    assert code == 0, err
    return ModelPackage(dest / "hippo16"), json.loads(out), argv


def test_install_writes_a_float16_copy_with_its_own_openvino_model(bundled, installed, sample, monkeypatch):
    openvino = pytest.importorskip("openvino")
    from medseg.inference import Predictor
    from medseg.inference.runtime import _OpenVINOForward, openvino_ir_tag

    package, row, _ = installed
    assert row["weights_dtype"] == "float16" and row["weights_sha256"] == file_sha256(package.path / WEIGHTS)
    assert row["weights_mb"] < 0.55 * row["source_weights_mb"]
    shape = (1, 1, *package.card.patch_size)
    tags = [p.name for p in package.runtime_dir.iterdir()]
    assert tags == [openvino_ir_tag(package.weights_sha256, shape, openvino.__version__)]
    assert (package.runtime_dir / tags[0] / "model.xml").is_file()

    def no_conversion(self, shape):
        raise AssertionError("the installed package should ship its OpenVINO model")

    monkeypatch.setattr(_OpenVINOForward, "convert", no_conversion)
    predictor = Predictor(package, runtime="openvino")
    labels = predictor.predict(sample).label_map.array
    assert predictor.runtimes[0]._forward.sources == {shape: "shipped"}
    reference = Predictor(bundled, runtime="openvino").predict(sample).label_map.array
    assert np.mean(labels == reference) >= AGREEMENT


def test_install_refuses_an_existing_destination_with_exit_2(installed):
    package, _, argv = installed
    before = file_sha256(package.path / WEIGHTS)
    code, out, err = _cli(argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "already exists" in err and "Traceback" not in err
    assert file_sha256(package.path / WEIGHTS) == before
    assert [p.name for p in package.path.parent.iterdir()] == ["hippo16"]  # no temporary folder left


def test_install_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for argv in (
        ["models", "install", str(tmp_path / "empty"), "--dest", str(tmp_path)],  # not a package
        ["models", "install", "hippocampus", "--name", "../up", "--dest", str(tmp_path)],
        ["models", "install", "hippocampus", "--name", "empty", "--dest", str(tmp_path), "--force"],
        ["models", "install"],
    ):
        code, out, err = _cli(argv)
        assert code == 2 and "Traceback" not in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_install_force_replaces_a_package(half, tmp_path):
    first = half.copy_to(tmp_path / "p", "float32")
    argv = ["models", "install", str(half.path), "--name", "p", "--dest", str(tmp_path), "--force", "--no-openvino"]
    code, out, err = _cli(argv)
    assert code == 0, err
    replaced = ModelPackage(tmp_path / "p")
    assert replaced.card.weights_dtype == "float16" != first.card.weights_dtype
    assert replaced.check_weights() == half.weights_sha256  # float16 to float16: the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_models_lists_the_installed_package(installed, monkeypatch):
    package, _, _ = installed
    monkeypatch.setenv("MEDSEG_MODEL_PATH", str(package.path.parent))
    code, out, err = _cli(["models", "--packages", "--json"])
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert rows[0]["path"] == str(package.path) and rows[0]["weights_sha256"] == package.weights_sha256
    assert rows[0]["folder_name"] == "hippo16" and rows[0]["name"] == "hippocampus"
    code, out, _ = _cli(["models", "--packages"])
    assert code == 0 and any(line.split()[2:3] == [package.card.weights_short] for line in out.splitlines())
    assert resolve_model("hippo16").path == package.path
