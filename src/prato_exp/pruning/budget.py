"""The token budget PrATo and the baselines share, so comparisons are at equal counts.

PrATo's percentile mode and every baseline that selects a fixed number of tokens keep
``n - floor(q n / 100)`` of the ``n`` tokens alive at each pruning point (:func:`percentile_keep_count`),
so ``pruning=random threshold=percentile50`` is compared with ``pruning=percentile50`` token for token.
A fixed PrATo threshold keeps an image-dependent number that no score-free method can copy; the
baselines refuse it with an error instead of silently using another count.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "check_percentile_budget",
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


def check_percentile_budget(method: str, threshold: str, q: float, tau: float | None) -> None:
    """Raise a ValueError unless ``threshold`` is ``percentile`` with ``q`` in ``(0, 100)``."""
    if threshold != "percentile" or tau is not None:
        raise ValueError(
            f"{method} keeps a fixed token count per point and supports only percentile thresholds "
            f"(threshold=percentile25|50|75); got threshold={threshold!r}, tau={tau!r}"
        )
    if not 0 < q < 100:
        raise ValueError(f"{method}: percentile q must lie in (0, 100), got {q!r}")
