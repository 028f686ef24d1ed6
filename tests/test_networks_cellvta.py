"""CellVTA: deformable attention against a naive reference, parameter counts, branches, freezing,
timm-format pretrained ViT weights, and a short real-data overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medseg.errors import ConfigError, InputShapeError, PretrainedWeightsError
from medseg.networks import count_parameters, create_network, network_entry
from medseg.networks.blocks import (
    MultiScaleDeformableAttention,
    grid_reference_points,
    multi_scale_deformable_attention,
    resample_abs_pos_embed,
)
from medseg.networks.cellvta import CellVTA, CellVTAOutput
from medseg.networks.vit_adapter import VisionTransformer
from tests.conftest import shared_path

REFERENCES = network_entry("cellvta").references


def tiny(**overrides) -> CellVTA:
    return create_network("cellvta", **{**REFERENCES["tiny"], **overrides})


# ---------------------------------------------------------------------------------------------
# multi-scale deformable attention
# ---------------------------------------------------------------------------------------------


def naive_msda(value, shapes, locations, weights):
    """Per-point bilinear sampling with explicit loops (pixel centres at (i + 0.5) / size, zeros outside)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(batch, queries, heads, channels, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (height, width) in enumerate(shapes):
                    grid = value[b, starts[lvl] : starts[lvl + 1], m].reshape(height, width, channels)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * width - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(channels, dtype=value.dtype)
                        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
                                if 0 <= yi < height and 0 <= xi < width:
                                    sample += wy * wx * grid[yi, xi]
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(batch, queries, heads * channels)


def test_deformable_attention_matches_naive_bilinear_sampling():
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    batch, queries, heads, channels, points = 2, 6, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, channels, dtype=torch.float64)
    # some points fall outside the maps (zero padding) or near the border
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.3 - 0.15
    weights = torch.rand(batch, queries, heads, len(shapes) * points, dtype=torch.float64).softmax(-1)
    weights = weights.view(batch, queries, heads, len(shapes), points)
    fast = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert fast.shape == (batch, queries, heads * channels)
    torch.testing.assert_close(fast, naive_msda(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


def test_deformable_attention_is_differentiable_in_values_locations_and_weights():
    torch.manual_seed(1)
    shapes = [(3, 3), (2, 2)]
    value = torch.randn(1, 13, 1, 2, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(1, 2, 1, 2, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(1, 2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, shapes, loc, w), (value, locations, weights)
    )


def test_deformable_attention_module_initial_points_and_shapes():
    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(d_model=16, n_levels=2, n_heads=4, n_points=2, ratio=0.5)
    assert attention.value_proj.out_features == 8
    # paper initialisation: head m looks along angle 2 pi m / M, point k at k + 1 pixels
    offsets = attention.sampling_offsets.bias.view(4, 2, 2, 2)
    torch.testing.assert_close(offsets[:, 0, 1], 2 * offsets[:, 0, 0])
    torch.testing.assert_close(offsets[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(offsets[1, 1, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    shapes = [(4, 4), (2, 2)]
    queries = grid_reference_points([(2, 2)])
    assert queries.shape == (1, 4, 1, 2)
    torch.testing.assert_close(queries[0, :, 0], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    out = attention(torch.randn(3, 4, 16), queries, torch.randn(3, 20, 16), shapes)
    assert out.shape == (3, 4, 16)
    with pytest.raises(ValueError):
        attention(torch.randn(3, 4, 16), queries, torch.randn(3, 16, 16), [(4, 4)])


# ---------------------------------------------------------------------------------------------
# parameter counts (meta device: ViT-L is never allocated)
# ---------------------------------------------------------------------------------------------


def linear(i, o):
    return i * o + o


def conv_bn(i, o, k=3, bias=True):
    return i * o * k * k + (o if bias else 0) + 2 * o


def expected_counts(dim, depth, n_types=6, n_tissues=19, heads=8, points=4, spm=64, dec=(64, 128, 256, 512)):
    """Counts written out from the architecture description (docs/architectures.md section 6)."""
    block = (
        2 * 2 * dim + linear(dim, 3 * dim) + linear(dim, dim) + 2 * dim + linear(dim, 4 * dim) + linear(4 * dim, dim)
    )
    vit = 3 * dim * 16 * 16 + dim + dim + (1 + 14 * 14) * dim + depth * block + 2 * dim
    widths = [3, spm, spm, spm, spm, 2 * spm, 4 * spm, 4 * spm]
    spm_count = sum(conv_bn(widths[i], widths[i + 1], bias=False) for i in range(7))
    spm_count += sum(linear(w, dim) for w in (spm, 2 * spm, 4 * spm, 4 * spm))

    def msda(levels):
        return (
            linear(dim, heads * levels * points * 2)
            + linear(dim, heads * levels * points)
            + linear(dim, dim // 2)
            + linear(dim // 2, dim)
        )

    injector = 2 * 2 * dim + msda(3) + dim
    hidden = dim // 4
    extractor = 2 * 2 * dim + msda(1) + linear(dim, hidden) + 10 * hidden + linear(hidden, dim) + 2 * dim
    adapter = spm_count + 3 * dim + 4 * injector + 6 * extractor + (dim * dim * 4 + dim) + 4 * 2 * dim
    c0, c1, c2, c3 = dec
    shared = (
        conv_bn(3, c0 // 2)
        + conv_bn(c0 // 2, c0)
        + conv_bn(dim, c1)
        + conv_bn(c1, c1)
        + conv_bn(dim, c2)
        + conv_bn(c2, c2)
        + conv_bn(dim, c3)
        + conv_bn(c3, c3)
    )

    def branch(out):
        return (
            (dim * c3 * 4 + c3)
            + conv_bn(c3, c3)
            + conv_bn(2 * c3, c3)
            + 2 * conv_bn(c3, c3)
            + (c3 * c2 * 4 + c2)
            + conv_bn(2 * c2, c2)
            + conv_bn(c2, c2)
            + (c2 * c1 * 4 + c1)
            + conv_bn(2 * c1, c1)
            + conv_bn(c1, c1)
            + (c1 * c0 * 4 + c0)
            + conv_bn(2 * c0, c0)
            + conv_bn(c0, c0)
            + linear(c0, out)
        )

    decoder = shared + branch(2) + branch(2) + branch(n_types)
    return dict(vit=vit, adapter=adapter, decoder=decoder, head=linear(dim, n_tissues) if n_tissues else 0)


def split_counts(net: CellVTA) -> dict[str, int]:
    vit = count_parameters(net.vit)
    head = count_parameters(net.tissue_head) if net.tissue_head is not None else 0
    return dict(vit=vit, adapter=count_parameters(net.backbone) - vit, decoder=count_parameters(net.decoder), head=head)


@pytest.mark.parametrize("label,dim,depth", [("S", 384, 12), ("B", 768, 12), ("L", 1024, 24)])
def test_reference_parameter_counts_on_meta_device(label, dim, depth):
    with torch.device("meta"):
        net = create_network("cellvta", **REFERENCES[label])
    assert split_counts(net) == expected_counts(dim, depth)
    # frozen: the ViT except its final norm (which feeds the tissue head)
    assert count_parameters(net) - count_parameters(net, trainable_only=True) == split_counts(net)["vit"] - 2 * dim


def test_published_vit_l_totals():
    """docs/architectures.md section 6: about 387.8M total, ViT-L 303.35M, decoders 62.12M."""
    with torch.device("meta"):
        net = create_network("cellvta", **REFERENCES["L"])
    counts = split_counts(net)
    assert counts["vit"] == 303_350_784  # timm vit_large_patch16_224, LayerScale, no head
    assert count_parameters(net) == pytest.approx(387.8e6, rel=0.005)
    assert counts["decoder"] == pytest.approx(62.12e6, rel=0.005)
    # adapter 21.50M vs the notes' 22.28M, hence trainable 83.65M vs 84.4M (see medseg.networks.cellvta)
    assert count_parameters(net, trainable_only=True) == pytest.approx(84.4e6, rel=0.01)


def test_vit_l_reference_runs_at_256px_on_meta_device():
    """The published configuration end to end (shapes only; nothing is allocated)."""
    with torch.device("meta"):
        net = create_network("cellvta", **REFERENCES["L"]).eval()
        with torch.no_grad():
            out = net(torch.empty(1, 3, 256, 256), features=True)
    assert out.logits.shape == (1, 6, 256, 256)
    assert out.nuclei_probability_logits.shape == out.horizontal_vertical.shape == (1, 2, 256, 256)
    assert out.tissue_logits.shape == (1, 19)
    assert [tuple(f.shape) for f in out.encoder] == [(1, 1024, 256 // 2**k, 256 // 2**k) for k in (1, 2, 3, 4)]


# ---------------------------------------------------------------------------------------------
# forward, taps, freezing
# ---------------------------------------------------------------------------------------------


def test_branch_shapes_and_taps_on_64px_input():
    torch.manual_seed(0)
    net = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, features=True)
        logits = net(x)
    assert isinstance(out, CellVTAOutput)
    assert torch.equal(logits, out.logits)
    assert out.logits.shape == (2, 6, 64, 64)  # NT type logits
    assert out.nuclei_probability_logits.shape == (2, 2, 64, 64)
    assert out.horizontal_vertical.shape == (2, 2, 64, 64)
    assert out.tissue_logits.shape == (2, 5)
    dim = REFERENCES["tiny"]["embed_dim"]
    assert [tuple(f.shape) for f in out.encoder] == [(2, dim, 64 // 2**k, 64 // 2**k) for k in (1, 2, 3, 4)]
    c0, c1, c2, c3 = REFERENCES["tiny"]["decoder_channels"]
    assert [tuple(f.shape) for f in out.decoder] == [(2, c3, 8, 8), (2, c2, 16, 16), (2, c1, 32, 32), (2, c0, 64, 64)]
    assert out.deep_supervision == []
    # no tissue head: tissue_logits is None
    assert tiny(num_tissue_classes=0).eval()(x[:1], features=True).tissue_logits is None


def test_non_square_input_uses_interpolated_position_embedding():
    net = tiny().eval()
    assert net.vit.pos_embed.shape[1] == 1 + 2 * 2  # pretrain_img_size 32 -> 2 x 2 grid
    with torch.no_grad():
        out = net(torch.randn(1, 3, 48, 80), features=True)
    assert out.logits.shape == (1, 6, 48, 80)
    assert out.encoder[-1].shape[-2:] == (3, 5)


def test_gradients_reach_trainable_parameters_and_not_the_frozen_vit():
    torch.manual_seed(0)
    net = tiny()
    # zero-initialised offset/weight projections (paper init) make the query norms' gradient
    # exactly zero at step 0; give them the small values they have after any training step
    for module in net.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            nn.init.normal_(module.sampling_offsets.weight, std=0.01)
            nn.init.normal_(module.attention_weights.weight, std=0.01)
    out = net(torch.randn(2, 3, 64, 64), features=True)
    loss = sum(
        t.float().square().mean()
        for t in (out.logits, out.nuclei_probability_logits, out.horizontal_vertical, out.tissue_logits)
    )
    loss.backward()
    frozen = {f"backbone.vit.{n}" for n, _ in net.vit.named_parameters() if not n.startswith("norm.")}
    assert "backbone.vit.blocks.0.attn.qkv.weight" in frozen
    for name, parameter in net.named_parameters():
        if name in frozen:
            assert not parameter.requires_grad and parameter.grad is None, name
        else:
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    unfrozen = tiny(freeze_encoder=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_bad_input_and_config_raise_typed_errors():
    net = tiny().eval()
    for bad in (torch.randn(1, 3, 72, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 3, 64, 64, 16)):
        with pytest.raises(InputShapeError):
            net(bad)
    with pytest.raises(ConfigError):
        tiny(spatial_dims=3)
    with pytest.raises(ConfigError):
        tiny(embed_dim=50)  # not divisible by the heads
    with pytest.raises(ConfigError):
        tiny(not_an_option=1)


# ---------------------------------------------------------------------------------------------
# timm-format pretrained ViT weights
# ---------------------------------------------------------------------------------------------

TIMM_BLOCK_KEYS = {
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
}


def write_timm_checkpoint(path, dim=64, depth=4, heads=4, img_size=48, head_classes=0):
    """A random tiny ViT saved as timm saves one (``torch.save(model.state_dict())``)."""
    torch.manual_seed(3)
    vit = VisionTransformer(16, 3, dim, depth, heads, 4.0, 1e-5, img_size)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    for name in state:  # LayerScale/norm values that differ from any init
        if name.endswith(("gamma", "norm.weight")):
            state[name] = torch.rand_like(state[name])
    if head_classes:
        state["head.weight"], state["head.bias"] = torch.randn(head_classes, dim), torch.randn(head_classes)
    torch.save(state, path)
    return state


def test_timm_state_dict_naming():
    state = VisionTransformer(16, 3, 32, 2, 2, 4.0, 1e-5, 32).state_dict()
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in TIMM_BLOCK_KEYS}
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, 1 + 2 * 2, 32) and state["cls_token"].shape == (1, 1, 32)


def test_load_timm_vit_with_other_grid_and_classification_head(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    state = write_timm_checkpoint(path, img_size=48, head_classes=7)  # 3 x 3 grid vs the network's 2 x 2
    net = tiny()
    adapter_before = net.backbone.spm.projections[0].weight.clone()
    report = net.load_pretrained(str(path))
    assert report == {"missing": [], "unexpected": ["head.weight", "head.bias"]}
    loaded = net.vit.state_dict()
    for name, tensor in state.items():
        if name not in ("pos_embed", "head.weight", "head.bias"):
            assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["pos_embed"], resample_abs_pos_embed(state["pos_embed"], (2, 2)))
    assert torch.equal(loaded["pos_embed"][:, :1], state["pos_embed"][:, :1])  # class token kept
    assert torch.equal(net.backbone.spm.projections[0].weight, adapter_before)  # adapter untouched
    assert not net.vit.blocks[0].attn.qkv.weight.requires_grad  # still frozen
    # through the registry, and the network runs
    net = create_network("cellvta", pretrained=str(path), **REFERENCES["tiny"]).eval()
    assert torch.equal(net.vit.blocks[1].ls2.gamma, state["blocks.1.ls2.gamma"])
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 6, 32, 32)


def test_position_embedding_resampling_keeps_a_constant_field():
    pos_embed = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 9, 4), 2.5)], dim=1)
    resampled = resample_abs_pos_embed(pos_embed, (5, 4))
    assert resampled.shape == (1, 21, 4)
    torch.testing.assert_close(resampled[:, 1:], torch.full((1, 20, 4), 2.5))
    assert torch.equal(resampled[:, 0], pos_embed[:, 0])
    with pytest.raises(ValueError):
        resample_abs_pos_embed(torch.zeros(1, 1 + 6, 4), (2, 2))


def test_pretrained_shape_mismatch_and_bad_files_raise(tmp_path):
    wide = tmp_path / "vit_wide.pth"
    write_timm_checkpoint(wide, dim=96, heads=4, img_size=32)
    with pytest.raises(PretrainedWeightsError):
        tiny().load_pretrained(str(wide))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError):
        tiny().load_pretrained(str(garbage))
    other = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], other)
    with pytest.raises(PretrainedWeightsError):
        tiny().load_pretrained(str(other))


# ---------------------------------------------------------------------------------------------
# real data: a tiny CellVTA fits one DSB crop
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_cellvta_overfits_a_real_nuclei_crop():
    tifffile = pytest.importorskip("tifffile")
    from monai.apps.pathology.losses import HoVerNetLoss
    from monai.transforms import ComputeHoVerMaps
    from monai.utils.enums import HoVerNetBranch

    from medseg.package import Normalization
    from medseg.preprocess import normalize_intensity

    folder = shared_path("nuclei", "stardist_dsb_sample")
    image = tifffile.imread(folder / "img2d.tif").astype(np.float32)
    instances = tifffile.imread(folder / "mask2d.tif").astype(np.int64)
    # the 64 x 64 crop with the most nuclei pixels among a coarse grid
    corners = [(y, x) for y in range(0, 448, 32) for x in range(0, 448, 32)]
    y, x = max(corners, key=lambda c: (instances[c[0] : c[0] + 64, c[1] : c[1] + 64] > 0).sum())
    image, instances = image[y : y + 64, x : x + 64], instances[y : y + 64, x : x + 64]
    assert len(np.unique(instances)) > 3

    inputs = torch.as_tensor(normalize_intensity(image, Normalization(scheme="zscore")))[None, None].repeat(1, 3, 1, 1)
    nuclei = torch.as_tensor(instances > 0).long()
    target = {
        HoVerNetBranch.NP.value: nn.functional.one_hot(nuclei, 2).permute(2, 0, 1)[None].float(),
        HoVerNetBranch.HV.value: torch.as_tensor(ComputeHoVerMaps()(instances[None]))[None].float(),
        HoVerNetBranch.NC.value: nn.functional.one_hot(nuclei, 6).permute(2, 0, 1)[None].float(),  # type 1
    }
    torch.manual_seed(0)
    net = tiny()
    loss_function = HoVerNetLoss()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        out = net(inputs, features=True)
        prediction = {
            HoVerNetBranch.NP.value: out.nuclei_probability_logits,
            HoVerNetBranch.HV.value: out.horizontal_vertical,
            HoVerNetBranch.NC.value: out.logits,
        }
        loss = loss_function(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0] and losses == sorted(losses, reverse=True), losses
    with torch.no_grad():  # training mode: batch statistics, as in the steps above
        foreground = net(inputs, features=True).nuclei_probability_logits.argmax(1)[0]
    dice = 2 * (foreground * nuclei).sum() / (foreground.sum() + nuclei.sum())
    assert dice > 0.7, float(dice)
