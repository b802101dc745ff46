"""Benchmark pruned vs unpruned inference for several backbones and pruners in one run.

For every model and every pruning configuration (``none`` first, then each ``--pruning`` entry in each
``--modes`` mode) it reports:

- GFLOPs on the executed graph (batch 1, mean over the phantom images), the FLOP ratio of the whole
  model and of the pruned part (``net.pruned_part()``: the blocks after the first pruning point, the
  pruners' grid modules, and the decoder where it runs in a window), and the token sparsity;
- per batch size and autocast dtype: median latency, throughput, the time ratio of the whole model and of
  the pruned part alone (:class:`PartTimer`: from the first entry into a part module to the last exit,
  the glue code between them included, time in other modules taken off), the pruner calls' share of the
  unpruned time, and the peak memory of that configuration measured on its own (a fresh process per
  configuration on CPU, peak RSS over its baseline; ``torch.cuda.max_memory_allocated`` after a reset on
  GPU), so the figure is that configuration's and not the process's;
- for hierarchical backbones (Swin UNETR, SegFormer: ``net.stage_names()``), per stage the fraction of
  the grid pruned and the share of the stage's token-wise FLOPs (its linear layers: QKV, projections,
  MLP) saved, spec section 3.

A pair a backbone refuses (Evo-ViT in Swin UNETR, ...) is a row saying so. Weights are random unless
``--checkpoint`` gives trained ones (percentile counts do not depend on the weights; fixed thresholds and
DToP's exits do). Every configuration gets the same phantom images with their tight (oracle) boxes.
Latencies are timed in interleaved rounds (forwards in even rounds, backwards in odd ones); a time
ratio is the median over rounds of the row's round latency over the unpruned model's in the same round,
with a 95 % bootstrap interval, so a drift of the machine between rounds cancels. A copy of the
unpruned model is timed as one more configuration (row ``none (A/A)``): its time ratios, ideally 1,
show how far apart two identical networks time on this machine. Run it alone on the machine.

Example (the four small presets, every pruner, CPU)::

    python scripts/benchmark.py --models unetr_small transunet_small swin_unetr_small segformer_small \\
        --pruning percentile25 random dynamicvit evovit dtop stp tram tome --modes drop \\
        --input-size 128 --batch-sizes 1 16 --out docs/results/benchmark_small_cpu

    # GPU, fp32 beside bf16 autocast
    python scripts/benchmark.py --models unetr --input-size 224 --batch-sizes 1 4 --dtypes fp32 bf16

    # one table for several settings of one pruner: an entry takes Hydra overrides after `+`
    python scripts/benchmark.py --models unetr_small --pruning percentile25 \\
        percentile25+model.decoder_window=1 prato_box_first+experiment=fast \\
        prato@fixed0.5 prato@fixed0.5+model.unequal_counts=group

A row's pruned part (and so its part time ratio) is its own: the unpruned model's part time is measured
for each distinct part of the rows beside it (an entry with other pruning points has another part).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from torch import nn

from prato_exp.cli.allocator import retain_freed_memory
from prato_exp.cli.common import CONFIG_DIR, environment
from prato_exp.data.phantoms import SyntheticCardiacSource
from prato_exp.data.prompts import BoxPrompter
from prato_exp.data.transforms import resize_pair
from prato_exp.lightning.checkpoint import build_net, load_checkpoint, load_net_weights
from prato_exp.metrics.efficiency import FlopReport, count_flops, measure_latency

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NOISE_ROW = "none (A/A)"
"""The row of an identical copy of the unpruned model, timed like every other: its time ratios are the
machine's noise floor for the model's other rows."""


@dataclass(frozen=True)
class Config:
    """One network to measure: ``model=<model>`` with the ``--pruning`` entry ``pruning`` in ``mode``
    (None: the preset's).

    An entry is ``PRESET[@THRESHOLD][+KEY=VALUE...]``: a pruning preset (conf/pruning), optionally a
    threshold choice (conf/threshold), then Hydra overrides of its own, e.g.
    ``prato_box_first+experiment=fast`` or ``prato@fixed0.5+model.unequal_counts=group``.
    """

    model: str
    pruning: str
    mode: str | None

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "pruning": self.pruning, "mode": self.mode})

    def overrides(self, size: int) -> list[str]:
        """The Hydra overrides that build this configuration at input ``size``."""
        head, *own = self.pruning.split("+")
        preset, _, threshold = head.partition("@")
        malformed = [o for o in own if "=" not in o or o.startswith("=")]
        if not preset or malformed:
            raise SystemExit(
                f"--pruning entry {self.pruning!r}: expected PRESET[@THRESHOLD][+KEY=VALUE...], "
                f"e.g. percentile25+model.decoder_window=1"
            )
        overrides = [f"model={self.model}", f"pruning={preset}", f"model.img_size={size}"]
        if threshold:
            overrides.append(f"threshold={threshold}")
        if self.mode is not None:
            overrides.append(f"pruning.mode={self.mode}")
        return overrides + own


def phantom_batch(size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` cardiac phantoms resized to ``size`` with their tight boxes: ``(N,1,S,S)``, ``(N,4)``."""
    source = SyntheticCardiacSource(num_val=count, size=128, seed=123)
    prompter = BoxPrompter(condition="tight")
    images, boxes = [], []
    for case_id in source.split_ids()["val"]:
        case = source.load_case(case_id)
        image, label = resize_pair(case.image[:, 0], case.label[0], size)
        images.append(image)
        boxes.append(torch.as_tensor(prompter(label.numpy(), case_id, 0)[0]))
    return torch.stack(images), torch.stack(boxes)


def build(config: Config, size: int, extra: list[str]) -> nn.Module:
    """The network of ``config`` from the project's configs, in eval mode, seeded weights.

    ``extra`` (``--override``) applies to every configuration; the entry's own overrides come after it,
    so they win. A backbone's refusal of a pruner is raised as ValueError.
    """
    own = config.overrides(size)
    overrides = [*own[:3], *extra, *own[3:]]  # model, pruning, size; then --override; then the entry's
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    try:
        return build_net(cfg.model, SyntheticCardiacSource).eval()
    except InstantiationException as err:
        raise ValueError(str(err.__cause__ or err)) from err


def batch_of(images: torch.Tensor, boxes: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The phantom images and boxes repeated to ``bs``."""
    reps = -(-bs // len(images))
    return images.repeat(reps, 1, 1, 1)[:bs], boxes.repeat(reps, 1)[:bs]


def autocast(device: torch.device, dtype: str):
    """The autocast context of ``dtype`` (``fp32``: none)."""
    return nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, dtype=DTYPES[dtype])


def is_pruned(net: nn.Module) -> bool:
    return any(p.active for p in net.pruners.values())


class PartTimer:
    """Wall-clock time of the pruned part (``net.pruned_part()``) in one forward, glue code included.

    The part's span runs from the first entry into one of its modules to the last exit from one; the
    time spent in that span inside modules outside the part (the maximal ones, e.g. a decoder block
    that runs between two windowed ones) is taken off. What a backbone does between the part's
    modules (gathers, scatters, window bookkeeping, merges) thus counts, as it counts in the unpruned
    model, whose stages are single module calls.
    """

    def __init__(self, net: nn.Module, names: list[str], device: torch.device) -> None:
        def under(name: str, prefix: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        modules = dict(net.named_modules())
        part = {n for n in modules if n and any(under(n, p) for p in names)}
        holds_part = {n for n in modules if any(under(p, n) for p in part)}  # ancestors (and the part)
        rest = [n for n in modules if n and n not in holds_part and n.rpartition(".")[0] in holds_part | {""}]
        self.device = device
        self.total = 0.0
        self.handles = []
        self._events: list[tuple[bool, float, float]] = []
        self._open: dict[int, float] = {}
        for name in sorted(part) + rest:
            module = modules[name]
            is_part = name in part
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leaver(is_part)))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._open[id(module)] = self._now()

    def _leaver(self, is_part: bool) -> Callable[..., None]:
        def leave(module: nn.Module, args: Any, output: Any) -> None:
            self._events.append((is_part, self._open.pop(id(module)), self._now()))

        return leave

    def start(self) -> None:
        """Forget the events of earlier forwards."""
        self._events.clear()

    def stop(self) -> float:
        """Seconds of the part in the forward since :meth:`start`."""
        spans = [(t0, t1) for is_part, t0, t1 in self._events if is_part]
        if not spans:
            return 0.0
        begin, end = min(t0 for t0, _ in spans), max(t1 for _, t1 in spans)
        inside = [t1 - t0 for is_part, t0, t1 in self._events if not is_part and t0 >= begin and t1 <= end]
        return end - begin - sum(inside)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_pruners(net: nn.Module, image, box, repeats: int, device) -> float:
    """Median ms of all pruner calls of one forward pass (the scoring and selection cost alone)."""
    calls: list[tuple[nn.Module, tuple, dict]] = []

    def capture(module, args, kwargs):
        calls.append((module, tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    handles = [p.register_forward_pre_hook(capture, with_kwargs=True) for p in net.pruners.values()]
    with torch.no_grad():
        net(image, box)
    for handle in handles:
        handle.remove()

    def run() -> None:
        for module, args, kwargs in calls:
            module(*args, **kwargs)

    with torch.no_grad():
        return measure_latency(run, warmup=1, repeats=repeats, device=device).median_ms


def stage_figures(net: nn.Module, dense_report, report, image, box) -> dict[str, Any]:
    """Per-stage pruned fraction and token-wise FLOPs saved of a hierarchical backbone."""
    with torch.no_grad():
        trace = net(image, box).trace
    pruned = (1 - net.stage_keep_fraction(trace).mean(dim=0)).tolist() if is_pruned(net) else None
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    figures: dict[str, Any] = {}
    for index, stage in enumerate(net.stage_names(), start=1):
        names = [n for n in linear if n.startswith(stage + ".")]
        dense = dense_report.flops_under(names)
        figures[f"stage{index}_pruned"] = pruned[index - 1] if pruned is not None else 0.0
        figures[f"stage{index}_tokenwise_saved"] = 1 - report.flops_under(names) / dense if dense else None
    return figures


def flop_reports(net: nn.Module, images, boxes) -> list[FlopReport]:
    """One FLOP report per image (batch 1) on the executed graph."""
    return [count_flops(net, images[i : i + 1], boxes[i : i + 1]) for i in range(len(images))]


def measure_static(
    net: nn.Module, reports: list[FlopReport], dense_reports: list[FlopReport], images, boxes
) -> dict[str, Any]:
    """FLOPs (batch 1, mean over the images), sparsity and per-stage figures of one network.

    ``reports`` are the network's FLOP reports (:func:`flop_reports`), ``dense_reports`` the unpruned
    model's on the same images: ``ref_part_gflops`` is the unpruned FLOPs of this network's own part,
    the denominator of its part FLOP ratio.
    """
    part = net.pruned_part()
    row: dict[str, Any] = {
        "gflops": statistics.fmean(r.total_flops for r in reports) / 1e9,
        "part_gflops": statistics.fmean(r.flops_under(part) for r in reports) / 1e9,
        "ref_part_gflops": statistics.fmean(r.flops_under(part) for r in dense_reports) / 1e9,
    }
    with torch.no_grad():
        sparsity = net(images, boxes).trace.sparsity()
    row["sparsity"] = 0.0 if sparsity is None else float(sparsity.mean())
    if hasattr(net, "stage_names"):  # per-stage figures need the unpruned model's FLOPs per stage
        row.update(stage_figures(net, dense_reports[0], reports[0], images[:1], boxes[:1]))
    return row


def batch_flops(net: nn.Module, images, boxes, batch_sizes: list[int]) -> dict[str, float]:
    """GFLOPs per image of one forward at each batch size above 1: where images keep different counts
    and the batch is padded to its largest, this exceeds the batch-1 mean (``gflops``) by the padding."""
    return {
        f"gflops_per_img_b{bs}": count_flops(net, *batch_of(images, boxes, bs)).total_flops / bs / 1e9
        for bs in batch_sizes
        if bs > 1
    }


def measure_times(
    nets: list[nn.Module], rows: list[dict[str, Any]], images, boxes, bs: int, dtype: str, args, device
) -> None:
    """Median latency, pruned-part time and pruner time of every network at batch ``bs`` under ``dtype``,
    timed in ``args.rounds`` interleaved rounds.

    A row's ``part_sets`` (the unpruned model's: one per distinct part of the pruned rows) are each
    timed; the medians go to ``row["_part_ms"][suffix][part]``, the first also to ``part_ms_<suffix>``.
    """
    x, b = batch_of(images, boxes, bs)
    per_round = max(1, args.repeats // args.rounds)
    parts = [row.get("part_sets") or [tuple(row["part_names"])] for row in rows]
    times: list[list[float]] = [[] for _ in nets]
    round_ms: list[list[float]] = [[] for _ in nets]
    part_times: list[dict[tuple[str, ...], list[float]]] = [{part: [] for part in p} for p in parts]
    prune_times: list[list[float]] = [[] for _ in nets]
    for round_index in range(args.rounds):
        warmup = args.warmup if round_index == 0 else 1
        for i in round_order(len(nets), round_index):
            net = nets[i]
            with torch.no_grad(), autocast(device, dtype):
                timed = measure_latency(lambda n=net: n(x, b), warmup, per_round, device).times_ms
                times[i] += timed
                round_ms[i].append(statistics.median(timed))
                for part in parts[i]:
                    timer = PartTimer(net, list(part), device)
                    try:
                        for _ in range(per_round):
                            timer.start()
                            net(x, b)
                            part_times[i][part].append(timer.stop() * 1e3)
                    finally:
                        timer.remove()
                if is_pruned(net):
                    prune_times[i].append(time_pruners(net, x, b, per_round, device))
    suffix = f"b{bs}_{dtype}"
    for i, row in enumerate(rows):
        median = statistics.median(times[i])
        row[f"ms_{suffix}"] = median
        row[f"img_per_s_{suffix}"] = bs / (median / 1e3)
        row.setdefault("_round_ms", {})[suffix] = round_ms[i]
        by_part = {part: statistics.median(values) for part, values in part_times[i].items()}
        row.setdefault("_part_ms", {})[suffix] = by_part
        row[f"part_ms_{suffix}"] = by_part[parts[i][0]]
        if prune_times[i]:
            row[f"prune_ms_{suffix}"] = statistics.median(prune_times[i])


def peak_memory(config: Config, bs: int, dtype: str, args, device: torch.device) -> dict[str, Any]:
    """Peak memory of ``config`` at batch ``bs`` over its baseline, measured on its own.

    CPU: a fresh process builds the network and inputs, reads its RSS, runs the forward passes and reads
    its RSS high-water mark (``VmHWM``), so allocator caches of other configurations do not count.
    CUDA: ``max_memory_allocated`` after a reset, in this process (tensors only).
    """
    if device.type == "cuda":
        net = build(config, args.input_size, args.override).to(device)
        images, boxes = phantom_batch(args.input_size, args.images)
        x, b = batch_of(images.to(device), boxes.to(device), bs)
        with torch.no_grad(), autocast(device, dtype):
            net(x, b)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(3):
                net(x, b)
            torch.cuda.synchronize(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20, "method": "cuda"}
    command = [sys.executable, __file__, "--peak-of", config.to_json(), "--peak-batch", str(bs)]
    command += ["--peak-dtype", dtype, "--input-size", str(args.input_size), "--images", str(args.images)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.override:
        command += ["--override", *args.override]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"peak-memory process for {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_of(args) -> None:
    """The ``--peak-of`` child: one configuration's peak RSS over its baseline, printed as JSON."""
    from prato_exp.metrics.efficiency import _proc_status_kb, _reset_rss_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(**json.loads(args.peak_of))
    net = build(config, args.input_size, args.override)
    images, boxes = phantom_batch(args.input_size, args.images)
    x, b = batch_of(images, boxes, args.peak_batch)
    gc.collect()
    if not _reset_rss_peak():
        raise SystemExit("peak memory on CPU needs Linux's /proc/self/clear_refs")
    base = _proc_status_kb("VmRSS") / 1024
    with torch.no_grad(), autocast(torch.device("cpu"), args.peak_dtype):
        for _ in range(3):
            net(x, b)
    peak = _proc_status_kb("VmHWM") / 1024
    print(json.dumps({"peak_mb": peak - base, "baseline_mb": base, "method": "cpu_vmhwm_fresh_process"}))


def add_ratios(rows: list[dict[str, Any]], timings: list[str]) -> None:
    """Ratios of every pruned row to its model's ``none`` row: FLOPs, time, pruned-part time, scoring."""
    base = {r["model"]: r for r in rows if r["pruning"] == "none" and r["status"] == "ok"}
    for row in rows:
        ref = base.get(row["model"])
        if row["status"] != "ok" or ref is None:
            continue
        row["flop_ratio"] = row["gflops"] / ref["gflops"]
        for key in [k for k in row if k.startswith("gflops_per_img_")]:
            row[key.replace("gflops_per_img_", "flop_ratio_")] = row[key] / ref[key]
        row["part_flop_ratio"] = (
            row["part_gflops"] / row["ref_part_gflops"] if row["ref_part_gflops"] else None
        )
        for t in timings:
            ratio, low, high = paired_ratio(row["_round_ms"][t], ref["_round_ms"][t])
            row[f"time_ratio_{t}"] = ratio
            row[f"time_ratio_ci_{t}"] = [low, high]
            ref_part = ref["_part_ms"][t].get(tuple(row["part_names"]))  # the same modules, unpruned
            row[f"part_time_ratio_{t}"] = row[f"part_ms_{t}"] / ref_part if ref_part else None
            if f"prune_ms_{t}" in row:
                row[f"prune_share_{t}"] = row[f"prune_ms_{t}"] / ref[f"ms_{t}"]


def _fmt(spec: str) -> Callable[[Any], str]:
    return spec.format


def markdown_tables(rows: list[dict[str, Any]], timings: list[str]) -> str:
    """One table per model (whole model and pruned part) and one per-stage table per hierarchical model."""
    cols: list[tuple[str, str, Callable[[Any], str]]] = [
        ("pruning", "pruning", str),
        ("mode", "mode", str),
        ("weights", "weights", str),
        ("GFLOPs", "gflops", _fmt("{:.3f}")),
        ("FLOP ratio", "flop_ratio", _fmt("{:.3f}")),
        ("part FLOP ratio", "part_flop_ratio", _fmt("{:.3f}")),
        ("sparsity", "sparsity", _fmt("{:.3f}")),
    ]
    batched = {k.removeprefix("flop_ratio_") for r in rows for k in r if k.startswith("flop_ratio_b")}
    batched = sorted(batched, key=lambda b: int(b[1:]))
    cols += [(f"FLOP ratio {b} (per image)", f"flop_ratio_{b}", _fmt("{:.3f}")) for b in batched]
    for t in timings:
        cols += [
            (f"ms {t}", f"ms_{t}", _fmt("{:.1f}")),
            (f"time ratio {t}", f"time_ratio_{t}", _fmt("{:.3f}")),
            (f"95% CI {t}", f"time_ratio_ci_{t}", lambda ci: f"{ci[0]:.3f}-{ci[1]:.3f}"),
            (f"part time ratio {t}", f"part_time_ratio_{t}", _fmt("{:.3f}")),
            (f"img/s {t}", f"img_per_s_{t}", _fmt("{:.1f}")),
            (f"peak MB {t}", f"peak_mb_{t}", _fmt("{:.0f}")),
            (f"scoring share {t}", f"prune_share_{t}", _fmt("{:.2%}")),
        ]
    out: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        out += [f"## {model}", "", *_table(cols, [r for r in mine if r["status"] == "ok"])]
        refused = [r for r in mine if r["status"] != "ok"]
        out += [
            "",
            *[f"- `{r['pruning']}` refused: {r['status'].removeprefix('refused: ')}" for r in refused],
        ]
        stages = sorted({k.split("_")[0] for r in mine for k in r if k.startswith("stage")})
        if stages:
            stage_cols = [("pruning", "pruning", str)]
            for s in stages:
                stage_cols += [
                    (f"{s} pruned", f"{s}_pruned", _fmt("{:.3f}")),
                    (f"{s} token-wise FLOPs saved", f"{s}_tokenwise_saved", _fmt("{:.3f}")),
                ]
            out += [
                "",
                f"Per stage ({model}):",
                "",
                *_table(stage_cols, [r for r in mine if r["status"] == "ok"]),
            ]
        out.append("")
    return "\n".join(out)


def _table(cols, rows) -> list[str]:
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt(row[key]) if row.get(key) is not None else "-" for _, key, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]], tables: str, command: str) -> None:
    """``<out>.json`` (every figure), ``.csv`` and ``.md`` (the tables with command, commit, machine)."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    meta = {"command": command, "environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    retained = getattr(args, "retained_memory", False)
    allocator = "freed memory kept in the process (prato_exp.cli.allocator)" if retained else "glibc defaults"
    header = [
        f"# Benchmark: {', '.join(args.models)}",
        "",
        f"- command: `{command}`",
        f"- commit: {env['commit']}; torch {env['torch']}; {env['threads']} threads; device {args.device}"
        + (f" ({env['cuda']})" if env["cuda"] else ""),
        f"- machine: {env['machine']}; CPU allocator: {allocator}",
        f"- input {args.input_size} px, {args.images} cardiac phantoms (seed 123), tight (oracle) boxes;"
        " weights: random init unless the row says trained (--checkpoint)",
        "- GFLOPs: FlopCounterMode on the executed graph, eval mode, batch 1 (multiply-add = 2 FLOPs);"
        " part = `net.pruned_part()` (the blocks after the first pruning point, the pruners' grid modules,"
        " a windowed decoder); ratios are pruned / the same model unpruned (`none`); FLOP ratio bN (per"
        " image): FLOPs of one batch-N forward over N, against the unpruned model's (where images keep"
        " different counts, padding to the batch's largest count shows here and not at batch 1);"
        f" latency: median of {args.repeats} runs after {args.warmup} warm-up runs, timed in {args.rounds}"
        " interleaved rounds over all configurations of a model (forwards in even rounds, backwards in odd"
        " ones); time ratio: the median over rounds of the row's median in a round over the unpruned"
        " model's in the same round, with its 95% bootstrap interval (CI); `none (A/A)`: a copy of the"
        " unpruned model timed as another configuration, so its ratios show the machine's noise floor;"
        " part time: from the first entry into a part module to the last exit (glue code between them"
        " included; time in other modules inside"
        " that span taken off); scoring share = the pruner calls alone / the unpruned model's time;"
        " peak MB = the configuration's peak memory over its baseline, measured on its own (CPU: a fresh"
        " process, peak RSS; GPU: max_memory_allocated); `tBbN_dtype` = batch N under that autocast dtype",
        "- per stage (hierarchical models): fraction of the stage's grid pruned, and the share of the"
        " stage's token-wise FLOPs (linear layers: QKV, projections, MLP) saved against the unpruned model",
        "",
        tables,
    ]
    args.out.with_suffix(".md").write_text("\n".join(header))
    print(f"wrote {args.out}.{{json,csv,md}}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", "--model", nargs="+", default=["unetr_small"], help="model presets (conf/model)"
    )
    parser.add_argument(
        "--pruning",
        nargs="+",
        default=["percentile25", "percentile50", "percentile75"],
        help="pruning entries PRESET[@THRESHOLD][+KEY=VALUE...]: a preset (conf/pruning), a threshold "
        "choice, Hydra overrides of this entry alone; e.g. prato@fixed0.5, prato_box_first+experiment=fast",
    )
    parser.add_argument("--modes", nargs="+", default=["drop"], help="execution modes of each pruning entry")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4, help="phantom images for FLOP averaging")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per network and batch size")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the repeats are split into")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peak-memory", action="store_true", help="skip the per-configuration memory")
    parser.add_argument(
        "--no-noise-row",
        action="store_true",
        help=f"leave out the `{NOISE_ROW}` row (a copy of the unpruned model: the time ratios' noise floor)",
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="time with glibc's malloc defaults (default: freed memory kept in the process, as training "
        "does: prato_exp.cli.allocator; otherwise each configuration's buffers are page-faulted anew)",
    )
    parser.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides, e.g. model.prune_after=[3,6,9]"
    )
    parser.add_argument(
        "--checkpoint",
        nargs="*",
        default=[],
        help="MODEL/PRUNING=PATH: the network weights of a training checkpoint for that entry",
    )
    parser.add_argument("--out", type=Path, default=None, help="output prefix for .json/.csv/.md")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--peak-dtype", default="fp32", help=argparse.SUPPRESS)
    return parser


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    from tqdm import tqdm

    with tqdm(total=total, unit="config", file=sys.stderr) as bar:

        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        yield step


def round_order(count: int, round_index: int) -> list[int]:
    """The order the ``count`` configurations run in round ``round_index``: forwards in even rounds,
    backwards in odd ones, so no configuration always runs first, last or after the same neighbour."""
    order = list(range(count))
    return order if round_index % 2 == 0 else order[::-1]


def paired_ratio(
    times: list[float], ref_times: list[float], resamples: int = 2000
) -> tuple[float, float, float]:
    """The median over rounds of ``times[k] / ref_times[k]`` (each round's median latency against the
    reference's in the same round, so a drift of the machine between rounds cancels) and a 95 % bootstrap
    interval of that median (seeded: the same figures give the same interval)."""
    ratios = [t / r for t, r in zip(times, ref_times, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return statistics.median(ratios), low, high


def run(args: argparse.Namespace, command: str) -> list[dict[str, Any]]:
    """Measure every configuration of every model; returns the rows (also written with ``--out``)."""
    checkpoints = dict(item.rsplit("=", 1) for item in args.checkpoint)  # entries may hold "="
    known = {f"{m}/{p}" for m in args.models for p in ["none", *args.pruning]}
    if set(checkpoints) - known:
        raise SystemExit(f"--checkpoint names {sorted(set(checkpoints) - known)}, not among {sorted(known)}")
    device = torch.device(args.device)
    if args.dtypes != ["fp32"] and device.type != "cuda":
        print("note: bf16/fp16 autocast on CPU measures CPU autocast, not a GPU", file=sys.stderr)
    images, boxes = phantom_batch(args.input_size, args.images)
    images, boxes = images.to(device), boxes.to(device)
    timings = [f"b{bs}_{dtype}" for bs in args.batch_sizes for dtype in args.dtypes]
    rows: list[dict[str, Any]] = []
    with _progress(len(args.models) * (1 + len(args.pruning) * len(args.modes))) as step:
        for model in args.models:
            configs = [Config(model, "none", None)]
            configs += [Config(model, p, m) for p in args.pruning for m in args.modes]
            nets, mine, dense, dense_reports = [], [], None, None
            for config in configs:
                row: dict[str, Any] = {"model": model, "pruning": config.pruning, "mode": config.mode or "-"}
                try:
                    net = build(config, args.input_size, args.override)
                except ValueError as err:
                    rows.append({**row, "status": f"refused: {str(err).splitlines()[0]}"})
                    step(f"{model} {config.pruning}: refused")
                    continue
                key = f"{model}/{config.pruning}"
                if key in checkpoints:
                    load_net_weights(net, load_checkpoint(checkpoints[key]), checkpoints[key])
                net = net.to(device)
                row |= {"status": "ok", "weights": "trained" if key in checkpoints else "random"}
                reports = flop_reports(net, images, boxes)
                dense, dense_reports = dense or net, dense_reports or reports
                row |= measure_static(net, reports, dense_reports, images, boxes)
                row |= batch_flops(net, images, boxes, args.batch_sizes)
                row["part_names"] = net.pruned_part() if is_pruned(net) else dense.pruned_part()
                nets.append(net)
                mine.append(row)
                rows.append(row)
                step(f"{model} {config.pruning}: static")
            if len(mine) > 1 and mine[0]["pruning"] == "none":  # time each pruned row's part unpruned
                mine[0]["part_sets"] = list(dict.fromkeys(tuple(r["part_names"]) for r in mine[1:]))
                mine[0]["part_names"] = mine[0]["part_sets"][0]
            if nets and not args.no_noise_row:  # the unpruned model against a copy of itself
                nets.append(copy.deepcopy(nets[0]))
                mine.append({**mine[0], "pruning": NOISE_ROW, "part_sets": None})
                rows.append(mine[-1])
            for bs in args.batch_sizes:
                for dtype in args.dtypes:
                    measure_times(nets, mine, images, boxes, bs, dtype, args, device)
            if not args.no_peak_memory:
                for row in mine:
                    if row["pruning"] == NOISE_ROW:
                        continue
                    config = Config(model, row["pruning"], None if row["mode"] == "-" else row["mode"])
                    for bs in args.batch_sizes:
                        for dtype in args.dtypes:
                            row[f"peak_mb_b{bs}_{dtype}"] = peak_memory(config, bs, dtype, args, device)[
                                "peak_mb"
                            ]
            del nets
            gc.collect()
    add_ratios(rows, timings)
    for row in rows:
        for key in ("part_names", "part_sets", "_part_ms", "_round_ms"):
            row.pop(key, None)
    tables = markdown_tables(rows, timings)
    print(tables)
    if args.out:
        write_outputs(args, rows, tables, command)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.peak_of:
        peak_of(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.retained_memory = False if args.glibc_defaults else retain_freed_memory()
    run(args, "python scripts/benchmark.py " + " ".join(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
