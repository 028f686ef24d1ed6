"""D-Former: reference parameter counts, LS/GS-MSA grouping and masking, shapes, taps, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from medseg.errors import ConfigError, InputShapeError, PretrainedWeightsError
from medseg.networks import count_parameters, create_network, network_entry
from medseg.networks.dformer import DilatedTransformerBlock, group_layout, group_tokens, ungroup_tokens


def reference(label: str, **overrides):
    return {**network_entry("dformer").references[label], **overrides}


def _count(config) -> tuple[int, int]:
    with torch.device("meta"):
        net = create_network("dformer", **config)
    heads = sum(
        p.numel() for n, p in net.named_parameters() if n.startswith(("final_expand.", "head.", "deep_supervision_"))
    )
    return count_parameters(net), count_parameters(net) - heads


def test_reference_parameter_counts_on_meta_device():
    total, backbone = _count(reference("paper"))
    assert total == pytest.approx(44.65e6, rel=0.005)  # docs/architectures.md section 3, 9 classes
    assert backbone == pytest.approx(44.35e6, rel=0.005)
    with_ds, _ = _count(reference("paper_ds"))
    assert with_ds == pytest.approx(50.55e6, rel=0.005)


def test_group_layout_at_the_reference_size():
    # 64 x 128 x 128 -> token grids 32^3, 16^3, 8^3, 4^3; GS dilations (16,4,4), (8,2,2), (4,1,1), stage 4 global
    grids = [(32 >> s,) * 3 for s in range(4)]
    layouts = [group_layout(grid, (2, 8, 8)) for grid in grids]
    assert [layout and layout[1] for layout in layouts] == [(16, 4, 4), (8, 2, 2), (4, 1, 1), None]
    assert all(layout[0] == grid for layout, grid in zip(layouts[:3], grids))  # no padding needed


def _coordinates(grid):
    d, h, w = grid
    return torch.stack(torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij"), -1)[
        None
    ].float()


@pytest.mark.parametrize("dilated", [False, True])
def test_grouping_membership_and_round_trip(dilated):
    grid, group = (5, 7, 4), (2, 3, 3)  # padded to (6, 9, 6): dilation (3, 3, 2)
    coordinates = _coordinates(grid)
    groups, mask = group_tokens(coordinates, group, dilated)
    assert groups.shape == (3 * 3 * 2, 2 * 3 * 3, 3)
    assert mask.shape == (18, 1, 1, 18)
    real = mask[:, 0, 0] == 0
    assert real.any(dim=1).all()  # every group holds a real token
    for g in range(groups.shape[0]):
        members = groups[g][real[g]].long()
        if dilated:  # one residue class per axis: all members congruent modulo the dilation
            assert (members % torch.tensor([3, 3, 2]) == members[0] % torch.tensor([3, 3, 2])).all()
        else:  # one contiguous block per group
            assert (members // torch.tensor(group) == members[0] // torch.tensor(group)).all()
    # every real token lands in exactly one group, and ungrouping restores the map
    assert int(real.sum()) == 5 * 7 * 4
    assert torch.equal(ungroup_tokens(groups, grid, group, dilated), coordinates)


def test_whole_volume_is_one_group_when_smaller_than_the_group():
    x = torch.randn(2, 4, 2, 6, 5)
    groups, mask = group_tokens(x, (2, 3, 3), dilated=True)
    assert mask is None and groups.shape == (2, 4 * 2 * 6, 5)
    assert torch.equal(ungroup_tokens(groups, (4, 2, 6), (2, 3, 3), True), x)


@pytest.mark.parametrize("dilated", [False, True])
def test_masked_group_attention_equals_attention_over_real_tokens(dilated):
    """The reshaped, padded, -1e6-masked attention equals plain attention computed group by group
    over the real tokens only (group members enumerated with explicit loops)."""
    torch.manual_seed(0)
    grid, group = (5, 7, 4), (2, 3, 3)
    dilation = (3, 3, 2)
    block = DilatedTransformerBlock(8, 2, group, dilated=dilated).eval()
    x = torch.randn(1, *grid, 8)
    with torch.no_grad():
        groups, mask = group_tokens(x, group, dilated)
        fast = ungroup_tokens(block.attn(groups, attn_mask=mask), grid, group, dilated)
        slow = torch.zeros_like(x)
        for offset in itertools.product(*(range(n) for n in dilation)):
            members = []
            for member in itertools.product(*(range(g) for g in group)):
                if dilated:
                    position = tuple(m * i + o for m, i, o in zip(member, dilation, offset))
                else:
                    position = tuple(o * g + m for o, g, m in zip(offset, group, member))
                if all(p < n for p, n in zip(position, grid)):
                    members.append(position)
            index = tuple(torch.tensor(axis) for axis in zip(*members))
            slow[0][index] = block.attn(x[0][index][None])[0]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_shapes_taps_and_deep_supervision_scales():
    torch.manual_seed(0)
    net = create_network("dformer", **reference("tiny")).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x, features=True)
        logits = net(x)
    assert logits.shape == (2, 3, 32, 32, 32)
    torch.testing.assert_close(logits, out.logits)
    # token grid 16 x 8 x 8 (patch 2 x 4 x 4); encoder finest first, decoder coarsest first
    assert [tuple(f.shape[1:]) for f in out.encoder] == [(8, 16, 8, 8), (16, 8, 4, 4), (32, 4, 2, 2), (64, 2, 1, 1)]
    assert [tuple(f.shape[1:]) for f in out.decoder] == [(32, 4, 2, 2), (16, 8, 4, 4), (8, 16, 8, 8), (8, 32, 32, 32)]
    assert [tuple(f.shape[1:]) for f in out.deep_supervision] == [(3, 16, 16, 16), (3, 8, 8, 8)]
    without_ds = create_network("dformer", **reference("tiny", deep_supervision=False))
    assert without_ds(x[:1], features=True).deep_supervision == []


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = create_network("dformer", **reference("tiny")).train()
    out = net(torch.randn(1, 1, 32, 32, 32), features=True)
    loss = out.logits.square().mean() + sum(d.square().mean() for d in out.deep_supervision)
    loss.backward()
    without = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not without


def test_bad_input_raises_input_shape_error():
    net = create_network("dformer", **reference("tiny"))
    assert net.input_divisor == (16, 32, 32)
    with pytest.raises(InputShapeError, match="divisible"):
        net(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(InputShapeError, match="divisible"):
        net(torch.zeros(1, 1, 8, 32, 32))
    with pytest.raises(InputShapeError, match="channels"):
        net(torch.zeros(1, 2, 32, 32, 32))


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="num_heads"):
        create_network("dformer", **reference("tiny", num_heads=(3, 2, 2, 4)))
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_network("dformer", **reference("tiny", spatial_dims=2))


def test_pretrained_round_trip_and_shape_mismatch(tmp_path):
    torch.manual_seed(1)
    source = create_network("dformer", **reference("tiny")).eval()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    target = create_network("dformer", pretrained=str(tmp_path / "model.pt"), **reference("tiny")).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    report = create_network("dformer", **reference("tiny", deep_supervision=False)).load_pretrained(
        tmp_path / "model.pt"
    )
    assert report["missing"] == [] and sorted(report["unexpected"]) == sorted(
        k for k in source.state_dict() if k.startswith("deep_supervision_")
    )
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        create_network("dformer", **reference("tiny", out_channels=4)).load_pretrained(tmp_path / "model.pt")


def test_checkpoints_with_the_older_monai_block_names_still_load(tmp_path):
    """Before the shared ViTBlock, D-Former blocks used MONAI's SABlock/MLPBlock names."""
    torch.manual_seed(1)
    source = create_network("dformer", **reference("tiny")).eval()
    legacy = {
        k.replace(".attn.proj.", ".attn.out_proj.")
        .replace(".mlp.fc1.", ".mlp.linear1.")
        .replace(".mlp.fc2.", ".mlp.linear2."): v
        for k, v in source.state_dict().items()
    }
    assert any(".attn.out_proj." in k for k in legacy)
    torch.save(legacy, tmp_path / "old.pt")
    target = create_network("dformer", **reference("tiny")).eval()
    assert target.load_pretrained(tmp_path / "old.pt") == {"missing": [], "unexpected": []}
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
