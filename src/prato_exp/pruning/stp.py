r"""STP: token sparsification for medical image segmentation (Zhou et al., "Token Sparsification for
Faster Medical Image Segmentation", IPMI 2023; official code github.com/cvlab-stonybrook/
TokenSparse-for-MedSeg, ``lib/networks/adavit.py`` (``VisionTransformerTokenPruningV1``,
``MlpPredictor``, ``FusionNet``), ``lib/networks/gumbel_tricks.py``).

Score network (``MlpPredictor``) on the tokens at each pruning point::

    y = GELU(Linear_{C->C}(LayerNorm(x)));   z = cat(y[..., :C/2], mean_n y[..., C/2:])
    s = logsigmoid(MLP_{C -> C/2 -> C/4 -> 1}(z))                         # (B, N)

Selection keeps ``k`` tokens. Training, noise-perturbed soft top-K (``gumbel_soft_topk``):
``y_soft = softmax_n((s + g) / tau)`` with ``g ~ Gumbel(0, 1)``, ``hard`` = the top-``k`` of ``y_soft``,
``Pi = hard - y_soft.detach() + y_soft``; kept tokens go on as ``x * Pi`` and pruned ones as
``x * (1 - Pi)``: equal to ``x`` in value, with gradients to the score network from both. Inference:
the top-``k`` of ``s``. Tokens are really removed in both.

Multi-layer token assembly (MTA, ``FusionNet``) restores the full sequence for the decoder: the tokens
pruned at each point (their values there, after a per-point LayerNorm) and the final kept tokens each
get a per-group ``Linear(C -> d)`` plus a learned per-group layer token, are put back at their grid
places with a fixed 2-D sin-cos position embedding, pass ``depth`` transformer blocks, a LayerNorm and
``Linear(d -> C)``. The decoder reads this grid as its final feature and as every skip taken after the
first pruning point (the official UNETR reads it as every skip).

Departures, and why:

- 2-D: the released MTA raises for 2-D grids; the 2-D sin-cos embedding here is ours.
- Count: ``k`` is PrATo's percentile count ``n - floor(q n / 100)`` (official ``tp_ratio`` = 0.75 pruned
  per point, i.e. ``q = 75``), so comparisons are at equal budget. No class token.
- The Gumbel softmax runs over valid (non-padding) tokens only.
- MTA size follows the README commands (width = encoder width, 1 block, 8 heads) rather than the yaml
  (384, 3, 8); the MTA runs on all ``Z`` tokens and its FLOPs are counted with the pruned part.
- Skips read before the first pruning point are left as they are (nothing was pruned there).
- The MTA belongs to the pruner of the first pruning point (it needs every point's tokens).
- Hierarchical backbones (Swin UNETR, SegFormer), whose decoder reads one grid per stage: one MTA per
  grid from the pruning point on (the context's ``decoder_grids``; width = that stage's channels unless
  ``mta_width`` is set), each assembling the stage's kept tokens and the pruned places' carried values
  (``fill=carry``: the value at the point carried through Swin's merges; SegFormer's stage LayerNorm of
  the patch embedding). Pruned tokens' soft-top-K scale applies on the point's own grid only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from prato_exp.pruning.base import (
    BoxPrompt,
    FillMode,
    PointState,
    PruneMode,
    PrunerContext,
    PruneResult,
    TokenPruner,
)
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.predictors import LocalGlobalScorer
from prato_exp.tokens.token_set import TokenSet, write_to_grid


def sincos_2d(grid_hw: tuple[int, int], dim: int) -> Tensor:
    """``(h * w, dim)`` fixed 2-D sine-cosine position embedding (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid_hw
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class TokenAssembler(nn.Module):
    """STP's multi-layer token assembly: pruned groups + final kept tokens -> a full ``(B, Z, C)`` grid."""

    def __init__(
        self, dim: int, grid_hw: tuple[int, int], num_points: int, width: int, depth: int, heads: int
    ) -> None:
        super().__init__()
        self.grid_hw = tuple(grid_hw)
        self.num_points = num_points
        self.point_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_points))
        self.group_proj = nn.ModuleList(nn.Linear(dim, width) for _ in range(num_points + 1))
        self.layer_tokens = nn.Parameter(torch.zeros(num_points + 1, width))
        nn.init.trunc_normal_(self.layer_tokens, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(grid_hw, width), persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, final: Tensor, carry: Tensor, exit_point: Tensor) -> Tensor:
        """``final``/``carry`` ``(B, Z, C)``, ``exit_point`` ``(B, Z)`` (-1 = kept to the end)."""
        group = torch.where(exit_point < 0, torch.full_like(exit_point, self.num_points), exit_point)
        x = final.new_zeros(*final.shape[:2], self.layer_tokens.shape[1])
        for g, proj in enumerate(self.group_proj):
            feats = final if g == self.num_points else self.point_norms[g](carry)
            member = (group == g)[..., None].to(x.dtype)
            x = x + member * (proj(feats) + self.layer_tokens[g])
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


class STPPruner(TokenPruner):
    """STP's score network with soft top-K in training and hard top-K at inference (+ the MTA).

    Args:
        dim: token channels ``C``.
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile of the alive tokens pruned at each point (default 25).
        gumbel_tau: temperature of the perturbed softmax (official ``tp_tau`` 1.0).
        perturbation: ``gumbel`` (official) or ``none`` (the same soft top-K without noise).
        assembly: build the MTA (needs ``fill=carry``); False leaves the decoder the filled grid.
        mta_width, mta_depth, mta_heads: MTA size (width defaults to ``dim``).
        mode, fill: execution of the keep mask.
        context: the backbone's pruning context (grid and points for the MTA).
    """

    grid_modules = ("assemblers",)

    def __init__(
        self,
        dim: int,
        budget: TokenBudget | None = None,
        gumbel_tau: float = 1.0,
        perturbation: str = "gumbel",
        assembly: bool = True,
        mta_width: int | None = None,
        mta_depth: int = 1,
        mta_heads: int = 8,
        mode: PruneMode = "drop",
        fill: FillMode = "carry",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=stp")
        if perturbation not in ("gumbel", "none"):
            raise ValueError(f"perturbation must be 'gumbel' or 'none', got {perturbation!r}")
        if assembly and (fill != "carry" or context is None):
            raise ValueError(
                "stp's token assembly needs pruning.fill=carry and a backbone context "
                f"(pruner(dim=..., context=...)); got fill={fill!r}"
            )
        super().__init__(mode=mode, fill=fill)
        self.budget = budget
        self.gumbel_tau = gumbel_tau
        self.perturbation = perturbation
        self.predictor = LocalGlobalScorer(dim, out_features=1)
        self.assemblers = nn.ModuleList()
        if assembly and context is not None and context.point_index == 0:
            grids = context.decoder_grids or ((dim, context.grid_hw),)
            for channels, grid_hw in grids:
                width = mta_width or channels
                self.assemblers.append(
                    TokenAssembler(channels, grid_hw, context.num_points, width, mta_depth, mta_heads)
                )

    def extra_repr(self) -> str:
        return f"q={self.budget.q}, gumbel_tau={self.gumbel_tau}, perturbation={self.perturbation}"

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Soft top-K with a straight-through scale in training, hard top-K of ``s`` at inference."""
        tokens, grid_hw, positions, valid = alive.tokens, alive.grid_hw, alive.positions, alive.valid
        log_scores = F.logsigmoid(self.predictor(tokens, valid.to(tokens.dtype))[..., 0]).float()
        if not self.training:
            keep = self.budget.keep(log_scores, valid)
            return PruneResult(keep=keep, scores=log_scores.exp().detach())
        perturbed = log_scores
        if self.perturbation == "gumbel":
            uniform = torch.rand_like(log_scores).clamp(1e-10, 1 - 1e-10)
            perturbed = log_scores - torch.log(-torch.log(uniform))
        soft = (perturbed / self.gumbel_tau).masked_fill(~valid, -math.inf).softmax(dim=1)
        keep = self.budget.keep(soft, valid)
        delta = soft - soft.detach()
        ones = torch.ones(tokens.shape[0], grid_hw[0] * grid_hw[1], dtype=delta.dtype, device=delta.device)
        pruned_scale = write_to_grid(
            ones, torch.where(keep, torch.ones_like(delta), 1 - delta), positions, valid
        )
        return PruneResult(
            keep=keep,
            scores=soft.detach(),
            token_scale=torch.where(keep, 1 + delta, torch.ones_like(delta)).to(tokens.dtype),
            extras={"grid_pruned_scale": pruned_scale},
        )

    def assemble(
        self, final: Tensor, carry: Tensor, exit_point: Tensor, results: list, index: int = 0
    ) -> Tensor | None:
        """The MTA's grid number ``index`` (first point's pruner only); on the pruning point's own grid
        (``index`` 0) pruned tokens carry their soft-top-K scale."""
        if not self.assemblers:
            return None
        for point, result in enumerate(results if index == 0 else []):
            scale = result.extras.get("grid_pruned_scale")
            if scale is not None:
                carry = carry * torch.where(exit_point == point, scale, torch.ones_like(scale))[..., None].to(
                    carry.dtype
                )
        return self.assemblers[index](final, carry, exit_point)
