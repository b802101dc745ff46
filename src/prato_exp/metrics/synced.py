"""Evaluation metrics as torchmetrics ``Metric``s, so that under DDP every slice is scored exactly once.

Each process records one row per scored slice (or per image value); torchmetrics gathers the rows of
every process (``dist_reduce_fx="cat"``) before :meth:`compute`, which drops duplicates on
``(case, slice)`` (``DistributedSampler`` repeats samples to even out its shards; the first row in rank
order is kept) and reduces the global table once. Nothing is averaged per process first, so the result
equals that of one process on the same data.

* :class:`CaseSegmentationMetric`: per-slice tp/fp/fn, presence and HD95 rows; ``compute()`` returns a
  :class:`~prato_exp.metrics.segmentation.SegmentationMeter` filled with every unique slice (cases
  sorted by id, slices by index), whose ``compute()`` and ``per_case()`` give the spec's metrics.
* :class:`ImageMeanMetric`: named per-image values (token sparsity, foreground token recall);
  ``compute()`` returns the NaN-ignoring mean over unique images of each name.

Case ids and value names are strings: rows carry a stable 63-bit code of the string
(:func:`stable_code`, the same in every process) and each process also records the strings it saw as
UTF-8 bytes, gathered like the rows, to map codes back to names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from prato_exp.metrics.segmentation import SegmentationMeter, SliceStats, SpacingHW, slice_stats

__all__ = ["CaseSegmentationMetric", "ImageMeanMetric", "gather_rows", "stable_code"]


def stable_code(text: str) -> int:
    """A 63-bit code of ``text`` (BLAKE2b), identical in every process and run (unlike ``hash``)."""
    digest = hashlib.blake2b(str(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gather_rows(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """``gather_all_tensors`` for row states of any dtype, a process without rows included.

    torchmetrics stands in ``tensor([], dtype=metric.dtype)`` for an empty list state; this gives it
    the dtype and trailing shape of the other processes' rows first, so the padded all-gather matches.

    Args:
        tensor: ``(n, *row)`` rows of this process (``n`` may differ between processes).
        group: the process group (default: the world).

    Returns:
        One tensor per process, in rank order.
    """
    meta: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(meta, (tensor.dtype, tuple(tensor.shape)), group=group)
    reference = next(((dtype, shape) for dtype, shape in meta if int(np.prod(shape)) > 0), None)
    if tensor.numel() == 0 and reference is not None:
        dtype, shape = reference
        tensor = torch.empty((0, *shape[1:]), dtype=dtype, device=tensor.device)
    return gather_all_tensors(tensor, group=group)


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]) -> Tensor:
    """A list state (one process) or a gathered tensor (after sync) as one ``(n, *row_shape)`` CPU tensor."""
    if isinstance(state, list):
        state = torch.cat(state) if state else torch.empty(0)
    return state.detach().cpu().to(dtype).reshape(-1, *row_shape)


class _NamedRowsMetric(Metric):
    """Rows keyed by strings: keeps a gathered table of the strings each process saw."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", gather_rows)
        super().__init__(**kwargs)
        self.add_state("name_codes", default=[], dist_reduce_fx="cat")  # (m,) int64
        self.add_state("name_lengths", default=[], dist_reduce_fx="cat")  # (m,) int64
        self.add_state("name_bytes", default=[], dist_reduce_fx="cat")  # (sum of lengths,) uint8

    def _record_names(self, names: Sequence[str]) -> Tensor:
        """Record the distinct strings of ``names``; return their ``(len(names),)`` int64 codes."""
        unique = list(dict.fromkeys(str(n) for n in names))
        encoded = [n.encode("utf-8") for n in unique]
        dev = self.device
        self.name_codes.append(torch.tensor([stable_code(n) for n in unique], dtype=torch.int64, device=dev))
        self.name_lengths.append(torch.tensor([len(b) for b in encoded], dtype=torch.int64, device=dev))
        raw = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.name_bytes.append(torch.from_numpy(raw).to(dev))
        return torch.tensor([stable_code(str(n)) for n in names], dtype=torch.int64, device=dev)

    def _name_table(self) -> dict[int, str]:
        """Code -> string for every string recorded by any process (call inside ``compute``)."""
        codes = _cat(self.name_codes, torch.int64, ()).tolist()
        lengths = _cat(self.name_lengths, torch.int64, ()).tolist()
        raw = _cat(self.name_bytes, torch.uint8, ()).numpy().tobytes()
        table: dict[int, str] = {}
        offset = 0
        for code, length in zip(codes, lengths, strict=True):
            name = raw[offset : offset + length].decode("utf-8")
            offset += length
            if table.setdefault(code, name) != name:
                raise RuntimeError(f"stable_code collision between {table[code]!r} and {name!r}")
        return table


class CaseSegmentationMetric(_NamedRowsMetric):
    """Per-slice segmentation statistics of every process, reduced per case once (DDP-safe).

    Args:
        num_classes: number of classes including background (label 0).
        class_names: names of the foreground classes (as for :class:`SegmentationMeter`).
        **kwargs: passed to ``torchmetrics.Metric`` (``process_group``, ``sync_on_compute``, ...).

    ``compute()`` returns a :class:`SegmentationMeter` holding every unique ``(case, slice)`` of every
    process, cases sorted by id and slices by index; call its ``compute()`` / ``per_case()``.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        template = SegmentationMeter(num_classes, class_names)  # validates the arguments
        self.num_classes = num_classes
        self.class_names = template.class_names
        self.add_state("keys", default=[], dist_reduce_fx="cat")  # (n, 2) int64: case code, slice index
        self.add_state("counts", default=[], dist_reduce_fx="cat")  # (n, 3, K-1) int64: tp, fp, fn
        self.add_state("present", default=[], dist_reduce_fx="cat")  # (n, 2, K-1) uint8: truth, pred
        self.add_state("hd95", default=[], dist_reduce_fx="cat")  # (n, K-1) float64
        self.add_state("diagonal", default=[], dist_reduce_fx="cat")  # (n,) float64

    def update(
        self,
        case_ids: Sequence[str],
        slice_indices: Sequence[int] | Tensor,
        preds: Sequence[Tensor] | Tensor,
        targets: Sequence[Tensor] | Tensor,
        spacings_hw: Sequence[SpacingHW] | None = None,
        with_hd95: bool = True,
    ) -> None:
        """Score a batch of slices: ``preds[i]``, ``targets[i]`` are ``(H_i, W_i)`` integer label maps
        (``with_hd95=False``: DSC and IoU only, HD95 left NaN)."""
        n = len(case_ids)
        if len(slice_indices) != n or len(preds) != n or len(targets) != n:
            raise ValueError("case_ids, slice_indices, preds and targets must have the same length")
        spacings = [None] * n if spacings_hw is None else list(spacings_hw)
        if len(spacings) != n:
            raise ValueError("spacings_hw must give one spacing (or None) per item")
        stats = [
            slice_stats(preds[i], targets[i], self.num_classes, spacings[i], with_hd95) for i in range(n)
        ]
        self._add_stats(case_ids, slice_indices, stats)

    def _add_stats(
        self, case_ids: Sequence[str], slice_indices: Sequence[int] | Tensor, stats: Sequence[SliceStats]
    ) -> None:
        """Append the rows of ``stats``, one per ``(case_id, slice_index)``."""
        if not stats:
            return
        indices = slice_indices.tolist() if isinstance(slice_indices, Tensor) else list(slice_indices)
        codes = self._record_names(case_ids)
        dev = self.device
        self.keys.append(torch.stack([codes, torch.tensor(indices, dtype=torch.int64, device=dev)], dim=1))
        counts = np.stack([np.stack([s.tp, s.fp, s.fn]) for s in stats])  # (n, 3, K-1)
        present = np.stack([np.stack([s.truth_present, s.pred_present]) for s in stats])  # (n, 2, K-1)
        self.counts.append(torch.from_numpy(counts.astype(np.int64)).to(dev))
        self.present.append(torch.from_numpy(present.astype(np.uint8)).to(dev))
        self.hd95.append(torch.from_numpy(np.stack([s.hd95 for s in stats]).astype(np.float64)).to(dev))
        self.diagonal.append(torch.tensor([s.diagonal for s in stats], dtype=torch.float64, device=dev))

    def compute(self) -> SegmentationMeter:
        """A :class:`SegmentationMeter` of every unique slice of every process (first row kept)."""
        k = self.num_classes - 1
        keys = _cat(self.keys, torch.int64, (2,)).tolist()
        counts = _cat(self.counts, torch.int64, (3, k)).numpy()
        present = _cat(self.present, torch.bool, (2, k)).numpy()
        hd95 = _cat(self.hd95, torch.float64, (k,)).numpy()
        diagonal = _cat(self.diagonal, torch.float64, ()).tolist()
        names = self._name_table()
        first: dict[tuple[int, int], int] = {}
        for row, (code, index) in enumerate(keys):
            first.setdefault((code, index), row)
        meter = SegmentationMeter(self.num_classes, self.class_names)
        for (code, index), row in sorted(first.items(), key=lambda item: (names[item[0][0]], item[0][1])):
            stats = SliceStats(
                tp=counts[row, 0],
                fp=counts[row, 1],
                fn=counts[row, 2],
                truth_present=present[row, 0],
                pred_present=present[row, 1],
                hd95=hd95[row],
                diagonal=float(diagonal[row]),
            )
            meter.add(names[code], index, stats)
        return meter


class ImageMeanMetric(_NamedRowsMetric):
    """Named per-image values of every process, averaged over unique images (DDP-safe).

    ``update(name, case_ids, slice_indices, values)`` records ``values`` ``(B,)`` under ``name``;
    ``compute()`` returns ``{name: mean}`` in first-seen order (rank 0's first), the NaN-ignoring mean over
    unique ``(case, slice)`` of each name (NaN when all are NaN).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("keys", default=[], dist_reduce_fx="cat")  # (n, 3) int64: name, case code, slice
        self.add_state("values", default=[], dist_reduce_fx="cat")  # (n,) float64

    def update(
        self, name: str, case_ids: Sequence[str], slice_indices: Sequence[int] | Tensor, values: Tensor
    ) -> None:
        """Record ``values`` ``(B,)`` of the images ``(case_ids[i], slice_indices[i])`` under ``name``."""
        values = values.detach().reshape(-1)
        n = values.shape[0]
        if len(case_ids) != n or len(slice_indices) != n:
            raise ValueError(f"{name}: {n} values for {len(case_ids)} case ids, {len(slice_indices)} slices")
        if n == 0:
            return
        dev = self.device
        name_code = self._record_names([name])
        case_codes = torch.tensor([stable_code(c) for c in case_ids], dtype=torch.int64, device=dev)
        indices = slice_indices.tolist() if isinstance(slice_indices, Tensor) else list(slice_indices)
        slices = torch.tensor(indices, dtype=torch.int64, device=dev)
        self.keys.append(torch.stack([name_code.expand(n), case_codes, slices], dim=1))
        self.values.append(values.to(device=dev, dtype=torch.float64))

    def compute(self) -> dict[str, float]:
        keys = _cat(self.keys, torch.int64, (3,)).tolist()
        values = _cat(self.values, torch.float64, ())
        first: dict[tuple[int, int, int], int] = {}
        for row, key in enumerate(keys):
            first.setdefault(tuple(key), row)
        rows: dict[int, list[int]] = {}
        for (name_code, _, _), row in first.items():
            rows.setdefault(name_code, []).append(row)
        names = self._name_table()
        return {names[code]: float(torch.nanmean(values[idx])) for code, idx in rows.items()}
