"""Validation pictures for experiment loggers that take images (W&B): what the model sees and keeps.

Every ``every_n_epochs`` validation epochs the same fixed validation slices are drawn as one panel each:
the image with its box prompt, the prediction, the ground truth and the kept tokens (when the model
pruned). Any logger with ``log_image(key, images, caption=...)`` receives them; others are skipped, since
``metrics.json`` and the report's figures hold what every run needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Dataset

from prato_exp.render import mask_overlay, retention_map


def spread_indices(length: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(length)`` (fewer when ``length < count``)."""
    if length <= 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, length - 1, num=min(count, length))})


def validation_panel(
    image: np.ndarray, pred: np.ndarray, label: np.ndarray, box_xyxy: np.ndarray, keep_grid: np.ndarray | None
) -> Image.Image:
    """Prediction, ground truth and kept tokens side by side, each with the box, titled.

    Args:
        image: ``(C, H, W)`` network input.
        pred, label: ``(H, W)`` class indices.
        box_xyxy: ``(4,)`` pixel edges of the box prompt.
        keep_grid: ``(gh, gw)`` bool of the last pruning point, or None for an unpruned model.
    """
    parts = [("prediction", mask_overlay(image, pred, box_xyxy))]
    parts.append(("ground truth", mask_overlay(image, label)))
    if keep_grid is not None:
        parts.append((f"kept tokens ({keep_grid.mean():.0%})", retention_map(image, keep_grid, box_xyxy)))
    gap, title_h = 6, 16
    width = sum(p.width for _, p in parts) + gap * (len(parts) - 1)
    panel = Image.new("RGB", (width, max(p.height for _, p in parts) + title_h), (255, 255, 255))
    draw, font, x = ImageDraw.Draw(panel), ImageFont.load_default(), 0
    for title, part in parts:
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        panel.paste(part, (x, title_h))
        x += part.width + gap
    return panel


class ValidationImages(Callback):
    """Log panels of ``count`` fixed validation slices every ``every_n_epochs`` validation epochs.

    Args:
        every_n_epochs: log after every this many validation epochs (and never on the sanity check).
        count: how many slices, spread evenly over the validation set and the same each time.
        key: the logger's image key.
    """

    def __init__(self, every_n_epochs: int = 5, count: int = 4, key: str = "val/examples") -> None:
        if every_n_epochs < 1 or count < 1:
            raise ValueError(f"every_n_epochs and count must be >= 1, got {every_n_epochs} and {count}")
        self.every_n_epochs = every_n_epochs
        self.count = count
        self.key = key

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.current_epoch + 1 == (
            trainer.max_epochs or 0
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_image")]
        if not loggers or not self._due(trainer):
            return
        eval_set = getattr(trainer.datamodule, "eval_set", None)
        if eval_set is None:
            return
        dataset = eval_set("val")
        panels, captions = self.panels(pl_module.net, dataset, pl_module.device)
        for logger in loggers:
            logger.log_image(key=self.key, images=panels, caption=captions, step=trainer.global_step)

    @torch.no_grad()
    def panels(self, net: torch.nn.Module, dataset: Dataset, device: torch.device) -> tuple[list, list[str]]:
        """The panels and their ``case z=slice`` captions of this callback's fixed slices."""
        was_training = net.training
        net.eval()
        panels, captions = [], []
        for index in spread_indices(len(dataset), self.count):
            sample: dict[str, Any] = dataset[index]
            out = net(*(sample[k][None].to(device) for k in ("image", "box_xyxy", "prune_enabled")))
            keep = None
            if out.trace.keep_grids:
                keep = out.trace.keep_grids[-1][0].view(*out.trace.grid_hw).cpu().numpy()
            panels.append(
                validation_panel(
                    sample["image"].cpu().numpy(),
                    out.logits.argmax(1)[0].cpu().numpy(),
                    sample["label"].cpu().numpy(),
                    sample["box_xyxy"].cpu().numpy(),
                    keep,
                )
            )
            captions.append(f"{sample['case_id']} z={int(sample['slice_index'])}")
        net.train(was_training)
        return panels, captions
