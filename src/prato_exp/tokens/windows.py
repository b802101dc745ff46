"""Tensor helpers for (shifted) window attention on a pruned token set, and 2 x 2 patch merging.

A Swin stage keeps its tokens as ``tokens`` ``(B, N, C)`` with grid ``positions`` ``(B, N)`` and
``valid`` ``(B, N)`` (see :mod:`prato_exp.tokens.token_set`). Window attention needs the grid, so these
helpers map each token to its slot in the windows of the padded, cyclically shifted grid, the layout of
MONAI's ``window_partition(torch.roll(x, -shift))``, and gather only the windows holding a token.
"""

from __future__ import annotations

import functools
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
        has_pad: whether the window does not divide the grid (some slots are padded places).
    """

    window: tuple[int, int]
    num_windows: int
    slot_of_position: Tensor
    pad_slots: Tensor
    shift_mask: Tensor | None
    has_pad: bool

    @property
    def window_tokens(self) -> int:
        return self.window[0] * self.window[1]


def window_layout(
    grid_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> WindowLayout:
    """The window layout of a ``grid_hw`` grid padded to a multiple of ``window`` and rolled by ``-shift``.

    A place ``(r, c)`` lands at ``((r - sh) mod Hp, (c - sw) mod Wp)`` (``torch.roll`` by ``-shift``),
    then in window ``(r' // wh, c' // ww)`` at in-window index ``(r' % wh) * ww + c' % ww``. Layouts
    depend on nothing but the arguments, so each is built once per process and shared (read-only).
    """
    key = (tuple(int(v) for v in grid_hw), tuple(int(v) for v in window), tuple(int(v) for v in shift))
    return _cached_layout(*key, torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached_layout(
    grid_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> WindowLayout:
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
        has_pad=hp != h or wp != w,
    )


@dataclass
class WindowBatch:
    """The windows one block computes: those holding at least one valid token.

    Attributes:
        windows: ``(Wa,)`` long, computed windows as ``image * nW + window``.
        token_slot: ``(B, N)`` long, each token's row in the ``(Wa * T)`` flattened windows
            (``Wa * T`` for padding slots, which sit in no window).
        pad: ``(Wa, T)`` bool, slots of padded places (they hold ``qkv(0)``, as in MONAI).
        attn_bias: ``(Wa, 1, T, T)`` what the logits get added: the shift mask, and ``-inf`` on the
            slots that may not be attended to (all but alive tokens and padded places); None when
            there is neither.
        has_pad: whether the layout has padded places at all.
        all_valid: whether every token slot is valid (no padding slots in the token set).
    """

    windows: Tensor
    token_slot: Tensor
    pad: Tensor
    attn_bias: Tensor | None
    has_pad: bool
    all_valid: bool

    @property
    def num_slots(self) -> int:
        return self.pad.numel()


def window_batch(
    layout: WindowLayout, positions: Tensor, valid: Tensor, key_alive: Tensor, all_valid: bool = False
) -> WindowBatch:
    """Place the tokens ``positions`` ``(B, N)`` in ``layout``'s windows, computing only occupied ones.

    Args:
        layout: the window layout of the stage grid.
        positions: ``(B, N)`` long grid place of each token.
        valid: ``(B, N)`` bool, False on padding slots.
        key_alive: ``(B, N)`` bool, tokens that may serve as keys (pruned tokens of ``mask`` mode
            are present but not alive). A window with no key at all (only possible for pruned
            tokens in ``mask`` mode) lets every slot be a key, so its rows stay finite.
        all_valid: the caller knows ``valid`` is all True (the gathers then skip its masking).
    """
    b = positions.shape[0]
    t, nw = layout.window_tokens, layout.num_windows
    device = positions.device
    slot = (layout.slot_of_position[positions] + torch.arange(b, device=device)[:, None] * (nw * t)).flatten()
    window_of = slot // t  # (B * N,) window of each token, as image * nW + window
    if not all_valid:  # padding slots point at a spare window past the end, cut off below
        window_of = window_of.masked_fill(~valid.flatten(), b * nw)
    occupied = torch.zeros(b * nw + 1, dtype=torch.bool, device=device).index_fill_(0, window_of, True)
    occupied = occupied[: b * nw]
    windows = occupied.nonzero().squeeze(1)
    rank = torch.cumsum(occupied, dim=0) - 1
    wa = windows.numel()
    token_slot = (rank[window_of.clamp(max=b * nw - 1)] * t + slot % t).view(b, -1)
    if not all_valid:
        token_slot = token_slot.masked_fill(~valid, wa * t)
    pad = layout.pad_slots[windows % nw]
    is_key = (valid & key_alive).flatten()
    key_slot = token_slot.flatten()
    if not bool(is_key.all()):
        key_slot = key_slot.masked_fill(~is_key, wa * t)
    key_ok = torch.cat([pad.flatten(), pad.new_zeros(1)]).index_fill_(0, key_slot, True)[: wa * t]
    key_ok = key_ok.view_as(pad)
    key_ok = key_ok | ~key_ok.any(dim=1, keepdim=True)
    shift_mask = None if layout.shift_mask is None else layout.shift_mask[windows % nw]
    masks_keys = not bool(key_ok.all())
    attn_bias = shift_mask
    if masks_keys:
        base = torch.zeros(key_ok.shape[0], t, t, device=key_ok.device) if shift_mask is None else shift_mask
        attn_bias = base.masked_fill(~key_ok[:, None, :], float("-inf"))
    return WindowBatch(
        windows,
        token_slot,
        pad,
        attn_bias=None if attn_bias is None else attn_bias.unsqueeze(1),
        has_pad=layout.has_pad,
        all_valid=all_valid,
    )


def gather_windows(values: Tensor, batch: WindowBatch, pad_value: Tensor) -> Tensor:
    """Token values ``(B, N, D)`` into their windows ``(Wa, T, D)``; padded places get ``pad_value`` ``(D,)``.

    Window slots with no token and no padding (pruned places) are zero; padding slots of the token set
    are written nowhere (``batch.token_slot`` points them past the windows).
    """
    wa, t = batch.pad.shape
    if batch.has_pad:
        flat = torch.where(batch.pad.reshape(-1, 1), pad_value.to(values.dtype), values.new_zeros(()))
    else:
        flat = values.new_zeros(wa * t, values.shape[-1])
    if batch.all_valid:
        return flat.index_copy(0, batch.token_slot.flatten(), values.flatten(0, 1)).view(wa, t, -1)
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])  # padding slots (row Wa * T) write a spare row
    return flat.index_copy(0, batch.token_slot.flatten(), values.flatten(0, 1))[: wa * t].view(wa, t, -1)


def scatter_windows(windows: Tensor, batch: WindowBatch, valid: Tensor) -> Tensor:
    """Window outputs ``(Wa, T, D)`` back to the tokens ``(B, N, D)`` (zeros on padding slots)."""
    flat = windows.reshape(-1, windows.shape[-1])
    if flat.shape[0] == 0:
        return windows.new_zeros(*batch.token_slot.shape, windows.shape[-1])
    rows = flat.index_select(0, batch.token_slot.clamp(max=flat.shape[0] - 1).flatten())
    rows = rows.view(*batch.token_slot.shape, -1)
    return rows if batch.all_valid else rows * valid[..., None].to(flat.dtype)


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
