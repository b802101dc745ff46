"""Box prompts derived from the ground truth (spec sections 1 and 2).

Boxes are ``(x0, y0, x1, y1)`` float pixel edges in input-image coordinates, the convention of
``roi_align(aligned=True)``: pixel ``i`` covers ``[i, i + 1)``, so the tight box of a mask is
``(min col, min row, max col + 1, max row + 1)``. Boxes are always taken from the final, augmented
mask; a box is never itself transformed.

Evaluation boxes (the Table VI conditions) draw every random choice from :func:`prompt_rng`, seeded by
``prompt_seed`` and a CRC-32 of the image id and slice index, so a condition gives the same boxes in
every run and on every machine. Training jitter draws from the training generator instead.

Every prompted result is an oracle-box result: the box comes from the ground truth.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

Condition = Literal["tight", "oversized", "partial", "misleading"]
EmptyPolicy = Literal["whole_image", "no_pruning"]
CONDITIONS: tuple[str, ...] = get_args(Condition)
EMPTY_POLICIES: tuple[str, ...] = get_args(EmptyPolicy)

OVERSIZE_RANGE = (0.1, 0.3)
PARTIAL_AREA_RANGE = (0.4, 0.7)
MISLEADING_MAX_IOU = 0.1

MaskLike = np.ndarray | torch.Tensor


def _as_mask(mask: MaskLike) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask


def tight_box(mask: MaskLike) -> np.ndarray | None:
    """Tightest box around all foreground (``> 0``) pixels, or None for an empty mask."""
    fg = _as_mask(mask) > 0
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def whole_image_box(image_hw: tuple[int, int]) -> np.ndarray:
    """The box ``(0, 0, W, H)`` covering the whole image."""
    h, w = image_hw
    return np.array([0.0, 0.0, float(w), float(h)], dtype=np.float32)


def prompt_rng(prompt_seed: int, image_id: str, slice_index: int = 0) -> np.random.Generator:
    """Generator for one slice's evaluation prompt, stable across runs, processes and machines."""
    if isinstance(prompt_seed, bool) or not isinstance(prompt_seed, (int, np.integer)) or prompt_seed < 0:
        raise ValueError(f"prompt_seed must be a non-negative int, got {prompt_seed!r}")
    key = zlib.crc32(f"{image_id}:{int(slice_index)}".encode())
    return np.random.default_rng([int(prompt_seed), key])


def _oversized(box: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    f_left, f_top, f_right, f_bottom = rng.uniform(*OVERSIZE_RANGE, size=4)
    h, w = image_hw
    out = [
        max(0.0, x0 - f_left * bw),
        max(0.0, y0 - f_top * bh),
        min(float(w), x1 + f_right * bw),
        min(float(h), y1 + f_bottom * bh),
    ]
    return np.array(out, dtype=np.float32)


def _partial(box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    side = math.sqrt(rng.uniform(*PARTIAL_AREA_RANGE))
    pw, ph = bw * side, bh * side
    px = x0 + rng.uniform() * (bw - pw)
    py = y0 + rng.uniform() * (bh - ph)
    return np.array([px, py, px + pw, py + ph], dtype=np.float32)


def _misleading(box: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Same-size box at a uniformly drawn integer offset with IoU < 0.1 to ``box``.

    Candidate positions are the integer top-left corners that keep the box inside the image (the tight
    box has integer edges). If no candidate has IoU below the threshold, the candidate whose centre is
    farthest from the tight box's centre is used, ties drawn uniformly.
    """
    h, w = image_hw
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    bw, bh = x1 - x0, y1 - y0
    xs = np.arange(0, w - bw + 1)
    ys = np.arange(0, h - bh + 1)
    ix = np.clip(np.minimum(xs + bw, x1) - np.maximum(xs, x0), 0, None).astype(np.float64)
    iy = np.clip(np.minimum(ys + bh, y1) - np.maximum(ys, y0), 0, None).astype(np.float64)
    inter = iy[:, None] * ix[None, :]
    iou = inter / (2.0 * bw * bh - inter)
    candidates = np.flatnonzero(iou < MISLEADING_MAX_IOU)
    if candidates.size == 0:
        dist2 = ((ys - y0) ** 2)[:, None] + ((xs - x0) ** 2)[None, :]
        candidates = np.flatnonzero(dist2 == dist2.max())
    row, col = np.unravel_index(candidates[rng.integers(candidates.size)], iou.shape)
    px, py = int(xs[col]), int(ys[row])
    return np.array([px, py, px + bw, py + bh], dtype=np.float32)


def box_for_condition(mask: MaskLike, condition: Condition, rng: np.random.Generator) -> np.ndarray | None:
    """The Table VI box of ``condition`` for ``mask``, or None for an empty mask.

    - ``tight``: the tight box;
    - ``oversized``: each side pushed out by U(10 %, 30 %) of the box's width (left/right) or height
      (top/bottom), independently, then clipped to the image;
    - ``partial``: a sub-box with the tight box's aspect ratio and U(40 %, 70 %) of its area, placed
      uniformly inside it;
    - ``misleading``: a tight-sized box at a uniform integer offset with IoU < 0.1 to the tight box,
      else the position farthest (centre distance) from it.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown box condition {condition!r}; expected one of {CONDITIONS}")
    m = _as_mask(mask)
    box = tight_box(m)
    if box is None:
        return None
    image_hw = (int(m.shape[0]), int(m.shape[1]))
    if condition == "oversized":
        return _oversized(box, image_hw, rng)
    if condition == "partial":
        return _partial(box, rng)
    if condition == "misleading":
        return _misleading(box, image_hw, rng)
    return box


def _clip_and_grow(box: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    h, w = image_hw
    out = np.asarray(box, dtype=np.float64).copy()
    for lo, hi, size in ((0, 2, w), (1, 3, h)):
        out[lo] = min(max(out[lo], 0.0), size)
        out[hi] = min(max(out[hi], 0.0), size)
        if out[hi] - out[lo] <= 0.0:
            start = min(max(0.5 * (out[lo] + out[hi]) - 0.5, 0.0), max(size - 1.0, 0.0))
            out[lo], out[hi] = start, start + min(1.0, size)
    return out.astype(np.float32)


def jitter_box(
    box: np.ndarray,
    image_hw: tuple[int, int],
    rng: np.random.Generator,
    max_shift_frac: float = 0.1,
    max_scale_frac: float = 0.1,
) -> np.ndarray:
    """Training jitter: shift the centre by up to ``max_shift_frac`` of the box's width/height and
    scale width and height by ``1 + U(-max_scale_frac, max_scale_frac)``, then clip to the image."""
    if max_shift_frac < 0:
        raise ValueError(f"max_shift_frac must be >= 0, got {max_shift_frac!r}")
    if not 0 <= max_scale_frac < 1:
        raise ValueError(f"max_scale_frac must be in [0, 1), got {max_scale_frac!r}")
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    shift_x, shift_y = rng.uniform(-max_shift_frac, max_shift_frac, size=2)
    scale_x, scale_y = 1.0 + rng.uniform(-max_scale_frac, max_scale_frac, size=2)
    cx = min(max(0.5 * (x0 + x1) + shift_x * bw, 0.0), float(w))
    cy = min(max(0.5 * (y0 + y1) + shift_y * bh, 0.0), float(h))
    half_w, half_h = 0.5 * bw * scale_x, 0.5 * bh * scale_y
    return _clip_and_grow(np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h]), image_hw)


def _box_str(box: torch.Tensor) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box.tolist()) + ")"


def _image_name(image_ids: Sequence[str] | None, i: int) -> str:
    return f"image {image_ids[i]!r}" if image_ids is not None else f"image at batch index {i}"


NORMALISED_MIN_SIDE = 8
"""Images with both sides at least this many pixels refuse boxes whose coordinates all lie in [0, 1]."""


class BoxError(ValueError):
    """A box prompt that cannot be used: the message names the image and the box."""


def sanitize_boxes(
    box_xyxy: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    image_hw: tuple[int, int],
    image_ids: Sequence[str] | None = None,
    *,
    check_normalised: bool = True,
) -> torch.Tensor:
    """Validate ``(B, 4)`` pixel boxes ``(x0, y0, x1, y1)``: clip to the image, grow zero sides to 1 px.

    The one box validation of every path that takes a box (datamodule, evaluation, benchmark, the
    predict API and CLI). Raises :class:`BoxError` (a ValueError), naming the image and the box, for

    - a non-finite coordinate (NaN or inf);
    - an inverted box, ``x1 < x0`` or ``y1 < y0``;
    - a box with no overlap with ``[0, W) x [0, H)``;
    - with ``check_normalised``, a box of positive area whose coordinates all lie in ``[0, 1]`` on an
      image of at least :data:`NORMALISED_MIN_SIDE` pixels each way: it looks like 0-1 normalised
      coordinates. Boxes derived from a pixel mask (the oracle prompts) pass ``check_normalised=False``.

    A zero-width side counts as inside when it lies on ``[0, W]`` (its edges included); it is grown to a
    one-pixel side centred on it and shifted to stay inside the image. Returns a new tensor of the
    input's dtype and device (float32 for non-tensor input).
    """
    if not isinstance(box_xyxy, torch.Tensor):
        box_xyxy = torch.as_tensor(np.asarray(box_xyxy, dtype=np.float32))
    if box_xyxy.ndim != 2 or box_xyxy.shape[-1] != 4:
        raise BoxError(f"box_xyxy must have shape (B, 4) as (x0, y0, x1, y1), got {tuple(box_xyxy.shape)}")
    if not box_xyxy.is_floating_point():
        box_xyxy = box_xyxy.float()
    if image_ids is not None and len(image_ids) != box_xyxy.shape[0]:
        raise BoxError(f"got {len(image_ids)} image ids for {box_xyxy.shape[0]} boxes")
    h, w = (float(v) for v in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image_hw must be at least one pixel each way, got {tuple(image_hw)}")
    boxes = box_xyxy.detach().to(torch.float64)
    x0, y0, x1, y1 = boxes.unbind(-1)

    def first_bad(bad: torch.Tensor) -> int | None:
        idx = torch.nonzero(bad).flatten()
        return int(idx[0]) if idx.numel() else None

    if (i := first_bad(~torch.isfinite(boxes).all(-1))) is not None:
        raise BoxError(f"box {_box_str(boxes[i])} of {_image_name(image_ids, i)} is not finite")
    if (i := first_bad((x1 < x0) | (y1 < y0))) is not None:
        raise BoxError(
            f"box {_box_str(boxes[i])} of {_image_name(image_ids, i)} has x1 < x0 or y1 < y0 "
            "(expected (x0, y0, x1, y1))"
        )
    out_x = torch.where(x1 > x0, (x1 <= 0) | (x0 >= w), (x0 < 0) | (x0 > w))
    out_y = torch.where(y1 > y0, (y1 <= 0) | (y0 >= h), (y0 < 0) | (y0 > h))
    if (i := first_bad(out_x | out_y)) is not None:
        raise BoxError(
            f"box {_box_str(boxes[i])} of {_image_name(image_ids, i)} lies wholly outside the image "
            f"(H={int(h)}, W={int(w)})"
        )
    in_unit = ((boxes >= 0) & (boxes <= 1)).all(-1) & (x1 > x0) & (y1 > y0)
    looks_normalised = in_unit & (min(h, w) >= NORMALISED_MIN_SIDE)
    if check_normalised and (i := first_bad(looks_normalised)) is not None:
        raise BoxError(
            f"box {_box_str(boxes[i])} of {_image_name(image_ids, i)} looks like 0-1 normalised "
            f"coordinates on an image of H={int(h)}, W={int(w)} pixels; boxes are pixel edges "
            "(x0, y0, x1, y1): multiply by (W, H, W, H)"
        )
    clipped = [_clip_and_grow(b, (int(h), int(w))) for b in boxes.cpu().numpy()]
    result = torch.from_numpy(np.stack(clipped)) if clipped else boxes.new_zeros((0, 4))
    return result.to(dtype=box_xyxy.dtype, device=box_xyxy.device)


@dataclass
class BoxPrompter:
    """Makes the box prompt for one slice; configured from Hydra.

    In training (``train_rng`` given) it returns the tight box, jittered from ``train_rng`` when
    ``jitter`` is set; ``condition`` and ``prompt_seed`` are not used there. In evaluation it returns
    ``condition``'s box drawn from ``prompt_rng(prompt_seed, image_id, slice_index)``, identical in every
    run.

    An empty slice gets the whole-image box and ``is_empty=True`` under both ``empty`` policies; with
    ``no_pruning`` the flag tells the model to skip pruning for that image (see
    :attr:`skip_pruning_on_empty`), with ``whole_image`` the model prunes with the whole-image box. Either
    way the fallback itself reveals that the slice is empty; count such slices in the report.
    """

    condition: str = "tight"
    prompt_seed: int = 0
    empty: str = "whole_image"
    jitter: bool = False
    jitter_shift: float = 0.1
    jitter_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown box condition {self.condition!r}; expected one of {CONDITIONS}")
        if isinstance(self.prompt_seed, bool) or not isinstance(self.prompt_seed, (int, np.integer)):
            raise ValueError(f"prompt_seed must be an int, got {self.prompt_seed!r}")
        if self.prompt_seed < 0:
            raise ValueError(f"prompt_seed must be >= 0, got {self.prompt_seed!r}")
        if self.empty not in EMPTY_POLICIES:
            raise ValueError(f"unknown empty-slice policy {self.empty!r}; expected one of {EMPTY_POLICIES}")
        if not isinstance(self.jitter, bool):
            raise ValueError(f"jitter must be a bool, got {self.jitter!r}")
        if not (isinstance(self.jitter_shift, (int, float)) and self.jitter_shift >= 0):
            raise ValueError(f"jitter_shift must be a number >= 0, got {self.jitter_shift!r}")
        if not (isinstance(self.jitter_scale, (int, float)) and 0 <= self.jitter_scale < 1):
            raise ValueError(f"jitter_scale must be a number in [0, 1), got {self.jitter_scale!r}")

    @property
    def skip_pruning_on_empty(self) -> bool:
        """Whether the model should skip pruning for images flagged empty."""
        return self.empty == "no_pruning"

    def __call__(
        self,
        mask: MaskLike,
        image_id: str,
        slice_index: int = 0,
        train_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, bool]:
        """Box ``(4,)`` float32 for ``mask`` and whether the slice is empty."""
        m = _as_mask(mask)
        image_hw = (int(m.shape[0]), int(m.shape[1]))
        if train_rng is not None:
            box = tight_box(m)
            if box is not None and self.jitter:
                box = jitter_box(box, image_hw, train_rng, self.jitter_shift, self.jitter_scale)
        else:
            rng = prompt_rng(self.prompt_seed, image_id, slice_index)
            box = box_for_condition(m, self.condition, rng)
        if box is None:
            return whole_image_box(image_hw), True
        return box.astype(np.float32, copy=False), False
