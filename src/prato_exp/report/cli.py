"""``prato-report RUN_OR_MULTIRUN_DIR [...] --out DIR``: every table and figure of the paper from run folders.

Finds every ``metrics.json`` below the given folders, groups the runs by ``report.table`` and dataset
(one output table each) and by ``report.row`` (seeds are the replicates), and writes::

    DIR/index.md                    the tables, the figures and what was left out
    DIR/<table>_<dataset>.md, .csv  one table in the paper's layout
    DIR/figures/fig*.png (.pdf)     Figs. 3-9 (and sample panels of the other tables); PDF with --pdf

A hand-written discussion of a table, ``DIR/discussion/<table>_<dataset>.md`` where it exists, is placed
under that table (after a rule, marked as written by hand), so a rerun keeps it. Tables are
byte-identical when rerun on the same folders. A folder with no run, or a run without a ``report``
block, is an error (``--allow-incomplete`` turns it into a printed warning naming it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from prato_exp.report.figures import Figure, write_figures
from prato_exp.report.runs import ReportError, load_runs
from prato_exp.report.tables import DATASET_TITLES, group_runs, summarize, to_csv, to_markdown

DISCUSSION_DIR = "discussion"
"""Folder under ``--out`` holding the hand-written discussion of each table (``<table>_<dataset>.md``)."""

PAPER_FIGURES = {
    "fig3": "table4 (ACDC)",
    "fig4": "table4 (ISIC)",
    "fig5": "table5",
    "fig6": "table5",
    "fig7": "a PrATo row",
    "fig8": "a PrATo row",
    "fig9": "table6",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prato-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or multirun folders (searched below)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables, figures and index")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="leave out runs without a 'report' block (each named in a warning and in index.md) instead of "
        "stopping",
    )
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--pdf", action="store_true", help="write each figure as PDF too (beside the PNG)")
    return parser


def report(
    runs: Sequence[Path],
    out: Path,
    allow_incomplete: bool = False,
    figures: bool = True,
    pdf: bool = False,
) -> dict[str, list]:
    """Write every table (and figure) of the runs below ``runs`` into ``out``; return what was written.

    Raises:
        ReportError: a given folder holds no run, or (unless ``allow_incomplete``) a run has no ``report``.
    """
    records, problems = load_runs(runs, warn=lambda line: print(line, file=sys.stderr))
    if problems and not allow_incomplete:
        raise ReportError(
            f"{len(problems)} run folder(s) cannot be placed in a table (rerun with --allow-incomplete to "
            "leave them out):\n" + "\n".join(f"  {p}" for p in problems)
        )
    if not records:
        raise ReportError("no run with a 'report' block among: " + ", ".join(map(str, runs)))
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(records)
    tables: list[Path] = []
    sections: list[str] = []
    for group in groups:
        summary = summarize(group)
        markdown = to_markdown(summary) + _discussion(out / DISCUSSION_DIR / f"{group.name}.md")
        (out / f"{group.name}.md").write_text(markdown)
        (out / f"{group.name}.csv").write_text(to_csv(summary))
        tables.append(out / f"{group.name}.md")
        sections.append(markdown)
    written: list[Figure] = []
    missing: list[str] = []
    if figures:
        written, missing = write_figures(groups, out / "figures", pdf)
        drawn = {f.stem.name.split("_")[0] for f in written}
        missing += [
            f"{fig}: no runs of {source} here"
            for fig, source in PAPER_FIGURES.items()
            if fig not in drawn and not any(line.startswith(fig) for line in missing)
        ]
    (out / "index.md").write_text(_index(groups, sections, written, missing, problems, out, pdf))
    for line in missing:
        print(f"note: figure not drawn: {line}", file=sys.stderr)
    print(f"wrote {len(tables)} table(s) and {len(written)} figure(s) to {out} (index: {out / 'index.md'})")
    return {"tables": tables, "figures": written, "missing": missing, "problems": problems}


def _discussion(path: Path) -> str:
    """The hand-written discussion at ``path`` as a block to put under its table; "" when there is none."""
    if not path.is_file():
        return ""
    text = path.read_text().strip()
    return (
        f"\n---\n\n### Discussion\n\n*Written by hand (`{DISCUSSION_DIR}/{path.name}`); its figures are "
        f"copied from the table above.*\n\n{text}\n"
    )


def _index(groups, sections, figures, missing, problems, out: Path, pdf: bool) -> str:
    lines = [
        "# PrATo reproduction: tables and figures",
        "",
        "Written by `prato-report`.",
        "",
        "## Tables",
        "",
    ]
    for group in groups:
        seeds = sorted({r.seed for r in group.runs if r.seed is not None})
        lines.append(
            f"- [{group.name}]({group.name}.md) ([csv]({group.name}.csv)): "
            f"{DATASET_TITLES.get(group.dataset, group.dataset)}, {len(group.rows)} rows, "
            f"{len(group.runs)} runs, seeds {seeds}"
        )
    lines += ["", "## Figures", ""]
    for fig in figures:
        rel = fig.stem.relative_to(out)
        also = f" ([pdf]({rel}.pdf))" if pdf else ""
        lines.append(f"- [{rel.name}]({rel}.png){also}: {fig.caption}")
    lines += [f"- not drawn: {m}" for m in missing]
    if problems:
        lines += ["", "## Run folders left out", "", *[f"- {p}" for p in problems]]
    lines += ["", *[s for section in sections for s in ("", section)]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``prato-report``."""
    args = build_parser().parse_args(argv)
    try:
        report(
            args.runs,
            args.out,
            allow_incomplete=args.allow_incomplete,
            figures=not args.no_figures,
            pdf=args.pdf,
        )
    except ReportError as err:
        print(f"prato-report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
