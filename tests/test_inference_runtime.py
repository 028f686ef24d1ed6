"""Network runtimes compute the same function as the eager network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.inference.channels_last import GroupInstanceNorm
from medseg.inference.runtime import NetworkRuntime, auto_sw_batch_size
from medseg.networks import create_network

REPO_SAMPLE = Path(__file__).resolve().parents[1] / "medseg" / "samples" / "hippocampus_mr"


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return create_network(
        "unet", spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16), deep_supervision=1
    ).eval()


def test_group_norm_is_instance_norm():
    norm = torch.nn.InstanceNorm3d(6, affine=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7, 9) * 3 + 1
    torch.testing.assert_close(GroupInstanceNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("runtime", ["channels_last", "openvino"])
def test_runtime_matches_eager(runtime, network, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path))
    x = torch.randn(3, 1, 16, 24, 16)
    with torch.inference_mode():
        reference = network(x)
        fast = NetworkRuntime(network, runtime, batch_size=4, cache_key="test-weights")
        out = fast(x)  # 3 windows padded to the fixed batch of 4
    assert out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, atol=1e-4, rtol=1e-4)
    assert network.net.input_block.norm1.__class__.__name__ == "InstanceNorm3d"  # original untouched
    if runtime == "openvino":
        assert list(tmp_path.glob("openvino/*/model.xml"))  # converted once, cached
        again = NetworkRuntime(network, runtime, batch_size=4, cache_key="test-weights")
        with torch.inference_mode():
            torch.testing.assert_close(again(x), out)


def test_auto_runtime_and_batch_size_on_cpu(network):
    runtime = NetworkRuntime(network, "auto")
    assert runtime.name in ("openvino", "channels_last")
    assert auto_sw_batch_size(runtime, (16, 16, 16), 1, torch.device("cpu"), 10) == 1
    with pytest.raises(ValueError, match="unknown runtime"):
        NetworkRuntime(network, "tensorrt")


def test_openvino_conversion_is_verified_with_fallback(network, tmp_path, monkeypatch, caplog):
    import medseg.inference.runtime as runtime_module

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime_module, "VERIFY_TOLERANCE", -1.0)  # reject every conversion
    x = torch.randn(1, 1, 16, 16, 16)
    fast = NetworkRuntime(network, "openvino", cache_key="rejected")
    with torch.inference_mode():
        out = fast(x)
        torch.testing.assert_close(out, network(x), atol=1e-4, rtol=1e-4)
    assert fast.name == "channels_last"
    assert "differs from the network" in caplog.text
    assert not list(tmp_path.glob("openvino/*/model.xml"))  # nothing unverified is cached


def test_openvino_conversion_sends_no_telemetry():
    """Privacy: converting a network never reaches OpenVINO's Google Analytics telemetry."""
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "from medseg.inference.runtime import _OpenVINOForward\n"
        "forward = _OpenVINOForward(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), cache_key=None)\n"
        "forward.convert((1, 1, 8, 8, 8))\n"
        "from openvino.tools.ovc import convert_impl, telemetry_utils\n"
        "assert convert_impl.tm.__name__.endswith('telemetry_stub'), convert_impl.tm\n"
        "assert telemetry_utils.tm.__name__.endswith('telemetry_stub'), telemetry_utils.tm\n"
        "assert sys.modules.get('openvino_telemetry') is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# --- converted models shipped with the package, never trusted ---------------------------------
def _no_conversion(self, shape):
    raise AssertionError(f"converted {shape} although a verified stored model exists")


def test_shipped_openvino_model_is_used_without_converting(network, tmp_path, monkeypatch):
    from medseg.inference.runtime import _OpenVINOForward, prepare_openvino

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    shape = (1, 1, 16, 16, 16)
    (xml,) = prepare_openvino(network, "weights-1", [shape], tmp_path / "shipped")
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and xml.parent.parent == tmp_path / "shipped"
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    fast = NetworkRuntime(network, "openvino", cache_key="weights-1", shipped_dir=tmp_path / "shipped")
    x = torch.randn(shape)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), network(x), atol=1e-4, rtol=1e-4)
    assert fast._forward.sources == {shape: "shipped"}
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached


def test_a_stored_model_is_verified_against_its_reference_without_the_network(network, tmp_path, monkeypatch):
    """A stored model is checked against the eager output stored beside it at conversion, so the
    network is not built; a reference that does not belong to the model files (changed after
    conversion) is ignored and the network is built to verify against."""
    import numpy as np

    from medseg.inference.runtime import _OpenVINOForward, prepare_openvino

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    shape = (1, 1, 16, 16, 16)
    (xml,) = prepare_openvino(network, "weights-1", [shape], tmp_path / "shipped")
    assert (xml.parent / "reference.npz").is_file()
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    built = []

    def load():
        built.append(1)
        return network

    fast = NetworkRuntime(None, "openvino", cache_key="weights-1", shipped_dir=tmp_path / "shipped", load_network=load)
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    out = fast(x)
    assert isinstance(out, np.ndarray) and not built
    assert fast._forward.verified_by == {shape: "reference"}
    with torch.inference_mode():
        np.testing.assert_allclose(out, network(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-4)

    xml.write_text(xml.read_text() + " ")  # the model files changed after conversion
    again = NetworkRuntime(None, "openvino", cache_key="weights-1", shipped_dir=tmp_path / "shipped", load_network=load)
    np.testing.assert_allclose(again(x), out, atol=1e-5, rtol=1e-5)
    assert built and again._forward.verified_by == {shape: "network"}


def test_foreign_or_damaged_stored_models_are_converted_again(network, tmp_path, monkeypatch, caplog):
    from medseg.inference.runtime import prepare_openvino

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    shape = (1, 1, 16, 16, 16)
    torch.manual_seed(1)
    other = create_network(
        "unet", spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16), deep_supervision=1
    ).eval()
    # another network's conversion filed under this network's key (a stale or foreign model)
    (xml,) = prepare_openvino(other, "weights-1", [shape], tmp_path / "shipped")
    x = torch.randn(shape)
    fast = NetworkRuntime(network, "openvino", cache_key="weights-1", shipped_dir=tmp_path / "shipped")
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), network(x), atol=1e-4, rtol=1e-4)
    assert fast._forward.sources == {shape: "converted"} and fast.name == "openvino"
    assert "does not compute this network" in caplog.text
    (cached,) = (tmp_path / "cache").glob("openvino/*/model.xml")  # the fresh conversion is kept
    assert cached.parent.name == xml.parent.name

    # a damaged cached model (truncated weights) is converted again too, and replaced
    weights = cached.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[:100])
    caplog.clear()
    again = NetworkRuntime(network, "openvino", cache_key="weights-1")
    with torch.inference_mode():
        torch.testing.assert_close(again(x), network(x), atol=1e-4, rtol=1e-4)
    assert again._forward.sources == {shape: "converted"}
    assert "converting again" in caplog.text
    assert cached.with_suffix(".bin").stat().st_size > 100


def _tiny_package(tmp_path):
    """A seeded tiny hippocampus U-Net package (window 16x24x16) in ``tmp_path/tiny``, no IR yet."""
    from medseg.package import ModelCard, ModelPackage, NetworkSpec
    from tests.test_inference_predictor import LABELS

    config = dict(spatial_dims=3, in_channels=1, out_channels=3, filters=(4, 8, 16), deep_supervision=1)
    torch.manual_seed(0)
    card = ModelCard(
        name="tiny",
        network=NetworkSpec(name="unet", config=config),
        modality=["MR"],
        labels=LABELS,
        spacing=(1.0, 1.0, 1.0),
        patch_size=(16, 24, 16),
    )
    return ModelPackage.save(tmp_path / "tiny", card, create_network("unet", **config).state_dict())


def test_an_exported_package_predicts_without_converting(tmp_path, monkeypatch):
    """The package carries its OpenVINO model (prepare_package, as export does): a first
    prediction on a real case converts nothing."""
    from medseg.inference import Predictor
    from medseg.inference.runtime import _OpenVINOForward, prepare_package
    from medseg.io import read_image
    from tests.conftest import shared_path

    image = read_image(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz"))
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    package = _tiny_package(tmp_path)
    (xml,) = prepare_package(package)
    assert xml.is_relative_to(package.path / "runtime" / "openvino")
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    predictor = Predictor(package, runtime="openvino")
    prediction = predictor.predict(image)
    assert prediction.settings["runtime"] == "openvino"
    assert predictor.runtimes[0]._forward.sources == {(1, 1, 16, 24, 16): "shipped"}
    eager = Predictor(package, runtime="eager").predict(image)
    assert (prediction.label_map.array == eager.label_map.array).mean() > 0.999


def test_a_failed_conversion_is_remembered_and_the_predictor_falls_back_with_its_reason(tmp_path, monkeypatch):
    """A conversion that failed at export (e.g. OpenVINO's CPU plugin crashing: the 2D TransUNet's
    float32 compile ends in SIGSEGV on this CPU) leaves ``failed.json`` with the reason; the
    Predictor then runs the network eagerly, reports why, and converts nothing again."""
    import json

    import openvino

    from medseg.inference import Predictor
    from medseg.inference.runtime import FAILED, _OpenVINOForward, convert_package, openvino_ir_tag
    from medseg.io import read_image

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    package = _tiny_package(tmp_path)
    shape = (1, 1, 16, 24, 16)
    folder = package.runtime_dir / openvino_ir_tag(package.weights_sha256, shape, openvino.__version__)
    # a child that cannot read the package exits non-zero: its last stderr line is the reason
    with pytest.raises(Exception, match="failed|Error"):
        convert_package(tmp_path / "missing", shape, folder)
    reason = "OpenVINO conversion for input (1, 1, 16, 24, 16) crashed (SIGSEGV)"
    (folder / FAILED).write_text(json.dumps({"reason": reason}))
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    prediction = Predictor(package).predict(read_image(REPO_SAMPLE))
    assert prediction.settings["runtime"] == "channels_last"
    assert prediction.settings["runtime_fallback"] == reason
    assert not (tmp_path / "cache").exists()


def test_the_bundled_default_model_ships_its_openvino_model(monkeypatch, tmp_path):
    """`medseg predict ... --model hippocampus` right after install converts nothing: the package
    carries the OpenVINO IR of its window shape for the pinned OpenVINO version."""
    from medseg.inference import Predictor
    from medseg.inference.runtime import _OpenVINOForward
    from medseg.io import read_image
    from medseg.package import resolve_model

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    package = resolve_model("hippocampus")
    predictor = Predictor(package, runtime="openvino")
    image = read_image(package.path.parents[1] / "samples" / "hippocampus_mr")
    assert predictor.predict(image).settings["runtime"] == "openvino"
    assert predictor.runtimes[0]._forward.sources == {(1, 1, *package.card.patch_size): "shipped"}
    assert not (tmp_path / "cache").exists()


def test_a_conversion_that_crashed_is_retried_with_safe_settings_and_shipped(monkeypatch, tmp_path):
    """The bundled 2D TransUNet: OpenVINO's float32 compile with the CPU plugin's fused
    subgraphs crashes on this CPU, so its export retried without them (SAFE_COMPILE_OPTIONS,
    stored in compile.json); it runs through OpenVINO, converts nothing, labels like PyTorch."""
    from medseg.inference import Predictor
    from medseg.inference.runtime import SAFE_COMPILE_OPTIONS, _compile_options, _OpenVINOForward
    from medseg.io import read_image
    from medseg.package import resolve_model

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    package = resolve_model("hippocampus_transunet")
    (folder,) = [p for p in package.runtime_dir.iterdir() if p.is_dir()]
    assert _compile_options(folder) == SAFE_COMPILE_OPTIONS
    monkeypatch.setattr(_OpenVINOForward, "convert", _no_conversion)
    image = read_image(REPO_SAMPLE)
    predictor = Predictor(package)
    prediction = predictor.predict(image)
    assert prediction.settings["runtime"] == "openvino" and prediction.settings["runtime_fallback"] is None
    assert set(predictor.runtimes[0]._forward.sources.values()) == {"shipped"}
    eager = Predictor(package, runtime="eager").predict(image)
    assert (prediction.label_map.array == eager.label_map.array).mean() > 0.999
