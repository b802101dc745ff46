"""The LightningModule: a prunable segmentation network, Dice-CE loss and the paper's metrics.

The network is a plain ``nn.Module`` returning :class:`~prato_exp.models.unetr.SegOutput`
(logits and a pruning trace); this module adds the loss (paper Eq. 14-16 plus any auxiliary loss a
pruner returns), the optimiser, and the evaluation at original resolution.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from prato_exp.metrics.segmentation import foreground_token_recall, upsampled_argmax
from prato_exp.metrics.synced import CaseSegmentationMetric, ImageMeanMetric
from prato_exp.models.base import SegOutput
from prato_exp.pruning.base import TokenPruner

log = logging.getLogger(__name__)


class SegmentationModule(pl.LightningModule):
    """Train and evaluate a prunable segmentation network.

    Args:
        net: the network, ``net(image, box_xyxy, prune_enabled) -> SegOutput``.
        loss: the task loss on ``(logits (B,K,H,W), target (B,1,H,W))``, e.g. MONAI ``DiceCELoss``.
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` (Hydra ``_partial_``) or None.
        class_names: foreground class names, in label order.
        run_config: the composed run configuration, stored in checkpoints so that ``eval.py`` can
            rebuild the same model.
        hd95_every_n_epochs: during training, HD95 (the slow metric) every this many validation epochs
            and at the last; DSC and IoU every epoch. Scoring outside training always computes it.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        class_names: Sequence[str] = (),
        run_config: dict | None = None,
        hd95_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        if hd95_every_n_epochs < 1:
            raise ValueError(f"hd95_every_n_epochs must be >= 1, got {hd95_every_n_epochs}")
        self.hd95_every_n_epochs = hd95_every_n_epochs
        self.net = net
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names) + 1
        self.run_config = run_config or {}
        # torchmetrics Metrics (submodules, so Lightning moves them): under DDP each process scores its
        # shard and compute() gathers every process's rows, so every slice counts once, globally.
        self.seg_metrics = nn.ModuleDict(
            {split: CaseSegmentationMetric(self.num_classes, self.class_names) for split in ("val", "test")}
        )
        self.token_metrics = nn.ModuleDict({split: ImageMeanMetric() for split in ("val", "test")})
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_per_case: dict[str, list[dict[str, Any]]] = {}
        # the learning curve: one entry per validation epoch during fit (epoch, mean DSC, IoU, HD95)
        self.val_history: list[dict[str, float]] = []

    def forward(self, image: Tensor, box_xyxy: Tensor, prune_enabled: Tensor | None = None) -> SegOutput:
        return self.net(image, box_xyxy, prune_enabled)

    def model_step(self, batch: dict[str, Any]) -> tuple[Tensor, SegOutput, dict[str, Tensor]]:
        """Forward one batch; return the total loss, the output and every named loss term."""
        out = self(batch["image"], batch["box_xyxy"], batch["prune_enabled"])
        target = batch["label"][:, None]
        losses = {"dice_ce": self.loss_fn(out.logits, target)}
        losses.update(out.trace.aux_losses())
        losses.update(out.trace.early_prediction_losses(self.loss_fn, target))
        return sum(losses.values()), out, losses

    def _reset_pruner_rngs(self) -> None:
        for module in self.net.modules():
            if isinstance(module, TokenPruner):
                module.reset_rng()

    def on_validation_epoch_start(self) -> None:
        self._reset_pruner_rngs()

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        for module in self.net.modules():
            if isinstance(module, TokenPruner):
                module.on_train_batch(self.global_step)

    def on_test_epoch_start(self) -> None:
        self._reset_pruner_rngs()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, out, losses = self.model_step(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs)
        sparsity = out.trace.sparsity()
        if sparsity is not None:
            self.log("train/sparsity", sparsity.mean(), batch_size=bs)
        return total

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        total, out, _ = self.model_step(batch)
        bs = batch["image"].shape[0]
        self.log(f"{split}/loss", total, batch_size=bs, sync_dist=True)
        preds = upsampled_argmax(out.logits, [tuple(t.shape) for t in batch["label_orig"]])
        self.seg_metrics[split].update(
            batch["case_id"],
            batch["slice_index"],
            preds,
            batch["label_orig"],
            batch["spacing_hw"],
            with_hd95=self._hd95_due(),
        )
        self._collect_token_stats(out, batch, split)

    def _collect_token_stats(self, out: SegOutput, batch: dict[str, Any], split: str) -> None:
        """Record per-image token statistics ``(B,)`` (sparsity overall and per point, foreground token
        recall) keyed by ``(case_id, slice_index)``; averaged over all images at the epoch's end."""
        trace = out.trace
        sparsity = trace.sparsity()
        if sparsity is None:
            return
        ids, slices = batch["case_id"], batch["slice_index"]
        meter = self.token_metrics[split]
        meter.update("sparsity", ids, slices, sparsity)
        for point, keep in enumerate(trace.keep_grids):
            meter.update(f"sparsity_point{point}", ids, slices, 1.0 - keep.float().mean(dim=1))
        h, w = trace.grid_hw
        keep_grid = trace.keep_grids[-1].view(-1, h, w)
        meter.update("fg_token_recall", ids, slices, foreground_token_recall(keep_grid, batch["label"]))

    def _hd95_due(self) -> bool:
        """HD95 this evaluation epoch: always outside ``fit``, else every n-th epoch and the last."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return True
        epoch = trainer.current_epoch + 1
        return epoch % self.hd95_every_n_epochs == 0 or epoch == trainer.max_epochs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _end_eval_epoch(self, split: str) -> None:
        """Reduce the epoch's slices of every process once; log and keep the global figures.

        Every rank gathers all rows and computes the same global values (no mean of per-process means).
        ``sync_dist=True`` then only averages identical numbers: it keeps every rank's ``callback_metrics``
        equal and Lightning from warning about unsynced epoch-level logs.
        """
        meter = self.seg_metrics[split].compute()
        metrics = {f"{split}/{k}": float(v) for k, v in meter.compute().items()}
        if not self._hd95_due():  # left out, not logged as NaN, on the epochs that skip it
            metrics = {k: v for k, v in metrics.items() if "hd95" not in k}
        with warnings.catch_warnings():  # an unpruned model records no token statistics: that is expected
            warnings.filterwarnings("ignore", message=r".*compute.* was called before the ..update")
            token_stats = self.token_metrics[split].compute()  # on every rank: it is a collective
        metrics.update({f"{split}/{k}": v for k, v in token_stats.items()})
        self.seg_metrics[split].reset()
        self.token_metrics[split].reset()
        loggable = {k: v for k, v in metrics.items() if "/counts/" not in k}
        self.log_dict(loggable, sync_dist=True)
        self.last_metrics[split] = metrics
        hd95 = metrics.get(f"{split}/case/hd95_mean")
        sparsity = metrics.get(f"{split}/sparsity")
        log.info(
            "epoch %d %s: mean DSC %.4f, IoU %.4f, HD95 %s (per case), sparsity %s",
            self.current_epoch,
            split,
            metrics[f"{split}/case/dsc_mean"],
            metrics[f"{split}/case/iou_mean"],
            "-" if hd95 is None else f"{hd95:.2f}",
            "-" if sparsity is None else f"{sparsity:.3f}",
        )
        self.last_per_case[split] = meter.per_case()
        trainer = self._trainer
        if (
            split == "val"
            and trainer is not None
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
        ):
            point = {"epoch": self.current_epoch + 1, "dsc_mean": metrics["val/case/dsc_mean"]}
            point["iou_mean"] = metrics["val/case/iou_mean"]
            if hd95 is not None:
                point["hd95_mean"] = hd95
            self.val_history.append(point)

    def on_validation_epoch_end(self) -> None:
        self._end_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval_epoch("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prato_run_config"] = self.run_config
        batch_size = (self.run_config or {}).get("datamodule", {}).get("batch_size")
        if batch_size is not None:
            # what the weights were trained on, for a re-scoring run's training-budget line
            checkpoint["prato_train_samples_seen"] = (
                self.trainer.global_step * batch_size * self.trainer.world_size
            )
