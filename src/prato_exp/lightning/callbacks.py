"""Callbacks every training run gets: a non-finite-loss guard and per-epoch seeding.

Both know nothing of models or pruners; ``train.py`` adds them to every trainer.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the step and the batch's cases."""


def _batch_cases(batch: Any, limit: int = 16) -> str:
    if not isinstance(batch, dict) or "case_id" not in batch:
        return "(batch has no case ids)"
    slices = batch.get("slice_index")
    slices = [0] * len(batch["case_id"]) if slices is None else slices
    cases = [f"{c}:{int(z)}" for c, z in zip(batch["case_id"], slices, strict=True)]
    more = f" and {len(cases) - limit} more" if len(cases) > limit else ""
    return ", ".join(cases[:limit]) + more


class NonFiniteLossGuard(Callback):
    """Stop training at the first non-finite loss, before it reaches the weights.

    Checked before ``backward`` (one scalar read per step), so the weights are still those of the last
    good step: on one process they are saved to ``<checkpoint dir>/before-nonfinite.ckpt`` and the run
    stops with a :class:`NonFiniteLossError` naming the step, the loss, the batch's ``case:slice`` ids
    and the checkpoints kept. No checkpoint of NaN weights is ever written.
    """

    def __init__(self) -> None:
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        kept = []
        ckpt_cb = trainer.checkpoint_callback
        if trainer.world_size == 1 and ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None):
            path = Path(ckpt_cb.dirpath) / "before-nonfinite.ckpt"
            trainer.save_checkpoint(path)
            kept.append(str(path))
            if getattr(ckpt_cb, "last_model_path", ""):
                kept.append(f"{ckpt_cb.last_model_path} (last epoch end)")
        raise NonFiniteLossError(
            f"training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"batch cases (case:slice): {_batch_cases(self._batch)}. Weights kept before this step: "
            f"{', '.join(kept) if kept else 'none written (no checkpoint folder, or several processes)'}. "
            "Check those images and labels, or lower the learning rate."
        )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of training epoch ``epoch`` of a run seeded ``seed`` (a pure function of both)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochSeed(Callback):
    """Reseed torch, numpy and ``random`` at the start of every training epoch from ``(seed, epoch)``.

    The data order, augmentation, pruner noise and dropout of an epoch then depend on the seed and the
    epoch alone, so a run resumed from an epoch-end checkpoint continues exactly as the unbroken run.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)
