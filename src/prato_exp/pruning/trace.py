"""What pruning did in one forward pass: every point's result, the keep masks and the kept fractions."""

from __future__ import annotations

from dataclasses import dataclass, field

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
