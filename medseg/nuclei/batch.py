"""The nuclei batch runner behind ``medseg predict TILE... --model nuclei --output DIR [--mpp UM]``.

``medseg predict`` hands over here when the model card's ``task`` is ``nuclei``. Inputs are tile
files (PNG, JPEG, TIFF; :mod:`medseg.io.tile`) or folders of them (searched recursively; files
under ``--output`` are never taken as input). Each tile goes through
:class:`medseg.nuclei.NucleiPredictor` (any size: sliding window over the whole tile, one
watershed) and :func:`medseg.nuclei.outputs.write_nuclei_outputs`: ``<stem>.instances.tif``,
``<stem>.geojson`` (QuPath), ``<stem>.overlay.png`` and ``<stem>.json``. The pixel size is
``--mpp``, else the tile's (TIFF resolution tags, PNG pHYs), else the model's, which the report
then says it assumed. A failing tile is reported and the batch goes on; exit codes as
:mod:`medseg.commands.predict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.errors import ConfigError, MedsegError
from medseg.outcomes import Outcome, refuse_overwrite, report_outcomes, unique_stem

#: ``--formats`` of nuclei models (all by default)
NUCLEI_FORMATS = ("tiff", "geojson", "png", "json")


def nuclei_formats(text: str | None) -> tuple[str, ...]:
    """``--formats`` for a nuclei model.

    Raises:
        ConfigError: an unknown or empty list.
    """
    if text is None:
        return NUCLEI_FORMATS
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in NUCLEI_FORMATS]
    if unknown or not formats:
        raise ConfigError(
            f"--formats: unknown {', '.join(unknown) or 'empty list'} for a nuclei model "
            f"(choose from {', '.join(NUCLEI_FORMATS)})"
        )
    return formats


def find_tiles(inputs: list[str], out_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The tile files of ``inputs`` (files, or folders searched recursively), in order, without
    files under ``out_dir``; and ``(name, reason)`` for inputs that are neither."""
    from medseg.io.tile import is_tile_file

    resolved_out = out_dir.resolve()
    tiles: list[Path] = []
    bad: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and is_tile_file(p.name) and resolved_out not in p.resolve().parents
            ]
            if not found:
                bad.append((path.name, "no PNG, JPEG or TIFF tile in this folder"))
            tiles += found
        elif path.is_file():
            if is_tile_file(path.name):
                tiles.append(path)
            else:
                bad.append((path.name, "not a PNG, JPEG or TIFF tile (a nuclei model segments 2D tiles)"))
        else:
            bad.append((path.name, "no such file or folder"))
    return tiles, bad


def run_nuclei(args: argparse.Namespace, package, device: str, out_dir: Path) -> int:
    """Segment the nuclei of every tile of ``args.inputs`` into ``out_dir`` (module docstring)."""
    from medseg.io.tile import read_tile
    from medseg.nuclei.outputs import output_paths, write_nuclei_outputs
    from medseg.nuclei.predictor import NucleiPredictor

    if getattr(args, "broker", None):
        raise ConfigError("--broker: nuclei models run locally (the job queue takes series, not tiles)")
    if args.mpp is not None and not args.mpp > 0:
        raise ConfigError(f"--mpp {args.mpp}: must be a positive number of microns per pixel")
    formats = nuclei_formats(args.formats)
    tiles, bad = find_tiles(args.inputs, out_dir)
    outcomes = [Outcome(name, "failed", reason) for name, reason in bad]
    inputs = {p.resolve() for p in tiles}
    todo, used = [], set()
    for path in tiles:
        stem = unique_stem(path.stem, used)
        refuse_overwrite(output_paths(out_dir, stem, formats).values(), inputs, out_dir)
        if args.skip_existing and output_paths(out_dir, stem, ["json"])["json"].is_file():
            outcomes.append(Outcome(path.name, "exists", stem))
            continue
        todo.append((path, stem))
    if not todo:
        return report_outcomes(outcomes, out_dir)
    predictor = NucleiPredictor(
        package,
        device=device,
        sw_batch_size=args.sw_batch_size,
        overlap=args.overlap,
        tta=args.tta,
        runtime=getattr(args, "runtime", None) or "auto",
    )
    card = package.card
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for path, stem in todo:
            try:
                tile = read_tile(path, mpp=args.mpp)
                prediction = predictor.predict(tile)
                if tile.mpp is None:
                    tile.mpp = prediction.mpp
                model = {
                    "name": card.name,
                    "version": card.version,
                    "identity": card.identity,
                    "weights_sha256": card.weights_sha256,
                    "mpp": card.mpp,
                    "mpp_source": prediction.mpp_source,
                    "tta": predictor.tta,
                    "runtime": prediction.runtime,
                    "runtime_fallback": prediction.runtime_fallback,
                    "seconds": prediction.seconds,
                }
                written = write_nuclei_outputs(tile, prediction.instances, out_dir, stem, model=model, formats=formats)
                outcomes.append(Outcome(path.name, "done", f"{prediction.count} nuclei", written))
            except (MedsegError, ValueError) as error:
                outcomes.append(Outcome(path.name, "failed", str(error)))
    finally:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return report_outcomes(outcomes, out_dir)
