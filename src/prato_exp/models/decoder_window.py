"""Decode only inside a window of the token grid around the box prompt: the decoder shares the saving.

At the small presets the convolutional decoder does most of a pruned model's FLOPs (two thirds of small
UNETR's at 128 px), at every resolution alike, so pruning tokens alone cannot halve the model's time.
With ``decoder_window`` a backbone runs its decoder (and its convolutional encoders) on one rectangle of
the token grid per image, the box prompt dilated by ``margin`` tokens, and writes a fixed background
output elsewhere. Every image of a batch gets a rectangle of the same size (the batch's largest, shifted
to stay inside the image), so the decoder runs batched, without per-image padding; what an image outputs
outside its *own* dilated box is background all the same (:meth:`GridWindow.paste_logits`), so a larger
box in the batch (an empty slice's whole-image box makes the batch's window the whole grid) changes no
image's output there.

``model.decoder_window_batch`` says how a batch shares the decoder in evaluation: ``shared`` (the above,
one decoder call) or ``by_size``: the images are grouped by the size of their own dilated box, one
decoder call per size, each image on exactly its own rectangle. Then an image's logits do not depend on
the other images of its batch (they equal its batch-1 logits) and the FLOPs of a batch are the sum over
its images; the cost is one decoder call per distinct size. Training always shares one window: batch
norm's training statistics are the batch's, and a group of a few small windows would have almost none.

What it computes, exactly: the dense decoder with every convolution reading zeros outside the window
(a convolution's zero padding at the crop's edge is that zero), with normalisation statistics taken over
the window (per-pixel norms such as batch norm in evaluation are unaffected). ``masked_dense_reference``
in the tests builds that network from the dense one and the crop equals it on the window.

It leans on the box: a part of the object outside the dilated box is segmented as background. Reports
of a run with it say so, and its accuracy is measured under every prompt condition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

__all__ = [
    "GridWindow",
    "WindowBatch",
    "background_logits",
    "check_window_batch",
    "decode_in_window",
    "pruning_window",
    "whole",
]

WindowBatch = Literal["shared", "by_size"]
"""How a batch's images share the decoder window in evaluation (see the module docstring)."""


@dataclass(frozen=True)
class GridWindow:
    """One rectangle of the token grid per image, all of one size.

    Attributes:
        top, left: ``(B,)`` long, the rectangle's first token row and column.
        size_hw: ``(h, w)`` tokens, the same for every image.
        grid_hw: the full token grid ``(gh, gw)``.
        own_tlbr: ``(B, 4)`` long, each image's own dilated box in tokens (top, left, bottom, right;
            bottom and right exclusive), inside its rectangle.
    """

    top: Tensor
    left: Tensor
    size_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    own_tlbr: Tensor

    @classmethod
    def around_boxes(
        cls, box_xyxy: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int], margin: int
    ) -> GridWindow:
        """The tokens under each box ``(B, 4)`` (input pixels) dilated by ``margin`` tokens on every side.

        The batch's largest rectangle sets the size; each image's rectangle keeps its start (moved back
        where it would leave the grid), so it always covers the image's own dilated box.
        """
        if margin < 0:
            raise ValueError(f"model.decoder_window must be >= 0 tokens (or null for off), got {margin}")
        gh, gw = grid_hw
        cell_h, cell_w = image_hw[0] / gh, image_hw[1] / gw
        box = box_xyxy.detach().to(torch.float64).cpu()
        top = (torch.floor(box[:, 1] / cell_h).long() - margin).clamp(0, gh - 1)
        left = (torch.floor(box[:, 0] / cell_w).long() - margin).clamp(0, gw - 1)
        bottom = (torch.ceil(box[:, 3] / cell_h).long() + margin).clamp(1, gh)
        right = (torch.ceil(box[:, 2] / cell_w).long() + margin).clamp(1, gw)
        bottom, right = torch.maximum(bottom, top + 1), torch.maximum(right, left + 1)
        h = int((bottom - top).max())
        w = int((right - left).max())
        own = torch.stack([top, left, bottom, right], dim=1)
        return cls(top.clamp(max=gh - h), left.clamp(max=gw - w), (h, w), grid_hw, own)

    @property
    def is_full(self) -> bool:
        """True when the window is the whole grid (cropping would change nothing)."""
        return self.size_hw == self.grid_hw

    @property
    def covers_every_grid(self) -> bool:
        """True when every image's own window is the whole grid (the window changes nothing)."""
        gh, gw = self.grid_hw
        full = torch.tensor([0, 0, gh, gw], dtype=self.own_tlbr.dtype)
        return bool((self.own_tlbr == full).all())

    def by_size(self) -> list[tuple[Tensor, GridWindow]]:
        """The images grouped by the size of their own dilated box, smallest first: per group, the
        images' batch indices ``(B_g,)`` long and the window of exactly that size at each one's own box."""
        top, left, bottom, right = self.own_tlbr.T
        heights, widths = bottom - top, right - left
        groups = []
        for size_h, size_w in sorted(set(zip(heights.tolist(), widths.tolist(), strict=True))):
            index = ((heights == size_h) & (widths == size_w)).nonzero().flatten()
            own = self.own_tlbr[index]
            groups.append((index, GridWindow(own[:, 0], own[:, 1], (size_h, size_w), self.grid_hw, own)))
        return groups

    def fraction(self) -> float:
        """The share of the grid the decoder computes."""
        return self.size_hw[0] * self.size_hw[1] / (self.grid_hw[0] * self.grid_hw[1])

    def _scale(self, x: Tensor) -> int:
        scale = x.shape[-2] // self.grid_hw[0]
        if scale < 1 or x.shape[-2] != scale * self.grid_hw[0] or x.shape[-1] != scale * self.grid_hw[1]:
            raise ValueError(
                f"a map of shape {tuple(x.shape)} is no whole multiple of the grid {self.grid_hw}"
            )
        return scale

    def crop(self, x: Tensor) -> Tensor:
        """``(B, C, h s, w s)``: the window of ``x`` ``(B, C, gh s, gw s)``, ``s`` pixels per token."""
        if self.is_full:
            return x
        s = self._scale(x)
        h, w = self.size_hw[0] * s, self.size_hw[1] * s
        return torch.stack(
            [
                x[b, :, t * s : t * s + h, l_ * s : l_ * s + w]
                for b, (t, l_) in enumerate(zip(self.top.tolist(), self.left.tolist(), strict=True))
            ]
        )

    def paste(self, crop: Tensor, fill: Tensor) -> Tensor:
        """``(B, C, gh s, gw s)``: ``crop`` ``(B, C, h s, w s)`` in its window, ``fill`` ``(C,)`` outside."""
        if self.is_full:
            return crop
        s = crop.shape[-2] // self.size_hw[0]
        b, c = crop.shape[:2]
        out = fill.to(crop.dtype).view(1, c, 1, 1).expand(b, c, self.grid_hw[0] * s, self.grid_hw[1] * s)
        out = out.clone()
        h, w = crop.shape[-2:]
        for i, (t, l_) in enumerate(zip(self.top.tolist(), self.left.tolist(), strict=True)):
            out[i, :, t * s : t * s + h, l_ * s : l_ * s + w] = crop[i]
        return out

    def paste_logits(self, crop: Tensor, background: Tensor, inset: int = 0) -> Tensor:
        """``(B, K, H, W)`` logits: ``crop`` ``(B, K, h s, w s)`` inside each image's own window (with
        ``inset``, see :meth:`own_mask`), ``background`` ``(K,)`` everywhere else."""
        logits = self.paste(crop, background)
        scale = logits.shape[-2] // self.grid_hw[0]
        own = self.own_mask(scale, logits.device, inset)
        return torch.where(own, logits, background.to(logits.dtype).view(1, -1, 1, 1))

    def own_mask(self, scale: int, device: torch.device | None = None, inset: int = 0) -> Tensor:
        """``(B, 1, gh scale, gw scale)`` bool, True inside each image's own dilated box (a part of its
        rectangle, which has the batch's size); ``inset`` as in :meth:`mask`."""
        top, left, bottom, right = self.own_tlbr.T
        return self._mask(top, left, bottom, right, scale, device, inset)

    def mask(self, scale: int, device: torch.device | None = None, inset: int = 0) -> Tensor:
        """``(B, 1, gh scale, gw scale)`` bool, True inside each image's rectangle (the batch's size, where
        the decoder computed; :meth:`own_mask` is the part the image keeps); with ``inset``, True
        only at least ``inset`` cells inside every edge of the window that is not the grid's edge (where
        a decoder that reads neighbours across the window's edge computes exactly)."""
        size_h, size_w = self.size_hw
        return self._mask(self.top, self.left, self.top + size_h, self.left + size_w, scale, device, inset)

    def _mask(
        self,
        top: Tensor,
        left: Tensor,
        bottom: Tensor,
        right: Tensor,
        scale: int,
        device: torch.device | None,
        inset: int,
    ) -> Tensor:
        rows = torch.arange(self.grid_hw[0] * scale, device=device) // scale
        cols = torch.arange(self.grid_hw[1] * scale, device=device) // scale
        top, left = top.to(device)[:, None], left.to(device)[:, None]
        bottom, right = bottom.to(device)[:, None], right.to(device)[:, None]
        if inset:
            top = top + inset * (top > 0)
            left = left + inset * (left > 0)
            bottom = bottom - inset * (bottom < self.grid_hw[0])
            right = right - inset * (right < self.grid_hw[1])
        in_rows = (rows >= top) & (rows < bottom)
        in_cols = (cols >= left) & (cols < right)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def pruning_window(
    margin: int | None,
    pruners: nn.ModuleDict,
    box_xyxy: Tensor | None,
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
) -> GridWindow | None:
    """Where a backbone's decoder runs: the boxes dilated by ``margin`` tokens while one of ``pruners`` is
    active; None (everywhere) when the option is off, no box is given, pruning is off, or every image's
    window is the whole grid."""
    if margin is None or box_xyxy is None or not any(p.active for p in pruners.values()):
        return None
    window = GridWindow.around_boxes(box_xyxy, image_hw, grid_hw, margin)
    return None if window.covers_every_grid else window


def check_window_batch(value: str) -> WindowBatch:
    """``value`` as a :data:`WindowBatch`, or a ValueError naming the key and its choices."""
    if value not in get_args(WindowBatch):
        raise ValueError(f"model.decoder_window_batch must be one of {get_args(WindowBatch)}, got {value!r}")
    return value  # type: ignore[return-value]


def decode_in_window(
    window: GridWindow | None,
    inputs: Sequence[Tensor],
    decode: Callable[[Sequence[Tensor], GridWindow | None], Tensor],
    background: Tensor,
    by_size: bool = False,
    inset: int = 0,
) -> Tensor:
    """``(B, K, H, W)`` logits of a decoder run in ``window`` (everywhere when None), background elsewhere.

    Args:
        window: where each image decodes, or None for the dense decoder.
        inputs: the decoder's batched inputs, full maps ``(B, ...)``; ``decode`` crops them.
        decode: ``decode(inputs, window) -> (B, K, h, w)``, the logits on the window (on the whole map
            when the window is None).
        background: ``(K,)`` logits outside each image's own window.
        by_size: one decoder call per size of the images' own windows (``decoder_window_batch=by_size``)
            instead of one call on the batch's largest rectangle.
        inset: as in :meth:`GridWindow.paste_logits`.
    """
    if window is None:
        return decode(inputs, None)
    if not by_size:
        return window.paste_logits(decode(inputs, window), background, inset)
    parts, order = [], []
    for index, group in window.by_size():
        on_device = index.to(inputs[0].device)
        crop_logits = decode([x.index_select(0, on_device) for x in inputs], group)
        parts.append(group.paste_logits(crop_logits, background, inset))
        order.append(on_device)
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))


def whole(x: Tensor) -> Tensor:
    """The crop of a window that is the whole map: ``x`` itself."""
    return x


def background_logits(num_classes: int, margin: float = 20.0) -> Tensor:
    """``(K,)`` logits outside the window: class 0 (background) ahead of every other by ``margin``."""
    logits = torch.full((num_classes,), -margin)
    logits[0] = 0.0
    return logits
