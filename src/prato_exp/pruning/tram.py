r"""TRAM (Marchetti, Traini et al., "TRAM: Token relevance with attention maps ..." Expert Systems with
Applications 279, 127449, 2025; official code github.com/DavideTraini/TRAM, ``Code/Pretrained/TRAM.py``).

The attention maps of the blocks are the layers of a multilayer network whose edges are attention
weights. For block ``l`` with weights ``A_h`` ``(N, N)`` per head::

    A     = max_h A_h                         # (N, N)
    c_in  = sum_i A[i, :]                     # in-degree: attention each token receives
    r_l   = A^T c_in                          # attention received from well-attended tokens
    C_l   = C_{l-1} + (l / depth) r_l         # accumulated centrality, deeper layers weigh more

At a pruning point the tokens with the lowest centrality are discarded and ``C`` is carried for the
kept tokens. No parameters and no loss: only the attention weights are needed, so those blocks run on
the non-fused attention path (MONAI's einsum path; timm's non-fused path), and only for this pruner.

Departures, and why:

- Where: the official code prunes inside blocks 4, 7, 10, after attention and before the MLP; here
  pruning is at block boundaries like every other pruner (after the configured blocks, default 3),
  so the token grids and skips are comparable; block 4's attention is then not part of the score.
- Count: PrATo's percentile rule ``n - floor(q n / 100)`` per point (official: a ``cut`` of 75/50 %).
- ``depth`` (the number of blocks) replaces the hard-coded 12; padding rows and columns are excluded.
- No class token to remove.
- Swin UNETR: the blocks' attention is windowed, so each layer of the network is block-diagonal (one
  block per window, shifted every other block) and ``r_l`` is computed per window; the pruning point
  follows a patch merging, where a merged token's centrality is the sum of its 2 x 2 parents' (the
  merged node receives every edge its parents received). SegFormer is refused: its tokens at the
  pruning point are new (a patch embedding) and its attention reads spatially reduced keys, so no
  token-to-token attention graph exists there.
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
from prato_exp.pruning.budget import TokenBudget
from prato_exp.tokens.token_set import TokenSet


def layer_relevance(weights: Tensor, valid: Tensor) -> Tensor:
    """``r_l`` ``(B, N)`` of one block's attention ``weights`` ``(B, heads, N, N)`` over ``valid`` tokens."""
    pair = valid[:, :, None] & valid[:, None, :]
    attn = weights.amax(dim=1) * pair.to(weights.dtype)
    in_degree = attn.sum(dim=1)
    return torch.einsum("bij,bi->bj", attn, in_degree)


@dataclass
class TRAMState(CarriedState):
    """``centrality`` ``(B, N)``: the accumulated attention centrality of the alive tokens."""

    centrality: Tensor = field(metadata=SLOT_ALIGNED)


class TRAMPruner(TokenPruner):
    """Prune the tokens with the lowest accumulated attention centrality.

    Args:
        dim: token channels (unused).
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile of the alive tokens pruned at each point (default 25).
        mode, fill: execution of the keep mask.
        context: the backbone's pruning context (``depth`` weighs the layers).
    """

    rescorable = frozenset({"budget", "mode"})

    needs_attention = True

    def __init__(
        self,
        dim: int | None = None,
        budget: TokenBudget | None = None,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=tram")
        super().__init__(mode=mode, fill=fill)
        self.budget = budget
        self.depth = context.depth if context is not None else 12

    def extra_repr(self) -> str:
        return f"q={self.budget.q}, depth={self.depth}, mode={self.mode}, fill={self.fill}"

    def attention_score(self, weights: Tensor, valid: Tensor) -> Tensor:
        """``r_l`` of one block (per window in Swin: the attention graph is block-diagonal there)."""
        return layer_relevance(weights.float(), valid)

    def observe_scores(
        self, relevance: Tensor, valid: Tensor, state: PointState, block_index: int
    ) -> PointState:
        """``C += (l / depth) r_l`` for block ``l`` = ``block_index``."""
        carried = state.carried
        previous = carried.centrality if isinstance(carried, TRAMState) else torch.zeros_like(relevance)
        return replace(state, carried=TRAMState(previous + (block_index / self.depth) * relevance))

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Keep PrATo's count of the most central tokens; carry their centrality."""
        valid = alive.valid
        assert isinstance(state.carried, TRAMState), "TRAM observes the attention of the blocks before it"
        centrality = state.carried.centrality.masked_fill(~valid, 0.0)
        keep = self.budget.keep(centrality, valid)
        return PruneResult(keep=keep, scores=centrality, carried=TRAMState(centrality))
