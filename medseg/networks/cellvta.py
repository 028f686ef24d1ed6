"""CellVTA: a (frozen) foundation ViT + ViT-Adapter + CellViT/HoVer-Net decoder, for nuclei.

Yang et al., "CellVTA: Enhancing Vision Foundation Models for Accurate Cell Segmentation and
Classification", 2025 (code: JieZheng-ShanghaiTech/CellVTA). The encoder is a UNI ViT-L/16
(:class:`~medseg.networks.vit_adapter.VisionTransformer`, timm weight names), frozen for the whole
run; a ViT-Adapter one level finer (:class:`~medseg.networks.vit_adapter.ViTAdapter`) injects
high-resolution spatial priors and extracts features ``f1..f4`` at 1/2 .. 1/16. The decoder is the
CellViT one (Hoerst et al., "CellViT: Vision Transformers for precise cell segmentation and
classification", Medical Image Analysis 94, 2024), itself after HoVer-Net (Graham et al., Medical
Image Analysis 58, 2019): shared skip processors for the image and ``f1..f3`` and three upsampling
branches

* NP -- nuclei-vs-background logits, 2 channels,
* HV -- horizontal and vertical distances to the nucleus centre of mass, 2 channels regressed
  against targets in ``[-1, 1]`` (raw outputs without activation, as in CellViT),
* NT -- nucleus-type logits, ``out_channels`` channels (background included; PanNuke 6),

plus an optional tissue-type head on the class token (PanNuke 19 tissues).

Interface: ``network(x)`` returns the **NT type logits** ``(B, out_channels, H, W)`` -- the
segmentation logits of the medseg contract. ``network(x, features=True)`` returns a
:class:`CellVTAOutput` which also carries the NP logits, the HV maps and the tissue logits.
Instances come from HoVer-Net post-processing of NP + HV (MONAI
``HoVerNetInstanceMapPostProcessing``, Sobel kernel 21 at 40x) and per-instance majority NT type.

Parameters of the reference ``"L"`` (UNI ViT-L/16, PanNuke; ``benchmarks/bench_cellvta.py``):
386,994,525 in total = ViT-L 303,350,784 (frozen but its final norm) + adapter 21,502,592 +
decoder 62,121,674 + tissue head 19,475; 83,645,789 trainable. The project's rebuilt figures are
387.8M = 303.35M + 22.28M + 62.12M, 84.4M trainable: total and decoder agree within 0.25 %, the
adapter is 0.78M (3.5 %) smaller than that note with every stated hyper-parameter (8 heads, 4
points, 3 levels, value ratio 0.5, ConvFFN 0.25, 2 extra extractors) -- the difference is not
explained by the notes. The layout is rebuilt from the papers and the project's architecture notes
and is unverified against the authors' checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medseg.errors import ConfigError, PretrainedWeightsError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.blocks import resample_abs_pos_embed
from medseg.networks.pretrained import state_dict_from_checkpoint
from medseg.networks.registry import register_network
from medseg.networks.vit_adapter import VisionTransformer, ViTAdapter


@dataclass
class CellVTAOutput(NetworkOutput):
    """:class:`NetworkOutput` of CellVTA for an input ``(B, 3, H, W)``.

    Attributes:
        logits: NT nucleus-type logits ``(B, n_types, H, W)`` (background is type 0).
        nuclei_probability_logits: NP logits ``(B, 2, H, W)`` (channel 1 = nucleus).
        horizontal_vertical: HV maps ``(B, 2, H, W)`` (channel 0 horizontal, 1 vertical; trained
            against MONAI ``ComputeHoVerMaps`` targets in ``[-1, 1]``).
        tissue_logits: tissue-type logits ``(B, n_tissues)``, or ``None`` without a tissue head.
        decoder: NT-branch stage features, coarsest first: 1/8, 1/4, 1/2, 1/1.
        encoder: adapter features ``f1..f4`` at 1/2, 1/4, 1/8, 1/16 (finest first).
        deep_supervision: empty (no native deep-supervision heads).
    """

    nuclei_probability_logits: torch.Tensor | None = None
    horizontal_vertical: torch.Tensor | None = None
    tissue_logits: torch.Tensor | None = None


def _conv_block(in_channels: int, out_channels: int, dropout: float) -> Convolution:
    """CellViT ``Conv2DBlock``: conv 3x3 (bias) + BN + ReLU + dropout."""
    return Convolution(
        2,
        in_channels,
        out_channels,
        kernel_size=3,
        act="RELU",
        norm="BATCH",
        dropout=dropout or None,
        adn_ordering="NAD",
    )


def _upsample(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)


class HoVerBranch(nn.Module):
    """One CellViT upsampling branch (NP, HV or NT).

    ``bottleneck``: Deconv block (ConvT 2x2 + conv 3x3 + BN + ReLU) ``D -> c3`` from 1/16 to 1/8;
    then at 1/8: 3 conv blocks on ``[skip3, up]`` (``2 c3 -> c3``) and ConvT to 1/4 (``c2``);
    at 1/4 and 1/2: 2 conv blocks and ConvT; at 1/1: 2 conv blocks and a 1x1 head.

    Shapes: skips ``[(B, c0, H, W), (B, c1, H/2, W/2), (B, c2, H/4, W/4), (B, c3, H/8, W/8)]`` and
    ``f4 (B, D, H/16, W/16)`` -> logits ``(B, out_channels, H, W)`` and the stage features at
    1/8, 1/4, 1/2, 1/1 (coarsest first).
    """

    def __init__(self, embed_dim: int, channels: Sequence[int], out_channels: int, dropout: float = 0.0):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.bottleneck = nn.Sequential(_upsample(embed_dim, c3), _conv_block(c3, c3, dropout))
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*[_conv_block(2 * c3 if i == 0 else c3, c3, dropout) for i in range(3)]),
                nn.Sequential(_conv_block(2 * c2, c2, dropout), _conv_block(c2, c2, dropout)),
                nn.Sequential(_conv_block(2 * c1, c1, dropout), _conv_block(c1, c1, dropout)),
                nn.Sequential(_conv_block(2 * c0, c0, dropout), _conv_block(c0, c0, dropout)),
            ]
        )
        self.upsamples = nn.ModuleList([_upsample(c3, c2), _upsample(c2, c1), _upsample(c1, c0)])
        self.head = nn.Conv2d(c0, out_channels, kernel_size=1)

    def forward(
        self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, stage_features = self.bottleneck(bottleneck), []
        for i, stage in enumerate(self.stages):
            y = stage(torch.cat([skips[3 - i], y], dim=1))
            stage_features.append(y)
            if i < len(self.upsamples):
                y = self.upsamples[i](y)
        return self.head(y), stage_features


class CellViTDecoder(nn.Module):
    """Shared skip processors + NP/HV/NT branches (CellViT decoder on adapter features).

    Skip processors (2 conv blocks each): image ``C_in -> c0/2 -> c0``; ``f1: D -> c1 -> c1``;
    ``f2: D -> c2 -> c2``; ``f3: D -> c3 -> c3``. ``f4`` feeds each branch's bottleneck.
    """

    def __init__(self, in_channels: int, embed_dim: int, channels: Sequence[int], n_types: int, dropout: float = 0.0):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.skips = nn.ModuleList(
            [
                nn.Sequential(_conv_block(in_channels, c0 // 2, dropout), _conv_block(c0 // 2, c0, dropout)),
                nn.Sequential(_conv_block(embed_dim, c1, dropout), _conv_block(c1, c1, dropout)),
                nn.Sequential(_conv_block(embed_dim, c2, dropout), _conv_block(c2, c2, dropout)),
                nn.Sequential(_conv_block(embed_dim, c3, dropout), _conv_block(c3, c3, dropout)),
            ]
        )
        self.nuclei_branch = HoVerBranch(embed_dim, channels, 2, dropout)
        self.hv_branch = HoVerBranch(embed_dim, channels, 2, dropout)
        self.type_branch = HoVerBranch(embed_dim, channels, n_types, dropout) if n_types else None

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]):
        """``image (B, C, H, W)``, ``features = [f1..f4]`` -> (NP, HV, NT logits, NT stage features);
        without an NT branch (``n_types = 0``) the NP logits and stage features stand in for NT's."""
        skips = [processor(level) for processor, level in zip(self.skips, [image, *features[:3]])]
        nuclei, nuclei_features = self.nuclei_branch(skips, features[3])
        hv, _ = self.hv_branch(skips, features[3])
        if self.type_branch is None:
            return nuclei, hv, nuclei, nuclei_features
        types, stage_features = self.type_branch(skips, features[3])
        return nuclei, hv, types, stage_features


# everything but the ViT size, spelled out so a reference never depends on a default
_PANNUKE = dict(
    spatial_dims=2,
    in_channels=3,
    out_channels=6,
    num_tissue_classes=19,
    mlp_ratio=4.0,
    layer_scale=1e-5,
    patch_size=16,
    pretrain_img_size=224,
    spm_channels=64,
    deform_heads=8,
    deform_points=4,
    deform_ratio=0.5,
    injector_init=1e-5,
    cffn_ratio=0.25,
    extra_extractors=2,
    drop_path_rate=0.4,
    decoder_channels=(64, 128, 256, 512),
    dropout=0.0,
    freeze_encoder=True,
)

CELLVTA_REFERENCES = {
    # CellVTA as published: UNI ViT-L/16, PanNuke (5 types + background, 19 tissues), 256 x 256
    "L": dict(_PANNUKE, embed_dim=1024, depth=24, num_heads=16),
    # CoNIC: 6 types + background, no tissue labels
    "L_conic": dict(_PANNUKE, out_channels=7, num_tissue_classes=0, embed_dim=1024, depth=24, num_heads=16),
    "B": dict(_PANNUKE, embed_dim=768, depth=12, num_heads=12),
    "S": dict(_PANNUKE, embed_dim=384, depth=12, num_heads=6),
    # tests only: ViT-S-like but tiny, runs on 64 x 64 in well under a second on CPU
    "tiny": dict(
        spatial_dims=2,
        in_channels=3,
        out_channels=6,
        num_tissue_classes=5,
        embed_dim=64,
        depth=4,
        num_heads=4,
        pretrain_img_size=32,
        spm_channels=16,
        deform_heads=4,
        deform_points=2,
        drop_path_rate=0.0,
        decoder_channels=(16, 32, 32, 64),
    ),
}


@register_network(
    "cellvta",
    references=CELLVTA_REFERENCES,
    description="CellVTA: frozen ViT + ViT-Adapter (MS deformable attention) + CellViT NP/HV/NT decoder, 2D",
)
class CellVTA(SegmentationNetwork):
    """CellVTA nuclei segmentation and classification network (2D, RGB).

    Args:
        spatial_dims: must be 2.
        in_channels: image channels (3; images normalised with mean = std = 0.5 per channel).
        out_channels: nucleus types including background (PanNuke 6, CoNIC 7) -> NT branch; 0 builds
            no NT branch (nuclei without types, e.g. MoNuSeg): the logits are then the NP logits
            (``out_channels`` reads 2).
        num_tissue_classes: tissue-type head on the class token (PanNuke 19); 0 disables it.
        embed_dim, depth, num_heads, mlp_ratio, layer_scale, patch_size, pretrain_img_size: the
            ViT (ViT-L/16 UNI: 1024, 24, 16, 4, 1e-5, 16, 224).
        spm_channels, deform_heads, deform_points, deform_ratio, injector_init, cffn_ratio,
            interaction_indexes, extra_extractors: the adapter (64, 8, 4, 0.5, 1e-5, 0.25, 4 equal
            ranges, 2), see :class:`~medseg.networks.vit_adapter.ViTAdapter`.
        drop_path_rate: stochastic depth of ViT blocks (linear up to it) and extractors (0.4).
        decoder_channels: decoder widths at 1/1, 1/2, 1/4, 1/8 (64, 128, 256, 512).
        dropout: decoder dropout (0).
        freeze_encoder: ViT weights (patch embedding, tokens, position embedding, blocks) get
            ``requires_grad = False``; the ViT's final norm (used only by the tissue head), the
            tissue head, adapter and decoder are trained (the CellVTA schedule never unfreezes).

    Shapes: ``(B, in_channels, H, W)``, ``H, W`` multiples of 16 -> NT logits
    ``(B, out_channels, H, W)``; see :class:`CellVTAOutput` for ``features=True``.

    Raises:
        InputShapeError: wrong rank, channels, or a size not divisible by 16.
        ConfigError: invalid configuration (spatial_dims != 2, widths not divisible).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 6,
        num_tissue_classes: int = 19,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-5,
        patch_size: int = 16,
        pretrain_img_size: int = 224,
        spm_channels: int = 64,
        deform_heads: int = 8,
        deform_points: int = 4,
        deform_ratio: float = 0.5,
        injector_init: float = 1e-5,
        cffn_ratio: float = 0.25,
        interaction_indexes: Sequence[Sequence[int]] | None = None,
        extra_extractors: int = 2,
        drop_path_rate: float = 0.4,
        decoder_channels: Sequence[int] = (64, 128, 256, 512),
        dropout: float = 0.0,
        freeze_encoder: bool = True,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError(f"cellvta is a 2D network, got spatial_dims={spatial_dims}")
        if len(decoder_channels) != 4:
            raise ConfigError(f"cellvta decoder_channels needs 4 widths (1/1..1/8), got {tuple(decoder_channels)}")
        self.spatial_dims, self.in_channels, self.out_channels = 2, in_channels, out_channels or 2
        self.input_divisor = (patch_size, patch_size)
        self.deep_supervision_scales = ()  # NP/HV/tissue heads are extra outputs, not deep supervision
        try:
            vit = VisionTransformer(
                patch_size,
                in_channels,
                embed_dim,
                depth,
                num_heads,
                mlp_ratio,
                layer_scale,
                pretrain_img_size,
                drop_path_rate,
            )
            self.backbone = ViTAdapter(
                vit,
                in_channels,
                spm_channels,
                deform_heads,
                deform_points,
                deform_ratio,
                injector_init,
                cffn_ratio,
                interaction_indexes,
                extra_extractors,
                drop_path_rate,
            )
        except ValueError as error:
            raise ConfigError(f"cellvta: {error}") from None
        self.decoder = CellViTDecoder(in_channels, embed_dim, decoder_channels, out_channels, dropout)
        self.tissue_head = nn.Linear(embed_dim, num_tissue_classes) if num_tissue_classes else None
        if freeze_encoder:
            self.freeze_encoder()

    @property
    def vit(self) -> VisionTransformer:
        """The ViT encoder (timm parameter names)."""
        return self.backbone.vit

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Set ``requires_grad = not frozen`` on the ViT, except its final norm (always trained)."""
        for name, parameter in self.vit.named_parameters():
            parameter.requires_grad = not frozen or name.startswith("norm.")

    def forward_features(self, x: torch.Tensor) -> CellVTAOutput:
        features, cls = self.backbone(x)
        nuclei, hv, types, stage_features = self.decoder(x, features)
        tissue = self.tissue_head(cls) if self.tissue_head is not None else None
        return CellVTAOutput(
            logits=types,
            decoder=stage_features,
            encoder=features,
            nuclei_probability_logits=nuclei,
            horizontal_vertical=hv,
            tissue_logits=tissue,
        )

    hover_branches = True
    #: :meth:`load_pretrained` fills the ViT encoder only (keys and report relative to it)
    pretrained_target = "backbone.vit"

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> dict[str, torch.Tensor]:
        """A timm-format ViT state dict (e.g. UNI ``pytorch_model.bin``) for the ViT encoder, read by
        :meth:`load_pretrained`.

        Keys as timm names them (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
        ``blocks.0.attn.qkv.weight``, ``blocks.0.ls1.gamma``, ``norm.weight``...); a ``module.``
        prefix and a wrapping ``{"model": ...}`` / ``{"state_dict": ...}`` are accepted. A
        ``pos_embed`` stored for another square grid is resampled bicubically to this network's
        grid. Adapter, decoder and tissue head are not touched; the report (``missing`` /
        ``unexpected``) is relative to the ViT, e.g. ``head.weight`` of a classification
        checkpoint is reported as unexpected.

        Raises:
            PretrainedWeightsError: not a state dict of tensors, or a ``pos_embed`` that is not a
                square grid of this width (or, from the loader, another shape mismatch).
        """
        if options:
            raise TypeError(f"CellVTA.load_pretrained: unknown options {sorted(options)}")
        state = state_dict_from_checkpoint(checkpoint, source)
        own = self.vit.pos_embed
        if "pos_embed" in state and state["pos_embed"].shape != own.shape:
            pos_embed = state["pos_embed"]
            if pos_embed.ndim != 3 or pos_embed.shape[-1] != own.shape[-1]:
                raise PretrainedWeightsError(
                    f"{source}: pos_embed {tuple(pos_embed.shape)} does not fit embed_dim {own.shape[-1]}"
                )
            try:
                state["pos_embed"] = resample_abs_pos_embed(
                    pos_embed, self.vit.pretrain_grid, num_prefix_tokens=self.vit.num_prefix_tokens
                )
            except ValueError as error:
                raise PretrainedWeightsError(f"{source}: {error}") from None
        return state
