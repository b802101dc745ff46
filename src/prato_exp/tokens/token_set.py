"""The token set: the tokens a block runs on, where they sit on the grid, and the mode/fill plumbing.

Every backbone keeps one :class:`TokenSet` while it runs pruned blocks: ``tokens`` ``(B, N, C)``, their
grid ``positions`` ``(B, N)`` long, ``valid`` ``(B, N)`` bool and ``grid_hw``. It has one of two
layouts:

- gathered (``on_grid=False``): slot ``n`` holds the token of grid place ``positions[b, n]``; slots past
  an image's count are padding (``valid`` False, zero tokens). What ``drop`` runs on.
- on the grid (``on_grid=True``): ``N = Z = h * w`` and slot ``n`` is place ``n``; ``valid`` marks the
  places still alive and the others hold zeros. What ``mask`` runs on.
- weighted (:meth:`TokenSet.weighted`): on the grid, every place runs, and ``weight`` ``(B, Z)`` (1 kept,
  0 dropped, carrying a selector's gradient) multiplies every read of the grid (:meth:`TokenSet.rezero`,
  :meth:`TokenSet.to_grid`) and every key (:class:`~prato_exp.tokens.attention_mask.KeyPolicy`). What a
  differentiable keep (DynamicViT's training) runs on: ``drop`` in value, with gradients to the policy.

A set may also record token merging (``merged_into`` ``(B, Z)`` long: for each grid place merged away,
the alive place it was merged into, -1 elsewhere). Every read of such a set's grid
(:meth:`TokenSet.to_grid`) shows a merged-away place with its destination's value (unmerging), so
convolutions, patch merging and the decoder see a complete grid; :func:`follow_merges` composes the
merges of successive points and :func:`child_merged_into` carries them to the next stage.

:meth:`TokenSet.select` executes a keep mask in either mode, :meth:`TokenSet.to_grid` puts the set back
on the grid with a fill rule, :func:`child_keep` carries a keep mask to the next stage of a hierarchical
model (a child is kept if any parent in its ``stride x stride`` footprint is). The free functions below
are the index operations these are made of; pruners use them on their own slot-aligned tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SelectMode = Literal["drop", "mask"]


@dataclass
class TokenSet:
    """Tokens alive on a ``grid_hw`` grid (see the module docstring for the two layouts)."""

    tokens: Tensor
    positions: Tensor
    valid: Tensor
    grid_hw: tuple[int, int]
    on_grid: bool = False
    weight: Tensor | None = None
    merged_into: Tensor | None = None
    complete: bool = False
    """Known to have every slot valid (no padding, nothing masked): re-zeroing is the identity. Set where
    that is known without a look at ``valid`` (:meth:`full`, :meth:`select` with equal counts), so the
    fast paths cost no device sync."""

    @classmethod
    def full(cls, tokens: Tensor, grid_hw: tuple[int, int]) -> TokenSet:
        """All ``Z`` grid tokens of ``tokens`` ``(B, Z, C)`` alive, slot ``n`` = place ``n`` (both layouts
        at once; the grid layout is recorded)."""
        b, z, _ = tokens.shape
        if z != grid_hw[0] * grid_hw[1]:
            raise ValueError(f"{z} tokens do not fill a {grid_hw[0]} x {grid_hw[1]} grid")
        positions = torch.arange(z, device=tokens.device).expand(b, z)
        valid = torch.ones(b, z, dtype=torch.bool, device=tokens.device)
        return cls(tokens, positions, valid, (int(grid_hw[0]), int(grid_hw[1])), on_grid=True, complete=True)

    @property
    def num_grid(self) -> int:
        """``Z = h * w``."""
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def is_full_grid(self) -> bool:
        """Every grid place alive, slot ``n`` = place ``n``, nothing weighted or merged: what the
        unpruned library code computes on (a backbone may run its own blocks on such a set)."""
        return self.complete and self.on_grid and self.weight is None and self.merged_into is None

    @property
    def slots(self) -> Tensor:
        """``(B, N)`` bool: slots that hold a grid place (all of them on the grid; not padding)."""
        return torch.ones_like(self.valid) if self.on_grid else self.valid

    def weighted(self, weight: Tensor) -> TokenSet:
        """This grid-layout set with every place running and reads weighted by ``weight`` ``(B, Z)``."""
        if not self.on_grid:
            raise ValueError("a weighted token set needs the grid layout (TokenSet.full)")
        return replace(self, valid=torch.ones_like(self.valid), weight=weight, complete=False)

    def with_tokens(self, tokens: Tensor) -> TokenSet:
        """The same layout holding new ``tokens`` ``(B, N, C')``."""
        return replace(self, tokens=tokens)

    def alive_count(self) -> Tensor:
        """``(B,)`` number of alive tokens per image."""
        return self.valid.sum(dim=1)

    def keep_grid(self) -> Tensor:
        """``(B, Z)`` bool: which grid places hold an alive token (a weighted set: weight above 1/2)."""
        if self.weight is not None:
            return self.weight.detach() > 0.5
        if self.on_grid:
            return self.valid
        return keep_on_grid(self.positions, self.valid, self.num_grid)

    def rezero(self, tokens: Tensor | None = None) -> Tensor:
        """``tokens`` (default: the set's) ``(B, N, C)`` with every slot that is not alive set to zero
        (a weighted set: times its weight)."""
        tokens = self.tokens if tokens is None else tokens
        if self.weight is None and self.complete:
            return tokens
        alive = self.valid if self.weight is None else self.weight
        return tokens * alive[..., None].to(tokens.dtype)

    def select(self, keep: Tensor, mode: SelectMode) -> TokenSet:
        """Execute ``keep`` ``(B, N)`` bool (slot-aligned): ``drop`` gathers the kept tokens (padding to
        the batch's largest count, in grid order), ``mask`` keeps the grid and zeroes the pruned places."""
        if self.weight is not None:
            raise ValueError("a weighted token set is not selected from; carry its weight (child_weight)")
        keep = keep & self.valid
        if mode not in ("drop", "mask"):
            raise ValueError(f"unknown select mode {mode!r}")
        counts = keep.sum(dim=1)
        least, most = (int(v) for v in torch.aminmax(counts)) if counts.numel() else (0, 0)
        if self.on_grid and least == self.num_grid:  # nothing pruned in any image
            return replace(self, valid=keep, complete=True)
        if mode == "drop":
            order, valid = kept_order(keep, most)
            return TokenSet(
                gather_slots(self.tokens, order, valid, padded=least != most),
                gather_slots(self.positions, order, valid, padded=least != most),
                valid,
                self.grid_hw,
                merged_into=self.merged_into,
                complete=least == most,
            )
        if self.on_grid:
            grid, alive = self, keep
        else:
            grid = self._as_grid_layout()
            alive = write_to_grid(torch.zeros_like(grid.valid), keep, self.positions, self.valid)
        tokens = grid.tokens * alive[..., None].to(grid.tokens.dtype)
        merged_into = self.merged_into
        return TokenSet(tokens, grid.positions, alive, self.grid_hw, on_grid=True, merged_into=merged_into)

    def _as_grid_layout(self) -> TokenSet:
        return replace(TokenSet.full(self._scattered(), self.grid_hw), valid=self.keep_grid())

    def to_grid(self, fill: Tensor | None = None) -> Tensor:
        """``(B, Z, C)``: the alive tokens at their places, every place merged away its destination's
        value, every other place ``fill`` ``(B, Z, C)`` (zeros when None). Padding slots are never
        written."""
        grid = self._scattered(fill)
        return grid if self.merged_into is None else unmerge(grid, self.merged_into)

    def _scattered(self, fill: Tensor | None = None) -> Tensor:
        if self.on_grid and self.complete and self.weight is None:
            return self.tokens
        if self.on_grid:
            grid = self.rezero()
            return grid if fill is None else torch.where(self.valid[..., None], grid, fill)
        return scatter_slots(self.tokens, self.positions, self.valid, self.num_grid, fill)

    def to_map(self, fill: Tensor | None = None) -> Tensor:
        """``(B, C, h, w)`` feature map of :meth:`to_grid`."""
        grid = self.to_grid(fill)
        return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], *self.grid_hw)

    def from_map(self, feature_map: Tensor) -> Tensor:
        """``(B, C', h, w)`` map -> ``(B, N, C')`` its values at the set's slots (zero where not alive)."""
        flat = feature_map.flatten(2).transpose(1, 2)  # (B, Z, C')
        if not self.on_grid:
            flat = gather_slots(flat.contiguous(), self.positions, self.valid, padded=False)
        return self.rezero(flat)


def child_keep(keep: Tensor, grid_hw: tuple[int, int], stride: int = 2) -> tuple[Tensor, tuple[int, int]]:
    """The parent rule between stages: a child place is kept if any parent in its ``stride x stride``
    footprint is (odd sides padded at the bottom/right, as patch merging and strided embeddings do).

    Args:
        keep: ``(B, h * w)`` bool, row-major on ``grid_hw``.
        grid_hw: ``(h, w)``.
        stride: the footprint side (2 for Swin's patch merging and MiT's embeddings).

    Returns:
        ``(B, h' * w')`` bool and ``(h', w') = (ceil(h / stride), ceil(w / stride))``.
    """
    b = keep.shape[0]
    pooled = F.max_pool2d(keep.view(b, 1, *grid_hw).float(), stride, stride, ceil_mode=True)
    return pooled.flatten(1) > 0, (int(pooled.shape[-2]), int(pooled.shape[-1]))


def unmerge(grid: Tensor, merged_into: Tensor) -> Tensor:
    """``grid`` ``(B, Z, C)`` with every place of ``merged_into`` ``(B, Z)`` (>= 0: merged into that place)
    holding its destination's value."""
    source = merged_into >= 0
    taken = torch.gather(grid, 1, merged_into.clamp(min=0)[..., None].expand_as(grid))
    return torch.where(source[..., None], taken, grid)


def follow_merges(earlier: Tensor | None, now: Tensor | None) -> Tensor | None:
    """The merge map ``(B, Z)`` after a point that merged ``now`` on top of ``earlier`` (each -1 where a
    place was not merged): a place merged earlier into a destination that is merged now goes to the new
    destination. None when neither merged."""
    if now is None or earlier is None:
        return earlier if now is None else now
    moved = torch.gather(now, 1, earlier.clamp(min=0))
    earlier = torch.where((earlier >= 0) & (moved >= 0), moved, earlier)
    return torch.where(now >= 0, now, earlier)


def child_merged_into(
    merged_into: Tensor, keep: Tensor, grid_hw: tuple[int, int], stride: int = 2
) -> tuple[Tensor, tuple[int, int]]:
    """The merge map of the next stage (the parent rule of :func:`child_keep`): a child with no kept
    parent but a merged one takes the child of its first merged parent's destination (row-major
    footprint order), -1 otherwise.

    Args:
        merged_into: ``(B, h * w)`` long merge map of this stage.
        keep: ``(B, h * w)`` bool, places alive at this stage.
        grid_hw: ``(h, w)``; odd sides padded at the bottom/right.
        stride: the footprint side.

    Returns:
        ``(B, h' * w')`` long and ``(h', w')``.
    """
    b = merged_into.shape[0]
    h, w = grid_hw
    child_keep_grid, (hc, wc) = child_keep(keep, grid_hw, stride)
    rows = merged_into.clamp(min=0) // w
    cols = merged_into.clamp(min=0) % w
    child_of_destination = torch.where(merged_into >= 0, (rows // stride) * wc + cols // stride, -1)
    padded = F.pad(child_of_destination.view(b, h, w), (0, wc * stride - w, 0, hc * stride - h), value=-1)
    footprints = padded.view(b, hc, stride, wc, stride).permute(0, 1, 3, 2, 4).reshape(b, hc * wc, -1)
    has = footprints >= 0
    first = torch.gather(footprints, 2, has.to(torch.int8).argmax(dim=2, keepdim=True)).squeeze(2)
    return torch.where(child_keep_grid | ~has.any(dim=2), -1, first), (hc, wc)


def child_weight(weight: Tensor, grid_hw: tuple[int, int], stride: int = 2) -> Tensor:
    """:func:`child_keep` for a differentiable keep ``weight`` ``(B, h * w)``: each child's weight is its
    largest parent's (the gradient goes to that parent). Returns ``(B, h' * w')``."""
    b = weight.shape[0]
    return F.max_pool2d(weight.view(b, 1, *grid_hw), stride, stride, ceil_mode=True).flatten(1)


def kept_order(keep: Tensor, n_out: int | None = None) -> tuple[Tensor, Tensor]:
    """Slot order that puts the kept slots of ``keep`` ``(B, N)`` first, in ascending slot order.

    Returns ``order`` ``(B, N_out)`` long (``N_out`` = the batch's largest kept count, which a caller
    that knows it passes as ``n_out``) and ``valid`` ``(B, N_out)`` bool, False on the padding slots of
    images that keep fewer.
    """
    counts = keep.sum(dim=1)
    if n_out is None:
        n_out = int(counts.max().item()) if counts.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_out]
    valid = torch.arange(n_out, device=keep.device)[None, :] < counts[:, None]
    return order, valid


def flat_rows(index: Tensor, length: int) -> Tensor:
    """``(B * N,)`` rows of a ``(B * length, ...)`` flattening for the per-image ``index`` ``(B, N)``.

    Row gathers and copies (``index_select``, ``index_copy``) on the flattened tensor move whole rows;
    on CPU they run several times faster than ``gather``/``scatter`` with an expanded index.
    """
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * length
    return (index + offsets).flatten()


def gather_slots(values: Tensor, order: Tensor, valid: Tensor, padded: bool = True) -> Tensor:
    """``values`` ``(B, N, ...)`` gathered along dim 1 by ``order`` ``(B, N_out)``; padding slots (``valid``
    False) set to zero (``padded=False``: the caller knows there are none)."""
    b, n = values.shape[:2]
    trailing = values.shape[2:]
    rows = values.reshape(b * n, *trailing).index_select(0, flat_rows(order, n))
    gathered = rows.view(b, order.shape[1], *trailing)
    if not padded:
        return gathered
    pad = valid.reshape(*valid.shape, *([1] * len(trailing)))
    return torch.where(pad, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


def keep_on_grid(positions: Tensor, valid: Tensor, num_grid: int) -> Tensor:
    """``(B, Z)`` bool: the grid places that a valid slot of ``positions`` ``(B, N)`` points to."""
    counts = torch.zeros(valid.shape[0], num_grid, dtype=torch.int32, device=valid.device)
    return counts.scatter_add(1, positions, valid.to(torch.int32)) > 0


def scatter_slots(
    values: Tensor, positions: Tensor, valid: Tensor, num_grid: int, fill: Tensor | None = None
) -> Tensor:
    """``(B, Z, C)``: ``values`` ``(B, N, C)`` at their ``positions`` ``(B, N)``; places no ``valid``
    slot points to hold ``fill`` ``(B, Z, C)`` (zeros when None). Padding slots are never written (they
    go to a spare row that is cut off)."""
    b, _, c = values.shape
    rows = torch.where(valid.flatten(), flat_rows(positions, num_grid), b * num_grid)
    if fill is None:
        base = values.new_zeros(b * num_grid + 1, c)
    else:
        base = torch.cat([fill.reshape(b * num_grid, c).to(values.dtype), values.new_zeros(1, c)])
    grid = base.index_copy(0, rows, values.reshape(-1, c))
    return grid[: b * num_grid].view(b, num_grid, c)


def write_to_grid(grid: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """``grid`` ``(B, Z, ...)`` with ``values`` ``(B, N, ...)`` written at ``positions`` ``(B, N)``.

    Only slots where ``valid`` ``(B, N)`` holds are written; other places keep ``grid``'s values.
    Out of place, so gradients reach both ``grid`` and ``values``.
    """
    b, z = grid.shape[:2]
    trailing = grid.shape[2:]
    index = torch.where(valid, positions, torch.full_like(positions, z))
    index = index.reshape(*index.shape, *([1] * len(trailing))).expand(-1, -1, *trailing)
    padded = torch.cat([grid, grid.new_zeros(b, 1, *trailing)], dim=1)
    return padded.scatter(1, index, values.to(grid.dtype))[:, :z]
