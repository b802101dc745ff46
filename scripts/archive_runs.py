"""Copy the small record of finished runs into the repository, so tables can grow across machines.

A table at CPU scale takes longer than one working session, and run folders (``outputs/``, with their
checkpoints) are never committed. What ``prato-report`` reads for its tables is small: ``config.yaml``
and ``metrics.json`` (metrics, per-case rows, efficiency, environment with the commit). This copies
those, plus ``train.log`` and ``splits.json`` for provenance, from every finished run under the given
folders into ``<dest>/<run folder name>/``; ``prato-report <dest>`` then builds the tables from the
archive exactly as from the run folders (checked by ``tests/test_report.py``).

``report_samples.npz`` (the figures' slices) is copied without the dataset's pixels, which never go
into the repository: the network's prediction, kept tokens, scores and the box stay, the image and the
ground truth are replaced by a fingerprint, and ``prato-report`` reads the slices back from the run's
dataset (``prato_exp.report.samples.write_network_samples``), so the figures can be drawn from the
archive wherever the data is.

    python scripts/archive_runs.py outputs/multirun/<sweep> --dest docs/results/paper/runs/table3_roialign_k

Runs without ``metrics.json`` (unfinished or failed) are listed and left out; an archive folder that
already exists is never overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from prato_exp.report.samples import SAMPLES_FILENAME, load_report_samples, write_network_samples

ARCHIVED = ("config.yaml", "metrics.json", "train.log", "splits.json")
"""What is copied of a run folder (each only if present, except ``metrics.json`` and ``config.yaml``)."""
MAX_FILE_BYTES = 2 * 1024 * 1024


def run_folders(roots: list[Path]) -> list[Path]:
    """Every folder under ``roots`` (themselves included) that holds a ``config.yaml``, sorted."""
    found = set()
    for root in roots:
        if not root.is_dir():
            raise SystemExit(f"{root} is not a folder")
        found.update(p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra")
    return sorted(found)


def archive(run: Path, dest: Path) -> Path:
    """Copy :data:`ARCHIVED` of ``run`` into ``dest / run.name``, and its figure samples without the
    dataset's pixels; refuse to overwrite or to copy big files."""
    target = dest / run.name
    if target.exists():
        raise FileExistsError(f"{target} already exists; archive folders are never overwritten")
    files = [run / name for name in ARCHIVED if (run / name).is_file()]
    too_big = [
        f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in files if f.stat().st_size > MAX_FILE_BYTES
    ]
    if too_big:
        raise ValueError(f"{run}: files over 2 MiB cannot go into the repository: {', '.join(too_big)}")
    target.mkdir(parents=True)
    for file in files:
        shutil.copy2(file, target / file.name)
    samples = run / SAMPLES_FILENAME
    if samples.is_file():
        try:
            if "image" in load_report_samples(samples):
                write_network_samples(samples, target / SAMPLES_FILENAME)
            else:  # an archived run archived again: already without the data
                shutil.copy2(samples, target / SAMPLES_FILENAME)
            if (target / SAMPLES_FILENAME).stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"{run}: {SAMPLES_FILENAME} without the data is still over 2 MiB")
        except Exception:
            shutil.rmtree(target)  # no half-written archive folder, which a rerun would refuse to replace
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", type=Path, help="run folders or multirun folders")
    parser.add_argument("--dest", type=Path, required=True, help="archive folder (one subfolder per run)")
    args = parser.parse_args(argv)
    runs = run_folders(args.roots)
    finished = [r for r in runs if (r / "metrics.json").is_file()]
    for run in sorted(set(runs) - set(finished)):
        print(f"left out (no metrics.json: unfinished or failed): {run}", file=sys.stderr)
    for run in finished:
        print(f"archived {run} -> {archive(run, args.dest)}")
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
