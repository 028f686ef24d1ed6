"""Network runtimes compute the same function as the eager network."""

from __future__ import annotations

import pytest
import torch

from medseg.inference.runtime import GroupInstanceNorm, NetworkRuntime, auto_sw_batch_size
from medseg.networks import create_network


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
        "forward._convert_and_verify((1, 1, 8, 8, 8))\n"
        "from openvino.tools.ovc import convert_impl, telemetry_utils\n"
        "assert convert_impl.tm.__name__.endswith('telemetry_stub'), convert_impl.tm\n"
        "assert telemetry_utils.tm.__name__.endswith('telemetry_stub'), telemetry_utils.tm\n"
        "assert sys.modules.get('openvino_telemetry') is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
