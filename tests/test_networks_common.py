"""Checks every registered network against the spec and the SegmentationNetwork contract.

Parametrised by walking the registry, so a newly registered network is covered automatically:

- reference parameter counts (built on the ``meta`` device) against the issue's table, 0.5 %;
- every reference configuration builds on ``meta``;
- with the network's ``"tiny"`` reference (see :mod:`medseg.networks.registry`): forward shapes,
  tap scales and ordering, gradients reaching every trainable parameter (and none of a frozen
  encoder), ``InputShapeError`` for bad inputs, and bfloat16 autocast on CPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from medseg.errors import ConfigError, InputShapeError
from medseg.networks import (
    count_parameters,
    create_network,
    list_networks,
    network_entry,
)

# The spec: parameter counts of the reference configurations (issue 3 / docs/architectures.md),
# keyed by (network, reference label). Entries of networks not registered yet are skipped.
SPEC_PARAMETERS = {
    ("transunet", "R50-ViT-B_16"): 105_277_081,
    ("swin_unetr", "BTCV"): 62_187_296,
    ("swin_unetr", "BTCV_v2"): 72_762_656,
    ("swin_unetr", "2d"): 25_138_323,
    ("dformer", "paper"): 44_650_000,  # 44.65M with the segmentation head
    ("stunet", "S"): 14_596_941,
    ("stunet", "B"): 58_262_669,
    ("stunet", "L"): 440_302_605,
    ("stunet", "H"): 1_457_326_221,
    ("cellvta", "L"): 387_800_000,  # about 387.8M
}
TOLERANCE = 0.005
TINY = "tiny"
NETWORKS = list_networks()

ALL_REFERENCES = [(n, label) for n in NETWORKS for label in network_entry(n).references]


def meta_parameters(name: str, config: dict) -> int:
    with torch.device("meta"):
        return count_parameters(create_network(name, **config))


@pytest.mark.parametrize("name,label", sorted(SPEC_PARAMETERS), ids=lambda v: str(v))
def test_reference_parameter_count_matches_spec(name, label):
    if name not in NETWORKS:
        pytest.skip(f"network {name!r} is not registered yet")
    references = network_entry(name).references
    assert label in references, f"{name}: spec reference {label!r} not registered (has {sorted(references)})"
    expected = SPEC_PARAMETERS[name, label]
    count = meta_parameters(name, references[label])
    assert abs(count - expected) <= TOLERANCE * expected, f"{name}/{label}: {count:,} vs spec {expected:,}"


@pytest.mark.parametrize("name,label", ALL_REFERENCES, ids=[f"{n}-{label}" for n, label in ALL_REFERENCES])
def test_every_reference_builds_on_meta(name, label):
    assert meta_parameters(name, network_entry(name).references[label]) > 0


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_reference_registered(name):
    references = network_entry(name).references
    assert TINY in references, f"{name}: no {TINY!r} reference for the tests (see medseg.networks.registry)"
    assert meta_parameters(name, references[TINY]) < 10_000_000


# ---------------------------------------------------------------------------------------------
# behaviour of the tiny configuration
# ---------------------------------------------------------------------------------------------
def tiny(name: str, **overrides):
    references = network_entry(name).references
    if TINY not in references:
        pytest.skip(f"{name}: no {TINY!r} reference (reported by test_tiny_reference_registered)")
    torch.manual_seed(0)
    return create_network(name, **{**references[TINY], **overrides})


def spatial_size(net) -> tuple[int, ...]:
    """The registry convention: smallest multiple of the divisor >= max(2 * divisor, 32); last axis + divisor."""
    divisor = net.input_divisor
    divisor = (divisor,) * net.spatial_dims if isinstance(divisor, int) else tuple(divisor)
    size = [d * max(2, math.ceil(32 / d)) for d in divisor]
    size[-1] += divisor[-1]
    return tuple(size)


def example_input(net, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, net.in_channels, *spatial_size(net))


def ratios(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(s / t for s, t in zip(size, shape))


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_forward_shapes_and_tap_scales(name):
    net = tiny(name)
    x = example_input(net)
    size = tuple(x.shape[2:])
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            logits = net(x)
        assert tuple(logits.shape) == (2, net.out_channels, *size)
    with torch.no_grad():
        out = net(x, features=True)
    assert tuple(out.logits.shape) == (2, net.out_channels, *size)
    assert out.decoder and out.encoder, "decoder and encoder taps must not be empty"
    for kind in ("decoder", "encoder", "deep_supervision"):
        taps = getattr(out, kind)
        for tap in taps:
            assert tap.ndim == x.ndim and tap.shape[0] == 2, f"{kind} tap {tuple(tap.shape)}"
            # every tap sits at an integer downsampling of the input, per axis
            assert all(r >= 1 and r == int(r) for r in ratios(tuple(tap.shape[2:]), size)), (
                f"{kind} tap {tuple(tap.shape)} is not at an integer scale of {size}"
            )
        volumes = [math.prod(t.shape[2:]) for t in taps]
        if kind == "decoder":
            assert volumes == sorted(volumes), f"decoder taps must be coarsest first: {volumes}"
        else:
            assert volumes == sorted(volumes, reverse=True), f"{kind} taps must be finest first: {volumes}"
    for tap in out.deep_supervision:
        assert tap.shape[1] == net.out_channels
        assert math.prod(tap.shape[2:]) < math.prod(size), "deep supervision excludes full-resolution logits"


def _loss(out) -> torch.Tensor:
    """What training would use: logits, deep supervision and any extra output heads (e.g. CellVTA's
    NP/HV maps, in fields of a NetworkOutput subclass); not the encoder/decoder taps."""
    terms = []
    for field in dataclasses.fields(out):
        if field.name in ("encoder", "decoder"):
            continue
        value = getattr(out, field.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        terms += [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return sum(t.float().square().mean() for t in terms)


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_gradients_reach_every_trainable_parameter(name):
    net = tiny(name).train()
    _loss(net(example_input(net), features=True)).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{len(missing)} trainable parameters get no gradient, e.g. {missing[:5]}"
    bad = [n for n, p in net.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_frozen_encoder_gets_no_gradient(name):
    try:
        net = tiny(name, freeze_encoder=True).train()
    except ConfigError:
        pytest.skip(f"{name} has no freeze_encoder option")
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert frozen and trainable, "freeze_encoder=True must freeze some parameters and leave the rest trainable"
    _loss(net(example_input(net), features=True)).backward()
    params = dict(net.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert all(params[n].grad is not None for n in trainable)


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_bad_input_raises_input_shape_error(name):
    net = tiny(name).eval()
    x = example_input(net, batch=1)
    with pytest.raises(InputShapeError):  # wrong channel count
        net(torch.zeros(1, net.in_channels + 1, *x.shape[2:]))
    with pytest.raises(InputShapeError):  # missing batch axis
        net(x[0])
    divisor = net.input_divisor
    divisor = (divisor,) * net.spatial_dims if isinstance(divisor, int) else tuple(divisor)
    axes = [a for a, d in enumerate(divisor) if d > 1]
    if axes:  # the first axis with a divisor > 1, one voxel too long
        size = list(spatial_size(net))
        size[axes[0]] += 1
        with pytest.raises(InputShapeError):
            net(torch.zeros(1, net.in_channels, *size))


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_bfloat16_autocast(name):
    net = tiny(name).eval()
    x = example_input(net, batch=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, features=True)
    assert tuple(out.logits.shape) == (1, net.out_channels, *x.shape[2:])
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("name", NETWORKS)
def test_tiny_meta_count_equals_cpu_count(name):
    net = tiny(name)
    assert meta_parameters(name, network_entry(name).references[TINY]) == count_parameters(net)


def test_cited_documents_exist_in_the_repository():
    """Docstrings cite the architecture reference by a repository path that exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cited = set()
    for path in (root / "medseg").rglob("*.py"):
        cited |= set(re.findall(r"\b(docs/[\w./-]+\.md)", path.read_text()))
    assert "docs/architectures.md" in cited
    assert all((root / doc).is_file() for doc in cited), sorted(cited)
