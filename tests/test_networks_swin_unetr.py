"""Swin UNETR wrapper: identical to MONAI's SwinUNETR, taps, meta build, self-supervised weights."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from medseg.errors import ConfigError, InputShapeError, PretrainedWeightsError
from medseg.networks import count_parameters, create_network, network_entry

# 3D, small enough for CPU tests (the registry's "tiny" is 2D, see swin_unetr.py)
SMALL3D = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=3,
    feature_size=12,
    depths=(1, 1, 1, 1),
    num_heads=(1, 1, 1, 1),
    window_size=4,
)
MONAI_KEYS = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)


@pytest.mark.parametrize("label,expected", [("BTCV", 62_187_296), ("BTCV_v2", 72_762_656), ("2d", 25_138_323)])
def test_reference_counts_on_meta_equal_monai(label, expected):
    config = network_entry("swin_unetr").references[label]
    with torch.device("meta"):
        net = create_network("swin_unetr", **config)
    assert count_parameters(net) == expected
    assert all(p.device.type == "meta" for p in net.parameters())
    # the meta build must not leave torch.linspace redirected
    assert torch.linspace(0, 1, 3).device.type == "cpu"


@pytest.mark.parametrize("spatial_dims,size", [(3, (32, 64, 32)), (2, (64, 96))])
def test_same_output_as_monai_swinunetr(spatial_dims, size):
    torch.manual_seed(0)
    ours = create_network("swin_unetr", **{**SMALL3D, "spatial_dims": spatial_dims}).eval()
    theirs = MonaiSwinUNETR(1, 3, spatial_dims=spatial_dims, **MONAI_KEYS).eval()
    theirs.load_state_dict({k.removeprefix("net."): v for k, v in ours.state_dict().items()})
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_taps_have_the_documented_scales_and_channels():
    torch.manual_seed(0)
    net = create_network("swin_unetr", **SMALL3D).train()
    size = (32, 32, 64)  # bottleneck 1 x 1 x 2: instance norm needs > 1 voxel in training
    out = net(torch.randn(2, 1, *size), features=True)
    f = 12

    def layout(taps):
        return [(t.shape[1], tuple(s // n for s, n in zip(size, t.shape[2:]))) for t in taps]

    assert out.logits.shape == (2, 3, *size)
    assert layout(out.encoder) == [
        (f, (1, 1, 1)),
        (f, (2, 2, 2)),
        (2 * f, (4, 4, 4)),
        (4 * f, (8, 8, 8)),
        (8 * f, (16, 16, 16)),
        (16 * f, (32, 32, 32)),
    ]
    assert layout(out.decoder) == [
        (8 * f, (16, 16, 16)),
        (4 * f, (8, 8, 8)),
        (2 * f, (4, 4, 4)),
        (f, (2, 2, 2)),
        (f, (1, 1, 1)),
    ]
    assert out.deep_supervision == []


def test_v2_and_freeze_encoder():
    net = create_network("swin_unetr", **SMALL3D, use_v2=True, freeze_encoder=True)
    assert any(".layers1c." in n for n, _ in net.named_parameters())  # the V2 residual conv blocks
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.startswith("net.swinViT.")}


def test_input_not_divisible_by_32_raises_input_shape_error():
    net = create_network("swin_unetr", **SMALL3D).eval()
    with pytest.raises(InputShapeError, match="divisible"):
        net(torch.zeros(1, 1, 48, 64, 64))


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError):
        create_network("swin_unetr", **{**SMALL3D, "feature_size": 16})  # not divisible by 12
    with pytest.raises(ConfigError):
        create_network("swin_unetr", **SMALL3D, img_size=(96, 96, 96))  # removed from MONAI


# ---------------------------------------------------------------------------------------------
# MONAI's self-supervised checkpoint format (model_swinvit.pt)
# ---------------------------------------------------------------------------------------------
def write_ssl_checkpoint(path, feature_size: int = 12) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like MONAI's self-supervised Swin UNETR weights: DataParallel
    ``module.`` prefix, the Swin transformer at top level with timm names (``mlp.fc1``), and the
    pre-training heads."""
    torch.manual_seed(7)
    pretrained = MonaiSwinUNETR(1, 3, **{**MONAI_KEYS, "feature_size": feature_size})
    state = {}
    for key, value in pretrained.swinViT.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = value.clone()
    state["module.rotation_head.weight"] = torch.zeros(4, 16 * feature_size)
    state["module.contrastive_head.weight"] = torch.zeros(512, 16 * feature_size)
    state["module.conv.0.weight"] = torch.zeros(8, 16 * feature_size, 1, 1, 1)
    torch.save({"epoch": 100, "state_dict": state}, path)
    return {k: v for k, v in pretrained.swinViT.state_dict().items()}


def test_loads_self_supervised_checkpoint(tmp_path):
    path = tmp_path / "model_swinvit.pt"
    expected = write_ssl_checkpoint(path)
    net = create_network("swin_unetr", **SMALL3D)
    report = net.load_pretrained(path)
    assert sorted(report["unexpected"]) == [
        "module.contrastive_head.weight",
        "module.conv.0.weight",
        "module.rotation_head.weight",
    ]
    assert report["missing"] and not [k for k in report["missing"] if k.startswith("net.swinViT.")]
    for key, value in expected.items():
        torch.testing.assert_close(net.net.swinViT.state_dict()[key], value, msg=key)


def test_self_supervised_checkpoint_agrees_with_monai_load_from(tmp_path):
    """MONAI's own reader of this format (SwinUNETR.load_from) must give the same Swin weights."""
    path = tmp_path / "model_swinvit.pt"
    write_ssl_checkpoint(path)
    net = create_network("swin_unetr", **SMALL3D, pretrained=str(path))
    reference = MonaiSwinUNETR(1, 3, **MONAI_KEYS)
    reference.load_from(torch.load(path, weights_only=True))
    ours = net.net.swinViT.state_dict()
    for key, value in reference.swinViT.state_dict().items():
        torch.testing.assert_close(ours[key], value, msg=key)


def test_loads_a_full_monai_swinunetr_state_dict(tmp_path):
    torch.manual_seed(3)
    source = MonaiSwinUNETR(1, 3, **MONAI_KEYS)
    path = tmp_path / "swin_unetr.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    net = create_network("swin_unetr", **SMALL3D)
    assert net.load_pretrained(path) == {"missing": [], "unexpected": []}
    for key, value in source.state_dict().items():
        torch.testing.assert_close(net.net.state_dict()[key], value, msg=key)


def test_checkpoint_of_another_feature_size_raises(tmp_path):
    path = tmp_path / "model_swinvit.pt"
    write_ssl_checkpoint(path, feature_size=24)
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        create_network("swin_unetr", **SMALL3D).load_pretrained(path)


def test_unreadable_checkpoint_raises(tmp_path):
    bad = tmp_path / "model_swinvit.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(PretrainedWeightsError, match="model_swinvit.pt"):
        create_network("swin_unetr", **SMALL3D).load_pretrained(bad)
