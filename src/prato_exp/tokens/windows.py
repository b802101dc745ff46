"""Tensor helpers for (shifted) window attention on a pruned token set, and 2 x 2 patch merging.

A Swin stage keeps its tokens as ``tokens`` ``(B, N, C)`` with grid ``positions`` ``(B, N)`` and
``valid`` ``(B, N)`` (see :mod:`prato_exp.tokens.token_set`). Window attention needs the grid, so these
helpers map each token to its slot in the windows of the padded, cyclically shifted grid, the layout of
MONAI's ``window_partition(torch.roll(x, -shift))``, and gather only the windows holding a token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import compute_mask
from torch import Tensor


@dataclass
class WindowLayout:
    """Where each grid place sits in the windows of one (window, shift) configuration.

    Attributes:
        window: ``(wh, ww)`` window size; ``T = wh * ww`` slots per window.
        num_windows: windows per image ``nW`` of the grid padded to a multiple of the window.
        slot_of_position: ``(Z,)`` long, flat slot (``window * T + t``) of each row-major grid place.
        pad_slots: ``(nW, T)`` bool, True on slots of padded places (not grid places).
        shift_mask: ``(nW, T, T)`` MONAI's additive shift mask (0 / -100), None without a shift.
    """

    window: tuple[int, int]
    num_windows: int
    slot_of_position: Tensor
    pad_slots: Tensor
    shift_mask: Tensor | None

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1]


def window_layout(
    grid_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> WindowLayout:
    """The window layout of a ``grid_hw`` grid padded to a multiple of ``window`` and rolled by ``-shift``.

    A place ``(r, c)`` lands at ``((r - sh) mod Hp, (c - sw) mod Wp)`` (``torch.roll`` by ``-shift``),
    then in window ``(r' // wh, c' // ww)`` at in-window index ``(r' % wh) * ww + c' % ww``.
    """
    (h, w), (wh, ww), (sh, sw) = grid_hw, window, shift
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    rows = (torch.arange(hp, device=device) - sh) % hp
    cols = (torch.arange(wp, device=device) - sw) % wp
    window_index = (rows // wh)[:, None] * (wp // ww) + (cols // ww)[None, :]  # (Hp, Wp)
    slot = window_index * (wh * ww) + ((rows % wh)[:, None] * ww + (cols % ww)[None, :])
    is_pad = torch.ones(hp, wp, dtype=torch.bool, device=device)
    is_pad[:h, :w] = False
    num_windows = (hp // wh) * (wp // ww)
    pad_slots = torch.zeros(num_windows * wh * ww, dtype=torch.bool, device=device)
    pad_slots[slot[is_pad]] = True
    shift_mask = compute_mask([hp, wp], window, shift, device) if sh > 0 or sw > 0 else None
    return WindowLayout(
        window=(wh, ww),
        num_windows=num_windows,
        slot_of_position=slot[:h, :w].reshape(-1),
        pad_slots=pad_slots.view(num_windows, wh * ww),
        shift_mask=shift_mask,
    )


@dataclass
class WindowBatch:
    """The windows one block computes: those holding at least one valid token.

    Attributes:
        windows: ``(Wa,)`` long, computed windows as ``image * nW + window``.
        token_slot: ``(B, N)`` long, each token's row in the ``(Wa * T)`` flattened windows
            (``Wa * T`` for padding slots, which sit in no window).
        pad: ``(Wa, T)`` bool, slots of padded places (they hold ``qkv(0)``, as in MONAI).
        key_ok: ``(Wa, T)`` bool, slots that may be attended to (alive tokens and padded places).
        shift_mask: ``(Wa, T, T)`` additive shift mask of each window, or None.
    """

    windows: Tensor
    token_slot: Tensor
    pad: Tensor
    key_ok: Tensor
    shift_mask: Tensor | None

    @property
    def num_slots(self) -> int:
        return self.pad.numel()


def window_batch(layout: WindowLayout, positions: Tensor, valid: Tensor, key_alive: Tensor) -> WindowBatch:
    """Place the tokens ``positions`` ``(B, N)`` in ``layout``'s windows, computing only occupied ones.

    Args:
        layout: the window layout of the stage grid.
        positions: ``(B, N)`` long grid place of each token.
        valid: ``(B, N)`` bool, False on padding slots.
        key_alive: ``(B, N)`` bool, tokens that may serve as keys (pruned tokens of ``mask`` mode
            are present but not alive). A window with no key at all (only possible for pruned
            tokens in ``mask`` mode) lets every slot be a key, so its rows stay finite.
    """
    b = positions.shape[0]
    t, nw = layout.window_tokens, layout.num_windows
    slot = layout.slot_of_position[positions] + torch.arange(b, device=positions.device)[:, None] * (nw * t)
    occupied = torch.zeros(b * nw, dtype=torch.bool, device=positions.device)
    occupied[(slot // t)[valid]] = True
    windows = occupied.nonzero().squeeze(1)
    rank = torch.cumsum(occupied, dim=0) - 1
    token_slot = rank[slot // t] * t + slot % t
    token_slot = token_slot.masked_fill(~valid, windows.numel() * t)
    pad = layout.pad_slots[windows % nw]
    key_ok = pad.flatten().clone()
    key_ok[token_slot[valid & key_alive]] = True
    key_ok = key_ok.view_as(pad)
    key_ok = key_ok | ~key_ok.any(dim=1, keepdim=True)
    shift_mask = None if layout.shift_mask is None else layout.shift_mask[windows % nw]
    return WindowBatch(windows, token_slot, pad, key_ok, shift_mask)


def gather_windows(values: Tensor, batch: WindowBatch, valid: Tensor, pad_value: Tensor) -> Tensor:
    """Token values ``(B, N, D)`` into their windows ``(Wa, T, D)``; padded places get ``pad_value`` ``(D,)``.

    Window slots with no token and no padding (pruned places) are zero.
    """
    wa, t = batch.pad.shape
    flat = torch.where(batch.pad.reshape(-1, 1), pad_value.to(values.dtype), values.new_zeros(()))
    flat = flat.index_put((batch.token_slot[valid],), values[valid])
    return flat.view(wa, t, -1)


def scatter_windows(windows: Tensor, batch: WindowBatch, valid: Tensor) -> Tensor:
    """Window outputs ``(Wa, T, D)`` back to the tokens ``(B, N, D)`` (zeros on padding slots)."""
    flat = windows.reshape(-1, windows.shape[-1])
    if flat.shape[0] == 0:
        return windows.new_zeros(*batch.token_slot.shape, windows.shape[-1])
    return flat[batch.token_slot.clamp(max=flat.shape[0] - 1)] * valid[..., None].to(flat.dtype)


_MERGE_ORDER = [(j, i) for i, j in itertools.product(range(2), range(2))]
"""``(row, col)`` offsets of the 2 x 2 parents in the channel order of MONAI's 2-D ``PatchMergingV2``."""


def merge_2x2(grid: Tensor) -> Tensor:
    """Concatenate each 2 x 2 neighbourhood of ``grid`` ``(B, h, w, C)`` to ``(B, ceil(h/2), ceil(w/2), 4C)``.

    Odd sides are zero-padded at the bottom/right, like MONAI's ``PatchMerging`` (whose ``norm`` and
    ``reduction`` then map ``4C -> 2C``).
    """
    h, w = grid.shape[1:3]
    grid = F.pad(grid, (0, 0, 0, w % 2, 0, h % 2))
    return torch.cat([grid[:, r::2, c::2, :] for r, c in _MERGE_ORDER], dim=-1)
