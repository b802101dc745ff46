"""The token budget the baselines share with PrATo's percentile mode, so comparisons are at equal counts.

Every baseline that selects a fixed number of tokens keeps ``n - floor(q n / 100)`` of the ``n``
tokens alive at each pruning point (PrATo's :func:`~prato_exp.pruning.prato.percentile_keep_count`),
so ``pruning=random threshold=percentile50`` is compared with ``pruning=percentile50`` token for token.
A fixed PrATo threshold keeps an image-dependent number that no score-free method can copy; the
baselines refuse it with an error instead of silently using another count.
"""

from __future__ import annotations

from torch import Tensor

from prato_exp.pruning.prato import descending_rank, percentile_keep, percentile_keep_count

__all__ = [
    "check_percentile_budget",
    "cumulative_count",
    "keep_top",
    "percentile_keep",
    "percentile_keep_count",
]


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
