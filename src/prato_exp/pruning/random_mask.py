"""Random token masking: the PrATo paper's unguided baseline (Sec. IV, "randomly drops a fixed number of
tokens without any guidance").

At each pruning point every image keeps a uniformly random subset of its ``n`` alive tokens of the same
size PrATo's percentile mode keeps (``n - floor(q n / 100)``, :mod:`prato_exp.pruning.budget`), a fresh
subset for every image and every call. Training draws from torch's global generator (seeded by the
run's ``seed``, so a run is reproducible, and every epoch sees new masks). Evaluation draws from a
generator owned by the pruner and seeded with ``seed``; :meth:`RandomPruner.reset_rng`, called by the
LightningModule at the start of every evaluation epoch, restarts it, so every evaluation of a model
sees the same masks for the same data order.
"""

from __future__ import annotations

import torch

from prato_exp.pruning.base import (
    BoxPrompt,
    FillMode,
    PointState,
    PruneMode,
    PrunerContext,
    PruneResult,
    TokenPruner,
)
from prato_exp.pruning.budget import check_percentile_budget, percentile_keep
from prato_exp.tokens.token_set import TokenSet


class RandomPruner(TokenPruner):
    """Keep a seeded uniformly random subset of PrATo's size.

    Args:
        dim: token channels (unused: random masking has no parameters).
        q: percentile of the alive tokens pruned at each point.
        seed: seed of the evaluation stream (the point index is added, so points differ).
        threshold, tau: the ``threshold`` config group's keys; only ``percentile`` is accepted.
        mode, fill: execution of the keep mask (see :mod:`prato_exp.pruning.base`).
        min_keep: tokens always kept per image.
        context: the backbone's pruning context (for the point index).
    """

    rescorable = frozenset({"q", "seed", "mode"})

    def __init__(
        self,
        dim: int | None = None,
        q: float = 25,
        seed: int = 0,
        threshold: str = "percentile",
        tau: float | None = None,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        min_keep: int = 1,
        context: PrunerContext | None = None,
    ) -> None:
        check_percentile_budget("random", threshold, q, tau)
        super().__init__(mode=mode, fill=fill)
        self.q = q
        self.min_keep = min_keep
        self.seed = seed + (context.point_index if context is not None else 0)
        self.generator = torch.Generator()
        self.reset_rng()

    def extra_repr(self) -> str:
        return f"q={self.q}, seed={self.seed}, mode={self.mode}, fill={self.fill}"

    def reset_rng(self) -> None:
        """Restart the random stream at ``seed``."""
        self.generator.manual_seed(self.seed)

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Draw ``u ~ U(0, 1)`` per token (on the CPU) and keep the top count of ``u``."""
        valid = alive.valid
        generator = None if self.training else self.generator
        scores = torch.rand(valid.shape, generator=generator).to(valid.device)
        scores = scores.masked_fill(~valid, 0.0)
        return PruneResult(keep=percentile_keep(scores, valid, self.q, self.min_keep), scores=scores)
