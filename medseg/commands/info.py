"""``medseg info PATH [--json]``: the image series in a file, folder or archive, with geometry.

For each series: UID, modality, description, shape, spacing (mm), orientation, affine (voxel ->
RAS+ mm), instance count and the reader's warnings. Pixel data is read to verify geometry.
No patient identifiers are printed.

A DICOM series that mixes echoes or magnitude / phase / derived images is listed as separate
parts, as dcm2niix writes them (``<uid>``, ``<uid>.e2``, ``<uid>.ph``, ``<uid>.derived``; see
:func:`medseg.io.dicom_scan.split_series`), each with a warning such as
``split by echo: 2 echoes (EchoNumbers 1, 2); this part is <uid>.e2``; pass the part's uid to
``--series``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list the image series in a file, folder or zip, with their geometry",
        description="List every image series (DICOM grouped by SeriesInstanceUID, NIfTI, NRRD, "
        "MetaImage) with shape, spacing, affine and warnings. Series mixing "
        "echoes or magnitude/phase/derived images are listed as parts <uid>.e2, "
        "<uid>.ph, <uid>.derived (use that uid with --series).",
    )
    parser.add_argument("path", type=Path, help="file, folder or .zip")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.set_defaults(func=run)


def series_summary(info) -> dict[str, Any]:
    """One series as a JSON-friendly dict; geometry errors are reported, not raised."""
    from medseg.io.volume_files import describe

    entry = info.as_dict()
    try:
        image = info.read()
    except MedsegError as error:
        entry.update({"error": str(error), "error_code": error.code})
        return entry
    entry.update(describe(image))
    entry["warnings"] = list(image.warnings)
    return entry


def run(args: argparse.Namespace) -> int:
    from medseg.io import find_series

    series = find_series(args.path)
    summaries = [series_summary(info) for info in series]
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        for index, entry in enumerate(summaries, start=1):
            print(f"[{index}] {entry['uid']}")
            print(
                f"    modality: {entry['modality'] or '-'}   description: "
                f"{entry['description'] or '-'}   instances: {entry['instance_count']}"
            )
            if "error" in entry:
                print(f"    error: {entry['error']}")
            else:
                spacing = " x ".join(f"{v:g}" for v in entry["spacing"])
                print(
                    f"    shape: {tuple(entry['shape'])}   spacing: {spacing} mm   "
                    f"orientation: {entry['orientation']}   dtype: {entry['dtype']}"
                )
                for row in entry["affine"][:3]:
                    print("    affine: [" + ", ".join(f"{v:10.4f}" for v in row) + "]")
            for warning in entry["warnings"]:
                print(f"    warning: {warning}")
    return 1 if any("error" in entry for entry in summaries) else 0
