"""STU-Net: reference parameter counts, shapes, deep supervision, gradients, upstream checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import ConfigError, InputShapeError, PretrainedWeightsError
from medseg.losses import nnunet_deep_supervision_weights
from medseg.networks import count_parameters, create_network, network_entry
from medseg.networks.stunet import (
    NNUNET_DEEP_SUPERVISION_WEIGHTS,
    medseg_to_upstream_key,
    upstream_to_medseg_key,
)

# README / docs/architectures.md section 5 (in 1, out 105)
PUBLISHED = {"S": 14_596_941, "B": 58_262_669, "L": 440_302_605, "H": 1_457_326_221}


def tiny(**overrides):
    return create_network("stunet", **{**network_entry("stunet").references["tiny"], **overrides})


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_reference_parameter_counts_on_meta_device(size):
    with torch.device("meta"):  # H and L are never allocated
        net = create_network("stunet", **network_entry("stunet").references[size])
    assert count_parameters(net) == PUBLISHED[size]


def test_shapes_taps_and_deep_supervision_scales():
    torch.manual_seed(0)
    net = tiny().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x, features=True)
        logits = net(x)
    assert logits.shape == (1, 3, 32, 32, 32)
    assert torch.equal(logits, out.logits)
    channels, scales = (4, 8, 8, 16, 16, 16), (1, 2, 4, 8, 16, 16)  # tiny: pool strides 2, 2, 2, 2, 1
    assert [tuple(f.shape[1:]) for f in out.encoder] == [(c, *(32 // r,) * 3) for c, r in zip(channels, scales)]
    # decoder levels coarsest first: 1/16 .. 1/1
    assert [tuple(f.shape[1:]) for f in out.decoder] == [
        (channels[4 - u], *(32 // 2 ** (4 - u),) * 3) for u in range(5)
    ]
    # deep supervision finest first, excluding the final logits: 1/2, 1/4, 1/8, 1/16
    assert [tuple(f.shape) for f in out.deep_supervision] == [(1, 3, *(32 // 2**i,) * 3) for i in range(1, 5)]
    assert len(NNUNET_DEEP_SUPERVISION_WEIGHTS) == 1 + len(out.deep_supervision)
    assert nnunet_deep_supervision_weights(5) == pytest.approx(NNUNET_DEEP_SUPERVISION_WEIGHTS)


def test_anisotropic_pool_strides():
    net = tiny(pool_strides=[(1, 2, 2), 2, 2, (1, 2, 2), 1]).eval()
    assert net.input_divisor == (4, 16, 16)
    with torch.no_grad():
        out = net(torch.randn(1, 1, 8, 32, 32), features=True)
    assert out.logits.shape == (1, 3, 8, 32, 32)
    assert [tuple(f.shape[2:]) for f in out.deep_supervision] == [(8, 16, 16), (4, 8, 8), (2, 4, 4), (2, 2, 2)]
    with pytest.raises(ConfigError):
        tiny(pool_strides=[2, 2])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny().train()
    out = net(torch.randn(2, 1, 32, 32, 32), features=True)
    loss = out.logits.square().mean() + sum(d.square().mean() for d in out.deep_supervision)
    loss.backward()
    without = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not without


def test_bad_input_raises_input_shape_error():
    net = tiny()
    with pytest.raises(InputShapeError, match="divisible"):
        net(torch.zeros(1, 1, 32, 32, 24))
    with pytest.raises(InputShapeError, match="channels"):
        net(torch.zeros(1, 2, 32, 32, 32))
    with pytest.raises(InputShapeError):
        net(torch.zeros(1, 32, 32, 32))
    with pytest.raises(InputShapeError, match="single-voxel bottleneck"):
        net(torch.zeros(1, 1, 16, 16, 16))


def _write_upstream_checkpoint(net, path, **extra):
    """An nnU-Net v1 style checkpoint in the assumed upstream STU-Net key layout."""
    state = {medseg_to_upstream_key(k): v.clone() for k, v in net.state_dict().items()}
    torch.save(
        {
            "epoch": 1000,
            "state_dict": state,
            "optimizer_state_dict": {},
            "plot_stuff": ([np.float64(0.9)], [np.float32(0.8)], [], []),
            **extra,
        },
        path,
    )
    return state


def test_upstream_key_layout():
    net = tiny()
    keys = {medseg_to_upstream_key(k) for k in net.state_dict()}
    assert "conv_blocks_context.0.0.conv3.weight" in keys  # stage 0 input projection
    assert "conv_blocks_context.1.0.conv1.weight" in keys
    assert "conv_blocks_localization.4.0.norm2.bias" in keys
    assert "upsample_layers.0.conv.weight" in keys
    assert "seg_outputs.4.weight" in keys and "seg_outputs.5.weight" not in keys
    assert all(upstream_to_medseg_key(medseg_to_upstream_key(k)) == k for k in net.state_dict())
    assert upstream_to_medseg_key("module.seg_outputs.0.bias") == "heads.0.bias"


def test_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    source = tiny()
    path = tmp_path / "model_final_checkpoint.model"
    _write_upstream_checkpoint(source, path)
    torch.manual_seed(2)
    target = create_network("stunet", pretrained=str(path), **network_entry("stunet").references["tiny"])
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


def test_pretrained_reports_missing_and_unexpected(tmp_path):
    source = tiny()
    path = tmp_path / "partial.model"
    state = {medseg_to_upstream_key(k): v for k, v in source.state_dict().items()}
    del state["seg_outputs.0.weight"]
    state["conv_blocks_context.0.1.conv1.weight"] = torch.zeros(4, 4, 3, 3, 3)  # a block we do not have
    torch.save({"state_dict": state}, path)
    report = tiny().load_pretrained(path)
    assert report == {"missing": ["heads.0.weight"], "unexpected": ["encoder.0.1.conv1.weight"]}


def test_pretrained_skip_heads_for_other_classes(tmp_path):
    path = tmp_path / "totalseg.model"
    _write_upstream_checkpoint(tiny(out_channels=7), path)
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        tiny().load_pretrained(path)
    report = tiny().load_pretrained(path, skip_heads=True)
    assert sorted(report["missing"]) == sorted(f"heads.{u}.{p}" for u in range(5) for p in ("weight", "bias"))
    assert report["unexpected"] == []


def test_mismatched_shape_raises(tmp_path):
    path = tmp_path / "wider.model"
    _write_upstream_checkpoint(tiny(channels=(8, 8, 8, 16, 16, 16)), path)
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        tiny().load_pretrained(path)


def test_unreadable_checkpoint_raises(tmp_path):
    path = tmp_path / "broken.model"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="broken.model"):
        tiny().load_pretrained(path)
    torch.save({"epoch": 3}, tmp_path / "empty.model")
    with pytest.raises(PretrainedWeightsError, match="state_dict"):
        tiny().load_pretrained(tmp_path / "empty.model")
