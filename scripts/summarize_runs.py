"""Collect the ``metrics.json`` of several runs into one Markdown table (for ``docs/results/``).

Example::

    python scripts/summarize_runs.py outputs/runs/*acdc* --title "ACDC, small UNETR" \\
        --out docs/results/acdc_unetr_small.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's metrics and the config it ran with."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"dir": run_dir, "metrics": metrics, "config": config}


def row(run: dict[str, Any], split: str | None = None) -> dict[str, str]:
    m, cfg = run["metrics"], run["config"]
    split = split or ("test" if m.get("test") else "val")
    scores = m[split]
    eff = m["efficiency"]
    pruner = cfg["pruning"]["_target_"].rsplit(".", 1)[-1]
    if pruner == "PrATo":
        pruner += f" {cfg['pruning']['threshold']} q={cfg['pruning']['q']} tau={cfg['pruning']['tau']}"
        where = {k: v for k, v in cfg["model"].items() if k.startswith("prune_")}
        pruner += " " + " ".join(f"{k}={v}" for k, v in where.items())
    elif "q" in cfg["pruning"]:
        pruner += f" q={cfg['pruning']['q']}"
    class_keys = sorted(k for k in scores if k.startswith(f"{split}/case/dsc/"))

    def fmt(key: str, digits: int = 4) -> str:
        value = scores.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    out = {
        "run": run["dir"].name,
        "model": cfg["model"]["_target_"].rsplit(".", 1)[-1] + f" h{cfg['model'].get('hidden_size')}",
        "pruning": pruner,
        "split": split,
        "epochs": str(m["epochs_run"]),
        "seed": str(m["seed"]),
    }
    out.update({k.rsplit("/", 1)[-1] + " DSC": fmt(k) for k in class_keys})
    out.update(
        {
            "mean DSC": fmt(f"{split}/case/dsc_mean"),
            "mean IoU": fmt(f"{split}/case/iou_mean"),
            "mean HD95": fmt(f"{split}/case/hd95_mean", 2),
            "sparsity": fmt(f"{split}/sparsity", 3),
            "GFLOPs": f"{eff['gflops_per_image']:.3f}",
            "FLOP ratio": f"{eff['flop_ratio']:.3f}" if "flop_ratio" in eff else "-",
            "latency ms": f"{eff['latency']['median_ms']:.1f}",
            "train min": f"{m['train_seconds'] / 60:.1f}",
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--title", default="Runs")
    parser.add_argument("--command", default=None, help="the command(s) that produced the runs")
    parser.add_argument("--split", choices=["val", "test"], default=None, help="default: test if present")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = [load_run(r) for r in args.runs if (r / "metrics.json").is_file()]
    if not runs:
        raise SystemExit("no run folder with a metrics.json among the arguments")
    rows = [row(r, args.split) for r in runs]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    env = runs[0]["metrics"]["environment"]
    lines = [
        f"# {args.title}",
        "",
        f"- commit: {env.get('commit')}; torch {env.get('torch')}; {env.get('threads')} CPU threads; "
        f"GPU: {env.get('cuda') or 'none'}; machine: {env.get('machine')}",
    ]
    if args.command:
        lines.append(f"- command: `{args.command}`")
    lines += [
        "- metrics per case (ACDC: per volume), original resolution; box prompts are oracle boxes from the"
        " ground truth (tight); `val` = validation figures (no test split here)",
        "- GFLOPs: FlopCounterMode on the executed graph, batch 1, multiply-add = 2 FLOPs",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r.get(c, "-") for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
