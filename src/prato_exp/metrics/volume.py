"""3-D HD95 per volume, the convention of ACDC papers (e.g. medpy's ``hd95`` on the stacked volume).

The per-slice HD95 of :mod:`prato_exp.metrics.segmentation` averages 2-D distances; ACDC papers stack a
volume's slices and measure surface distances in 3-D, in mm with the voxel spacing ``(z, y, x)`` where the
data has one (the official NIfTI layout) and in voxels where it has none (the SSL4MIS h5 copy, as SSL4MIS
itself reports). The empty-mask table of the spec applies per volume: both empty is NaN (excluded),
exactly one empty is the volume's diagonal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prato_exp.metrics.segmentation import hd95_surface, upsampled_argmax

SpacingDHW = tuple[float, float, float] | None


def volume_diagonal(shape_dhw: Sequence[int], spacing_dhw: SpacingDHW = None) -> float:
    """Length of the volume's diagonal, in mm with ``spacing_dhw`` else in voxels."""
    spacing = spacing_dhw or (1.0, 1.0, 1.0)
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape_dhw, spacing, strict=True)))


def hd95_volume(pred: Tensor, target: Tensor, num_classes: int, spacing_dhw: SpacingDHW = None) -> np.ndarray:
    """3-D HD95 of every foreground class of one volume: ``(K-1,)`` float64.

    Args:
        pred, target: ``(D, H, W)`` class indices.
        num_classes: classes including background.
        spacing_dhw: voxel spacing ``(z, y, x)`` in mm, or None for voxel units.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"expected two (D, H, W) volumes of equal shape, got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    out = np.full(num_classes - 1, np.nan, dtype=np.float64)
    diagonal = volume_diagonal(pred.shape, spacing_dhw)
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        p_any, t_any = bool(p.any()), bool(t.any())
        if p_any != t_any:
            out[k - 1] = diagonal
        elif p_any:
            out[k - 1] = hd95_surface(p.cpu().numpy(), t.cpu().numpy(), spacing_dhw)
    return out


@torch.no_grad()
def volume_hd95_rows(
    net: nn.Module,
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    class_names: Sequence[str],
    spacing_of: Any,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Predict every slice of ``batches`` at its original resolution, stack per case, score in 3-D.

    Args:
        net: ``net(image, box_xyxy, prune_enabled) -> SegOutput``.
        batches: evaluation batches (``image``, ``box_xyxy``, ``prune_enabled``, ``label_orig``,
            ``case_id``, ``slice_index``), e.g. a validation dataloader.
        spacing_of: ``case_id -> (z, y, x)`` spacing in mm or None.

    Returns:
        ``case_id -> {"hd95_3d/<class>": value, "hd95_3d_mean": value}``.
    """
    was_training = net.training
    net.eval().to(device)
    slices: dict[str, dict[int, tuple[Tensor, Tensor]]] = defaultdict(dict)
    for batch in batches:
        out = net(*(batch[k].to(device) for k in ("image", "box_xyxy", "prune_enabled")))
        preds = upsampled_argmax(out.logits, [tuple(t.shape) for t in batch["label_orig"]])
        for i, (pred, target) in enumerate(zip(preds, batch["label_orig"], strict=True)):
            slices[batch["case_id"][i]][int(batch["slice_index"][i])] = (
                pred.to("cpu", torch.uint8),
                target.to(torch.uint8),
            )
    net.train(was_training)
    rows: dict[str, dict[str, float]] = {}
    for case_id, by_index in slices.items():
        order = sorted(by_index)
        pred = torch.stack([by_index[z][0] for z in order])
        target = torch.stack([by_index[z][1] for z in order])
        values = hd95_volume(pred, target, num_classes, spacing_of(case_id))
        row = {f"hd95_3d/{name}": float(v) for name, v in zip(class_names, values, strict=True)}
        row["hd95_3d_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        rows[case_id] = row
    return rows


def summarise_volume_hd95(rows: dict[str, dict[str, float]], class_names: Sequence[str]) -> dict[str, float]:
    """``case/hd95_3d/<class>`` (mean over cases, NaNs excluded) and ``case/hd95_3d_mean`` (over classes)."""
    out: dict[str, float] = {}
    per_class = []
    for name in class_names:
        values = np.array([r[f"hd95_3d/{name}"] for r in rows.values()], dtype=np.float64)
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"case/hd95_3d/{name}"] = mean
        per_class.append(mean)
    finite = [v for v in per_class if math.isfinite(v)]
    out["case/hd95_3d_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out
