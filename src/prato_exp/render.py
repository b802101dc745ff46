"""Pictures of a prediction for people: the mask over the image, the retention map, the box.

Pure numpy + PIL (no matplotlib), so the CLI and the browser page draw the same pictures quickly.
Images are shown min-max scaled for display only; this scaling is unrelated to the network's input.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASS_COLOURS = np.array(
    [(214, 39, 40), (44, 160, 44), (31, 119, 180), (255, 127, 14), (148, 103, 189), (140, 86, 75)],
    dtype=np.float64,
)
"""Colours of classes 1, 2, ... (background is left uncoloured); they repeat after six classes."""
BOX_COLOUR = (255, 221, 0)
KEPT_COLOUR = np.array((255, 200, 0), dtype=np.float64)
MIN_SIDE = 256
"""Small images are enlarged (nearest neighbour, whole factors) to at least this side for display."""


def display_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 for showing ``image`` (``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, any range).

    8-bit images are shown as stored; others are min-max scaled over the image.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3:
        array = array[..., :3]
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.dtype != np.uint8:
        data = array.astype(np.float64)
        lo, hi = float(data.min()), float(data.max())
        array = np.zeros(data.shape, np.uint8) if hi <= lo else np.round((data - lo) / (hi - lo) * 255)
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array)


def _zoom(image_hw: tuple[int, int]) -> int:
    return max(1, math.ceil(MIN_SIDE / max(image_hw)))


def _enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def _draw_box(picture: Image.Image, box: np.ndarray | None, factor: int) -> Image.Image:
    if box is None or not np.isfinite(box).all():
        return picture
    x0, y0, x1, y1 = (float(v) * factor for v in box)
    width = max(2, factor // 2)
    ImageDraw.Draw(picture).rectangle(
        [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX_COLOUR, width=width
    )
    return picture


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, box: np.ndarray | None = None, alpha: float = 0.45
) -> Image.Image:
    """The image with each foreground class tinted in its colour and the box drawn.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.
        mask: ``(H, W)`` class indices.
        box: ``(4,)`` pixel edges ``(x0, y0, x1, y1)`` or None.
    """
    rgb = display_rgb(image).astype(np.float64)
    fg = mask > 0
    colours = CLASS_COLOURS[(np.maximum(mask, 1) - 1) % len(CLASS_COLOURS)]
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
    factor = _zoom(mask.shape)
    picture = Image.fromarray(_enlarge(np.round(rgb).astype(np.uint8), factor))
    return _draw_box(picture, box, factor)


def retention_map(image: np.ndarray, keep_grid: np.ndarray, box: np.ndarray | None = None) -> Image.Image:
    """The image with kept tokens tinted gold and pruned ones darkened (paper Fig. 7), and the box.

    ``keep_grid`` ``(h, w)`` bool lives on the network's token grid; grid cell ``(r, c)`` covers the
    original pixels ``[c W / w, (c + 1) W / w) x [r H / h, (r + 1) H / h)`` (the resize is per axis).
    """
    if keep_grid.size == 0:  # a network without a token grid (the CNN reference): nothing to show
        return mask_overlay(image, np.zeros(display_rgb(image).shape[:2], dtype=np.int64), box)
    rgb = display_rgb(image).astype(np.float64)
    height, width = rgb.shape[:2]
    gh, gw = keep_grid.shape
    rows = np.minimum(np.arange(height) * gh // height, gh - 1)
    cols = np.minimum(np.arange(width) * gw // width, gw - 1)
    kept = keep_grid[rows[:, None], cols[None, :]]
    rgb[kept] = 0.65 * rgb[kept] + 0.35 * KEPT_COLOUR
    rgb[~kept] *= 0.35
    factor = _zoom((height, width))
    big = _enlarge(np.round(rgb).astype(np.uint8), factor)
    picture = Image.fromarray(big)
    draw = ImageDraw.Draw(picture)
    for r in range(1, gh):  # grid lines between token cells
        y = round(r * height / gh * factor)
        draw.line([(0, y), (width * factor, y)], fill=(0, 0, 0), width=1)
    for c in range(1, gw):
        x = round(c * width / gw * factor)
        draw.line([(x, 0), (x, height * factor)], fill=(0, 0, 0), width=1)
    return _draw_box(picture, box, factor)


def overlay_panel(
    image: np.ndarray, mask: np.ndarray, keep_grid: np.ndarray, box: np.ndarray | None, caption: str
) -> Image.Image:
    """Three pictures side by side (image with box, mask, kept tokens) above a one-line caption."""
    plain = _draw_box(
        Image.fromarray(_enlarge(display_rgb(image), _zoom(mask.shape))), box, _zoom(mask.shape)
    )
    parts = [plain, mask_overlay(image, mask, box), retention_map(image, keep_grid, box)]
    gap, text_h = 6, 22
    width = sum(p.width for p in parts) + gap * (len(parts) - 1)
    height = max(p.height for p in parts)
    panel = Image.new("RGB", (width, height + text_h), (255, 255, 255))
    x = 0
    for part in parts:
        panel.paste(part, (x, text_h))
        x += part.width + gap
    ImageDraw.Draw(panel).text((4, 4), caption, fill=(0, 0, 0), font=ImageFont.load_default())
    return panel
