"""TransUNet 2D and 3D TransUNet: reference sizes, taps, and the Google npz weight format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError, PretrainedWeightsError
from medseg.networks import count_parameters, create_network, network_entry
from medseg.networks.blocks import resample_abs_pos_embed
from medseg.networks.transunet import TransUNet, transunet_to_npz

TINY = network_entry("transunet").references["tiny"]
TINY3D = network_entry("transunet3d").references["tiny"]


def meta(name: str, **config):
    with torch.device("meta"):
        return create_network(name, **config)


# ---------------------------------------------------------------------------------------------
# TransUNet 2D
# ---------------------------------------------------------------------------------------------
def test_reference_r50_vit_b16_parameter_split():
    """105,277,081 = ResNet 11.89M + transformer 85.99M + decoder/head 7.39M (architecture notes)."""
    net = meta("transunet", **network_entry("transunet").references["R50-ViT-B_16"])
    assert count_parameters(net) == 105_277_081
    assert count_parameters(net.resnet) == 11_894_848
    transformer = count_parameters(net.transformer)  # patch + position embedding, ViT blocks, final norm
    assert transformer == 85_993_728
    assert net.transformer.pos_embed.shape == (1, 196, 768)
    assert net.resnet.root_conv.in_channels == 3  # one channel is repeated to three, as upstream
    assert [len(stage) for stage in net.resnet.stages] == [3, 4, 9]


def test_taps_have_the_documented_scales_and_channels():
    torch.manual_seed(0)
    net = create_network("transunet", **TINY).eval()
    h, w = 64, 96
    with torch.no_grad():
        out = net(torch.randn(2, 1, h, w), features=True)
    assert out.logits.shape == (2, 3, h, w)
    # decoder: conv_more (H/16), then the 4 CUP blocks H/8, H/4, H/2, H
    assert [tuple(t.shape[1:]) for t in out.decoder] == [
        (64, h // 16, w // 16),
        (32, h // 8, w // 8),
        (32, h // 4, w // 4),
        (16, h // 2, w // 2),
        (16, h, w),
    ]
    # encoder: root H/2, stages H/4 (padded), H/8, H/16, ViT map H/16
    assert [tuple(t.shape[1:]) for t in out.encoder] == [
        (32, h // 2, w // 2),
        (128, h // 4, w // 4),
        (256, h // 8, w // 8),
        (512, h // 16, w // 16),
        (64, h // 16, w // 16),
    ]
    assert out.deep_supervision == []


def test_stage1_skip_is_zero_padded_like_upstream():
    """The pad-0 max-pool gives H/4 - 1 rows/columns; the skip copy is zero-padded bottom/right."""
    net = create_network("transunet", **TINY).eval()
    with torch.no_grad():
        skip = net(torch.randn(1, 1, 64, 64), features=True).encoder[1]
    assert skip.shape[-2:] == (16, 16)
    assert torch.all(skip[..., -1, :] == 0) and torch.all(skip[..., :, -1] == 0)
    assert skip[..., :-1, :-1].abs().sum() > 0


def test_one_channel_input_is_repeated_to_rgb():
    torch.manual_seed(0)
    grey = create_network("transunet", **TINY).eval()
    rgb = create_network("transunet", **{**TINY, "in_channels": 3}).eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)))


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError):
        create_network("transunet", **{**TINY, "spatial_dims": 3})
    with pytest.raises(ConfigError):
        create_network("transunet", **{**TINY, "img_size": 72})
    with pytest.raises(ConfigError):
        create_network("transunet", **{**TINY, "no_such_option": 1})


def test_freeze_encoder_freezes_resnet_embedding_and_vit_only():
    net = create_network("transunet", **TINY, freeze_encoder=True)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.split(".")[0] in ("resnet", "transformer")}


# ---------------------------------------------------------------------------------------------
# Google npz (R50+ViT-B_16.npz format)
# ---------------------------------------------------------------------------------------------
def write_upstream_npz(net: TransUNet, path) -> dict[str, np.ndarray]:
    """An ImageNet-21k-style classification checkpoint: the encoder plus cls token and head."""
    arrays = transunet_to_npz(net)
    hidden = net.transformer.pos_embed.shape[-1]
    arrays["cls"] = np.zeros((1, 1, hidden), np.float32)
    arrays["head/kernel"] = np.zeros((hidden, 21843), np.float32)
    arrays["head/bias"] = np.zeros((21843,), np.float32)
    np.savez(path, **arrays)
    return arrays


def test_npz_uses_google_key_names_and_layouts(tmp_path):
    net = create_network("transunet", **TINY)
    arrays = write_upstream_npz(net, tmp_path / "R50+ViT-B_16.npz")
    hidden, heads = 64, 4
    assert arrays["conv_root/kernel"].shape == (7, 7, 3, 32)  # HWIO
    assert arrays["gn_root/scale"].shape == (32,)
    assert arrays["block1/unit1/conv1/kernel"].shape == (1, 1, 32, 32)
    assert arrays["block2/unit1/conv2/kernel"].shape == (3, 3, 64, 64)
    assert arrays["block3/unit1/conv_proj/kernel"].shape == (1, 1, 256, 512)
    assert arrays["embedding/kernel"].shape == (1, 1, 512, hidden)
    attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    assert arrays[f"{attention}/query/kernel"].shape == (hidden, heads, hidden // heads)
    assert arrays[f"{attention}/query/bias"].shape == (heads, hidden // heads)
    assert arrays[f"{attention}/out/kernel"].shape == (heads, hidden // heads, hidden)
    assert arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].shape == (hidden, 128)
    assert arrays["Transformer/encoderblock_1/LayerNorm_2/scale"].shape == (hidden,)
    assert arrays["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + 16, hidden)  # with cls slot


def test_npz_round_trip_loads_every_encoder_tensor(tmp_path):
    torch.manual_seed(0)
    source = create_network("transunet", **TINY)
    path = tmp_path / "R50+ViT-B_16.npz"
    write_upstream_npz(source, path)
    torch.manual_seed(1)
    target = create_network("transunet", **TINY)
    report = target.load_pretrained(path)

    assert sorted(report["unexpected"]) == ["cls", "head/bias", "head/kernel"]
    assert report["missing"], "the decoder is not in the file"
    assert all(k.split(".")[0] in ("conv_more", "decoder_blocks", "head") for k in report["missing"])
    loaded = {k for k in target.state_dict() if k.split(".")[0] in ("resnet", "transformer")}
    # BatchNorm running statistics are buffers of the decoder only; every encoder tensor came from the file
    mine, theirs = target.state_dict(), source.state_dict()
    for key in loaded:
        torch.testing.assert_close(mine[key], theirs[key], msg=key)
    # and the encoder computes the same features
    source.eval(), target.eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x, features=True).encoder[-1], source(x, features=True).encoder[-1])


def test_npz_tensors_follow_jax_semantics(tmp_path):
    """Independent of the inverse mapping: apply the npz arrays as JAX/Flax would and compare."""
    torch.manual_seed(0)
    path = tmp_path / "w.npz"
    write_upstream_npz(create_network("transunet", **TINY), path)
    net = create_network("transunet", **TINY)
    net.load_pretrained(path)
    npz = np.load(path)
    x = torch.randn(5, 64)
    block = net.transformer.blocks[0]
    attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    # Flax DenseGeneral: q[..., h, d] = sum_i x[..., i] kernel[i, h, d] + bias[h, d]
    q = np.einsum("ni,ihd->nhd", x.numpy(), npz[f"{attention}/query/kernel"]) + npz[f"{attention}/query/bias"]
    v = np.einsum("ni,ihd->nhd", x.numpy(), npz[f"{attention}/value/kernel"]) + npz[f"{attention}/value/bias"]
    qkv = block.attn.qkv(x).detach().numpy()
    np.testing.assert_allclose(qkv[:, :64].reshape(5, 4, 16), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qkv[:, 128:].reshape(5, 4, 16), v, rtol=1e-5, atol=1e-5)
    # Flax Dense: y = x @ kernel + bias
    dense = "Transformer/encoderblock_0/MlpBlock_3/Dense_0"
    np.testing.assert_allclose(
        block.mlp.fc1(x).detach().numpy(),
        x.numpy() @ npz[f"{dense}/kernel"] + npz[f"{dense}/bias"],
        rtol=1e-5,
        atol=1e-5,
    )
    # HWIO conv: y[o] = sum_{h,w,i} patch[h, w, i] kernel[h, w, i, o] at one output position
    image = torch.randn(1, 3, 16, 16)
    weight = net.resnet.root_conv.weight
    y = F.conv2d(image, weight, stride=2, padding=3)[0, :, 4, 5]
    padded = F.pad(image, (3, 3, 3, 3))[0].permute(1, 2, 0).numpy()  # H W C
    patch = padded[8:15, 10:17]  # rows 2*4 .. 2*4+6, cols 2*5 .. 2*5+6
    np.testing.assert_allclose(
        y.detach().numpy(), np.einsum("hwi,hwio->o", patch, npz["conv_root/kernel"]), rtol=1e-4, atol=1e-4
    )


def test_npz_position_embedding_is_resized_for_another_image_size(tmp_path):
    torch.manual_seed(0)
    source = create_network("transunet", **TINY)  # img_size 64: 4 x 4 grid
    path = tmp_path / "w.npz"
    write_upstream_npz(source, path)
    target = create_network("transunet", **{**TINY, "img_size": 128})  # 8 x 8 grid
    report = target.load_pretrained(path)
    assert "transformer.pos_embed" not in report["missing"]
    expected = resample_abs_pos_embed(
        source.transformer.pos_embed.detach(),
        (8, 8),
        (4, 4),
        num_prefix_tokens=0,
        interpolation="bilinear",
        antialias=False,
    )
    torch.testing.assert_close(target.transformer.pos_embed.detach(), expected)


def test_npz_shape_mismatch_raises(tmp_path):
    path = tmp_path / "w.npz"
    write_upstream_npz(create_network("transunet", **TINY), path)
    four_channels = create_network("transunet", **{**TINY, "in_channels": 4})
    with pytest.raises(PretrainedWeightsError, match="conv"):
        four_channels.load_pretrained(path)
    wider = create_network("transunet", **{**TINY, "hidden_size": 128})
    with pytest.raises(PretrainedWeightsError):
        wider.load_pretrained(path)


def test_unreadable_npz_raises(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(PretrainedWeightsError, match="bad.npz"):
        create_network("transunet", **TINY, pretrained=str(bad))


# ---------------------------------------------------------------------------------------------
# 3D TransUNet
# ---------------------------------------------------------------------------------------------
def vit_b_parameters(layers: int = 12, d: int = 768, mlp: int = 3072, layer_scale: bool = True) -> int:
    per_block = (4 * d * d + 4 * d) + (2 * d * mlp + mlp + d) + 4 * d + (2 * d if layer_scale else 0)
    return layers * per_block + 2 * d


def test_transunet3d_reference_is_unet_plus_vit_b_bottleneck():
    config = network_entry("transunet3d").references["paper_encoder"]
    net = meta("transunet3d", **config)
    unet = meta("unet", spatial_dims=3, in_channels=1, out_channels=14, deep_supervision=4)
    tokens = (128 // 32) ** 3
    expected = (
        count_parameters(unet) + vit_b_parameters() + (320 * 768 + 768) + (768 * 320 + 320) + tokens * 768
    )  # embed, conv_more, pos-emb
    assert count_parameters(net) == expected == 116_816_806
    assert net.transformer.pos_embed.shape == (1, 64, 768)


def test_transunet3d_layer_scale_init_and_taps():
    torch.manual_seed(0)
    net = create_network("transunet3d", **TINY3D).eval()
    for block in net.transformer.blocks:
        assert torch.all(block.ls1.gamma == 1e-5) and torch.all(block.ls2.gamma == 1e-5)
    size = (16, 24, 32)  # divisor 8; not the reference 32^3, so the position embedding is resized
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size), features=True)

    def scales(taps):
        return [tuple(s // t for s, t in zip(size, tap.shape[2:])) for tap in taps]

    assert out.logits.shape == (2, 3, *size)
    assert scales(out.encoder) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (8, 8, 8)]
    assert [t.shape[1] for t in out.encoder] == [8, 16, 32, 32, 32]  # last: ViT map (hidden 32)
    assert scales(out.decoder) == [(8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]
    assert scales(out.deep_supervision) == [(2, 2, 2), (4, 4, 4)]
    assert all(t.shape[1] == 3 for t in out.deep_supervision)


def test_transunet3d_vit_initialises_from_google_npz(tmp_path):
    torch.manual_seed(0)
    source = create_network("transunet", **TINY)  # ViT hidden 64, 4 heads, MLP 128, 2 layers
    path = tmp_path / "ViT.npz"
    write_upstream_npz(source, path)
    net = create_network("transunet3d", **{**TINY3D, "hidden_size": 64, "num_heads": 4, "mlp_dim": 128})
    report = net.load_pretrained(path)
    assert "embedding/kernel" in report["unexpected"]
    assert "Transformer/posembed_input/pos_embedding" in report["unexpected"]
    vit = {k for k in net.state_dict() if k.startswith(("transformer.blocks.", "transformer.norm."))}
    assert not [k for k in report["missing"] if k in vit and ".ls" not in k]  # LayerScale is not in ViT npz
    mine, theirs = net.state_dict(), source.state_dict()
    for key in vit:
        if ".ls" not in key:
            torch.testing.assert_close(mine[key], theirs[key], msg=key)


def test_transunet3d_bad_img_size_raises():
    with pytest.raises(ConfigError, match="img_size"):
        create_network("transunet3d", **{**TINY3D, "img_size": (30, 32, 32)})
