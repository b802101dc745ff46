"""Training progress that stays readable wherever the output goes.

On a terminal Lightning's tqdm bar redraws one line in place. Written to a file (``> train.log``, SLURM's
``slurm-*.out``) the same bar is thousands of carriage returns, so off a terminal :class:`LineProgressBar`
prints one plain line every ``every_percent`` of an epoch instead: step, loss, throughput and ETA.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgressBar(ProgressBar):
    """Plain-line progress for files and pipes: no carriage returns, one line per ``every_percent``.

    A line reads ``epoch 3/15  step 41/82 (50%)  train/loss=0.412  15.2 samples/s  epoch ETA 0:42
    run ETA 9:05``. Validation and test announce themselves and say how long they took.
    """

    def __init__(self, every_percent: float = 10.0) -> None:
        super().__init__()
        if not 0 < every_percent <= 100:
            raise ValueError(f"every_percent must lie in (0, 100], got {every_percent}")
        self.every_percent = every_percent
        self._enabled = True
        self._epoch_started = 0.0
        self._phase_started = 0.0
        self._samples = 0
        self._epoch_seconds: list[float] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        total = self.total_train_batches
        done = batch_idx + 1
        if not isinstance(total, int) or total <= 0:
            return
        stride = max(1, round(total * self.every_percent / 100))
        if done % stride and done != total:
            return
        elapsed = time.perf_counter() - self._epoch_started
        epoch_eta = elapsed / done * (total - done)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        line = (
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  step {done}/{total} "
            f"({100 * done / total:.0f}%)  {shown}  {self._samples / max(elapsed, 1e-9):.1f} samples/s  "
            f"epoch ETA {_clock(epoch_eta)}"
        )
        if self._epoch_seconds and trainer.max_epochs and trainer.max_epochs > 0:
            per_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
            left = trainer.max_epochs - trainer.current_epoch - 1
            line += f"  run ETA {_clock(epoch_eta + left * per_epoch)}"
        self.print(line)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation runs inside the epoch, so this epoch's time includes it, as the run ETA should
        self._epoch_seconds.append(time.perf_counter() - self._epoch_started)

    def _start(self, what: str, batches: Any) -> None:
        self._phase_started = time.perf_counter()
        count = f" ({int(batches)} batches)" if isinstance(batches, int | float) and batches < 1e9 else ""
        self.print(f"{what}{count} ...")

    def _end(self, what: str) -> None:
        self.print(f"{what} done in {_clock(time.perf_counter() - self._phase_started)}")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        during_fit = trainer.state.fn == "fit"
        what = (
            f"validating (epoch {trainer.current_epoch + 1})"
            if during_fit
            else "scoring the validation split"
        )
        self._start(what, self.total_val_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end("validation")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("testing", sum(trainer.num_test_batches))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("test")


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "image" in batch:
        return int(batch["image"].shape[0])
    return 0


def progress_bar(every_percent: float = 10.0, stream: Any = None) -> ProgressBar:
    """Lightning's tqdm bar on a terminal, :class:`LineProgressBar` when ``stream`` (stderr) is a file."""
    stream = sys.stderr if stream is None else stream
    is_terminal = bool(getattr(stream, "isatty", lambda: False)())
    return TQDMProgressBar() if is_terminal else LineProgressBar(every_percent)
