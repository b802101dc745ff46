"""Record the reference outputs of every backbone x pruner preset pair (and a few variants).

Why this exists: the pruner-interface refactor must keep every network's outputs identical.
This script ran before it and wrote ``tests/data/reference_outputs.pt``; ``tests/test_reference_outputs.py``
compares today's outputs against that file. How cases are built and run lives in ``reference_cases.py``,
shared with the test.

Regenerate (from the repository root, about 3 minutes on one core)::

    python tests/reference/record_reference_outputs.py

WARNING: regenerating is legitimate only when a change of behaviour is intended (and reviewed as such).
Regenerating to make a failing reference test pass hides exactly the change it exists to catch.

After recording, the script re-runs every case in a child process under each of
``reference_cases.PERTURBATIONS`` (other SIMD and BLAS code paths) and stores per case how portable its
outputs are to other CPU types (``CaseRecord.portable``).

``--platform-copy`` records the same cases on another CPU type into
``tests/data/reference_outputs_<platform>.pt`` (run it from the commit the main file was recorded at, or
from one that the reference test shows to be equivalent) and prints, per case, the tightest tolerance
at which the copy meets the main file.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from reference_cases import (
    FORMAT_VERSION,
    MODES,
    PERTURBATIONS,
    REFERENCE_PATH,
    Case,
    CaseRecord,
    ModeOutputs,
    assert_outputs_match,
    load_reference,
    platform_fingerprint,
    preset_cases,
    record_case,
    settings,
    variant_cases,
)

PORTABILITY = ("float64", "float32", None)
"""From most to least portable: the tolerances that held under every perturbation, or none."""


def record_all(verbose: bool = True) -> list[CaseRecord]:
    """Every preset pair, then the variants of the pairs that built; one line per case on stdout."""

    def record(case: Case) -> CaseRecord:
        started = time.perf_counter()
        result = record_case(case)
        if verbose:
            detail = result.dtype if result.status == "ok" else f"{result.error_type}: {result.error_message}"
            print(
                f"{time.perf_counter() - started:5.2f}s  {case.id:45s} {result.status:8s} {detail}",
                flush=True,
            )
        return result

    records = [record(case) for case in preset_cases()]
    built = {(r.model, r.pruning) for r in records if r.status == "ok"}
    return records + [record(case) for case in variant_cases(built)]


def perturbed_records(name: str, env: dict[str, str], folder: Path) -> dict[Case, CaseRecord]:
    """Every case recorded by a child process of this script under the environment ``env``."""
    out = folder / f"{name}.pt"
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--child"]
    subprocess.run(command, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    return {r.case: r for r in map(CaseRecord.from_dict, load_reference(out)["cases"])}


def tolerance_met(expected: ModeOutputs, actual: ModeOutputs | None) -> tuple[int, str]:
    """Index in :data:`PORTABILITY` of the tightest tolerance under which ``actual`` matches ``expected``,
    and how it failed the tighter one (empty when float64 held)."""
    error = "no outputs"
    for index, tier in enumerate(PORTABILITY[:-1]):
        if actual is None:
            break
        try:
            assert_outputs_match(expected, actual, tier)
        except AssertionError as failure:
            lines = str(failure).strip().splitlines()
            error = " ".join([lines[0], *(line.strip() for line in lines if "Greatest absolute" in line)])
            continue
        return index, error if index else ""
    return len(PORTABILITY) - 1, error


def portability(
    reference: CaseRecord, perturbed: dict[str, dict[Case, CaseRecord]]
) -> tuple[str | None, str]:
    """The most portable level of :data:`PORTABILITY` that every perturbed run of ``reference`` meets,
    and what broke the levels above it."""
    worst, note = PORTABILITY.index(reference.dtype), ""
    for name, records in perturbed.items():
        for mode in MODES:
            met, error = tolerance_met(reference.outputs[mode], records[reference.case].outputs.get(mode))
            if met > worst:
                worst, note = met, f"{name}, {mode}: {error}"
    return PORTABILITY[worst], note


def platform_slug() -> str:
    """A file-name tag of this platform: SIMD level and CPU model, e.g. ``avx2_amd_epyc``."""
    fingerprint = platform_fingerprint()
    words = "".join(c if c.isalnum() else " " for c in fingerprint["cpu_model"].lower()).split()
    return "_".join([str(fingerprint["cpu_capability"]).lower(), *words[:3]])


def compare_with_main(records: list[CaseRecord]) -> None:
    """Print, for every recorded case, the tightest tolerance at which it meets the main reference file."""
    main_records = {r.case: r for r in map(CaseRecord.from_dict, load_reference(REFERENCE_PATH)["cases"])}
    for record in records:
        reference = main_records.get(record.case)
        if record.status != "ok" or reference is None or reference.status != "ok":
            continue
        worst, note = 0, ""
        for mode in MODES:
            met, error = tolerance_met(reference.outputs[mode], record.outputs.get(mode))
            if met > worst:
                worst, note = met, f"{mode}: {error}"
        print(f"against the main file: {PORTABILITY[worst]}  {record.case.id}  {note}", flush=True)


def main() -> None:
    """Record every case, measure its portability, save everything to ``--out``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REFERENCE_PATH, help="where to write (%(default)s)")
    parser.add_argument("--child", action="store_true", help="record only (a perturbed run of this script)")
    parser.add_argument(
        "--platform-copy",
        action="store_true",
        help="record only, into tests/data/reference_outputs_<platform>.pt, and compare with the main file",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    records = record_all(verbose=not args.child)
    if args.platform_copy:
        args.out = REFERENCE_PATH.parent / f"{REFERENCE_PATH.stem}_{platform_slug()}.pt"
        compare_with_main(records)
    elif not args.child:
        with tempfile.TemporaryDirectory() as folder:
            perturbed = {}
            for name, env in PERTURBATIONS.items():
                print(f"re-running every case under {name} ({env}) ...", flush=True)
                perturbed[name] = perturbed_records(name, env, Path(folder))
        for record in records:
            if record.status == "ok":
                record.portable, record.portability_note = portability(record, perturbed)
                if record.portable != "float64":
                    print(f"portable: {record.portable}  {record.case.id}: {record.portability_note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "platform": platform_fingerprint(),
        "settings": settings(),
        "cases": [r.to_dict() for r in records],
    }
    torch.save(payload, args.out)
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "refused", "failed")}
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): {counts}")


if __name__ == "__main__":
    main()
