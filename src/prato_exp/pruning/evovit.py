r"""Evo-ViT (Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022;
official code github.com/YifanXu74/Evo-ViT, ``deit/evo_deit.py``, ``levit/evo_levit.py``).

Tokens are ranked by a global attention score ``g`` ``(B, Z)`` that every block updates. At a pruning
point the top tokens are *informative*, the rest *placeholders*; nothing leaves the grid. In each block
after the point (until the next point, where all ``Z`` tokens are ranked again):

- slow path: the informative tokens plus one representative token
  ``x_rep = sum_{j in P} w_j x_j`` (``w_j = g_j / sum_P g``) go through the full block, giving the
  attention residual ``r1`` and the MLP residual ``r2``;
- fast path: every placeholder gets the representative's residuals, ``x_j += r1_rep + r2_rep``;
- ``g`` of the informative tokens is updated: ``g <- (1 - lam) g + lam a`` with ``a`` this block's
  attention received by each informative key (``lam`` = ``momentum``, 0.5 in the official code).

Before the first point ``g`` is the received attention of the block just before it (the official
``lam = 1`` for the blocks before the first selection). No extra loss; the selection is not
differentiable, as in the original.

Departures for dense prediction, and why:

- Global query. Segmentation ViTs have no class token, whose attention row the paper uses. Here
  ``a_j = sum_h mean_{i valid} A_h[i, j]``: the attention an average query pays to ``j``. Every token is
  an output in segmentation, so none is privileged; the mean row is the dense analogue of the class
  row (a convex combination of rows, so ``lam``-mixing keeps its scale) and needs no parameters.
- Keep count: PrATo's percentile rule applied cumulatively (``n - floor(q n / 100)`` per point), so the
  informative set has PrATo's size; the official stages keep 50 % (``q = 50``).
- The decoder reads the full grid, placeholders included (they hold their fast-path values), so no
  fill is needed; ``sparsity`` counts placeholders as pruned since the block's heavy layers skip them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from prato_exp.pruning.base import (
    SLOT_ALIGNED,
    BoxPrompt,
    CarriedState,
    FillMode,
    PointState,
    PruneMode,
    PrunerContext,
    PruneResult,
    TokenPruner,
)
from prato_exp.pruning.budget import TokenBudget, keep_top
from prato_exp.tokens.attention_mask import KeyMask
from prato_exp.tokens.blocks import BlockParts
from prato_exp.tokens.token_set import TokenSet, gather_slots, kept_order, scatter_slots, write_to_grid


def received_attention(weights: Tensor, valid: Tensor) -> Tensor:
    """``(B, N)`` attention received per key, summed over heads and averaged over valid queries.

    ``weights`` ``(B, heads, N, N)`` softmaxed; ``valid`` ``(B, N)`` bool. Padding keys get 0.
    """
    rows = valid[:, None, :, None].to(weights.dtype)
    received = (weights * rows).sum(dim=(1, 2)) / valid.sum(dim=1, keepdim=True).clamp_min(1).to(
        weights.dtype
    )
    return received * valid.to(weights.dtype)


@dataclass
class EvoViTState(CarriedState):
    """``global_attn`` ``(B, N)``: the global attention ``g`` of every token (Evo-ViT keeps the full grid)."""

    global_attn: Tensor = field(metadata=SLOT_ALIGNED)


class EvoViTPruner(TokenPruner):
    """Evo-ViT's slow-fast token evolution after each pruning point.

    Args:
        dim: token channels (unused: no parameters).
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile pruned per point, default 25 (PrATo's count, applied cumulatively over points).
        momentum: ``lam`` of the global attention update inside a stage (official: 0.5).
        representative: update placeholders by the representative token's residuals (the paper);
            False freezes them (the official DeiT code).
        mode, fill: Evo-ViT keeps the full grid; ``mode`` must be ``drop`` (the default).
        context: the backbone's pruning context (point index for the cumulative count).
    """

    rescorable = frozenset({"budget"})

    needs_attention = True
    plain_vit_only = (
        "its slow-fast update runs one representative token (the placeholders' weighted mean) through "
        "global attention with the informative tokens, and a hierarchical model's attention (Swin's "
        "windows, SegFormer's keys reduced from the grid) has no place for a token off the grid."
    )

    def __init__(
        self,
        dim: int | None = None,
        budget: TokenBudget | None = None,
        momentum: float = 0.5,
        representative: bool = True,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=evovit")
        if mode != "drop":
            raise ValueError(f"evovit runs its own slow-fast blocks; mode must be 'drop', got {mode!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        super().__init__(mode=mode, fill=fill)
        self.budget = budget
        self.momentum = momentum
        self.representative = representative
        self.point_index = context.point_index if context is not None else 0

    def extra_repr(self) -> str:
        return f"q={self.budget.q}, momentum={self.momentum}, representative={self.representative}"

    def attention_score(self, weights: Tensor, valid: Tensor) -> Tensor:
        """The attention each key receives from the average query."""
        return received_attention(weights, valid)

    def observe_scores(
        self, received: Tensor, valid: Tensor, state: PointState, block_index: int
    ) -> PointState:
        """Before the first point, ``g`` is the last observed block's received attention."""
        return replace(state, carried=EvoViTState(received))

    def runs_blocks(self) -> bool:
        return True

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """The informative tokens: the top PrATo-count of the global attention ``g``."""
        tokens, grid_hw, valid = alive.tokens, alive.grid_hw, alive.valid
        if tokens.shape[1] != grid_hw[0] * grid_hw[1]:
            raise ValueError("evovit expects the full token grid at every point (it never drops tokens)")
        assert isinstance(state.carried, EvoViTState), (
            "Evo-ViT observes the attention of the blocks before it"
        )
        g = state.carried.global_attn
        count = self.budget.keep_count(valid.sum(dim=1), self.point_index + 1)
        keep = keep_top(g, valid, count.clamp_min(1))
        return PruneResult(keep=keep, scores=g, carried=EvoViTState(g))

    def run_block(self, parts: BlockParts, tokens: Tensor, state: PointState) -> tuple[Tensor, PointState]:
        """Slow path for informative tokens + representative, fast path for placeholders."""
        assert state.keep is not None and isinstance(state.carried, EvoViTState)
        keep, g = state.keep, state.carried.global_attn
        z = tokens.shape[1]
        order, inf_valid = kept_order(keep)
        informative = gather_slots(tokens, order, inf_valid)
        slots, slot_valid = informative, inf_valid
        placeholder = ~keep
        if self.representative:
            w = g.clamp_min(0) * placeholder.to(g.dtype)
            w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            rep = (w[..., None].to(tokens.dtype) * tokens).sum(dim=1, keepdim=True)
            slots = torch.cat([informative, rep], dim=1)
            slot_valid = torch.cat([inf_valid, placeholder.any(dim=1, keepdim=True)], dim=1)
        r1, weights = parts.attention(slots, KeyMask(None if bool(slot_valid.all()) else slot_valid).softmax)
        hidden = slots + r1
        r2 = parts.mlp(hidden)
        out = hidden + r2
        n_inf = informative.shape[1]
        fill = tokens
        if self.representative:
            fill = tokens + (r1 + r2)[:, n_inf:] * placeholder[..., None].to(tokens.dtype)
        grid = scatter_slots(out[:, :n_inf], order, inf_valid, z, fill)
        received = received_attention(weights.detach()[:, :, :n_inf, :n_inf], inf_valid)
        updated = (1 - self.momentum) * torch.gather(g, 1, order) + self.momentum * received
        return grid, replace(state, carried=EvoViTState(write_to_grid(g, updated, order, inf_valid)))
