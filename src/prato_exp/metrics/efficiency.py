"""Efficiency measurements: FLOPs on the executed graph, latency and peak memory (spec section 4).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``; a multiply-add counts as 2 FLOPs and GMACs
(= FLOPs / 2) are reported beside GFLOPs, since papers usually quote MACs. Importing this module registers
FLOP formulas for two ops that ``FlopCounterMode`` counts as 0 (checked with torch 2.14):

- ``aten._scaled_dot_product_flash_attention_for_cpu``: what ``F.scaled_dot_product_attention`` dispatches
  to on CPU (with or without a mask, any float dtype, GQA). ``aten.scaled_dot_product_attention`` itself
  never reaches the counter (it is composite), so it needs no formula; the CUDA kernels (flash, efficient,
  cuDNN) already have formulas in torch. Counted like torch's own SDPA formula: ``QK^T`` and ``PV`` as two
  batched matmuls, ``2 * B * Hq * L * S * (E + Ev)``, softmax and masking ignored.
- ``torchvision::roi_align``: ``8 * C * n_samples + out.numel()``: each bilinear sample costs 4
  multiply-adds per channel (4 neighbours, weights shared across channels and not counted), plus one
  division per output bin. ``n_samples`` is ``K * ph * pw * sr^2`` for ``sampling_ratio = sr > 0``; for
  adaptive sampling (``sr <= 0``) it is read from the boxes, and counted as 1 per bin where the boxes have
  no data (fake tensors).
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = [
    "FlopReport",
    "LatencyReport",
    "count_flops",
    "measure_latency",
    "register_extra_flop_formulas",
    "registered_extra_ops",
]

_EXTRA_OPS: list[str] = []


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q K^T) V`` for ``Q (..., L, E)``, ``K (..., S, E)``, ``V (..., S, Ev)``."""
    batch_heads = math.prod(query_shape[:-2])
    length, head_dim = query_shape[-2], query_shape[-1]
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * length * keys * (head_dim + value_dim)


def _roi_align_flop(
    features: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    *args: Any,
    out_val: torch.Tensor | None = None,
    **kwargs: Any,
) -> int:
    """FLOPs of ``torchvision::roi_align`` (raw arguments: adaptive sampling depends on the boxes)."""
    channels = int(features.shape[1])
    bins = int(rois.shape[0]) * int(pooled_height) * int(pooled_width)
    if sampling_ratio > 0:
        samples = bins * sampling_ratio * sampling_ratio
    else:
        try:
            boxes = rois.detach().double().cpu()[:, 1:5].tolist()
        except Exception:
            samples = bins
        else:
            samples = 0
            for x0, y0, x1, y1 in boxes:
                roi_w, roi_h = (x1 - x0) * spatial_scale, (y1 - y0) * spatial_scale
                if not aligned:
                    roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
                grid_h = max(math.ceil(roi_h / pooled_height), 1)
                grid_w = max(math.ceil(roi_w / pooled_width), 1)
                samples += grid_h * grid_w * pooled_height * pooled_width
    return 8 * channels * samples + channels * bins


def register_extra_flop_formulas() -> list[str]:
    """Register the formulas above (idempotent; never replaces a formula torch already has).

    Returns the names of the ops that now have a formula from this module. Must run before a
    ``FlopCounterMode`` is created, which copies the registry; importing this module does it.
    """
    sdpa_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if sdpa_cpu is not None and sdpa_cpu not in flop_registry:
        register_flop_formula(sdpa_cpu)(_sdpa_cpu_flop)
        _EXTRA_OPS.append(str(sdpa_cpu))
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)

        roi_align = torch.ops.torchvision.roi_align
    except (ImportError, AttributeError, RuntimeError):
        roi_align = None
    if roi_align is not None and roi_align not in flop_registry:
        register_flop_formula(roi_align, get_raw=True)(_roi_align_flop)
        _EXTRA_OPS.append(str(roi_align))
    return list(_EXTRA_OPS)


def registered_extra_ops() -> list[str]:
    """Names of the ops whose FLOP formula this module registered."""
    return list(_EXTRA_OPS)


register_extra_flop_formulas()


@dataclass
class FlopReport:
    """FLOPs of one forward pass (a multiply-add = 2 FLOPs).

    Attributes:
        total_flops: all FLOPs counted.
        by_module: FLOPs per top-level child module (``"(other)"``: FLOPs outside every child).
        module_flops: FLOPs of every module the forward entered, keyed by its dotted path without the
            root (``""`` is the root; an entry includes its submodules).
        by_op: FLOPs per operator.
    """

    total_flops: int
    by_module: dict[str, int] = field(default_factory=dict)
    module_flops: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total_flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.total_flops / 2e9

    def flops_under(self, prefixes: Iterable[str]) -> int:
        """FLOPs of the modules whose path equals or lies under one of ``prefixes`` (counted once)."""
        prefixes = list(prefixes)

        def under(name: str) -> bool:
            return any(name == p or name.startswith(p + ".") for p in prefixes)

        roots = [n for n in self.module_flops if under(n) and not _has_ancestor(n, self.module_flops, under)]
        return sum(self.module_flops[n] for n in roots)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gflops": self.gflops, "gmacs": self.gmacs}


def _has_ancestor(name: str, names: Iterable[str], pred: Callable[[str], bool]) -> bool:
    present = set(names)
    parts = name.split(".")
    return any(".".join(parts[:i]) in present and pred(".".join(parts[:i])) for i in range(1, len(parts)))


def _subtree_flops(prefix: str, module_flops: dict[str, int]) -> int:
    """FLOPs under ``prefix``: its own entry, else the sum over its nearest tracked descendants."""
    if prefix in module_flops:
        return module_flops[prefix]
    children = {
        prefix + "." + n[len(prefix) + 1 :].split(".")[0] for n in module_flops if n.startswith(prefix + ".")
    }
    return sum(_subtree_flops(c, module_flops) for c in children)


def count_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> FlopReport:
    """FLOPs of one forward ``model(*inputs, **kwargs)`` in eval mode under ``torch.no_grad()``.

    Every module's training flag is restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        for m, training in modes.items():
            m.training = training
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    by_op = {str(op): int(v) for op, v in counts.get("Global", {}).items()}
    root = type(model).__name__
    module_flops: dict[str, int] = {}
    for name, ops in counts.items():
        if name == root:
            module_flops[""] = int(sum(ops.values()))
        elif name.startswith(root + "."):
            module_flops[name[len(root) + 1 :]] = int(sum(ops.values()))
    top = sorted({n.split(".")[0] for n in module_flops if n})
    by_module = {t: _subtree_flops(t, module_flops) for t in top}
    other = total - sum(by_module.values())
    if other:
        by_module["(other)"] = other
    return FlopReport(total_flops=total, by_module=by_module, module_flops=module_flops, by_op=by_op)


@dataclass
class LatencyReport:
    """Wall-clock time of ``repeats`` calls after ``warmup`` calls, and peak memory over all calls.

    ``memory_method`` says what the memory fields mean:
    - ``cuda_max_memory_allocated``: ``torch.cuda.max_memory_allocated`` after a reset of the peak
      statistics (tensors only, no allocator cache); ``baseline_memory_mb`` is what was allocated before.
    - ``cpu_vmhwm_reset``: process peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) and the
      RSS before the first call. RSS includes allocator caches and everything else in the process.
    - ``cpu_ru_maxrss``: without ``/proc``, ``resource.getrusage`` high-water marks before and after; the
      delta is 0 when the process had already peaked higher.
    """

    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    warmup: int
    repeats: int
    device: str
    num_threads: int
    num_interop_threads: int
    peak_memory_mb: float
    baseline_memory_mb: float
    memory_method: str
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def peak_delta_mb(self) -> float:
        return max(self.peak_memory_mb - self.baseline_memory_mb, 0.0)

    def to_dict(self, include_times: bool = False) -> dict[str, Any]:
        out = {**asdict(self), "peak_delta_mb": self.peak_delta_mb}
        if not include_times:
            out.pop("times_ms")
        return out


_MB = 1024.0**2
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def _ru_maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MB if sys.platform == "darwin" else rss / 1024.0


def measure_latency(
    fn: Callable[[], Any],
    warmup: int = 5,
    repeats: int = 20,
    device: torch.device | str = "cpu",
) -> LatencyReport:
    """Time ``fn()`` (its inputs already on ``device``): ``warmup`` untimed calls, then ``repeats`` timed.

    On CUDA every timed call is bracketed by ``torch.cuda.synchronize``. Peak memory covers all calls.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / _MB
        method = "cuda_max_memory_allocated"
    elif _reset_rss_peak():
        baseline = (_proc_status_kb("VmRSS") or 0) / 1024.0
        method = "cpu_vmhwm_reset"
    else:
        baseline = _ru_maxrss_mb()
        method = "cpu_ru_maxrss"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)

    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / _MB
    elif method == "cpu_vmhwm_reset":
        peak = (_proc_status_kb("VmHWM") or 0) / 1024.0
    else:
        peak = _ru_maxrss_mb()
    return LatencyReport(
        median_ms=float(statistics.median(times)),
        mean_ms=float(statistics.fmean(times)),
        p90_ms=float(np.percentile(times, 90)),
        min_ms=float(min(times)),
        max_ms=float(max(times)),
        std_ms=float(statistics.pstdev(times)),
        warmup=warmup,
        repeats=repeats,
        device=str(device),
        num_threads=torch.get_num_threads(),
        num_interop_threads=torch.get_num_interop_threads(),
        peak_memory_mb=float(peak),
        baseline_memory_mb=float(baseline),
        memory_method=method,
        times_ms=[float(t) for t in times],
    )
