"""The SegmentationNetwork contract, walked over the registry (issue 11, items 3 and 4).

- every registered network declares ``deep_supervision_scales`` (0 heads where it has none) and
  produces ``1 + heads`` outputs of the declared scales in training mode;
- :func:`medseg.losses.build_loss` wraps the loss in nnU-Net-weighted deep supervision exactly when
  a network declares heads, and the loss on the real training output is a finite scalar whose
  gradient reaches every output head;
- :func:`create_network` checks keyword arguments against the signature (a TypeError inside a
  constructor is not a ConfigError) and builds reference variants by name;
- one checkpoint reader (``SegmentationNetwork.load_pretrained``), one implementation of each shared
  block, and a cycle-free import graph in which blocks import no network.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from medseg.errors import ConfigError, PretrainedWeightsError
from medseg.losses import DeepSupervisionLoss, build_loss, nnunet_deep_supervision_weights
from medseg.losses.deep_supervision import LogitsLoss
from medseg.networks import (
    NetworkOutput,
    SegmentationNetwork,
    check_network_contract,
    count_parameters,
    create_network,
    list_networks,
    network_entry,
    registry,
)

NETWORKS = list_networks()
ALL_REFERENCES = [(n, label) for n in NETWORKS for label in network_entry(n).references]
PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

# heads each reference declares (the documented layouts; see each network's module docstring)
EXPECTED_HEADS = {
    ("unet", "tiny"): 1,
    ("unet", "hippocampus"): 2,
    ("unet", "3d_fullres"): 0,
    ("transunet3d", "tiny"): 2,
    ("transunet3d", "paper_encoder"): 4,
    ("stunet", "tiny"): 4,
    ("stunet", "B"): 4,
    ("stunet", "H"): 4,
    ("dformer", "tiny"): 2,
    ("dformer", "paper"): 0,
    ("dformer", "paper_ds"): 2,
    ("transunet", "tiny"): 0,
    ("transunet", "R50-ViT-B_16"): 0,
    ("swin_unetr", "tiny"): 0,
    ("swin_unetr", "BTCV"): 0,
    ("cellvta", "tiny"): 0,
    ("cellvta", "L"): 0,
}


def spatial_size(net) -> tuple[int, ...]:
    """The registry's test-size convention (see medseg.networks.registry)."""
    size = [d * max(2, math.ceil(32 / d)) for d in net.input_divisor]
    size[-1] += net.input_divisor[-1]
    return tuple(size)


def meta(name: str, **config):
    with torch.device("meta"):
        return create_network(name, **config)


# ---------------------------------------------------------------------------------------------
# the declaration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,label", ALL_REFERENCES, ids=[f"{n}-{label}" for n, label in ALL_REFERENCES])
def test_every_reference_declares_the_contract(name, label):
    net = meta(name, variant=label)
    check_network_contract(net)
    assert "deep_supervision_scales" in vars(net), f"{name} must declare deep_supervision_scales itself"
    assert net.num_deep_supervision_heads == len(net.deep_supervision_scales)
    if (name, label) in EXPECTED_HEADS:
        assert net.num_deep_supervision_heads == EXPECTED_HEADS[name, label]


def test_every_network_has_an_expected_head_count():
    assert {n for n, _ in EXPECTED_HEADS} >= set(NETWORKS), "add the new network's heads to EXPECTED_HEADS"


def test_declared_scales_of_anisotropic_configurations():
    unet = meta(
        "unet",
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        filters=(4, 8, 16, 16),
        strides=(1, (2, 2, 1), 2, (1, 2, 2)),
        deep_supervision=2,
    )
    assert unet.deep_supervision_scales == ((0.5, 0.5, 1.0), (0.25, 0.25, 0.5))
    stunet = meta("stunet", variant="tiny", pool_strides=[(1, 2, 2), 2, 2, (1, 2, 2), 1])
    assert stunet.deep_supervision_scales == (
        (1.0, 0.5, 0.5),
        (0.5, 0.25, 0.25),
        (0.25, 0.125, 0.125),
        (0.25, 0.0625, 0.0625),
    )
    assert meta("stunet", variant="tiny", deep_supervision=False).deep_supervision_scales == ()
    assert meta("dformer", variant="tiny", deep_supervision=False).deep_supervision_scales == ()


# ---------------------------------------------------------------------------------------------
# build_loss on every network's real training-mode output
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETWORKS)
def test_build_loss_on_the_real_training_output(name):
    torch.manual_seed(0)
    net = create_network(name, variant="tiny").train()
    heads = net.num_deep_supervision_heads
    size = spatial_size(net)
    loss = build_loss("dice_ce", net, size)
    if heads:
        assert isinstance(loss, DeepSupervisionLoss)
        assert loss.weights == pytest.approx(nnunet_deep_supervision_weights(heads + 1))
    else:
        assert isinstance(loss, LogitsLoss)

    x = torch.randn(2, net.in_channels, *size)
    output = net(x, features=True)
    outputs = [output.logits, *output.deep_supervision]
    assert len(outputs) == heads + 1, f"{name} declares {heads} heads"
    for tensor, scale in zip(output.deep_supervision, net.deep_supervision_scales):
        assert tuple(tensor.shape) == (2, net.out_channels, *(round(s * r) for s, r in zip(size, scale)))
    for tensor in outputs:
        tensor.retain_grad()
    target = torch.randint(0, net.out_channels, (2, 1, *size))
    value = loss(output, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    weights = loss.weights if heads else [1.0]
    for i, (tensor, weight) in enumerate(zip(outputs, weights)):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), f"output {i} gets no gradient"
        if weight > 0:
            assert tensor.grad.abs().sum() > 0, f"output {i} (weight {weight}) gets a zero gradient"


@pytest.mark.parametrize("name", ["unet", "stunet", "dformer", "transunet3d"])
def test_deep_supervision_can_be_switched_off_and_weights_must_fit(name):
    net = meta(name, variant="tiny")
    heads = net.num_deep_supervision_heads
    assert heads > 0
    assert isinstance(build_loss("dice_ce", net, (32, 32, 32), deep_supervision=False), LogitsLoss)
    custom = [1.0] + [0.0] * heads
    assert build_loss("dice_ce", net, (32, 32, 32), deep_supervision_weights=custom).weights == custom
    with pytest.raises(ConfigError, match="deep_supervision_weights"):
        build_loss("dice_ce", net, (32, 32, 32), deep_supervision_weights=[1.0] * (heads + 2))


def test_deep_supervision_loss_refuses_another_number_of_outputs():
    loss = DeepSupervisionLoss(torch.nn.MSELoss(), [0.5, 0.5], num_outputs=2)
    with pytest.raises(ValueError, match="expects 2 outputs"):
        loss(NetworkOutput(logits=torch.zeros(1, 2, 4, 4)), torch.zeros(1, 1, 4, 4))


class _Liar(SegmentationNetwork):
    """Declares one head but returns none."""

    def __init__(self):
        super().__init__()
        self.spatial_dims, self.in_channels, self.out_channels, self.input_divisor = 2, 1, 2, (1, 1)
        self.deep_supervision_scales = ((0.5, 0.5),)
        self.conv = torch.nn.Conv2d(1, 2, 1)

    def forward_features(self, x):
        return NetworkOutput(logits=self.conv(x))


def test_a_network_whose_heads_do_not_match_its_declaration_fails_loudly():
    net = _Liar().train()
    with pytest.raises(RuntimeError, match="declares deep-supervision outputs"):
        net(torch.zeros(1, 1, 4, 4), features=True)
    assert net.eval()(torch.zeros(1, 1, 4, 4), features=True).deep_supervision == []  # checked in training only


def test_build_loss_needs_the_declaration():
    module = torch.nn.Conv2d(1, 2, 1)
    module.out_channels = 2
    with pytest.raises(TypeError, match="deep_supervision_scales"):
        build_loss("dice_ce", module, (4, 4))


# ---------------------------------------------------------------------------------------------
# create_network: signature check, variants
# ---------------------------------------------------------------------------------------------
class _Broken(SegmentationNetwork):
    def __init__(self, spatial_dims: int = 2, width: int = 4):
        super().__init__()
        raise TypeError("a bug inside the constructor")


@pytest.fixture()
def broken_network(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "broken", registry.NetworkEntry("broken", _Broken, {"tiny": {}}))
    return "broken"


def test_type_error_inside_a_constructor_is_not_a_config_error(broken_network):
    with pytest.raises(TypeError, match="a bug inside the constructor"):
        create_network(broken_network, width=8)


@pytest.mark.parametrize("name", NETWORKS)
def test_unknown_keyword_is_a_config_error_naming_it(name):
    with pytest.raises(ConfigError, match="no_such_option"):
        create_network(name, variant="tiny", no_such_option=1)


def test_missing_required_argument_is_a_config_error(monkeypatch):
    def needs_width(*, width: int) -> SegmentationNetwork:  # pragma: no cover - never called
        raise AssertionError

    monkeypatch.setitem(registry._REGISTRY, "needs", registry.NetworkEntry("needs", needs_width))
    with pytest.raises(ConfigError, match="width"):
        create_network("needs")


def test_variant_by_name_like_timm_create_model():
    config = network_entry("unet").references["hippocampus"]
    torch.manual_seed(0)
    by_name = create_network("unet", variant="hippocampus")
    torch.manual_seed(0)
    by_config = create_network("unet", **config)
    assert by_name.state_dict().keys() == by_config.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_config.state_dict().values()))
    assert by_name.num_deep_supervision_heads == 2
    assert network_entry("unet").variants == list(network_entry("unet").references)
    # keyword arguments override the variant's
    assert create_network("unet", variant="hippocampus", out_channels=5).out_channels == 5
    assert meta("stunet", variant="B", out_channels=14).out_channels == 14
    with pytest.raises(ConfigError, match="unknown variant 'nope'.*hippocampus"):
        create_network("unet", variant="nope")
    with pytest.raises(ConfigError, match="unknown network"):
        create_network("no_such_network", variant="tiny")


@pytest.mark.parametrize("name,label", ALL_REFERENCES, ids=[f"{n}-{label}" for n, label in ALL_REFERENCES])
def test_every_variant_builds_by_name(name, label):
    assert count_parameters(meta(name, variant=label)) == count_parameters(
        meta(name, **network_entry(name).references[label])
    )


# ---------------------------------------------------------------------------------------------
# one checkpoint reader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETWORKS)
def test_one_load_pretrained_for_every_network(name, tmp_path):
    net = meta(name, variant="tiny")
    assert type(net).load_pretrained is SegmentationNetwork.load_pretrained, (
        f"{name}: convert in pretrained_state_dict, do not override load_pretrained"
    )
    with pytest.raises(PretrainedWeightsError, match="absent.pt"):
        net.load_pretrained(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pt"):
        net.load_pretrained(garbage)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(PretrainedWeightsError, match="list.pt"):
        net.load_pretrained(listed)


def _python_files(*parts: str) -> list[Path]:
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


def test_checkpoint_files_are_read_in_one_place():
    readers = []
    for path in _python_files("networks"):
        text = path.read_text()
        if path.name != "pretrained.py" and any(call in text for call in ("torch.load(", "np.load(", "numpy.load(")):
            readers.append(path.name)
    assert not readers, f"checkpoint files read outside medseg/networks/pretrained.py: {readers}"


# ---------------------------------------------------------------------------------------------
# shared blocks: one implementation each, clean import graph
# ---------------------------------------------------------------------------------------------
SHARED = {
    "Attention",
    "Mlp",
    "LayerScale",
    "ViTBlock",
    "TokenBottleneck",
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "grid_reference_points",
    "resample_abs_pos_embed",
    "init_linear_trunc_normal",
    "conv_bn_relu",
}


def _definitions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}


def test_each_shared_block_is_defined_once_in_blocks():
    where: dict[str, list[str]] = {}
    for path in _python_files():
        for name in _definitions(path):
            where.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    for name in SHARED:
        assert len(where.get(name, [])) == 1 and where[name][0].startswith("networks/blocks/"), (name, where.get(name))
    # and no second copy under another name: outside the blocks, no network module computes
    # attention or deformable sampling itself or uses MONAI's ViT attention/MLP blocks
    for path in _python_files("networks"):
        if "blocks" in path.parts:
            continue
        used = _names(path)
        for marker in ("scaled_dot_product_attention", "SABlock", "MLPBlock", "TransformerBlock", "grid_sample"):
            assert marker not in used, f"{path.name} uses {marker}; use medseg.networks.blocks"


def _names(path: Path) -> set[str]:
    """Identifiers used in code (names, attributes, imported names), not in strings or comments."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
    return names


def _imports(path: Path) -> set[str]:
    """medseg modules imported by ``path`` (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg"):
            found.add(node.module)
            for alias in node.names:  # `from medseg.networks import unet` imports a module
                candidate = f"{node.module}.{alias.name}"
                if _module_path(candidate) is not None:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medseg")}
    return found


def _module_path(module: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_graph_has_no_cycles_and_blocks_import_no_network():
    graph = {
        _module_name(p): {m for m in _imports(p) if _module_path(m) is not None}
        for p in _python_files("networks") + _python_files("losses")
    }
    for module, imported in graph.items():
        if module.startswith("medseg.networks.blocks"):
            assert all(m.startswith("medseg.networks.blocks") for m in imported), (module, imported)
        if module in ("medseg.networks.pretrained", "medseg.networks.base"):
            assert imported <= {"medseg.errors", "medseg.networks.pretrained"}, (module, imported)
        if module.startswith("medseg.losses"):
            assert not {m for m in imported if m.startswith("medseg.networks")} - {"medseg.networks.base"}, (
                module,
                imported,
            )
    # package __init__ modules aggregate their children; the cycle check is over the other modules
    edges = {
        m: {i for i in imported if i in graph and not graph_is_package(i)}
        for m, imported in graph.items()
        if not graph_is_package(m)
    }
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in edges.get(module, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, module, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def graph_is_package(module: str) -> bool:
    path = _module_path(module)
    return path is not None and path.name == "__init__.py"


def test_npz_is_recognised_by_content_not_only_by_name(tmp_path):
    import numpy as np

    from medseg.networks.pretrained import read_checkpoint

    path = tmp_path / "weights.bin"
    with path.open("wb") as handle:
        np.savez(handle, a=np.arange(3, dtype=np.float32))
    arrays = read_checkpoint(path)
    assert set(arrays) == {"a"} and arrays["a"].tolist() == [0.0, 1.0, 2.0]
    torch.save({"a": torch.zeros(1)}, tmp_path / "torch.npz.pt")  # a torch zip is not an npz
    assert isinstance(read_checkpoint(tmp_path / "torch.npz.pt")["a"], torch.Tensor)
