"""What every prunable segmentation network returns, and the contract it follows.

A backbone wrapper (UNETR, ...) is a plain ``nn.Module`` with

- ``forward(image (B,C,H,W), box_xyxy (B,4) | None, prune_enabled (B,) | None) -> SegOutput``;
- ``pruners``: an ``nn.ModuleDict`` of the pruners at its pruning points (the ``none`` pruner when off);
- ``pruned_part() -> list[str]``: module names of the layers that run after the first pruning point,
  so FLOP ratios can be given for the part that pruning touches.

The LightningModule, ``eval.py`` and ``scripts/benchmark.py`` rely on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from prato_exp.pruning.base import PruneResult


@dataclass
class PruningTrace:
    """What pruning did in one forward pass, for the loss, the logs and the plots.

    Attributes:
        grid_hw: ``(h, w)`` of the token grid the keep masks live on.
        results: the pruner's result at each pruning point, in order.
        keep_grids: ``(B, Z)`` bool per pruning point, grid places still alive after it.
        block_keep_fraction: ``(B, depth)`` fraction of grid tokens alive at the input of each block
            (1-based block ``i`` is column ``i - 1``).
        first_pruned_block: 1-based index of the first block that runs after a pruning point
            (``depth + 1`` when nothing was pruned).
    """

    grid_hw: tuple[int, int] = (0, 0)
    results: list[PruneResult] = field(default_factory=list)
    keep_grids: list[Tensor] = field(default_factory=list)
    block_keep_fraction: Tensor | None = None
    first_pruned_block: int = 0

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses of every pruning point, named ``<loss>`` or ``<loss>_<point>``."""
        losses: dict[str, Tensor] = {}
        for point, result in enumerate(self.results):
            for name, value in result.aux_losses.items():
                losses[name if len(self.results) == 1 else f"{name}_{point}"] = value
        return losses

    def sparsity(self) -> Tensor | None:
        """``(B,)`` fraction of grid tokens pruned, averaged over the blocks after the first point."""
        if self.block_keep_fraction is None or not self.results:
            return None
        after = self.block_keep_fraction[:, self.first_pruned_block - 1 :]
        return 1.0 - after.mean(dim=1)


@dataclass
class SegOutput:
    """A segmentation network's output: ``logits`` ``(B, K, H, W)`` and what pruning did."""

    logits: Tensor
    trace: PruningTrace


def merge_early_exits(logits: Tensor, trace: PruningTrace) -> Tensor:
    """Write early predictions (DToP) into the decoder's ``logits`` ``(B, K, H, W)``.

    Places in any result's ``exit_grid`` take the last result's ``early_logits`` (a canvas holding,
    per place, the head logits of the point where it exited), nearest-upsampled to their patches;
    everywhere else the decoder's logits stay. The identity when no pruning point made early exits.
    """
    exits = [r.exit_grid for r in trace.results if r.exit_grid is not None]
    canvas = next((r.early_logits for r in reversed(trace.results) if r.early_logits is not None), None)
    if not exits or canvas is None:
        return logits
    h, w = trace.grid_hw
    exited = torch.stack(exits).any(dim=0).view(-1, 1, h, w)
    size = logits.shape[-2:]
    exited = F.interpolate(exited.to(logits.dtype), size=size, mode="nearest").bool()
    early = F.interpolate(canvas.to(logits.dtype), size=size, mode="nearest")
    return torch.where(exited, early, logits)
