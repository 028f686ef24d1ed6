"""The preview PNG a clinician reads (output format ``png``, :func:`write_preview`): sagittal,
coronal and axial slices through the segmentation with the label overlay, orientation letters,
true aspect ratio, a legend with volumes (ml), the series description, the model identity and,
unless the model is validated, "not for diagnostic use". Drawn with numpy and Pillow (no
matplotlib). The layout pieces (header, legend, letters, grey window, label colours) are shared
with the MIP preview (:mod:`medseg.mip_preview`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.io.atomic import atomic_write
from medseg.io.image import Image
from medseg.labels import Label
from medseg.package import ModelCard
from medseg.stems import stem_for

#: the three preview views: (name, through-plane world axis, screen-right (world axis, sign),
#: screen-up (world axis, sign)); world axes of RAS+ (0 = R, 1 = A, 2 = S). Radiological
#: convention: the patient's right is on the viewer's left in the coronal and axial views.
PREVIEW_VIEWS = (
    ("sagittal", 0, (1, +1), (2, +1)),
    ("coronal", 1, (0, -1), (2, +1)),
    ("axial", 2, (0, -1), (1, +1)),
)
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of RAS+ world axes
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
#: at most this many legend entries (the rest are counted; the report has every label)
LEGEND_MAX = 12


def direction_letter(vector: Sequence[float]) -> str:
    """Patient direction of a RAS+ world vector: ``R``/``L``, ``A``/``P`` or ``S``/``I`` for its
    largest component (``(-1, 0.2, 0)`` -> ``"L"``).

    Raises:
        ValueError: a zero vector.
    """
    vector = np.asarray(vector, dtype=np.float64)[:3]
    axis = int(np.argmax(np.abs(vector)))
    if vector[axis] == 0:
        raise ValueError("a zero vector has no direction")
    return _LETTERS[axis][int(vector[axis] > 0)]


def view_geometry(affine: np.ndarray) -> list[dict[str, Any]]:
    """How :func:`write_preview` cuts and orients each view of an image with this ``affine``.

    The voxel axis closest to each RAS+ world axis is found (nibabel ``io_orientation``), so any
    storage order (RAS, LPS, sagittal or coronal acquisitions) is shown the same way.

    Args:
        affine: ``(4, 4)`` voxel ``(i, j, k)`` -> RAS+ mm matrix.

    Returns:
        per view (sagittal, coronal, axial): ``name``; ``through`` (the voxel axis a slice is
        taken along); ``right`` / ``up`` (``(voxel axis, step sign)`` that moves right / up on
        screen); ``letters``: ``{"left", "right", "bottom", "top"}`` patient directions at the
        view's edges, computed from the affine's direction of those voxel steps.

    Raises:
        ValueError: a singular affine.
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("singular affine: no orientation")
    ornt = nib.orientations.io_orientation(affine)  # per voxel axis: (world axis, sign)
    voxel_of = {int(world): (axis, int(sign)) for axis, (world, sign) in enumerate(ornt)}
    views = []
    for name, through_world, (right_world, right_sign), (up_world, up_sign) in PREVIEW_VIEWS:
        right_axis, right_flip = voxel_of[right_world]
        up_axis, up_flip = voxel_of[up_world]
        right = (right_axis, right_sign * right_flip)
        up = (up_axis, up_sign * up_flip)
        to_right = affine[:3, right[0]] * right[1]
        to_top = affine[:3, up[0]] * up[1]
        views.append(
            {
                "name": name,
                "through": voxel_of[through_world][0],
                "right": right,
                "up": up,
                "letters": {
                    "left": direction_letter(-to_right),
                    "right": direction_letter(to_right),
                    "bottom": direction_letter(-to_top),
                    "top": direction_letter(to_top),
                },
            }
        )
    return views


def orientation_letters(affine: np.ndarray) -> dict[str, dict[str, str]]:
    """``{view: {"left", "right", "bottom", "top": letter}}`` for the preview's sagittal, coronal
    and axial views of an image with this ``affine`` (see :func:`view_geometry`), e.g. axial
    ``{"left": "R", "right": "L", "bottom": "P", "top": "A"}``.

    Raises:
        ValueError: a singular affine.
    """
    return {view["name"]: view["letters"] for view in view_geometry(affine)}


def preview_slices(label_map: np.ndarray, affine: np.ndarray) -> dict[str, int]:
    """Voxel index of the slice each view shows: through the centre of mass of the foreground
    (``label_map > 0``), or the volume centre when there is none; when the centre-of-mass slice
    of a view holds no foreground (e.g. two separate structures), the nearest slice that does.

    Args:
        label_map: integer ``(I, J, K)``.
        affine: its ``(4, 4)`` voxel -> RAS+ mm matrix.

    Returns:
        ``{view name: index along that view's through voxel axis}``.
    """
    mask = np.asarray(label_map) > 0
    result = {}
    for view in view_geometry(affine):
        axis = view["through"]
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
        total = counts.sum()
        if not total:
            result[view["name"]] = int(mask.shape[axis] // 2)
            continue
        centre = int(round(float((counts * np.arange(len(counts))).sum() / total)))
        if counts[centre] == 0:
            filled = np.flatnonzero(counts)
            centre = int(filled[np.argmin(np.abs(filled - centre))])
        result[view["name"]] = centre
    return result


def _plane(volume: np.ndarray, view: dict[str, Any], index: int) -> np.ndarray:
    """The 2D slice ``index`` of ``volume`` for ``view``: rows go up (row 0 at the bottom),
    columns go right."""
    through, (right, right_sign), (up, up_sign) = view["through"], view["right"], view["up"]
    plane = np.take(volume, index, axis=through)
    remaining = [a for a in range(3) if a != through]
    plane = plane.transpose(remaining.index(up), remaining.index(right))
    return plane[:: 1 if up_sign > 0 else -1, :: 1 if right_sign > 0 else -1]


def _format_ml(volume: float) -> str:
    return f"{volume:.2f} ml" if volume < 100 else f"{volume:.1f} ml" if volume < 1000 else f"{volume:.0f} ml"


def preview_annotations(
    image: Image, labels: Sequence[Label], statistics: Sequence[dict], card: ModelCard | None = None
) -> dict[str, Any]:
    """The text of a preview (also stored in the PNG's text chunks).

    Returns:
        ``series`` (the series description, else series number, else the file name), ``model``
        (``"<name> <version> · sha256 <12 hex> · trained <date>"``, or ``None`` without a card),
        ``notice`` (``"NOT FOR DIAGNOSTIC USE"`` unless ``card.clinically_validated``, else
        ``None``), and ``legend``: ``[(label, "<name>: <volume> ml")]`` in label-id order, at most
        :data:`LEGEND_MAX` entries (only labels with volume when there are more labels), plus
        ``more``: how many labels were left out.
    """
    meta = image.meta
    series = str(meta.get("series_description") or "").strip()
    if not series and meta.get("series_number") is not None:
        series = f"series {meta['series_number']}"
    if not series:
        series = stem_for(meta, dicom=bool(image.dicom_source))
    modality = str(meta.get("modality") or "").strip()
    model = None
    if card is not None:
        model = f"{card.name} {card.version}"
        if card.weights_short:
            model += f" · sha256 {card.weights_short}"
        if card.trained_at:
            model += f" · trained {card.trained_at[:10]}"
    volumes = {int(s["id"]): float(s.get("volume_ml") or 0.0) for s in statistics}
    shown = list(labels)
    if len(shown) > LEGEND_MAX:
        shown = [label for label in shown if volumes.get(label.id, 0.0) > 0]
    more = len(labels) - len(shown[:LEGEND_MAX])
    legend = [(label, f"{label.name[:40]}: {_format_ml(volumes.get(label.id, 0.0))}") for label in shown[:LEGEND_MAX]]
    validated = bool(card is not None and card.clinically_validated)
    series = series[:64]
    return {
        "series": f"{modality} · {series}" if modality else series,
        "model": model,
        "notice": None if validated else NOT_FOR_DIAGNOSTIC_USE,
        "legend": legend,
        "more": more,
    }


def preview_font(points: float, dpi: int):
    """Pillow's bundled FreeType font at ``points`` (1/72 in) for ``dpi`` pixels per inch."""
    from PIL import ImageFont

    return ImageFont.load_default(size=max(8, round(points * dpi / 72)))


def display_window(data: np.ndarray) -> tuple[float, float]:
    """Grey-level window ``(lo, hi)`` of a preview: the 0.5 and 99.5 percentiles of the finite
    intensities (from at most ~2 M voxels of a regular subsample); ``(0, 1)`` when none."""
    data = np.asarray(data)
    step = max(1, int(np.ceil((data.size / 2e6) ** (1 / data.ndim))))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def label_colours(labels: Sequence[Label], alpha: float) -> np.ndarray:
    """``(max id + 1, 4)`` float RGBA per label id (0..255 colour, ``alpha`` opacity; 0 elsewhere)."""
    colours = np.zeros((max([label.id for label in labels], default=0) + 1, 4))
    for label in labels:
        colours[label.id] = [*label.color, alpha]
    return colours


def legend_height(text: dict[str, Any]) -> float:
    """Height (inches) of :func:`draw_legend` for ``text``."""
    entries = len(text["legend"]) + (1 if text["more"] else 0)
    return 0.45 + 0.3 * max(1, -(-entries // _legend_columns(text)))


def _legend_columns(text: dict[str, Any]) -> int:
    return 3 if all(len(entry) <= 34 for _, entry in text["legend"]) else 2


def draw_legend(draw, text: dict[str, Any], top: float, width: float, margin: float, dpi: int) -> None:
    """Draw the legend (label colour, name and volume per entry of ``text["legend"]``) from
    ``top`` inches down on a canvas ``width`` inches wide."""

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    items = [(label.color, entry) for label, entry in text["legend"]]
    if text["more"]:
        items.append((None, f"+ {text['more']} more label(s), see the report"))
    if not items:
        return
    columns = _legend_columns(text)
    legend_font = preview_font(11.5, dpi)
    draw.text(
        (px(width) / 2, px(top)),
        "Segmented volume (whole series)",
        fill="black",
        font=preview_font(11, dpi),
        anchor="ma",
    )
    column_w = (width - 2 * margin) / columns
    swatch = px(0.16)
    for n, (colour, entry) in enumerate(items):
        row, col = divmod(n, columns)
        cx = px(margin + col * column_w + 0.2)
        cy = px(top + 0.45 + 0.3 * row)
        if colour is not None:
            draw.rectangle((cx, cy - swatch // 2, cx + swatch, cy + swatch // 2), fill=tuple(colour), outline="black")
        draw.text((cx + swatch + px(0.1), cy), entry, fill="black", font=legend_font, anchor="lm")


def save_preview_png(canvas, text: dict[str, Any], path: str | Path, title: str) -> Path:
    """Save a Pillow ``canvas`` as PNG atomically, with ``text``'s series, model, legend and notice
    in the ``Title``, ``Description``, ``Software`` and ``Disclaimer`` chunks."""
    from PIL.PngImagePlugin import PngInfo

    import medseg

    description = "; ".join(
        [f"Series: {text['series']}", f"Model: {text['model'] or 'unknown'}", *(entry for _, entry in text["legend"])]
    )
    info = PngInfo()
    info.add_text("Title", f"{title}: {text['series']}")
    info.add_text("Description", description)
    info.add_text("Software", f"medseg {medseg.__version__}")
    if text["notice"]:
        info.add_text("Disclaimer", text["notice"].capitalize())
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info, compress_level=1))


def draw_letters(draw, letters: dict[str, str], box: tuple[int, int, int, int], font, dpi: int) -> None:
    """Orientation letters (:func:`orientation_letters`) at the edges of a panel ``box``
    ``(left, upper, right, lower)`` pixels."""
    left, upper, right, lower = box
    middle, gap = (left + right) / 2, round(0.05 * dpi)
    style = dict(fill=(26, 79, 138), font=font, stroke_width=1, stroke_fill=(26, 79, 138))
    draw.text((left - gap, (upper + lower) / 2), letters["left"], anchor="rm", **style)
    draw.text((right + gap, (upper + lower) / 2), letters["right"], anchor="lm", **style)
    draw.text((middle, upper - round(0.03 * dpi)), letters["top"], anchor="md", **style)
    draw.text((middle, lower + round(0.03 * dpi)), letters["bottom"], anchor="ma", **style)


def header_height(text: dict[str, Any]) -> float:
    """Height (inches) of :func:`draw_header` for ``text`` (:func:`preview_annotations`)."""
    return (0.42 if text["notice"] else 0.0) + (0.95 if text["model"] else 0.65)


def draw_header(draw, text: dict[str, Any], width: float, margin: float, dpi: int) -> float:
    """Draw a preview's header at the top of a canvas ``width`` inches wide: the red "not for
    diagnostic use" banner (when ``text["notice"]``), the series and the model line, the medseg
    version. Returns its height in inches (:func:`header_height`)."""
    import medseg

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    top = 0.0
    if text["notice"]:
        canvas_width = px(width)
        draw.rectangle((0, 0, canvas_width, px(0.42)), fill=(176, 0, 32))
        draw.text(
            (canvas_width / 2, px(0.21)),
            f"{text['notice']}  ·  research output, verify against the source images",
            fill="white",
            font=preview_font(13, dpi),
            anchor="mm",
            stroke_width=1,
            stroke_fill="white",
        )
        top = 0.42
    draw.text(
        (px(margin), px(top + 0.32)),
        f"Series: {text['series']}",
        fill="black",
        font=preview_font(14, dpi),
        anchor="lm",
        stroke_width=1,
        stroke_fill="black",
    )
    if text["model"]:
        draw.text(
            (px(margin), px(top + 0.62)),
            f"Model: {text['model']}",
            fill="black",
            font=preview_font(11.5, dpi),
            anchor="lm",
        )
    draw.text(
        (px(width - margin), px(top + 0.32)),
        f"medseg {medseg.__version__}",
        fill=(85, 85, 85),
        font=preview_font(10, dpi),
        anchor="rm",
    )
    return header_height(text)


def render_view(
    data: np.ndarray,
    seg: np.ndarray,
    view: dict[str, Any],
    index: int,
    window: tuple[float, float],
    colours: np.ndarray,
) -> np.ndarray:
    """One preview panel as pixels: slice ``index`` of ``data`` for ``view`` (:func:`view_geometry`)
    in grey, the label overlay blended in.

    Args:
        data: intensities ``(I, J, K)``.
        seg: integer label map ``(I, J, K)``.
        view: one entry of :func:`view_geometry`.
        index: the slice along ``view["through"]``.
        window: ``(lo, hi)`` intensities mapped to black and white.
        colours: ``(L, 4)`` float RGBA (0..255 colour, 0..1 opacity) per label id; ids beyond
            ``L`` are not drawn.

    Returns:
        ``(rows, cols, 3)`` uint8, top row first (screen up = the view's ``up`` direction), one
        pixel per voxel.
    """
    lo, hi = window
    plane = _plane(data, view, index)[::-1].astype(np.float32)
    grey = np.clip((np.nan_to_num(plane, nan=lo) - lo) * (255.0 / (hi - lo)), 0, 255)
    labels = _plane(seg, view, index)[::-1].astype(np.int64)
    labels = np.where((labels >= 0) & (labels < len(colours)), labels, 0)
    rgba = colours[labels]
    alpha = rgba[..., 3:]
    rgb = grey[..., None] * (1 - alpha) + rgba[..., :3] * alpha
    return np.rint(rgb).astype(np.uint8)


def preview_inputs(
    label_map: np.ndarray,
    image: Image,
    labels: Sequence[Label],
    statistics: Sequence[dict] | None,
    card: ModelCard | None,
    what: str,
) -> tuple[np.ndarray, np.ndarray, list[Label], dict[str, Any]]:
    """What every preview starts from: ``(seg, data, labels, text)`` — the label map and the
    image's first volume ``(I, J, K)`` (a view), the labels sorted by id, and the annotations
    (:func:`preview_annotations`; statistics computed from ``label_map`` when ``None``).

    Raises:
        InputShapeError: ``label_map`` is not ``image``'s 3D grid (``what`` names the preview).
    """
    from medseg.errors import InputShapeError
    from medseg.inference.statistics import label_statistics

    seg = np.asarray(label_map)
    data = np.asarray(image.array if image.array.ndim == 3 else image.array[..., 0])
    if seg.ndim != 3 or seg.shape != data.shape:
        raise InputShapeError(f"{what}: label map shape {seg.shape} is not the image grid {data.shape}")
    labels = sorted(labels, key=lambda label: label.id)
    if statistics is None:
        statistics = label_statistics(seg, image.affine, labels)
    return seg, data, labels, preview_annotations(image, labels, statistics, card)


def write_preview(
    label_map: np.ndarray,
    image: Image,
    labels: Sequence[Label],
    path: str | Path,
    alpha: float = 0.45,
    *,
    statistics: Sequence[dict] | None = None,
    card: ModelCard | None = None,
    dpi: int = 100,
) -> Path:
    """A PNG a clinician can read: sagittal, coronal and axial slices of ``image`` through the
    segmentation's centre of mass (:func:`preview_slices`) with the label overlay, atomically.

    Each view is shown in RAS+ (radiological convention: the patient's right on the viewer's
    left in coronal and axial) with its true aspect ratio from the voxel spacing and the
    orientation letters (:func:`orientation_letters`) at its edges; its title gives the slice's
    world position (mm). Above: the series description and the model (name, version, short
    weights hash, training date) and, unless the card is ``clinically_validated``, a red
    "NOT FOR DIAGNOSTIC USE" banner. Below: a legend with each label's colour, name and volume
    (ml). The same text is stored in the PNG's ``Title``, ``Description`` and ``Disclaimer``
    chunks. ``12 * dpi`` pixels wide (1200 at the default). Panels are numpy arrays
    (:func:`render_view`) scaled with nearest-neighbour sampling and composed with Pillow.

    Args:
        label_map: integer ``(I, J, K)`` on ``image``'s grid.
        image: the input; ``array`` ``(I, J, K)`` or ``(I, J, K, T)`` (the first volume is shown).
        labels: the card's labels (colours and names).
        path: the ``.png`` to write.
        alpha: overlay opacity, 0..1.
        statistics: per-label ``id`` and ``volume_ml`` (``Prediction.statistics``); computed from
            ``label_map`` when ``None``.
        card: the model card (identity, ``clinically_validated``); without it no model line is
            drawn and the notice is shown.
        dpi: pixels per inch of the layout (text sizes are in points).

    Raises:
        InputShapeError: ``label_map`` is not ``image``'s 3D grid.
        ValueError: a singular affine.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    seg, data, labels, text = preview_inputs(label_map, image, labels, statistics, card, "preview")
    views = view_geometry(image.affine)
    slices = preview_slices(seg, image.affine)
    spacing = np.asarray(image.spacing)
    lo, hi = display_window(data)
    colours = label_colours(labels, alpha)

    # layout in inches (as before), drawn at dpi pixels per inch
    width, margin, gap = 12.0, 0.45, 0.75
    mm = [
        (data.shape[v["right"][0]] * spacing[v["right"][0]], data.shape[v["up"][0]] * spacing[v["up"][0]])
        for v in views
    ]
    scale = min(3.8 / max(h for _, h in mm), (width - 2 * margin - 2 * gap) / sum(w for w, _ in mm))
    for _ in range(20):  # keep every panel at least 1.4 in wide (titles), all within the width
        boxes = [max(w * scale, 1.4) for w, _ in mm]
        if sum(boxes) <= width - 2 * margin - 2 * gap + 1e-6:
            break
        scale *= 0.95
    panel_h = max(max(h * scale, 0.6) for _, h in mm)
    title_h, letter_h = 0.62, 0.34
    height = header_height(text) + title_h + panel_h + letter_h + legend_height(text) + 0.15

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    canvas = PILImage.new("RGB", (px(width), px(height)), "white")
    draw = ImageDraw.Draw(canvas)
    top = draw_header(draw, text, width, margin, dpi)
    band_top = top + title_h
    title_font, letter_font = preview_font(12, dpi), preview_font(13, dpi)
    x = margin + (width - 2 * margin - 2 * gap - sum(boxes)) / 2
    for view, box_w, (w_mm, h_mm) in zip(views, boxes, mm):
        index = slices[view["name"]]
        pixels = render_view(data, seg, view, index, (float(lo), float(hi)), colours)
        size = (max(1, px(w_mm * scale)), max(1, px(h_mm * scale)))
        panel = PILImage.fromarray(pixels).resize(size, PILImage.Resampling.NEAREST)
        left = px(x + box_w / 2) - size[0] // 2
        upper = px(band_top + panel_h / 2) - size[1] // 2
        canvas.paste(panel, (left, upper))
        right, lower = left + size[0], upper + size[1]
        centre = np.asarray(data.shape, dtype=np.float64) / 2 - 0.5
        centre[view["through"]] = index
        world = image.affine[:3, :3] @ centre + image.affine[:3, 3]
        axis_world = int(np.argmax(np.abs(image.affine[:3, view["through"]])))
        position = world[axis_world]
        where = f"{_LETTERS[axis_world][int(position >= 0)]} {abs(position):.1f} mm"
        middle = (left + right) / 2
        draw.text(
            (middle, upper - px(0.3)),
            f"{view['name'].capitalize()}  ({where})",
            fill="black",
            font=title_font,
            anchor="md",
        )
        draw_letters(draw, view["letters"], (left, upper, right, lower), letter_font, dpi)
        x += box_w + gap
    draw_legend(draw, text, band_top + panel_h + letter_h, width, margin, dpi)
    return save_preview_png(canvas, text, path, title="medseg preview")
