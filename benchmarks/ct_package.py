"""An untrained (seeded) CT model package for benchmarks: ``python benchmarks/ct_package.py OUT_DIR``.

Writes a medseg model package (a MONAI-Bundle-compatible folder, as training exports) for CT
volumes such as ``../shared/data/ct_mr_multilabel/example_ct_sm.nii.gz`` (122 x 101 x 30, 3 mm,
RAS), for ``benchmarks/predict_vs_monai.py --package OUT_DIR`` (a bigger network on a bigger
volume than the bundled hippocampus model):

- network: medseg's ``unet`` (nnU-Net-style, the DynUNet that the plain MONAI script and the
  bundle's ``configs/inference.json`` build with :func:`medseg.package.dynunet_kwargs`), filters
  32, 64, 128, 256, 320 (5 stages, strides 1, 2, 2, 2, 2: 16.5 M parameters, the hippocampus
  U-Net has 1.4 M), 1 input channel, ``--classes`` outputs (default 4: background and three
  TotalSegmentator organs), random weights (``torch.manual_seed(--seed)``): speed does not
  depend on the weights; these are no model for any use;
- spacing: the CT's own voxel size (``--image``; 3 mm for the example), so neither medseg nor
  MONAI resamples it (the model grid is the image grid); orientation RAS (the example's);
- normalisation: nnU-Net's CT scheme, clip to -1000..1000 HU, then ``(x - mean) / std`` with the
  mean and standard deviation of the clipped voxels above -500 HU of ``--image`` (the body),
  rounded to 0.1 HU;
- patch: 96 x 96 x 32 (``--patch-size``): 4 windows on the example at overlap 0.5, its 30 slices
  padded to 32;
- its OpenVINO IR for the CPU window ``(1, 1, 96, 96, 32)``, converted and verified against the
  eager network (:func:`medseg.inference.runtime.prepare_package`; ``--no-openvino`` skips it).

Prints the package folder, the card's settings and the export seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
CT = SHARED / "ct_mr_multilabel" / "example_ct_sm.nii.gz"
FILTERS = (32, 64, 128, 256, 320)
PATCH = (96, 96, 32)
CLIP = (-1000.0, 1000.0)
#: TotalSegmentator's first organs (SNOMED CT codes), for the label card of the untrained model
ORGANS = (
    ("spleen", "78961009", (157, 108, 162)),
    ("right kidney", "9846003", (185, 102, 83)),
    ("left kidney", "18639004", (185, 102, 83)),
    ("gallbladder", "28231008", (0, 255, 0)),
    ("liver", "10200004", (221, 130, 101)),
    ("stomach", "69695003", (216, 101, 79)),
)


def ct_statistics(image, clip: tuple[float, float] = CLIP, body_hu: float = -500.0) -> tuple[float, float]:
    """Mean and standard deviation (HU, rounded to 0.1) of the clipped voxels above ``body_hu``."""
    import numpy as np

    values = np.clip(np.asarray(image.array, dtype=np.float64), *clip)
    body = values[values > body_hu]
    if body.size < 2:
        body = values.ravel()
    return round(float(body.mean()), 1), round(max(float(body.std()), 1.0), 1)


def write_ct_package(
    out: Path,
    image_path: Path = CT,
    filters: tuple[int, ...] = FILTERS,
    patch_size: tuple[int, int, int] = PATCH,
    classes: int = 4,
    seed: int = 0,
    openvino: bool = True,
) -> dict:
    """Write the package to ``out`` (replacing it); returns what was written (JSON-serialisable)."""
    import torch

    from medseg.io import read_image
    from medseg.labels import Code, Label
    from medseg.networks import create_network
    from medseg.package import ModelCard, ModelPackage, NetworkSpec, Normalization

    if not 2 <= classes <= len(ORGANS) + 1:
        raise SystemExit(f"--classes must be in 2..{len(ORGANS) + 1}")
    image = read_image(image_path)
    mean, std = ct_statistics(image)
    spacing = tuple(round(float(s), 6) for s in image.spacing)
    config = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": classes,
        "filters": list(filters),
        "strides": [1] + [2] * (len(filters) - 1),
        "deep_supervision": 1,  # 0 heads fails on MONAI 1.6.1; eval mode returns the main output only
    }
    labels = [
        Label(id=i, name=name, type=Code(value=code, meaning=name.capitalize()), color=color)
        for i, (name, code, color) in enumerate(ORGANS[: classes - 1], start=1)
    ]
    card = ModelCard(
        name="ct_seeded_unet",
        description=(
            f"UNTRAINED (random weights, seed {seed}) {len(filters)}-stage U-Net for CT at "
            f"{'x'.join(f'{s:g}' for s in spacing)} mm: benchmarks only (benchmarks/ct_package.py)"
        ),
        network=NetworkSpec(name="unet", config=config),
        modality=["CT"],
        labels=labels,
        spacing=spacing,
        orientation="RAS",
        normalization=Normalization(scheme="ct", clip=CLIP, mean=mean, std=std),
        patch_size=tuple(int(p) for p in patch_size),
        overlap=0.5,
        training={"untrained": True, "seed": seed, "normalization_from": image_path.name},
    )
    torch.manual_seed(seed)
    network = create_network("unet", **config)
    package = ModelPackage.save(out, card, network.state_dict())
    written = {
        "package": str(package.path),
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "spacing": list(spacing),
        "image_shape": list(image.shape),
        "normalization": card.normalization.model_dump(),
        "patch_size": list(card.patch_size),
        "filters": list(filters),
        "classes": classes,
    }
    if openvino:
        from medseg.inference.runtime import prepare_package

        started = time.perf_counter()
        written["openvino_ir"] = [str(path.relative_to(package.path)) for path in prepare_package(package)]
        written["export_s"] = round(time.perf_counter() - started, 2)
    return written


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="package folder to write (replaced if it exists)")
    parser.add_argument("--image", type=Path, default=CT, help=f"the CT whose spacing and HU statistics (default {CT})")
    parser.add_argument("--filters", type=_ints, default=FILTERS, help="U-Net filters per stage (default 32,...,320)")
    parser.add_argument("--patch-size", type=_ints, default=PATCH, help="window in voxels (default 96,96,32)")
    parser.add_argument("--classes", type=int, default=4, help="output channels, background included (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false", help="do not ship the OpenVINO IR")
    args = parser.parse_args(argv)
    if len(args.patch_size) != 3:
        parser.error("--patch-size takes three numbers")
    written = write_ct_package(
        args.out, args.image, args.filters, args.patch_size, args.classes, args.seed, args.openvino
    )
    print(json.dumps(written, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
