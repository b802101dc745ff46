r"""DynamicViT (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification", NeurIPS 2021; official code github.com/raoyongming/DynamicViT, ``models/dyvit.py``,
``losses.py``).

At each pruning point a prediction module scores the alive tokens ``x`` ``(B, N, C)``::

    y      = GELU(Linear_{C->C}(LayerNorm(x)))
    local  = y[..., :C/2];   global = sum_n(y[..., C/2:] * D_prev) / sum_n(D_prev)
    logits = LogSoftmax(MLP_{C -> C/2 -> C/4 -> 2}(cat(local, global)))     # channel 0 = log P(keep)

Training: ``D = GumbelSoftmax(logits, tau=1, hard=True)[..., 0] * D_prev`` (0/1 in value, straight-
through gradient), returned as ``PruneResult.soft_keep``. Nothing is removed: every backbone runs the
later blocks on all tokens with attention weighted by the policy
(:class:`~prato_exp.tokens.attention_mask.KeyPolicy`, the original's ``softmax_with_policy``: a kept
query attends to kept keys, a dropped token to itself), so batch shapes stay fixed and the gradient
reaches the predictor through the attention. The keep
ratio loss ``ratio_weight / P * sum_p mean_b (mean_n D_p - rho_p)^2`` pulls the kept fraction of all
``Z`` tokens toward the cumulative target ``rho_p`` (over the images that are pruned: rows exempted by
the ``no_pruning`` empty-slice fallback neither count nor pass gradients). Inference keeps the
top-``k`` tokens by ``logits[..., 0]`` and really drops the rest (the backbone's ``drop`` path).

Departures for dense prediction, and why:

- Keep count: ``rho_p`` is the cumulative keep fraction of PrATo's percentile rule
  (``n - floor(q n / 100)`` at every point), and inference keeps exactly PrATo's count, so tables compare
  at equal budget (the paper's ``[rho, rho^2, rho^3]`` with ``rho = 0.7`` is ``q = 30`` at 3 points).
- No class token: the global feature averages the policy-weighted patch tokens only.
- The decoder reads the token grid: in training, places the policy drops read as the tokens times the
  policy (zero in value) wherever the grid is read (skips, the final feature, Swin's merges, SegFormer's
  convolutions), exactly what ``fill=zero`` gives at inference; so the task loss also reaches the
  predictor through the skips (the original has no dense output).
- Hierarchical backbones (Swin UNETR, SegFormer): keys are weighted per window slot (Swin) or per
  spatially reduced key, by its largest parent's policy (SegFormer, where a query reads itself only at
  ``sr = 1``), and a next-stage token's policy is its largest parent's; the training execution then
  equals ``drop`` of the sampled keep in value (tested).
- No distillation: the paper distils from an unpruned pretrained teacher (token MSE + logit KL, weight
  0.5). Models here train from scratch on a fixed budget with the same recipe as every other pruner,
  so the teacher terms are left out; ``ratio_weight`` keeps the paper's 2.0.
- One learning rate for predictor and backbone (the original scales the pretrained backbone's by 0.01).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
from prato_exp.tokens.token_set import TokenSet


class DynamicViTPruner(TokenPruner):
    """DynamicViT's learned keep/drop predictor at one pruning point.

    Args:
        dim: token channels ``C``.
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile of the alive tokens pruned at each point, default 25 (it sets ``rho_p`` and the
            inference count).
        ratio_weight: weight of the keep-ratio loss (paper: 2.0), divided by the number of points.
        gumbel_tau: Gumbel-softmax temperature (paper: 1).
        mode, fill: execution of the inference keep mask.
        context: the backbone's pruning context (point index and count set ``rho_p``).
    """

    def __init__(
        self,
        dim: int,
        budget: TokenBudget | None = None,
        ratio_weight: float = 2.0,
        gumbel_tau: float = 1.0,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=dynamicvit")
        if fill != "zero":
            raise ValueError(
                f"dynamicvit zeroes dropped places in training; fill must be 'zero', got {fill!r}"
            )
        if mode != "drop":
            raise ValueError(
                f"dynamicvit runs its own masked attention in training; mode must be 'drop', got {mode!r}"
            )
        super().__init__(mode=mode, fill=fill)
        self.budget = budget
        self.ratio_weight = ratio_weight
        self.gumbel_tau = gumbel_tau
        self.point_index = context.point_index if context is not None else 0
        self.num_points = context.num_points if context is not None else 1
        self.predictor = LocalGlobalScorer(dim, out_features=2)

    def extra_repr(self) -> str:
        point = f"{self.point_index}/{self.num_points}"
        return f"q={self.budget.q}, ratio_weight={self.ratio_weight}, point={point}"

    def target_ratio(self) -> float:
        """``rho_p``: the cumulative fraction of the grid kept after this point."""
        return (1.0 - self.budget.q / 100.0) ** (self.point_index + 1)

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Training: a Gumbel hard sample of the policy and the ratio loss; inference: top-k keep."""
        tokens, valid = alive.tokens, alive.valid
        prev = state.soft_keep if state.soft_keep is not None else valid.to(tokens.dtype)
        log_probs = self.predictor(tokens, prev).log_softmax(dim=-1)
        scores = log_probs[..., 0].exp()
        if not self.training:
            keep = self.budget.keep(scores, valid)
            return PruneResult(keep=keep, scores=scores.detach())
        sample = F.gumbel_softmax(log_probs.float(), tau=self.gumbel_tau, hard=True)[..., 0]
        policy = sample.to(tokens.dtype) * prev * valid.to(tokens.dtype)
        kept_fraction = policy.sum(dim=1) / policy.shape[1]
        pruned_rows = (
            ~state.exempt if state.exempt is not None else torch.ones_like(kept_fraction, dtype=torch.bool)
        )
        squared = (kept_fraction - self.target_ratio()) ** 2
        ratio_loss = (squared * pruned_rows).sum() / pruned_rows.sum().clamp_min(1)
        return PruneResult(
            keep=policy.detach() > 0.5,
            scores=scores.detach(),
            aux_losses={"keep_ratio": self.ratio_weight / self.num_points * ratio_loss},
            soft_keep=policy,
        )
