"""Training-recipe comparison table from run folders: what each run changed, what it reached, how fast.

    python scripts/recipe_table.py outputs/runs/<run> ... [plain.json ...] \
        --out docs/results/recipe_acdc_cpu.md --title "CPU recipe on the shared ACDC split" [--note "..."]

Every figure is read from the runs' ``config.yaml`` and ``metrics.json`` (the scored split's per-case
means, samples seen and throughput, the commit read when the run started), or from the JSON that
``scripts/plain_unetr_acdc.py --out`` writes (the plain-script yardstick, a row of its own); nothing is
typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def _augment(config: dict[str, Any]) -> str:
    names = [
        t["_target_"].rsplit(".", 1)[-1].removeprefix("Rand").removesuffix("d")
        for t in config["augment"]["transforms"]
    ]
    return "+".join(dict.fromkeys(names)) or "none"


def _model(config: dict[str, Any]) -> str:
    model = config["model"]
    name = model["_target_"].rsplit(".", 1)[-1]
    width = f" h{model['hidden_size']}" if "hidden_size" in model else ""
    return f"{name}{width} {model['img_size']}px"


def recipe_row(run_dir: Path) -> dict[str, Any]:
    """One table row of a finished run folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    split = "test" if metrics.get("test") else "val"
    scores = metrics[split]
    classes = [k.rsplit("/", 1)[-1] for k in scores if k.startswith(f"{split}/case/dsc/")]
    optimizer = config["optimizer"]
    scheduler = (config.get("scheduler") or {}).get("_target_", "none").rsplit(".", 1)[-1]
    return {
        "run": run_dir.name,
        "model": _model(config),
        "dataset": config["dataset"]["_target_"].rsplit(".", 1)[-1].removesuffix("Source"),
        "batch": config["datamodule"]["batch_size"],
        "lr": f"{optimizer['lr']:g}",
        "schedule": scheduler,
        "augment": _augment(config),
        "epochs": metrics["epochs_run"],
        "samples seen": metrics.get("train_samples_seen"),
        "samples/s": metrics.get("train_samples_per_second"),
        "split": f"{split} ({metrics['scored_checkpoint']})",
        **{f"{c} DSC": scores[f"{split}/case/dsc/{c}"] for c in classes},
        "mean DSC": scores[f"{split}/case/dsc_mean"],
        "mean HD95 (2-D)": scores.get(f"{split}/case/hd95_mean"),
        "mean HD95 (3-D)": scores.get(f"{split}/case/hd95_3d_mean"),
        "seed": metrics["seed"],
        "commit": (metrics.get("environment") or {}).get("commit"),
        "threads": (metrics.get("environment") or {}).get("threads"),
    }


def plain_script_row(path: Path) -> dict[str, Any]:
    """One table row of a ``scripts/plain_unetr_acdc.py --out`` JSON (its fixed recipe: batch 16, AdamW
    lr 3e-4 without a schedule, flips only, final-epoch weights on validation)."""
    result = json.loads(path.read_text())
    return {
        "run": f"{path.stem} (plain script)",
        "model": f"MONAI {'UNETR h192' if result['model'] == 'unetr' else 'BasicUNet'} 128px",
        "dataset": "ACDC",
        "batch": 16,
        "lr": "0.0003",
        "schedule": "none",
        "augment": "Flip",
        "epochs": result["epochs"],
        "samples seen": result["samples_seen"],
        "samples/s": result["samples_per_second"],
        "split": "val (final epoch)",
        "mean DSC": result["val_mean_dsc_per_volume"],
        "seed": result.get("seed", 0),
        "commit": result.get("commit"),
        "threads": result["threads"],
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def to_markdown(rows: Sequence[dict[str, Any]], title: str, notes: Sequence[str]) -> str:
    """The rows as one Markdown table (columns in first-seen order) under a title and notes."""
    columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("commit", "threads")))
    commits = sorted({str(r["commit"]) for r in rows if r.get("commit")})
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    lines += [f"- commit(s) the runs started from: {', '.join(commits)}"]
    lines += [f"- torch threads: {sorted({r['threads'] for r in rows})}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="finished run folders (with metrics.json) or plain-script JSONs"
    )
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--title", default="Training recipes")
    parser.add_argument("--note", action="append", default=[], help="a line under the title (repeatable)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r.is_file() or (r / "metrics.json").is_file())]
    if missing:
        print("not finished runs (no metrics.json): " + ", ".join(missing), file=sys.stderr)
        return 2
    rows = [plain_script_row(r) if r.is_file() else recipe_row(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, args.title, args.note))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
