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
from prato_exp.pruning.budget import TokenBudget
from prato_exp.tokens.token_set import TokenSet


class RandomPruner(TokenPruner):
    """Keep a seeded uniformly random subset of PrATo's size.

    Args:
        dim: token channels (unused: random masking has no parameters).
        budget: the token budget; only its percentile rule applies (a count per point): ``q`` is the
            percentile of the alive tokens pruned at each point (default 25).
        seed: seed of the evaluation stream (the point index is added, so points differ).
        mode, fill: execution of the keep mask (see :mod:`prato_exp.pruning.base`).
        context: the backbone's pruning context (for the point index).
    """

    rescorable = frozenset({"budget", "seed", "mode"})

    def __init__(
        self,
        dim: int | None = None,
        budget: TokenBudget | None = None,
        seed: int = 0,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        budget = (budget or TokenBudget()).require_count("pruning=random")
        super().__init__(mode=mode, fill=fill)
        self.budget = budget
        self.seed = seed + (context.point_index if context is not None else 0)
        self.generator = torch.Generator()
        self.reset_rng()

    def extra_repr(self) -> str:
        return f"q={self.budget.q}, seed={self.seed}, mode={self.mode}, fill={self.fill}"

    def reset_rng(self) -> None:
        """Restart the random stream at ``seed``."""
        self.generator.manual_seed(self.seed)

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Draw ``u ~ U(0, 1)`` per token (on the CPU) and keep the top count of ``u``."""
        valid = alive.valid
        generator = None if self.training else self.generator
        scores = torch.rand(valid.shape, generator=generator).to(valid.device)
        scores = scores.masked_fill(~valid, 0.0)
        return PruneResult(keep=self.budget.keep(scores, valid), scores=scores)
