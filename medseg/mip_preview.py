"""The MIP preview (output format ``mip``, ``<stem>.mip.png``): maximum intensity projections of the
image and of the label map side by side, the check a vessel reader makes first — a vessel cut in
the label map shows as a gap in its projection where the image's projection runs on (SPOCKMIP,
Radhakrishna et al. 2024, trains on exactly these projections).

Both panels project along the through-plane voxel axis of the axial view (:func:`medseg.preview.view_geometry`:
the axis closest to the world S-I axis; for a microscopy TIFF stack, the stack axis z) and are
shown as the axial view is, with orientation letters, true aspect ratio from the voxel spacing,
the preview's header (series, model, "not for diagnostic use") and legend (label, volume in ml).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io.image import Image
from medseg.labels import Label
from medseg.package import ModelCard
from medseg.preview import (
    display_window,
    draw_header,
    draw_legend,
    draw_letters,
    header_height,
    label_colours,
    legend_height,
    preview_font,
    preview_inputs,
    render_view,
    save_preview_png,
    view_geometry,
)

__all__ = ["write_mip_preview", "projections"]


def projections(image: np.ndarray, label_map: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximum intensity projections of ``image`` and ``label_map`` (both ``(I, J, K)``) along voxel
    ``axis``, kept as one-voxel-thick volumes (the axis has length 1), so the preview's views cut
    them like any volume. Non-finite intensities are ignored (NaN only where a ray has no finite
    voxel)."""
    data = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(data)
    projected = np.where(finite, data, -np.inf).max(axis=axis, keepdims=True)
    projected[~finite.any(axis=axis, keepdims=True)] = np.nan
    return projected, np.asarray(label_map).max(axis=axis, keepdims=True)


def write_mip_preview(
    label_map: np.ndarray,
    image: Image,
    labels: Sequence[Label],
    path: str | Path,
    *,
    statistics: Sequence[dict] | None = None,
    card: ModelCard | None = None,
    dpi: int = 100,
) -> Path:
    """Write ``<stem>.mip.png``: the image's and the label map's maximum intensity projections side
    by side (module docstring), atomically, ``12 * dpi`` pixels wide.

    Args:
        label_map: integer ``(I, J, K)`` on ``image``'s grid.
        image: the input; ``array`` ``(I, J, K)`` or ``(I, J, K, C)`` (the first channel is shown).
        labels: the card's labels (colours, names).
        path: the ``.png`` to write.
        statistics: per-label ``id`` and ``volume_ml`` (``Prediction.statistics``); computed from
            ``label_map`` when ``None``.
        card: the model card (identity, ``clinically_validated``).
        dpi: pixels per inch of the layout.

    Raises:
        InputShapeError: ``label_map`` is not ``image``'s 3D grid.
        ValueError: a singular affine.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    seg, data, labels, text = preview_inputs(label_map, image, labels, statistics, card, "MIP preview")
    view = next(v for v in view_geometry(image.affine) if v["name"] == "axial")
    image_mip, label_mip = projections(data, seg, view["through"])
    window = display_window(image_mip)
    spacing = np.asarray(image.spacing)
    w_mm = data.shape[view["right"][0]] * spacing[view["right"][0]]
    h_mm = data.shape[view["up"][0]] * spacing[view["up"][0]]

    width, margin, gap, title_h, letter_h = 12.0, 0.45, 0.75, 0.62, 0.34
    scale = min(5.0 / h_mm, (width - 2 * margin - gap) / 2 / w_mm)
    panel_w, panel_h = w_mm * scale, h_mm * scale
    height = header_height(text) + title_h + panel_h + letter_h + legend_height(text) + 0.15

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    canvas = PILImage.new("RGB", (px(width), px(height)), "white")
    draw = ImageDraw.Draw(canvas)
    top = draw_header(draw, text, width, margin, dpi) + title_h
    size = (max(1, px(panel_w)), max(1, px(panel_h)))
    no_labels, black = np.zeros_like(label_mip), np.zeros_like(image_mip)
    panels = [  # the axial view's through-plane axis is the one closest to world S-I
        (
            "Image, maximum intensity projection (S-I)",
            render_view(image_mip, no_labels, view, 0, window, label_colours(labels, 0)),
        ),
        (
            "Label map, maximum intensity projection",
            render_view(black, label_mip, view, 0, (0, 1), label_colours(labels, 1)),
        ),
    ]
    x = (width - 2 * panel_w - gap) / 2
    for title, pixels in panels:
        panel = PILImage.fromarray(pixels).resize(size, PILImage.Resampling.NEAREST)
        left, upper = px(x), px(top)
        canvas.paste(panel, (left, upper))
        draw.text((left + size[0] / 2, upper - px(0.3)), title, fill="black", font=preview_font(12, dpi), anchor="md")
        draw_letters(draw, view["letters"], (left, upper, left + size[0], upper + size[1]), preview_font(13, dpi), dpi)
        x += panel_w + gap
    draw_legend(draw, text, top + panel_h + letter_h, width, margin, dpi)
    return save_preview_png(canvas, text, path, title="medseg MIP preview")
