"""Tensor helpers that move tokens between the full grid and the set of alive tokens.

A plain-ViT backbone keeps three tensors while it runs pruned blocks:
``tokens`` ``(B, N, C)``, their grid ``positions`` ``(B, N)`` long, and ``valid`` ``(B, N)`` bool
(False on padding slots). At the start ``N = Z = h * w``, ``positions = arange(Z)`` and all are valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AliveTokens:
    """The tokens a block runs on, with where they sit on the grid."""

    tokens: Tensor
    positions: Tensor
    valid: Tensor

    @classmethod
    def full_grid(cls, tokens: Tensor) -> AliveTokens:
        """All ``Z`` grid tokens of ``tokens`` ``(B, Z, C)`` alive, in row-major order."""
        b, z, _ = tokens.shape
        positions = torch.arange(z, device=tokens.device).expand(b, z)
        valid = torch.ones(b, z, dtype=torch.bool, device=tokens.device)
        return cls(tokens, positions, valid)

    def alive_count(self) -> Tensor:
        """``(B,)`` number of real (non-padding) tokens per image."""
        return self.valid.sum(dim=1)


def kept_order(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Slot order that puts the kept slots of ``keep`` ``(B, N)`` first, in ascending slot order.

    Returns ``order`` ``(B, N_out)`` long (``N_out`` = the batch's largest kept count) and ``valid``
    ``(B, N_out)`` bool, False on the padding slots of images that keep fewer.
    """
    counts = keep.sum(dim=1)
    n_out = int(counts.max().item()) if counts.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_out]
    valid = torch.arange(n_out, device=keep.device)[None, :] < counts[:, None]
    return order, valid


def gather_slots(values: Tensor, order: Tensor, valid: Tensor) -> Tensor:
    """``values`` ``(B, N, ...)`` gathered along dim 1 by ``order``; padding slots set to zero."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    gathered = torch.gather(values, 1, index)
    pad = valid.reshape(*valid.shape, *([1] * (values.dim() - 2)))
    return torch.where(pad, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


def gather_kept(alive: AliveTokens, keep: Tensor) -> AliveTokens:
    """Keep only the tokens where ``keep`` ``(B, N)`` is True, padding to the batch's largest count.

    Kept tokens stay in ascending grid order. Padding slots get zeros, position 0 and ``valid`` False;
    where every image keeps the same number (percentile mode) there is no padding at all.
    """
    order, valid = kept_order(keep & alive.valid)
    tokens = gather_slots(alive.tokens, order, valid)
    positions = gather_slots(alive.positions, order, valid)
    return AliveTokens(tokens, positions, valid)


def scatter_to_grid(alive: AliveTokens, num_grid: int, fill: Tensor | None = None) -> Tensor:
    """Place alive tokens back on the ``(B, Z, C)`` grid; other places get ``fill`` (zeros if None).

    Padding slots are never written.
    """
    b, _, c = alive.tokens.shape
    grid = (
        torch.zeros(b, num_grid, c, dtype=alive.tokens.dtype, device=alive.tokens.device)
        if fill is None
        else fill.clone()
    )
    values = alive.tokens * alive.valid[..., None].to(alive.tokens.dtype)
    index = alive.positions[..., None].expand(-1, -1, c)
    if fill is not None:
        grid = grid * (~keep_on_grid(alive, num_grid))[..., None].to(grid.dtype)
    return grid.scatter_add(1, index, values)


def keep_on_grid(alive: AliveTokens, num_grid: int) -> Tensor:
    """``(B, Z)`` bool: which grid places hold an alive token."""
    counts = torch.zeros(alive.valid.shape[0], num_grid, dtype=torch.int32, device=alive.valid.device)
    return counts.scatter_add(1, alive.positions, alive.valid.to(torch.int32)) > 0


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
