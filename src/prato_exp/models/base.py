"""What every prunable segmentation network returns, and the contract it follows.

A backbone wrapper (UNETR, ...) is a plain ``nn.Module`` with

- ``forward(image (B,C,H,W), box_xyxy (B,4) | None, prune_enabled (B,) | None) -> SegOutput``;
- ``pruners``: an ``nn.ModuleDict`` of the pruners at its pruning points (the ``none`` pruner when off);
- ``pruned_part() -> list[str]``: module names of the layers that run after the first pruning point,
  so FLOP ratios can be given for the part that pruning touches.

The LightningModule, ``eval.py`` and ``scripts/benchmark.py`` rely on nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from prato_exp.pruning.trace import PruningTrace

__all__ = ["PruningTrace", "SegOutput"]


@dataclass
class SegOutput:
    """A segmentation network's output: ``logits`` ``(B, K, H, W)`` and what pruning did."""

    logits: Tensor
    trace: PruningTrace
