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

import torch
import torch.nn.functional as F
from torch import Tensor

from prato_exp.pruning.trace import PruningTrace

__all__ = ["PruningTrace", "SegOutput", "merge_early_exits"]


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
