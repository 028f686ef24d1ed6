"""What a nuclei prediction leaves on disk, written by one function: :func:`write_nuclei_outputs`.

From a finished instance map (``(H, W)`` ids on the tile's pixel grid, 0 background, one id per
nucleus), in ``out_dir``, named ``<stem>`` + suffix:

- ``<stem>.instances.tif`` — the instance map, ``uint16`` (``uint32`` when an id exceeds 65535),
  zlib-compressed, one page ``(H, W)``; with the pixel size in the resolution tags (pixels per
  centimetre, ``ResolutionUnit`` centimetre) when the tile's ``mpp`` is known;
- ``<stem>.geojson`` — a GeoJSON ``FeatureCollection`` for QuPath (*File > Import objects*): one
  ``Feature`` per nucleus (see :func:`nucleus_features`);
- ``<stem>.overlay.png`` — the RGB tile with every nucleus' inner boundary pixels
  (``skimage.segmentation.find_boundaries(mode="inner")``) painted :data:`OVERLAY_COLOR`;
- ``<stem>.json`` — the report (see :func:`build_nuclei_report`).

Every file is written under a temporary name and renamed (:func:`medseg.io.atomic.atomic_write`);
the report is written last, so its presence marks a complete set. An output path that is the
input tile's own file is refused before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.io.atomic import atomic_write
from medseg.io.tile import Tile

SUFFIXES = {
    "tiff": ".instances.tif",
    "geojson": ".geojson",
    "png": ".overlay.png",
    "json": ".json",
}
FORMATS = tuple(SUFFIXES)
#: colour of the boundary pixels in the overlay, and of the QuPath "Nucleus" class
OVERLAY_COLOR = (0, 255, 0)
CLASS_NAME = "Nucleus"
#: a pixel whose three channels are all at least this bright is background (glass), not tissue
BACKGROUND_MIN = 220

DEFINITIONS = {
    "area_px": "pixels of the nucleus' id in the instance map",
    "area_um2": "area_px * mpp**2 (um^2); null when the pixel size is unknown",
    "image_area_mm2": "width * height * mpp**2 / 1e6",
    "density_per_mm2": "count / image_area_mm2 (nuclei per mm^2 of the whole tile)",
    "tissue_fraction": f"share of pixels that are not background (background: R, G and B all >= {BACKGROUND_MIN}, "
    "i.e. bright glass in a brightfield tile; for dark-background fluorescence nearly all pixels count as tissue)",
    "tissue_area_mm2": "tissue_fraction * image_area_mm2",
    "density_per_tissue_mm2": "count / tissue_area_mm2",
}


def output_paths(out_dir: str | Path, stem: str, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """``{format: path}`` for ``stem`` in ``out_dir``.

    Raises:
        ValueError: an unknown format.
    """
    unknown = [f for f in formats if f not in SUFFIXES]
    if unknown:
        raise ValueError(f"unknown nuclei output format(s) {unknown}; choose from {list(FORMATS)}")
    return {fmt: Path(out_dir) / f"{stem}{SUFFIXES[fmt]}" for fmt in formats}


def _check_instances(tile: Tile, instances: np.ndarray) -> np.ndarray:
    instances = np.asarray(instances)
    if instances.shape != tuple(tile.shape[:2]):
        raise ValueError(f"instance map shape {instances.shape} does not match the tile's {tuple(tile.shape[:2])}")
    if instances.dtype == bool:
        return instances.astype(np.uint8)
    if instances.dtype.kind not in "iu":
        raise ValueError(f"instance map must hold integer ids, got {instances.dtype}")
    if instances.size and instances.min() < 0:
        raise ValueError("instance map holds negative ids")
    if instances.size and int(instances.max()) > np.iinfo(np.uint32).max:
        raise ValueError("instance ids must fit in 32 bits")
    return instances


def _instance_table(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, areas_px, labels)``: the ids present (ascending, no 0), their pixel counts, and a
    label array with consecutive ids 1..N in the same order (``instances`` itself when dense)."""
    if not instances.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), instances
    top = int(instances.max())
    if top <= 4 * instances.size:  # dense ids: one bincount pass, no sort
        counts = np.bincount(instances.ravel(), minlength=top + 1)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        if len(ids) == top:
            return ids, counts[ids], instances
        lookup = np.zeros(top + 1, np.int64)
        lookup[ids] = np.arange(1, len(ids) + 1)
        return ids, counts[ids], lookup[instances]
    values, inverse, counts = np.unique(instances, return_inverse=True, return_counts=True)
    keep = values > 0
    rank = np.cumsum(keep) * keep  # 0 stays 0, the k-th id present becomes k
    return values[keep], counts[keep], rank[inverse.reshape(instances.shape)]


def _drop_collinear(contour: np.ndarray) -> np.ndarray:
    """The closed ``contour`` (first point = last) without the vertices where it runs straight on.

    Lossless: the polygon is the same set of points, only the vertices in the middle of straight
    runs are removed (marching squares on a binary mask puts one every half pixel).
    """
    ring = contour[:-1] if len(contour) > 1 and np.array_equal(contour[0], contour[-1]) else contour
    if len(ring) < 4:
        return contour
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    turn = ~np.isclose(cross, 0.0) | (np.einsum("ij,ij->i", before, after) < 0)
    if turn.sum() < 3:
        return contour
    kept = ring[turn]
    return np.vstack([kept, kept[:1]])


def _outline(mask: np.ndarray, row0: int, col0: int) -> list[list[float]] | None:
    """Closed outer ring ``[[x, y], ...]`` of the (cropped) binary ``mask`` in image coordinates."""
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(np.float32)
    contours = find_contours(padded, 0.5, fully_connected="high")
    if not contours:
        return None
    contour = _drop_collinear(max(contours, key=len))  # outer boundary; holes and fragments are shorter
    # padded (row, col) -> image pixel centres -> QuPath's continuous coordinates (pixel corner = integer)
    y = contour[:, 0] + (row0 - 1 + 0.5)
    x = contour[:, 1] + (col0 - 1 + 0.5)
    if x[0] != x[-1] or y[0] != y[-1]:
        x, y = np.append(x, x[0]), np.append(y, y[0])
    if len(x) < 4:
        return None
    if np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) < 0:  # counter-clockwise in (x, y) (RFC 7946)
        x, y = x[::-1], y[::-1]
    return [[round(float(a), 3), round(float(b), 3)] for a, b in zip(x, y)]


def nucleus_features(instances: np.ndarray, mpp: float | None) -> list[dict[str, Any]]:
    """One GeoJSON ``Feature`` per nucleus of ``instances`` (``(H, W)`` ids), for QuPath.

    Geometry: a ``Polygon`` with one closed ring (first point = last), the outer contour of the
    nucleus traced by ``skimage.measure.find_contours`` at level 0.5 on its padded binary mask
    (8-connected foreground, so a nucleus joined only diagonally is one ring; the longest contour
    is kept: holes and disconnected fragments of the same id are left out of the outline, though
    not out of ``area_px``), with the vertices in the middle of straight runs removed (lossless;
    ``skimage.measure.approximate_polygon`` would cost ~1 s per 500 nuclei in Python loops),
    oriented counter-clockwise in ``(x, y)``. Marching squares never makes a ring cross itself.

    Coordinates are QuPath's (and any image viewer's) continuous pixel coordinates of the input
    image: ``x`` along the columns, ``y`` along the rows, pixel ``(row r, column c)`` covering
    ``[c, c + 1) x [r, r + 1)``, so its centre is ``(c + 0.5, r + 0.5)`` and the ring runs on
    the pixel edges (corners cut by half a pixel). Subtract 0.5 for pixel-centre tools such as
    ``skimage.draw.polygon``.

    Properties: ``objectType`` ``"detection"``, ``classification`` ``{"name": "Nucleus", "color":
    [r, g, b]}``, ``measurements`` ``{"area_px"[, "area_um2"]}`` (``area_um2`` only when ``mpp`` is
    known: QuPath measurements are numbers) and ``instance_id`` (the id in the instance map).
    ``id`` is a random UUID string, as QuPath writes.
    """
    from scipy.ndimage import find_objects

    ids, areas, labels = _instance_table(np.asarray(instances))
    if not len(ids):
        return []
    slices = find_objects(labels if labels.dtype.kind == "i" else labels.astype(np.int64), max_label=len(ids))
    classification = {"name": CLASS_NAME, "color": list(OVERLAY_COLOR)}
    features = []
    for k, (nucleus_id, area, box) in enumerate(zip(ids, areas, slices), start=1):
        if box is None:
            continue
        ring = _outline(labels[box] == k, box[0].start, box[1].start)
        if ring is None:
            continue
        measurements: dict[str, float] = {"area_px": int(area)}
        if mpp is not None:
            measurements["area_um2"] = round(float(area) * mpp * mpp, 4)
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": classification,
                    "measurements": measurements,
                    "instance_id": int(nucleus_id),
                },
            }
        )
    return features


def _stats(values: np.ndarray, digits: int) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "median": None, "total": 0}
    return {
        "mean": round(float(np.mean(values)), digits),
        "median": round(float(np.median(values)), digits),
        "total": round(float(np.sum(values)), digits),
    }


def build_nuclei_report(
    tile: Tile, areas_px: np.ndarray, model: dict | None = None, outputs: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The JSON report of one tile's nuclei (definitions in :data:`DEFINITIONS`, also in the report).

    ``image``: ``name``, ``width``, ``height`` (pixels), ``mpp`` (um/px or null), ``area_mm2``.
    ``nuclei``: ``count`` (always present, 0 when none were found), ``area_px`` and ``area_um2``
    (``mean``, ``median``, ``total``; means and medians null when the count is 0; ``area_um2``
    null when the pixel size is unknown), ``density_per_mm2``, ``tissue_fraction``,
    ``tissue_area_mm2``, ``density_per_tissue_mm2`` (the mm fields null without ``mpp``, or when
    there is no tissue). ``warnings`` says so when no nuclei were found or the pixel size is
    unknown. ``model`` is the caller's dict as given; ``outputs`` maps format -> file name.
    """
    import medseg

    height, width = tile.shape[:2]
    mpp = tile.mpp
    count = int(len(areas_px))
    background = np.all(tile.array >= BACKGROUND_MIN, axis=2)
    tissue_fraction = float(1.0 - background.mean()) if background.size else 0.0
    image_mm2 = width * height * mpp * mpp / 1e6 if mpp is not None else None
    tissue_mm2 = image_mm2 * tissue_fraction if image_mm2 is not None else None
    nuclei: dict[str, Any] = {
        "count": count,
        "area_px": _stats(np.asarray(areas_px, np.float64), 2),
        "area_um2": _stats(np.asarray(areas_px, np.float64) * mpp * mpp, 3) if mpp is not None else None,
        "density_per_mm2": round(count / image_mm2, 2) if image_mm2 else None,
        "tissue_fraction": round(tissue_fraction, 4),
        "tissue_area_mm2": round(tissue_mm2, 6) if tissue_mm2 is not None else None,
        "density_per_tissue_mm2": round(count / tissue_mm2, 2) if tissue_mm2 else None,
    }
    warnings = []
    if count == 0:
        warnings.append("no nuclei were found in this tile (count 0)")
    if mpp is None:
        warnings.append("pixel size unknown: areas in um^2 and densities per mm^2 are not given (pass --mpp)")
    return {
        "medseg_version": medseg.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "image": {
            "name": tile.name,
            "width": int(width),
            "height": int(height),
            "mpp": mpp,
            "area_mm2": round(image_mm2, 6) if image_mm2 is not None else None,
        },
        "nuclei": nuclei,
        "warnings": warnings,
        "definitions": DEFINITIONS,
        "model": model,
        "outputs": {fmt: path.name for fmt, path in (outputs or {}).items()},
    }


def write_nuclei_outputs(
    tile: Tile,
    instances: np.ndarray,
    out_dir: str | Path,
    stem: str,
    model: dict | None = None,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Path]:
    """Write the instance TIFF, QuPath GeoJSON, overlay PNG and JSON report of one tile.

    Args:
        tile: the input tile (``array`` ``(H, W, 3)`` uint8, ``mpp`` um/px or ``None``).
        instances: ``(H, W)`` integer instance map on the tile's pixel grid, 0 background; ids
            need not be consecutive. An all-zero map is fine: the report says count 0.
        out_dir: created if missing.
        stem: file-name stem, e.g. the tile's name without its suffix.
        model: identification of the model (name, version, weights sha256...), copied into the
            report as given (must be JSON-serialisable; other values are written as strings).
        formats: any of :data:`FORMATS`; the report is always written last.

    Returns:
        ``{format: path}`` of the files written.

    Raises:
        ValueError: ``instances.shape != tile.shape[:2]``, non-integer or negative ids, or an
            unknown format.
        ConfigError: an output path is the input tile's own file.
    """
    instances = _check_instances(tile, instances)
    paths = output_paths(out_dir, stem, formats)
    if tile.path is not None:
        source = Path(tile.path).resolve()
        for path in paths.values():
            if path.resolve() == source:
                raise ConfigError(f"{path.name}: this output would overwrite the input tile; choose another output")
    mpp = tile.mpp
    _, areas_px, _ = _instance_table(instances)
    written: dict[str, Path] = {}

    if "tiff" in paths:
        import tifffile

        dtype = np.uint16 if not instances.size or int(instances.max()) <= 65535 else np.uint32
        data = np.ascontiguousarray(instances.astype(dtype, copy=False))
        extra: dict[str, Any] = {}
        if mpp is not None:
            extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}

        def write_tiff(tmp: Path) -> None:
            tifffile.imwrite(str(tmp), data, photometric="minisblack", compression="zlib", **extra)

        written["tiff"] = atomic_write(paths["tiff"], write_tiff)

    if "geojson" in paths:
        collection = {"type": "FeatureCollection", "features": nucleus_features(instances, mpp)}
        text = json.dumps(collection, separators=(",", ":"))
        written["geojson"] = atomic_write(paths["geojson"], lambda tmp: tmp.write_text(text, encoding="utf-8"))

    if "png" in paths:
        from PIL import Image as PILImage
        from skimage.segmentation import find_boundaries

        overlay = np.array(tile.array, dtype=np.uint8, copy=True)
        overlay[find_boundaries(instances, mode="inner")] = OVERLAY_COLOR

        def write_png(tmp: Path) -> None:
            PILImage.fromarray(overlay).save(tmp, format="PNG", compress_level=1)

        written["png"] = atomic_write(paths["png"], write_png)

    if "json" in paths:
        report = build_nuclei_report(tile, areas_px, model, {**written, "json": paths["json"]})
        text = json.dumps(report, indent=2, default=str)
        written["json"] = atomic_write(paths["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return written
