"""ToMe-style token merging (Bolya et al., ICLR 2023; for segmentation ALGM, CVPR 2024): the prompt-free
anchor that merges redundant tokens instead of dropping them.

At each pruning point the alive tokens are split alternately into two sets A and B (bipartite soft
matching). Every A token finds its most similar B token (cosine similarity of the tokens; ToMe uses the
attention keys, which a pruning point between blocks does not see), and the ``floor(q n / 100)`` A tokens
with the most similar partners are merged into them: the destination becomes the size-weighted mean of
itself and what was merged into it, where a token's size counts the patches it already holds (carried
from point to point in :class:`ToMeState`). The merged-away tokens leave the set like pruned ones, so the
later blocks run on fewer tokens; before the decoder every merged-away place takes its destination's
value (unmerging: the executor records the merge in the token set, whose every grid read,
:meth:`~prato_exp.tokens.token_set.TokenSet.to_grid`, shows a merged-away place with its destination's
value), so the decoder sees a complete grid. ToMe's proportional attention (``log size`` added to the
attention logits) is not applied.

One bipartite round merges at most the A half, so ``q`` is at most 50. The box prompt is not read.

Hierarchical backbones (one merging point at a stage): every grid read after it is unmerged, so Swin's
patch merging, SegFormer's key-reduction and depth-wise convolutions and next patch embedding, and both
decoders see merged-away places with their destination's value; at the next stage a place with no kept
parent takes the place its first merged parent's destination became. Departure in Swin UNETR: a merged
token attends inside its destination's window only, so the windows its sources came from no longer
see them (ToMe's equivalence of a merged token with its sources assumes global attention). SegFormer's
keys at ``sr > 1`` are reduced from the unmerged grid, so there the sources are seen as keys in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    TokenMerge,
    TokenPruner,
)
from prato_exp.pruning.budget import TokenBudget, descending_rank
from prato_exp.tokens.token_set import TokenSet


@dataclass
class ToMeState(CarriedState):
    """``size`` ``(B, N)``: how many grid patches each alive token holds."""

    size: Tensor = field(metadata=SLOT_ALIGNED)


def bipartite_sides(valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, N)`` bool masks of sides A and B: the valid slots alternately, in slot order."""
    rank = valid.long().cumsum(dim=1) - 1
    side_a = valid & (rank % 2 == 0)
    return side_a, valid & ~side_a


def match(tokens: Tensor, side_a: Tensor, side_b: Tensor) -> tuple[Tensor, Tensor]:
    """For every slot the most similar B slot (cosine) and that similarity, ``(B, N)`` each.

    Only rows on side A are meaningful (others get similarity ``-inf``).
    """
    unit = F.normalize(tokens.detach().float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    similarity = similarity.masked_fill(~side_b[:, None, :], -torch.inf)
    best, partner = similarity.max(dim=-1)
    return best.masked_fill(~side_a, -torch.inf), partner


def merge_tokens(
    tokens: Tensor, size: Tensor, merged: Tensor, partner: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the slots in ``merged`` ``(B, N)`` into their ``partner`` ``(B, N)`` slots.

    Returns the tokens ``(B, N, C)`` with every destination replaced by the size-weighted mean of itself
    and its sources (other slots unchanged), the new sizes ``(B, N)``, and the slot each token now lives
    in ``(B, N)`` long (its partner when merged, itself otherwise).
    """
    own = torch.arange(tokens.shape[1], device=tokens.device).expand_as(partner)
    target = torch.where(merged, partner, own)
    weight = size.to(tokens.dtype)[..., None]
    summed = torch.zeros_like(tokens).scatter_add(1, target[..., None].expand_as(tokens), tokens * weight)
    new_size = torch.zeros_like(size).scatter_add(1, target, size)
    gained = new_size > size
    mean = summed / new_size.clamp(min=1).to(tokens.dtype)[..., None]
    return torch.where(gained[..., None], mean, tokens), torch.where(merged, size, new_size), target


class ToMeMerger(TokenPruner):
    """Merge the ``floor(q n / 100)`` most redundant tokens at each point into their nearest partner.

    Args:
        dim: token channels (unused: merging has no parameters).
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile of the alive tokens merged away at each point, in ``(0, 50]`` (default 25).
            Its ``min_keep`` is unused: a round keeps at least the B half.
        mode: ``drop`` (the later blocks run on the reduced set) or ``mask`` (its exact emulation on the
            grid); ``zero_once`` has no meaning for merging and is refused.
        fill: what non-merged pruned places hold (none here: every removed token is merged).
        context: the backbone's pruning context (unused).
    """

    rescorable = frozenset({"budget", "mode"})

    def __init__(
        self,
        dim: int | None = None,
        budget: TokenBudget | None = None,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=tome")
        if budget.q > 50:
            raise ValueError(
                f"pruning.budget.q={budget.q}: one bipartite round of ToMe merges at most half the tokens "
                "(side A); "
                "use q <= 50 or more pruning points (model.prune_after)"
            )
        if mode == "zero_once":
            raise ValueError("pruning.mode=zero_once has no meaning for token merging; use drop or mask")
        super().__init__(mode=mode, fill=fill)
        self.budget = budget

    def extra_repr(self) -> str:
        return f"q={self.budget.q}, mode={self.mode}"

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Match A to B, merge the most similar A tokens; ``scores`` = 1 - similarity to the partner."""
        tokens, valid = alive.tokens, alive.valid
        carried = state.carried
        size = carried.size if isinstance(carried, ToMeState) else valid.long()
        side_a, side_b = bipartite_sides(valid)
        best, partner = match(tokens, side_a, side_b)
        n = valid.sum(dim=1)
        count = torch.minimum(self.budget.pruned_count(n), side_a.sum(dim=1))
        merged = side_a & (descending_rank(best, side_a) < count[:, None])
        merged_tokens, new_size, target = merge_tokens(tokens, size * valid, merged, partner)
        scores = torch.where(side_a, 1.0 - best.clamp(min=-1.0), torch.ones_like(best)) * valid
        return PruneResult(
            keep=valid & ~merged,
            scores=scores,
            carried=ToMeState(size=new_size),
            merge=TokenMerge(merged_tokens, target),
        )
