"""The token budget PrATo and the baselines share, so comparisons are at equal counts.

A :class:`TokenBudget` (config ``pruning.budget``, chosen with the ``threshold`` group) says how many
tokens a selector keeps at each pruning point. Its percentile rule keeps ``n - floor(q n / 100)`` of the
``n`` alive tokens (:func:`percentile_keep_count`), so ``pruning=random threshold=percentile50`` is
compared with ``pruning=percentile50`` token for token. Its fixed rule (PrATo only) keeps the tokens whose
score exceeds ``tau``, an image-dependent number that no score-free method can copy; the baselines ask
for a count with :meth:`TokenBudget.require_count`, which refuses the fixed rule with an error instead of
silently using another count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import torch
from torch import Tensor

BudgetRule = Literal["percentile", "fixed"]

__all__ = [
    "BudgetRule",
    "TokenBudget",
    "cumulative_count",
    "descending_rank",
    "fixed_keep",
    "keep_top",
    "percentile_keep",
    "percentile_keep_count",
]


def descending_rank(scores: Tensor, valid: Tensor) -> Tensor:
    """``(B, N)`` rank of each valid token by score, 0 for the highest (ties by slot index)."""
    keyed = scores.detach().float().masked_fill(~valid, -math.inf)
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    arange = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, arange)


def percentile_keep_count(n: Tensor, q: float) -> Tensor:
    """``n - floor(q n / 100)``, computed exactly in integers.

    Args:
        n: ``(B,)`` long, valid tokens per image.
        q: percentile to prune, in ``(0, 100)``.

    Returns:
        ``(B,)`` long, tokens to keep.
    """
    frac = Fraction(q).limit_denominator(10**6)
    return n - torch.div(n * frac.numerator, 100 * frac.denominator, rounding_mode="floor")


def percentile_keep(scores: Tensor, valid: Tensor, q: float, min_keep: int = 1) -> Tensor:
    """Keep the top ``n - floor(q n / 100)`` valid tokens of each image by score (a top-k).

    Args:
        scores: ``(B, N)`` scores.
        valid: ``(B, N)`` bool, False on padding slots (never kept, not counted in ``n``).
        q: percentile to prune, in ``(0, 100)``.
        min_keep: at least ``min(min_keep, n)`` tokens are kept.

    Returns:
        ``(B, N)`` bool keep mask.
    """
    n = valid.sum(dim=1)
    count = torch.maximum(percentile_keep_count(n, q), n.clamp(max=min_keep))
    return (descending_rank(scores, valid) < count[:, None]) & valid


def fixed_keep(scores: Tensor, valid: Tensor, tau: float, min_keep: int = 1) -> Tensor:
    """Eq. 5: keep the valid tokens with ``s > tau``, and at least the ``min_keep`` best.

    Args:
        scores: ``(B, N)`` scores ``s``.
        valid: ``(B, N)`` bool, False on padding slots (never kept).
        tau: threshold in ``(0, 1)``.
        min_keep: at least ``min(min_keep, n)`` tokens are kept, the highest-scoring.

    Returns:
        ``(B, N)`` bool keep mask.
    """
    forced = descending_rank(scores, valid) < min_keep
    return ((scores > tau) | forced) & valid


def cumulative_count(n: Tensor, q: float, points: int) -> Tensor:
    """``(B,)`` tokens PrATo keeps after ``points`` pruning points from ``n`` ``(B,)`` tokens."""
    for _ in range(points):
        n = percentile_keep_count(n, q)
    return n


def keep_top(scores: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """``(B, N)`` bool: the ``count`` ``(B,)`` highest-scoring valid tokens (ties by slot index)."""
    return (descending_rank(scores, valid) < count[:, None]) & valid


@dataclass(frozen=True)
class TokenBudget:
    """How many tokens a selector keeps at each pruning point (config ``pruning.budget``).

    Args:
        rule: ``percentile`` keeps ``n - floor(q n / 100)`` per image (a top-k, so ties cannot change the
            count); ``fixed`` keeps the tokens with score ``> tau`` (Eq. 5), an image-dependent count.
        q: percentile of the alive tokens pruned, in ``(0, 100)``; only with ``rule=percentile``, where
            ``None`` means the paper's 25.
        tau: score threshold, in ``(0, 1)``; only with ``rule=fixed``.
        min_keep: every image keeps at least ``min(min_keep, n)`` tokens, the highest-scoring; at least 1
            (an image keeping no token has no attention key).

    Raises:
        ValueError: naming the ``pruning.budget`` key, for an unknown rule, a value out of range, or a
            value the rule does not use (a set ``tau`` with ``percentile`` would otherwise be ignored).
    """

    rule: BudgetRule = "percentile"
    q: float | None = None
    tau: float | None = None
    min_keep: int = 1

    def __post_init__(self) -> None:
        if self.rule not in get_args(BudgetRule):
            raise ValueError(f"pruning.budget.rule must be one of {get_args(BudgetRule)}, got {self.rule!r}")
        if self.rule == "percentile":
            if self.q is None:
                object.__setattr__(self, "q", 25)
            if not 0 < self.q < 100:
                raise ValueError(f"pruning.budget.q (percentile) must lie in (0, 100), got {self.q!r}")
            if self.tau is not None:
                raise ValueError(
                    f"pruning.budget.tau={self.tau!r} is not used with rule=percentile (it keeps q % of the "
                    "tokens); remove it, or choose a fixed threshold (threshold=fixed0.3)"
                )
        else:
            if self.tau is None or not 0 < self.tau < 1:
                raise ValueError(f"pruning.budget.tau (fixed threshold) must lie in (0, 1), got {self.tau!r}")
            if self.q is not None:
                raise ValueError(
                    f"pruning.budget.q={self.q!r} is not used with rule=fixed (it keeps the tokens with "
                    "s > tau); set pruning.budget.q=null, or choose a percentile (threshold=percentile25)"
                )
        if self.min_keep < 1:
            raise ValueError(
                f"pruning.budget.min_keep must be >= 1 (an image keeping no token has no attention key), "
                f"got {self.min_keep!r}"
            )

    @property
    def label(self) -> str:
        """The Table II row of this budget: ``q=25`` or ``tau=0.3``."""
        return f"q={self.q:g}" if self.rule == "percentile" else f"tau={self.tau:g}"

    def require_count(self, method: str) -> TokenBudget:
        """Return ``self`` if it keeps a fixed count per point; otherwise raise naming ``method``."""
        if self.rule != "percentile":
            raise ValueError(
                f"{method} keeps a fixed token count per point and supports only percentile budgets "
                f"(threshold=percentile25|50|75); got pruning.budget.rule={self.rule!r}, tau={self.tau!r}"
            )
        return self

    def keep(self, scores: Tensor, valid: Tensor) -> Tensor:
        """``(B, N)`` bool keep mask of ``scores`` ``(B, N)`` over the ``valid`` ``(B, N)`` slots."""
        if self.rule == "percentile":
            return percentile_keep(scores, valid, self.q, self.min_keep)
        return fixed_keep(scores, valid, self.tau, self.min_keep)

    def keep_count(self, n: Tensor, points: int = 1) -> Tensor:
        """``(B,)`` long: tokens kept of ``n`` ``(B,)`` after ``points`` percentile points (no min_keep)."""
        return cumulative_count(n, self.require_count("keep_count").q, points)

    def pruned_count(self, n: Tensor) -> Tensor:
        """``(B,)`` long: ``floor(q n / 100)``, the tokens one point removes of ``n`` ``(B,)``."""
        return n - self.keep_count(n)
