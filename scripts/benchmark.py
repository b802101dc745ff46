"""Benchmark pruned vs unpruned inference: GFLOPs on the executed graph, token sparsity, latency,
throughput and peak memory, at batch 1 and a larger batch, on CPU or GPU.

Every configuration is built from the project's Hydra configs (random weights unless a trained
checkpoint is given with ``--checkpoint``: percentile keep counts do not depend on the weights, but
fixed thresholds and DToP's confidence-based exits do) and fed the same phantom images with their
tight boxes. Each pruning config is run in every requested execution mode (``drop``, ``mask``),
next to ``none``; ratios are pruned / unpruned, for the whole model and for the part pruning touches.
The PrATo scoring itself (the pruner call at each pruning point) is timed separately.

Example::

    python scripts/benchmark.py --model unetr_small --pruning percentile25 percentile50 percentile75 \\
        --modes drop mask --batch-sizes 1 8 --out docs/results/benchmark_unetr_small_cpu

    # all seven pruners at PrATo's q=25 budget, DToP with its trained heads
    python scripts/benchmark.py --model unetr_small --input-size 128 --modes drop \\
        --pruning percentile25 random dynamicvit evovit dtop stp tram \\
        --checkpoint dtop=outputs/runs/<run>/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from prato_exp.cli.common import CONFIG_DIR, build_net, environment
from prato_exp.cli.eval import load_checkpoint, load_net_weights
from prato_exp.data.phantoms import SyntheticCardiacSource
from prato_exp.data.prompts import BoxPrompter
from prato_exp.data.transforms import resize_pair
from prato_exp.metrics.efficiency import count_flops, measure_latency


def phantom_batch(size: int, count: int) -> tuple[torch.Tensor, torch.Tensor, SyntheticCardiacSource]:
    """``count`` cardiac phantoms resized to ``size`` with their tight boxes: ``(N,1,S,S)``, ``(N,4)``."""
    source = SyntheticCardiacSource(num_val=count, size=128, seed=123)
    prompter = BoxPrompter(condition="tight")
    images, boxes = [], []
    for case_id in source.split_ids()["val"]:
        case = source.load_case(case_id)
        image, label = resize_pair(case.image[:, 0], case.label[0], size)
        images.append(image)
        boxes.append(torch.as_tensor(prompter(label.numpy(), case_id, 0)[0]))
    return torch.stack(images), torch.stack(boxes), source


def build(model: str, pruning: str, mode: str | None, size: int, source, extra: list[str]) -> nn.Module:
    """A network from the configs ``model=<model> pruning=<pruning>`` (``pruning.mode=<mode>``).

    ``pruning`` may name a threshold choice after ``@``: ``prato@fixed0.5`` is
    ``pruning=prato threshold=fixed0.5``.
    """
    preset, _, threshold = pruning.partition("@")
    overrides = [f"model={model}", f"pruning={preset}", f"model.img_size={size}", *extra]
    if threshold:
        overrides.append(f"threshold={threshold}")
    if mode is not None:
        overrides.append(f"pruning.mode={mode}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    return build_net(cfg.model, source).eval()


def time_pruners(net: nn.Module, image, box, warmup: int, repeats: int, device) -> float:
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
        return measure_latency(run, warmup=warmup, repeats=repeats, device=device).median_ms


def mean_sparsity(net: nn.Module, image, box) -> float:
    with torch.no_grad():
        sparsity = net(image, box).trace.sparsity()
    return 0.0 if sparsity is None else float(sparsity.mean())


def measure_static(net: nn.Module, images, boxes) -> dict[str, Any]:
    """FLOPs (batch 1, mean over the images) and sparsity of one network."""
    reports = [count_flops(net, images[i : i + 1], boxes[i : i + 1]) for i in range(len(images))]
    part = net.pruned_part()
    return {
        "gflops": statistics.fmean(r.total_flops for r in reports) / 1e9,
        "part_gflops": statistics.fmean(r.flops_under(part) for r in reports) / 1e9,
        "sparsity": mean_sparsity(net, images, boxes),
    }


def measure_latencies(
    nets: list[nn.Module], rows: list[dict[str, Any]], images, boxes, bs: int, args, device
) -> None:
    """Median latency of every network at batch ``bs``, timed in interleaved rounds.

    Each of ``args.rounds`` rounds times every network ``repeats / rounds`` times in turn, so a slow
    drift of the machine (other tenants, clocks) affects all configurations alike; the median is over
    all timed runs of a network. The PrATo scoring alone is timed the same way.
    """
    reps = -(-bs // len(images))
    x, b = images.repeat(reps, 1, 1, 1)[:bs], boxes.repeat(reps, 1)[:bs]
    per_round = max(1, args.repeats // args.rounds)
    times: list[list[float]] = [[] for _ in nets]
    prune_times: list[list[float]] = [[] for _ in nets]
    peaks = [0.0 for _ in nets]
    for round_index in range(args.rounds):
        warmup = args.warmup if round_index == 0 else 1
        for i, net in enumerate(nets):
            with torch.no_grad():
                lat = measure_latency(lambda n=net: n(x, b), warmup=warmup, repeats=per_round, device=device)
            times[i] += lat.times_ms
            peaks[i] = max(peaks[i], lat.peak_memory_mb)
            if any(p.active for p in net.pruners.values()):
                prune_times[i].append(time_pruners(net, x, b, warmup, per_round, device))
    for i, row in enumerate(rows):
        median = statistics.median(times[i])
        row[f"ms_b{bs}"] = median
        row[f"img_per_s_b{bs}"] = bs / (median / 1e3)
        row[f"peak_mb_b{bs}"] = peaks[i]
        if prune_times[i]:
            row[f"prune_ms_b{bs}"] = statistics.median(prune_times[i])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unetr_small")
    parser.add_argument(
        "--pruning",
        nargs="+",
        default=["percentile25", "percentile50", "percentile75"],
        help="pruning presets; `preset@threshold` adds a threshold choice, e.g. prato@fixed0.5",
    )
    parser.add_argument("--modes", nargs="+", default=["drop", "mask"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4, help="phantom images for FLOP averaging")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per network and batch size")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the repeats are split into")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides, e.g. model.prune_after=[3,6,9]"
    )
    parser.add_argument(
        "--checkpoint",
        nargs="*",
        default=[],
        help="PRUNING=PATH: load the network weights of a training checkpoint for that pruning entry",
    )
    parser.add_argument("--out", type=Path, default=None, help="output prefix for .json/.csv/.md")
    args = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    unknown = set(checkpoints) - {"none", *args.pruning}
    if unknown:
        parser.error(f"--checkpoint names {sorted(unknown)}, not among none/--pruning {args.pruning}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    images, boxes, source = phantom_batch(args.input_size, args.images)
    images, boxes = images.to(device), boxes.to(device)
    runs: list[tuple[str, str | None]] = [("none", None)]
    runs += [(p, m) for p in args.pruning for m in args.modes]
    rows = []
    started = time.time()
    nets = []
    for pruning, mode in runs:
        net = build(args.model, pruning, mode, args.input_size, source, args.override)
        if pruning in checkpoints:
            load_net_weights(net, load_checkpoint(checkpoints[pruning]), checkpoints[pruning])
        net = net.to(device)
        rows.append(
            {
                "model": args.model,
                "pruning": pruning,
                "mode": mode or "-",
                "weights": "trained" if pruning in checkpoints else "random",
                **measure_static(net, images, boxes),
            }
        )
        nets.append(net)
    for bs in args.batch_sizes:
        measure_latencies(nets, rows, images, boxes, bs, args, device)
        print(f"timed batch {bs} ({time.time() - started:.0f} s)", flush=True)
    add_ratios(rows, args.batch_sizes)
    table = markdown_table(rows, args.batch_sizes)
    print(table)
    if args.out:
        write_outputs(args, rows, table)


def add_ratios(rows: list[dict[str, Any]], batch_sizes: list[int]) -> None:
    """Pruned / unpruned ratios of FLOPs and time, whole model and pruned part; scoring overhead."""
    base = rows[0]
    for row in rows:
        row["flop_ratio"] = row["gflops"] / base["gflops"]
        row["part_flop_ratio"] = row["part_gflops"] / base["part_gflops"]
        for bs in batch_sizes:
            row[f"time_ratio_b{bs}"] = row[f"ms_b{bs}"] / base[f"ms_b{bs}"]
            if f"prune_ms_b{bs}" in row:
                row[f"prune_overhead_b{bs}"] = row[f"prune_ms_b{bs}"] / base[f"ms_b{bs}"]


def markdown_table(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    cols: list[tuple[str, str, Callable[[Any], str]]] = [
        ("pruning", "pruning", str),
        ("mode", "mode", str),
        ("weights", "weights", str),
        ("GFLOPs", "gflops", "{:.3f}".format),
        ("FLOP ratio", "flop_ratio", "{:.3f}".format),
        ("part FLOP ratio", "part_flop_ratio", "{:.3f}".format),
        ("sparsity", "sparsity", "{:.3f}".format),
    ]
    for bs in batch_sizes:
        cols += [
            (f"ms b{bs}", f"ms_b{bs}", "{:.1f}".format),
            (f"time ratio b{bs}", f"time_ratio_b{bs}", "{:.3f}".format),
            (f"img/s b{bs}", f"img_per_s_b{bs}", "{:.1f}".format),
            (f"peak MB b{bs}", f"peak_mb_b{bs}", "{:.0f}".format),
            (f"scoring/unpruned b{bs}", f"prune_overhead_b{bs}", "{:.2%}".format),
        ]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [fmt(row[key]) if key in row and row[key] is not None else "-" for _, key, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]], table: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    command = "python scripts/benchmark.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v not in (None, []) and k != "out"
    )
    meta = {"command": command, "environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    header = [
        f"# Benchmark: {args.model}",
        "",
        f"- command: `{command}`",
        f"- commit: {env['commit']}; torch {env['torch']}; {env['threads']} threads; device {args.device}"
        + (f" ({env['cuda']})" if env["cuda"] else ""),
        f"- machine: {env['machine']}",
        f"- input {args.input_size} px, {args.images} cardiac phantoms (seed 123), tight boxes;"
        " weights: random init unless the row says trained (--checkpoint)",
        "- GFLOPs: FlopCounterMode on the executed graph, eval mode, batch 1 (multiply-add = 2 FLOPs);"
        " part = the blocks after the first pruning point; ratios are pruned / unpruned (`none`);"
        f" latency: median of {args.repeats} runs after {args.warmup} warm-up runs, timed in {args.rounds}"
        " interleaved rounds over all configurations;"
        " scoring/unpruned = the pruner calls alone / the unpruned model's time;"
        " peak MB = the process's peak RSS during the timed runs (CPU) or peak allocated memory (CUDA)",
        "",
        table,
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(header))
    print(f"wrote {args.out}.{{json,csv,md}}")


if __name__ == "__main__":
    main()
