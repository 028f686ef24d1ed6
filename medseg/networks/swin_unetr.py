"""Swin UNETR (2D/3D): MONAI's ``SwinUNETR`` with the encoder/decoder taps exposed.

Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
Images", BrainLes 2021 (arXiv:2201.01266); SwinUNETR-V2 (``use_v2``): He et al., MICCAI 2023.
The network is ``monai.networks.nets.SwinUNETR`` unchanged (state-dict keys are MONAI's, prefixed
``net.``); only its forward is re-expressed over its own submodules so that
:class:`~medseg.networks.base.NetworkOutput` carries the intermediate features.

Taps for an input ``(B, C, *S)`` (every spatial size divisible by 32), ``f = feature_size``:

- ``encoder`` (finest first): ``encoder1(x)`` (f, S), ``encoder2`` (f, S/2), ``encoder3``
  (2f, S/4), ``encoder4`` (4f, S/8), the stage-4 Swin hidden state (8f, S/16) and the bottleneck
  ``encoder10`` (16f, S/32).
- ``decoder`` (coarsest first): ``decoder5`` (8f, S/16), ``decoder4`` (4f, S/8), ``decoder3``
  (2f, S/4), ``decoder2`` (f, S/2), ``decoder1`` (f, S); the 1x1 head ``out`` gives the logits.
- ``deep_supervision``: none (no native heads).

Reference (3D, in 1, out 14, feature_size 48, BTCV 96^3): 62,187,296 parameters; V2 72,762,656;
2D in 1 / out 9: 25,138,323.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from torch.overrides import TorchFunctionMode

from medseg.errors import ConfigError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.pretrained import state_dict_from_checkpoint
from medseg.networks.registry import register_network

_REFERENCES = {
    "BTCV": dict(spatial_dims=3, in_channels=1, out_channels=14, feature_size=48),
    "BTCV_v2": dict(spatial_dims=3, in_channels=1, out_channels=14, feature_size=48, use_v2=True),
    "2d": dict(spatial_dims=2, in_channels=1, out_channels=9, feature_size=48),
    # tests only; 2D because bfloat16 Conv3d on CPU falls back to PyTorch's slow reference kernel
    "tiny": dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        feature_size=12,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        window_size=4,
    ),
}


class _LinspaceOnCPU(TorchFunctionMode):
    """Evaluate ``torch.linspace`` on the CPU: MONAI's ``SwinTransformer`` turns the drop-path
    schedule into Python floats with ``.item()``, which the ``meta`` device cannot do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def _meta_safe() -> Iterator[None]:
    if torch.get_default_device().type == "meta":
        with _LinspaceOnCPU():
            yield
    else:
        yield


@register_network(
    "swin_unetr", references=_REFERENCES, description="Swin UNETR / SwinUNETR-V2 (MONAI SwinUNETR with taps), 2D/3D"
)
class SwinUNETR(SegmentationNetwork):
    """Swin UNETR on ``monai.networks.nets.SwinUNETR`` (see the module docstring for taps).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: input channels and classes K.
        feature_size: embedding size f (48 in the paper; MONAI's default is 24); divisible by 12.
        use_v2: SwinUNETR-V2 (a residual conv block at the start of each Swin stage).
        depths, num_heads, window_size: Swin stages ((2, 2, 2, 2), (3, 6, 12, 24), 7).
        drop_rate, attn_drop_rate, dropout_path_rate: dropout rates.
        norm_name: CNN norm of the UNETR blocks (instance).
        use_checkpoint: activation checkpointing in the Swin stages (saves memory in training).
        use_flash_attention: ``scaled_dot_product_attention`` in the window attention.
        freeze_encoder: ``requires_grad=False`` on the Swin transformer (``net.swinViT``), e.g. to
            fine-tune the CNN parts on top of self-supervised weights.

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``, S divisible by 32.

    Raises:
        ConfigError: invalid configuration (e.g. feature_size not divisible by 12).
        InputShapeError: wrong input channels/dimensions/sizes (at call time).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        feature_size: int = 48,
        use_v2: bool = False,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        norm_name: str | tuple = "instance",
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.input_divisor = (32,) * spatial_dims
        self.deep_supervision_scales = ()  # no native heads
        try:
            with _meta_safe():
                self.net = MonaiSwinUNETR(
                    in_channels,
                    out_channels,
                    feature_size=feature_size,
                    use_v2=use_v2,
                    depths=depths,
                    num_heads=num_heads,
                    window_size=window_size,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    dropout_path_rate=dropout_path_rate,
                    norm_name=norm_name,
                    use_checkpoint=use_checkpoint,
                    spatial_dims=spatial_dims,
                    use_flash_attention=use_flash_attention,
                )
        except ValueError as error:
            raise ConfigError(f"swin_unetr: {error}") from None
        if freeze_encoder:
            self.net.swinViT.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        net = self.net
        hidden = net.swinViT(x, net.normalize)  # 5 maps: S/2 (f) ... S/32 (16f)
        encoder = [
            net.encoder1(x),
            net.encoder2(hidden[0]),
            net.encoder3(hidden[1]),
            net.encoder4(hidden[2]),
            hidden[3],
            net.encoder10(hidden[4]),
        ]
        decoder = [net.decoder5(encoder[5], hidden[3])]
        for block, skip in zip((net.decoder4, net.decoder3, net.decoder2, net.decoder1), encoder[3::-1]):
            decoder.append(block(decoder[-1], skip))
        return NetworkOutput(logits=net.out(decoder[-1]), decoder=decoder, encoder=encoder)

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> dict[str, torch.Tensor]:
        """MONAI's self-supervised Swin UNETR checkpoint (``model_swinvit.pt``) or a SwinUNETR state
        dict, read by :meth:`load_pretrained`.

        Accepted layouts: ``{"state_dict": {...}}`` or a bare state dict; keys with or without a
        ``module.`` (DataParallel) prefix; Swin-transformer keys in the self-supervised layout
        (``patch_embed.*``, ``layers1.0.blocks.0.mlp.fc1.weight`` ...) or MONAI's (``swinViT.*``),
        plus MONAI SwinUNETR's CNN keys (``encoder1.*``, ``decoder5.*``, ``out.*``). Keys of the
        self-supervised heads (rotation, contrastive, reconstruction) are reported as unexpected,
        under their names in the file.

        Raises:
            PretrainedWeightsError: no state dict in the checkpoint (or, from the loader, a tensor
                whose shape does not fit).
        """
        if options:
            raise TypeError(f"SwinUNETR.load_pretrained: unknown options {sorted(options)}")
        return swin_unetr_state(self.net, state_dict_from_checkpoint(checkpoint, source, strip_module=False))


def swin_unetr_state(net: MonaiSwinUNETR, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a self-supervised / MONAI SwinUNETR state dict to :class:`SwinUNETR` keys (``net.*``).

    Keys that match no submodule keep their original name (reported as unexpected).
    """
    swin_children = {name for name, _ in net.swinViT.named_children()}
    top_children = {name for name, _ in net.named_children()}
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        head = name.split(".", 1)[0]
        if head in swin_children:  # self-supervised layout: the Swin transformer at top level
            name = f"net.swinViT.{name}".replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        elif head in top_children:
            name = f"net.{name}".replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        elif head == "net":
            pass
        else:
            name = key
        renamed[name] = value
    return renamed
