"""What pruning did in one forward pass: every point's result, the keep masks and the kept fractions."""

from __future__ import annotations

from collections.abc import Callable
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
        merges: per pruning point, ``(B, Z)`` long: the place each place merged away there was merged
            into (-1 for the others), or None where the point merged nothing.
    """

    grid_hw: tuple[int, int] = (0, 0)
    results: list[PruneResult] = field(default_factory=list)
    keep_grids: list[Tensor] = field(default_factory=list)
    block_keep_fraction: Tensor | None = None
    first_pruned_block: int = 0
    merges: list[Tensor | None] = field(default_factory=list)

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

    def exit_points(self) -> Tensor:
        """``(B, Z)`` long: the 0-based pruning point that removed each place, -1 if alive to the end."""
        exit_point = torch.full_like(self.keep_grids[0], -1, dtype=torch.long)
        alive = torch.ones_like(self.keep_grids[0])
        for point, keep in enumerate(self.keep_grids):
            exit_point = torch.where(alive & ~keep, torch.full_like(exit_point, point), exit_point)
            alive = alive & keep
        return exit_point

    def final_logits(self, logits: Tensor) -> Tensor:
        """The prediction after the pruners' own final predictions are written into the decoder's
        ``logits`` ``(B, K, H, W)``; the identity unless a pruning point made early exits.

        Places in any result's ``early_exit.exit_grid`` take the last early exit's ``logits`` (a canvas
        holding, per place, the head logits of the point where it exited; DToP), nearest-upsampled to
        their patches; everywhere else the decoder's logits stay.
        """
        made = [r.early_exit for r in self.results if r.early_exit is not None]
        if not made:
            return logits
        h, w = self.grid_hw
        canvas = made[-1].logits
        exited = torch.stack([e.exit_grid for e in made]).any(dim=0).view(-1, 1, h, w)
        size = logits.shape[-2:]
        exited = F.interpolate(exited.to(logits.dtype), size=size, mode="nearest").bool()
        early = F.interpolate(canvas.to(logits.dtype), size=size, mode="nearest")
        return torch.where(exited, early, logits)

    def early_prediction_losses(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], target: Tensor
    ) -> dict[str, Tensor]:
        """The task loss of every early prediction (DToP's heads), upsampled bilinearly to ``target``
        ``(B, 1, H, W)`` and weighted by its point's ``early_loss_weight``; named ``early_head`` or
        ``early_head_<point>``. Empty when no point made early predictions."""
        points = [(i, r.early_exit) for i, r in enumerate(self.results) if r.early_exit is not None]
        losses = {}
        for i, early in points:
            logits = F.interpolate(early.logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            name = "early_head" if len(points) == 1 else f"early_head_{i}"
            losses[name] = early.loss_weight * loss_fn(logits, target)
        return losses
