"""Figures written by ``eval.py``: prediction overlays, token-retention maps (paper Fig. 7) and the
sorted relevance scores with their inverse-entropy weights (paper Fig. 8)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle
from torch import nn
from torch.utils.data import Dataset

LABEL_COLOURS = ListedColormap(["none", "tab:red", "tab:green", "tab:blue", "tab:orange"])


def pick_samples(dataset: Dataset, count: int) -> list[int]:
    """Up to ``count`` evenly spread indices of samples with foreground (all samples if none has any)."""
    with_fg = [i for i in range(len(dataset)) if bool(dataset[i]["label"].any())]
    pool = with_fg or list(range(len(dataset)))
    if not pool or count <= 0:
        return []
    return [pool[int(j)] for j in np.linspace(0, len(pool) - 1, num=min(count, len(pool)))]


def _show_image(ax: plt.Axes, image: torch.Tensor) -> None:
    array = image.float().cpu().numpy()
    if array.shape[0] == 3:
        ax.imshow(np.clip(array.transpose(1, 2, 0), 0, 1))
    else:
        ax.imshow(array[0], cmap="gray")
    ax.set_axis_off()


def _draw_box(ax: plt.Axes, box: torch.Tensor) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    # pixel i covers [i, i+1); imshow centres pixel i at i, so edges sit at -0.5
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))


def _overlay(ax: plt.Axes, image: torch.Tensor, label: torch.Tensor, title: str, num_classes: int) -> None:
    _show_image(ax, image)
    masked = np.ma.masked_equal(label.cpu().numpy(), 0)
    ax.imshow(
        masked, cmap=LABEL_COLOURS, vmin=0, vmax=LABEL_COLOURS.N - 1, alpha=0.45, interpolation="nearest"
    )
    ax.set_title(title, fontsize=8)


@torch.no_grad()
def save_overlays(net: nn.Module, dataset: Dataset, folder: Path, count: int) -> list[Path]:
    """Write ``count`` PNGs: image, ground truth, prediction (with the box) and, when the model
    pruned, the token-retention map (kept patches highlighted, box drawn; paper Fig. 7).

    For the first image whose pruner reports entropy weights, also write ``fig8_scores.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    paths: list[Path] = []
    fig8_done = False
    for index in pick_samples(dataset, count):
        sample = dataset[index]
        out = net(
            sample["image"][None].to(device),
            sample["box_xyxy"][None].to(device),
            sample["prune_enabled"][None].to(device),
        )
        pred = out.logits.argmax(1)[0].cpu()
        num_classes = out.logits.shape[1]
        keep_grids = out.trace.keep_grids
        panels = 3 + (1 if keep_grids else 0)
        fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.2))
        _show_image(axes[0], sample["image"])
        axes[0].set_title(f"{sample['case_id']} z={sample['slice_index']}", fontsize=8)
        _draw_box(axes[0], sample["box_xyxy"])
        _overlay(axes[1], sample["image"], sample["label"], "ground truth", num_classes)
        _overlay(axes[2], sample["image"], pred, "prediction", num_classes)
        _draw_box(axes[2], sample["box_xyxy"])
        if keep_grids:
            draw_retention_map(
                axes[3], sample["image"], keep_grids[-1][0].cpu(), out.trace.grid_hw, sample["box_xyxy"]
            )
        fig.tight_layout()
        path = folder / f"{sample['case_id']}_z{sample['slice_index']:02d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        results = out.trace.results
        if not fig8_done and results and "weights" in results[0].extras:
            paths.append(save_score_plot(results[0], folder / "fig8_scores.png", sample["case_id"]))
            fig8_done = True
    net.train(was_training)
    return paths


def draw_retention_map(
    ax: plt.Axes, image: torch.Tensor, keep: torch.Tensor, grid_hw: tuple[int, int], box: torch.Tensor
) -> None:
    """Image with the kept patches highlighted (``keep`` ``(Z,)`` bool on ``grid_hw``) and the box drawn."""
    _show_image(ax, image)
    h, w = grid_hw
    height, width = image.shape[-2:]
    kept = keep.view(h, w).float().numpy()
    ax.imshow(
        np.ma.masked_equal(kept, 0),
        cmap=ListedColormap(["gold"]),
        alpha=0.45,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        interpolation="nearest",
    )
    _draw_box(ax, box)
    ax.set_title(f"kept tokens {int(kept.sum())}/{h * w}", fontsize=8)


def save_score_plot(result, path: Path, image_id: str) -> Path:
    """Paper Fig. 8 for one image: (a) sorted relevance scores, (b) sorted inverse-entropy weights,
    each against the uniform line."""
    scores = result.scores[0].detach().float().cpu().numpy()
    weights = result.extras["weights"][0].detach().float().cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, values, title in (
        (axes[0], scores, "(a) relevance scores s"),
        (axes[1], weights, "(b) weights Omega"),
    ):
        ordered = np.sort(values)
        ranks = np.linspace(0, 1, len(ordered))
        ax.plot(ranks, ordered, label="sorted")
        ax.plot(ranks, ordered.min() + ranks * (ordered.max() - ordered.min()), "r--", label="true uniform")
        ax.set_xlabel("normalised rank")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(image_id, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
