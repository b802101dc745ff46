"""Train every small backbone preset with every pruner for one epoch on the phantoms, and tabulate.

Why this exists: a pruner that builds in a unit test can still fail inside the real pipeline (Hydra
composition, Lightning, the metrics, the efficiency pass), and a backbone may refuse a pruner. This runs
exactly the user's command for every pair::

    python train.py model=<M> pruning=<P> trainer.max_epochs=1 logger=csv hydra.run.dir=<out>/<M>/<P>

(``model`` every ``conf/model/*_small.yaml``, ``pruning`` every ``conf/pruning/*.yaml``; the default
dataset is the cardiac phantoms) and writes one Markdown table: the exit status, the validation mean DSC
after one epoch (slices; phantoms, so a smoke figure, not a result), the FLOP ratio against the same
weights unpruned, and, for a pair that is refused, the refusal's first line. A pair passes when it
finishes, or when it is refused before training starts with a ``ValueError`` that names the pruner.

    python scripts/pruner_matrix.py --out outputs/pruner_matrix --table docs/results/pruner_matrix.md

Runs one pair at a time (about a minute each on 2 CPU cores); ``--models`` / ``--pruners`` restrict it.
An existing ``--out`` folder is refused, so no run overwrites another's.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PairResult:
    """What one ``train.py`` run of a (model, pruning) pair gave."""

    model: str
    pruning: str
    returncode: int
    seconds: float
    dsc: float | None = None
    flop_ratio: float | None = None
    refusal: str | None = None

    @property
    def status(self) -> str:
        if self.returncode == 0:
            return "trained"
        return "refused" if self.refusal else "FAILED"


def presets(group: str, suffix: str = "") -> list[str]:
    """The config choices of ``conf/<group>/`` whose names end with ``suffix``, sorted."""
    return sorted(p.stem for p in (ROOT / "conf" / group).glob(f"*{suffix}.yaml"))


def refusal_line(stderr: str) -> str | None:
    """The ``ValueError`` message a refused pair ended with (plain, or as Hydra's instantiate quotes it:
    ``ValueError("...")``), or None (another failure)."""
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("ValueError: "):
            return line.removeprefix("ValueError: ")
        if line.startswith('ValueError("') and line.endswith('")'):
            return line.removeprefix('ValueError("').removesuffix('")')
    return None


def run_pair(model: str, pruning: str, out: Path) -> PairResult:
    """Run ``train.py`` for one pair into ``out/<model>/<pruning>``."""
    run_dir = out / model / pruning
    command = [
        sys.executable,
        "train.py",
        f"model={model}",
        f"pruning={pruning}",
        "trainer.max_epochs=1",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "matrix_stderr.log").write_text(done.stderr)
    result = PairResult(model, pruning, done.returncode, seconds)
    if done.returncode != 0:
        result.refusal = refusal_line(done.stderr)
        return result
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result.dsc = metrics["val"].get("val/slice/dsc_mean")
    result.flop_ratio = metrics.get("efficiency", {}).get("flop_ratio")
    return result


def commit() -> str:
    """The checkout's commit, ``-dirty`` when it has uncommitted changes."""
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return sha + ("-dirty" if dirty.strip() else "")


def table(results: list[PairResult], command: str) -> str:
    """The Markdown report of ``results``."""

    def fmt(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [
        "# Every small backbone with every pruner: one epoch on the cardiac phantoms",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit()}`; machine: {platform.platform()}, {platform.processor() or 'cpu'}; "
        "seed: the config default (0).",
        "",
        "Each row is `python train.py model=M pruning=P trainer.max_epochs=1 logger=csv`. DSC is the "
        "validation mean DSC over phantom slices after one epoch (a smoke figure, not a result); the FLOP "
        "ratio is pruned over unpruned on the same weights (phantom images, oracle boxes). `refused` means "
        "the backbone refused the pruner before training, with the reason shown.",
        "",
        "| model | pruning | status | val DSC | FLOP ratio | refusal |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        refusal = (r.refusal or "").replace("|", "/")
        lines.append(
            f"| {r.model} | {r.pruning} | {r.status} | {fmt(r.dsc, 3)} | {fmt(r.flop_ratio, 3)} | {refusal} |"
        )
    counts = {s: sum(r.status == s for r in results) for s in ("trained", "refused", "FAILED")}
    lines += ["", f"{counts['trained']} trained, {counts['refused']} refused, {counts['FAILED']} failed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run folders (must not exist)")
    parser.add_argument("--table", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--models", nargs="*", default=presets("model", "_small"))
    parser.add_argument("--pruners", nargs="*", default=presets("pruning"))
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new --out so no run is overwritten")
    for group, names in (("model", args.models), ("pruning", args.pruners)):
        unknown = sorted(set(names) - set(presets(group)))
        if unknown:
            raise SystemExit(f"unknown {group} choices {unknown}; choose from {presets(group)}")
    pairs = [(m, p) for m in args.models for p in args.pruners]
    results = []
    for model, pruning in tqdm(pairs, desc="pairs", unit="run"):
        results.append(run_pair(model, pruning, args.out))
        tqdm.write(f"{model} x {pruning}: {results[-1].status}")
    command = "python scripts/pruner_matrix.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(table(results, command))
    failed = [f"{r.model} x {r.pruning}" for r in results if r.status == "FAILED"]
    if failed:
        print(f"failed: {failed}; stderr in {args.out}/<model>/<pruning>/matrix_stderr.log", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
