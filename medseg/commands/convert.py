"""``medseg convert INPUT OUTPUT.nii.gz [--series UID]``: one volume to NIfTI.

INPUT is anything :func:`medseg.io.read_image` reads (DICOM folder/file/zip, NRRD, MetaImage,
NIfTI). The output is written atomically: on any error nothing is left at OUTPUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medseg.errors import UnsupportedInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert one series (DICOM, NRRD, MHA, NIfTI) to NIfTI",
        description="Read one image series and write it as NIfTI with its RAS+ affine.",
    )
    parser.add_argument("input", type=Path, help="DICOM file/folder/zip, .nrrd, .mha, .nii(.gz)")
    parser.add_argument("output", type=Path, help="output .nii or .nii.gz")
    parser.add_argument("--series", metavar="UID", help="series to convert when INPUT holds several (see medseg info)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.io import read_image, write_nifti

    if not args.output.name.lower().endswith((".nii", ".nii.gz")):
        raise UnsupportedInputError(f"{args.output.name}: output must end in .nii or .nii.gz")
    image = read_image(args.input, series_uid=args.series)
    out = write_nifti(image, args.output)
    for warning in image.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    shape = "x".join(str(s) for s in image.array.shape)
    spacing = " x ".join(f"{v:g}" for v in image.spacing)
    print(f"wrote {out} ({shape}, {spacing} mm, {image.orientation})")
    return 0
