"""The paper's tables from run records: grouping, mean ± std over seeds, paired tests, Markdown and CSV.

Runs are grouped by ``(report.table, dataset)`` into one output table and by ``report.row`` into its rows;
the seeds of a row are its replicates. A row that is one configuration in several tables
(``shared_rows.yaml``) is trained once: a seed the table has but the row lacks is taken from another
member's run, and the caption names it. Every cell is the mean ± sample standard deviation (``ddof=1``)
over seeds of one run-level figure, with ``n`` and the paper's value beside it. Beside the cells, a
two-sided Wilcoxon signed-rank test of the per-case mean DSC of a row against its reference row (cases
paired by case id within a seed, seeds pooled) tells which differences are noise.
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.resources import files
from typing import Any

import numpy as np
import yaml
from scipy.stats import wilcoxon

from prato_exp.report.runs import RunRecord

NOT_RECORDED = "n/a (not recorded)"
DASH = "—"

PAPER_DATASETS = ("acdc", "isic")
"""Datasets whose paper values are printed; phantom runs are never compared with the paper's numbers."""

DATASET_TITLES = {
    "acdc": "ACDC",
    "isic": "ISIC",
    "synthetic_cardiac": "synthetic cardiac phantoms (smoke test, not ACDC)",
    "synthetic_lesion": "synthetic lesion phantoms (smoke test, not ISIC)",
}

SPLIT_TITLES = {
    "val": "validation (the runs' own validation split; no test figures)",
    "test": "test",
}

CHECKPOINT_TITLES = {
    "best": "the checkpoint best on validation mean DSC",
    "best on validation": "the checkpoint best on validation mean DSC",
    "final": "the final-epoch weights",
    "final epoch": "the final-epoch weights",
    "last": "the final-epoch weights",
}

SAMPLES_SEEN = re.compile(r" \([\d,]+ training samples\)")
"""The samples-seen part of a budget text (``15 epochs (19,680 training samples), batch 16, ...``)."""

CHECKPOINT_FILES = {
    "best": "best-<epoch>.ckpt",
    "best on validation": "best-<epoch>.ckpt",
    "final": "last.ckpt",
    "final epoch": "last.ckpt",
    "last": "last.ckpt",
}
"""The checkpoint file a rescoring command names, per the ``report.checkpoint`` of its runs."""

SCALE_TITLES = {"cpu": "CPU presets (small models, short training)", "paper": "paper-size models"}


@dataclass(frozen=True)
class Column:
    """One value column: ``key`` names the figure (see :func:`run_value`), ``digits`` its format."""

    key: str
    header: str
    fmt: str = ".4f"
    in_markdown: bool = True


@cache
def paper_tables() -> dict[str, Any]:
    """``paper_values.yaml``: the paper's tables, rows and values."""
    text = files("prato_exp.report").joinpath("paper_values.yaml").read_text()
    return yaml.safe_load(text)


def paper_table_key(table: str) -> str | None:
    """``table4_pruners`` -> ``table4`` when ``paper_values.yaml`` has it, else None."""
    match = re.match(r"table\d+", table)
    return match.group(0) if match and match.group(0) in paper_tables() else None


def paper_spec(table: str) -> dict[str, Any]:
    key = paper_table_key(table)
    return paper_tables()[key] if key else {"title": table, "rows": {}, "reference_row": None}


def paper_value(table: str, row: str, dataset: str, column: str) -> float | None:
    """The paper's value of one cell, or None where the paper gives none (or the data is not the paper's)."""
    if dataset not in PAPER_DATASETS:
        return None
    entry = paper_spec(table)["rows"].get(row) or {}
    values = {**(entry.get("all") or {}), **(entry.get(dataset) or {})}
    value = values.get(column)
    return None if value is None else float(value)


# ----------------------------------------------------------------------------------------------------------
# values of one run


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _nanmean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in (_finite(x) for x in values) if v is not None]
    return float(np.mean(kept)) if kept else None


def hd95_3d(run: RunRecord) -> float | None:
    """Mean over classes of the per-class mean over cases of the per-volume 3-D HD95, or None if absent.

    Read from ``case/hd95_3d_mean`` when the run wrote it, else from the per-case ``hd95_3d/<class>``.
    """
    if _finite(run.metrics.get("case/hd95_3d_mean")) is not None:
        return _finite(run.metrics["case/hd95_3d_mean"])
    per_class = []
    for name in run.class_names:
        values = [row.get(f"hd95_3d/{name}") for row in run.per_case]
        if any(v is not None for v in values):
            per_class.append(_nanmean(values))
    return _nanmean(per_class) if per_class else None


BUSY_LOAD_MARGIN = 0.5
"""A timing counts as shared when the 1-minute load right after it exceeds the process's cores by this."""


def timed_busy(run: RunRecord) -> bool | None:
    """Whether ``run``'s latency was measured while other work shared its cores (its 1-minute load
    average above its cores + :data:`BUSY_LOAD_MARGIN`); None where the run did not record its load."""
    load = run.efficiency.get("machine_load") or {}
    if load.get("load_average_1min") is None or not load.get("cores"):
        return None
    return float(load["load_average_1min"]) > float(load["cores"]) + BUSY_LOAD_MARGIN


def _latency(run: RunRecord, key: str) -> float | None:
    """A latency figure of ``run``, or None where it was timed on a busy machine (not a speed figure)."""
    if timed_busy(run):
        return None
    if key == "latency_ratio":
        return run.efficiency.get("latency_ratio")
    return (run.efficiency.get("latency") or {}).get("median_ms")


def _pruned(run: RunRecord) -> bool:
    return "unpruned" in run.efficiency or run.metrics.get("sparsity") is not None


VALUE_GETTERS: dict[str, Callable[[RunRecord], Any]] = {
    "dsc_mean": lambda r: r.metrics.get("case/dsc_mean"),
    "iou_mean": lambda r: r.metrics.get("case/iou_mean"),
    "hd95_mean": lambda r: r.metrics.get("case/hd95_mean"),
    "hd95_3d_mean": hd95_3d,
    "gflops": lambda r: r.efficiency.get("gflops_per_image"),
    "sparsity": lambda r: r.metrics.get("sparsity") if _pruned(r) else (0.0 if r.efficiency else None),
    "flop_ratio": lambda r: r.efficiency.get("flop_ratio"),
    "part_flop_ratio": lambda r: r.efficiency.get("pruned_part_flop_ratio"),
    "latency_ratio": lambda r: _latency(r, "latency_ratio"),
    "latency_ms": lambda r: _latency(r, "latency_ms"),
    "fg_token_recall": lambda r: r.metrics.get("fg_token_recall"),
    "size_ratio_mean": lambda r: r.metrics.get("case/size_ratio_mean"),
    "slice_dsc_mean": lambda r: r.metrics.get("slice/dsc_mean"),
    "slice_hd95_mean": lambda r: r.metrics.get("slice/hd95_mean"),
}


def run_value(run: RunRecord, key: str) -> float | None:
    """One run-level figure of ``run`` (``dsc/<class>`` or a key of :data:`VALUE_GETTERS`), or None."""
    if key.startswith("dsc/") or key.startswith("iou/") or key.startswith("hd95/"):
        return _finite(run.metrics.get(f"case/{key}"))
    return _finite(VALUE_GETTERS[key](run))


# ----------------------------------------------------------------------------------------------------------
# grouping


@dataclass
class TableGroup:
    """The runs of one output table: ``rows`` maps a row label to its runs (one per seed)."""

    table: str
    dataset: str
    rows: dict[str, list[RunRecord]]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.table}_{self.dataset}"

    @property
    def runs(self) -> list[RunRecord]:
        return [r for runs in self.rows.values() for r in runs]


def row_order(table: str, labels: Sequence[str]) -> list[str]:
    """The rows of ``paper_values.yaml`` in its order, then the others alphabetically."""
    known = [label for label in paper_spec(table)["rows"] if label in labels]
    return known + sorted(set(labels) - set(known))


@dataclass(frozen=True)
class SharedRow:
    """One table's row in a set of rows that are the same configuration (``shared_rows.yaml``)."""

    table: str
    row: str
    reference_row: str


@cache
def shared_row_sets() -> tuple[tuple[SharedRow, ...], ...]:
    """``shared_rows.yaml``: the sets of rows that are one training run in several tables."""
    text = files("prato_exp.report").joinpath("shared_rows.yaml").read_text()
    return tuple(tuple(SharedRow(**member) for member in members) for members in yaml.safe_load(text))


def borrow_shared_rows(
    buckets: dict[tuple[str, str], dict[str, list[RunRecord]]],
) -> dict[tuple[str, str], list[str]]:
    """Fill, in place, each shared row's missing seeds from another member's runs; return notes per
    ``(table, dataset)``.

    A run is taken only where the table's own runs hold its seed, scale and training budget (in some
    row), its row lacks that seed and scale, and its seed is known; first from the member with the most
    such runs (so a row comes from one table where it can, then in ``shared_rows.yaml``'s order), and
    within a member the last run of a seed in path order (as :func:`group_runs` keeps). Each filled run
    is a copy placed in the table (its ``table``, ``row`` and ``reference_row`` those of the member),
    with ``shared_from`` naming the run's own table and row.
    """
    notes: dict[tuple[str, str], list[str]] = {}
    for members in shared_row_sets():
        for (table, dataset), rows in buckets.items():
            own = {
                (r.seed, r.scale, r.budget) for runs in rows.values() for r in runs if r.shared_from is None
            }
            for target in (m for m in members if m.table == table):
                have = {(r.seed, r.scale) for r in rows.get(target.row, [])}
                fitting = []
                for source in (m for m in members if m != target):
                    latest: dict[tuple[int | None, str | None], RunRecord] = {}
                    for run in (buckets.get((source.table, dataset)) or {}).get(source.row, []):
                        key = (run.seed, run.scale)
                        usable = run.shared_from is None and run.seed is not None and key not in have
                        if usable and (run.seed, run.scale, run.budget) in own:
                            latest[key] = run
                    fitting.append(latest)
                taken: dict[tuple[int | None, str | None], RunRecord] = {}
                for latest in sorted(fitting, key=len, reverse=True):  # the fullest source first, stable
                    for key, run in latest.items():
                        taken.setdefault(key, run)
                if not taken:
                    continue
                rows.setdefault(target.row, []).extend(
                    replace(
                        run,
                        table=table,
                        row=target.row,
                        reference_row=target.reference_row,
                        shared_from=f"{run.table} '{run.row}'",
                    )
                    for run in taken.values()
                )
                sources = sorted({f"{r.table} '{r.row}'" for r in taken.values()})
                seeds = sorted({r.seed for r in taken.values() if r.seed is not None})
                notes.setdefault((table, dataset), []).append(
                    f"row '{target.row}' seed(s) {', '.join(map(str, seeds))}: the run(s) of "
                    f"{' and '.join(sources)}, the same configuration (`shared_rows.yaml`, checked by "
                    "tests/test_table_presets.py), not trained again"
                )
    return notes


def group_runs(records: Sequence[RunRecord]) -> list[TableGroup]:
    """One :class:`TableGroup` per ``(table, dataset)``, sorted; a seed run twice in a row keeps the last
    folder (in path order) and says so in the group's notes; shared rows are filled by
    :func:`borrow_shared_rows`."""
    buckets: dict[tuple[str, str], dict[str, list[RunRecord]]] = {}
    for run in sorted(records, key=lambda r: str(r.path)):
        buckets.setdefault((run.table, run.dataset), {}).setdefault(run.row, []).append(run)
    shared_notes = borrow_shared_rows(buckets)
    groups = []
    for (table, dataset), rows in sorted(buckets.items()):
        notes: list[str] = list(shared_notes.get((table, dataset), []))
        ordered: dict[str, list[RunRecord]] = {}
        for label in row_order(table, list(rows)):
            by_seed: dict[int | None, RunRecord] = {}
            for run in rows[label]:
                if run.seed in by_seed:
                    notes.append(
                        f"row '{label}' seed {run.seed}: two runs; used {run.path}, left out "
                        f"{by_seed[run.seed].path}"
                    )
                by_seed[run.seed] = run
            ordered[label] = sorted(by_seed.values(), key=lambda r: (r.seed is None, r.seed or 0))
        groups.append(TableGroup(table, dataset, ordered, notes))
    return groups


# ----------------------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Cell:
    """Mean, sample std (``ddof=1``; NaN for one value) and count of one figure over the seeds of a row."""

    mean: float | None
    std: float | None
    n: int
    paper: float | None


def cell_stats(values: Sequence[float | None], paper: float | None = None) -> Cell:
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return Cell(None, None, 0, paper)
    std = float(np.std(kept, ddof=1)) if kept.size > 1 else None
    return Cell(float(np.mean(kept)), std, int(kept.size), paper)


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank test of a row against its reference row."""

    reference: str | None
    p_value: float | None
    n_pairs: int
    note: str = ""


def case_values(run: RunRecord, key: str = "dsc_mean") -> dict[str, float]:
    """``case_id -> value`` of one per-case figure (NaN/None left out)."""
    out = {}
    for row in run.per_case:
        value = _finite(row.get(key))
        if value is not None and "case_id" in row:
            out[str(row["case_id"])] = value
    return out


def paired_values(
    runs: Sequence[RunRecord], reference_runs: Sequence[RunRecord], key: str = "dsc_mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-case values of ``runs`` and ``reference_runs`` paired by (seed, case id), seeds pooled, in
    seed then case-id order."""
    ref_by_seed = {r.seed: r for r in reference_runs}
    xs, ys = [], []
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed or 0)):
        ref = ref_by_seed.get(run.seed)
        if ref is None:
            continue
        mine, theirs = case_values(run, key), case_values(ref, key)
        for case_id in sorted(set(mine) & set(theirs)):
            xs.append(mine[case_id])
            ys.append(theirs[case_id])
    return np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value (scipy defaults); None for fewer than 2 pairs, 1 when every
    difference is zero."""
    if x.size < 2:
        return None
    if np.all(x - y == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(x, y).pvalue)


def reference_of(group: TableGroup, label: str) -> tuple[str | None, str]:
    """The reference row of ``label`` (from its runs, else ``paper_values.yaml``) and a note on conflicts."""
    named = Counter(r.reference_row for r in group.rows[label] if r.reference_row)
    if not named:
        return paper_spec(group.table).get("reference_row"), ""
    choice = sorted(named.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    note = f"runs of row '{label}' name different reference rows {sorted(named)}; used '{choice}'"
    return choice, note if len(named) > 1 else ""


def paired_test(group: TableGroup, label: str) -> PairedTest:
    reference, note = reference_of(group, label)
    if reference is None or reference == label:
        return PairedTest(reference, None, 0, note)
    if reference not in group.rows:
        return PairedTest(reference, None, 0, f"reference row '{reference}' has no runs here")
    x, y = paired_values(group.rows[label], group.rows[reference])
    return PairedTest(reference, wilcoxon_p(x, y), int(x.size), note)


# ----------------------------------------------------------------------------------------------------------
# the table


def _has_size_ratio(runs: Sequence[RunRecord]) -> bool:
    """Whether any run recorded the predicted-over-true size (runs scored before it existed did not)."""
    return any(r.metrics.get("case/size_ratio_mean") is not None for r in runs)


def layout(group: TableGroup) -> list[Column]:
    """The value columns of a table: the paper's metric columns for the dataset, then efficiency."""
    classes: list[str] = []
    for run in group.runs:
        classes += [c for c in run.class_names if c not in classes]
    cols: list[Column] = []
    if len(classes) > 1:
        cols += [Column(f"dsc/{c}", f"{c} DSC") for c in classes]
        cols += [
            Column("dsc_mean", "mean DSC"),
            Column("iou_mean", "mean IoU"),
            Column("hd95_mean", "mean HD95 (2-D)", ".2f"),
        ]
    else:
        cols += [Column("dsc_mean", "DSC"), Column("iou_mean", "IoU"), Column("hd95_mean", "HD95", ".2f")]
    if any(int(row.get("num_slices", 1)) > 1 for run in group.runs for row in run.per_case):
        cols.append(Column("hd95_3d_mean", "HD95 3-D", ".2f"))
    if _has_size_ratio(group.runs):
        cols.append(Column("size_ratio_mean", "size ratio", ".3f"))
    cols += [
        Column("gflops", "GFLOPs", ".3f"),
        Column("sparsity", "sparsity", ".3f"),
        Column("flop_ratio", "FLOP ratio", ".3f"),
        Column("part_flop_ratio", "part FLOP ratio", ".3f"),
        Column("latency_ratio", "time ratio", ".3f"),
        Column("latency_ms", "time (ms)", ".2f"),
        Column("fg_token_recall", "fg token recall", ".3f"),
        Column("slice_dsc_mean", "slice mean DSC", ".4f", in_markdown=False),
        Column("slice_hd95_mean", "slice mean HD95", ".2f", in_markdown=False),
    ]
    return cols


@dataclass
class RowSummary:
    label: str
    runs: list[RunRecord]
    cells: dict[str, Cell]
    test: PairedTest


@dataclass
class TableSummary:
    group: TableGroup
    columns: list[Column]
    rows: list[RowSummary]

    @property
    def title(self) -> str:
        return str(paper_spec(self.group.table).get("title", self.group.table))


def summarize(group: TableGroup) -> TableSummary:
    columns = layout(group)
    rows = []
    for label, runs in group.rows.items():
        cells = {
            c.key: cell_stats(
                [run_value(r, c.key) for r in runs], paper_value(group.table, label, group.dataset, c.key)
            )
            for c in columns
        }
        rows.append(RowSummary(label, runs, cells, paired_test(group, label)))
    return TableSummary(group, columns, rows)


def _fmt(value: float | None, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def format_cell(cell: Cell, column: Column, n_seeds: int) -> str:
    """``mean ± std (paper X)``, ``[n=k]`` when fewer seeds than the row's gave a value."""
    if cell.n == 0:
        text = NOT_RECORDED if column.key == "hd95_3d_mean" else DASH
    else:
        text = _fmt(cell.mean, column.fmt)
        if cell.std is not None:
            text += f" ± {_fmt(cell.std, column.fmt)}"
        if cell.n != n_seeds:
            text += f" [n={cell.n}]"
    if cell.paper is not None:
        text += f" (paper {cell.paper:g})"
    return text


def format_test(test: PairedTest, label: str, single_reference: bool) -> str:
    if test.reference is None or test.reference == label:
        return DASH
    if test.p_value is None:
        return f"{DASH} [{test.n_pairs} pairs]"
    text = f"{test.p_value:.3g} [{test.n_pairs}]"
    return text if single_reference else f"{text} vs {test.reference}"


def _values(runs: Sequence[RunRecord], attr: str) -> list[str]:
    """The distinct values of ``attr`` over ``runs``, sorted (seeds numerically), None left out."""
    values = {getattr(r, attr) for r in runs if getattr(r, attr) not in (None, "")}
    if attr == "seed":
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def caption(summary: TableSummary) -> list[str]:
    """The lines under a table's title: data, split, weights, prompts, seeds, conventions, commits."""
    group = summary.group
    runs = group.runs
    seeds = _values(runs, "seed")
    n_per_row = sorted({len(r.runs) for r in summary.rows})
    splits = [SPLIT_TITLES.get(s, s) for s in _values(runs, "split")]
    checkpoints = [CHECKPOINT_TITLES.get(c, c) for c in _values(runs, "checkpoint")] or ["not recorded"]
    scales = [SCALE_TITLES.get(s, s) for s in _values(runs, "scale")] or ["not recorded"]
    prompts = _values([r for r in runs if r.prompted], "prompt")
    references = sorted({r.test.reference for r in summary.rows if r.test.reference})
    lines = [
        f"Dataset: {DATASET_TITLES.get(group.dataset, group.dataset)}. Split: {'; '.join(splits)}. "
        f"Weights scored: {'; '.join(checkpoints)}. Scale: {'; '.join(scales)}.",
        f"Seeds: {', '.join(seeds) or 'not recorded'}; n = {', '.join(map(str, n_per_row))} runs per row "
        "(cells show `[n=k]` where fewer runs gave a value).",
    ]
    if prompts:
        lines.append(
            f"Box prompts are oracle boxes from the ground truth. Prompt condition: {', '.join(prompts)}."
        )
    else:
        lines.append("No row reads a box prompt.")
    if group.dataset not in PAPER_DATASETS:
        lines.append("Synthetic phantoms: the paper's values are not shown (they are for ACDC / ISIC).")
    else:
        lines.append("`(paper X)`: the paper's value for that cell (— where the paper gives none).")
    lines += [
        "Cells: mean ± sample std (ddof = 1) over seeds of each run's figure, itself a mean over cases "
        "(an ACDC case is a volume: DSC and IoU on the stacked volume, HD95 2-D the mean of its slice HD95, "
        "HD95 3-D the volume's 3-D HD95 where recorded); HD95 in mm where the data has a pixel spacing, "
        "else in pixels.",
        "p: two-sided Wilcoxon signed-rank test (scipy defaults: zero differences dropped) of per-case "
        "mean DSC against the reference row"
        + (f" '{references[0]}'" if len(references) == 1 else "s named in the cell")
        + ", cases paired by case id within a seed, seeds pooled; [k] = number of pairs; p = 1 when every "
        "difference is zero; — for the reference row itself or fewer than 2 pairs.",
        "GFLOPs: FlopCounterMode on the executed graph, eval mode, batch 1, a multiply-add = 2 FLOPs (GMACs "
        "= GFLOPs / 2; the paper probably reports MACs). FLOP / time ratio: pruned over the same weights "
        "with pruning off (— where the row prunes nothing); part FLOP ratio: the blocks after the first "
        "pruning point only. Sparsity: fraction of grid tokens pruned, averaged over the blocks after the "
        "first pruning point. Time: median batch-1 latency on the run's own device. fg token recall: the "
        "fraction of tokens whose patch holds foreground that are still kept after the last pruning point, "
        "averaged over the slices with foreground (tokens kept at random give the kept fraction: 0.75 at "
        "q = 25 with one pruning point).",
    ]
    if _has_size_ratio(runs):
        lines.append(
            "size ratio: predicted over true foreground size per case and class (a volume's voxels, an "
            "image's pixels), its median over the cases whose truth has the class, then the mean over "
            "classes: above 1 the model over-segments, below 1 it under-segments (runs scored before this "
            "metric existed did not record it; a cell's [n=k] counts the runs that did)."
        )
    points = _values(runs, "prune_points")
    if points:
        lines.append(f"Pruning points: {'; '.join(p for p in points if p)}.")
    windowed = sorted(
        {(r.row, r.decoder_window, r.window_per_image) for r in runs if r.decoder_window is not None}
    )
    if windowed:
        which = ", ".join(
            f"{row} (margin {margin}{', each image its own window' if own else ''})"
            for row, margin, own in windowed
        )
        lines.append(
            f"Decoder window: {which} ran the decoder only on the box dilated by that margin (in tokens of "
            "the pruned grid; in Swin UNETR, cells of its 1/32 bottleneck) and output background "
            "elsewhere, so these rows lean on the box prompt beyond token pruning."
        )
    no_fg = sorted(
        {int(v) for r in runs if (v := _finite(r.metrics.get("counts/slice/no_foreground"))) is not None}
    )
    slices = sorted({int(v) for r in runs if (v := _finite(r.metrics.get("counts/slices"))) is not None})
    if no_fg:
        lines.append(
            f"Slices without foreground (their box falls back to the whole image, which itself tells the "
            f"model the slice is empty): {', '.join(map(str, no_fg))} of {', '.join(map(str, slices))} "
            "per run."
        )
    timed = [r for r in runs if r.efficiency.get("latency")]
    busy = sum(timed_busy(r) is True for r in timed)
    unknown = sum(timed_busy(r) is None for r in timed)
    if busy:
        lines.append(
            f"Time cells leave out {busy} of {len(timed)} runs timed while other work shared the machine "
            f"(1-minute load above its cores + {BUSY_LOAD_MARGIN}): those are not speed figures."
        )
    if unknown:
        lines.append(
            f"{unknown} of {len(timed)} runs did not record the machine's load when timed: their time "
            "cells may include time the machine spent on other work."
        )
    lines += _command_lines(runs)
    lines += budget_lines(runs)
    machines = _values(runs, "machine")
    if machines:
        lines.append(f"Machine: {'; '.join(machines)}.")
    lines.append(f"Commit(s): {', '.join(_values(runs, 'commit')) or 'not recorded'}.")
    notes = list(group.notes) + [r.test.note for r in summary.rows if r.test.note]
    notes += _condition_notes(group)
    lines += [f"Note: {n}." for n in notes]
    return lines


def budget_lines(runs: Sequence[RunRecord]) -> list[str]:
    """The training budgets, each naming its rows where they differ; a budget that lacks only the samples
    count joins the one that has it."""
    budgets = _values(runs, "budget")
    with_count = {SAMPLES_SEEN.sub("", b) for b in budgets if SAMPLES_SEEN.search(b)}
    uncounted = [r for r in runs if r.budget in with_count]
    shown = [b for b in budgets if b not in with_count]
    if not shown:
        return []
    if len(shown) > 1:
        counted = {SAMPLES_SEEN.sub("", b): b for b in shown if SAMPLES_SEEN.search(b)}
        rows_of = {b: [] for b in shown}
        for run in runs:
            rows = rows_of[counted.get(run.budget, run.budget)]
            if run.row not in rows:
                rows.append(run.row)
        shown = [f"{b} ({', '.join(rows_of[b])})" for b in shown]
    lines = [f"Training budget: {'; '.join(shown)}."]
    if uncounted:
        seeds = _values(uncounted, "seed")
        lines.append(
            f"{len(uncounted)} of {len(runs)} runs (seed{'s' * (len(seeds) > 1)} {', '.join(seeds)}) scored "
            "weights whose checkpoint predates the training-samples count; their budget is otherwise the "
            "same."
        )
    return lines


def _command_lines(runs: Sequence[RunRecord]) -> list[str]:
    """The commands that made the runs: a training preset's sweep on the table's dataset (named, since a
    preset's default dataset is ACDC), or an eval preset over checkpoints."""
    lines = []
    trained = [r for r in runs if r.kind == "train"]
    if _values(trained, "experiment"):
        commands = "; ".join(
            f"`python train.py -m experiment={e} dataset={d}`"
            for e in _values(trained, "experiment")
            for d in _values([r for r in trained if r.experiment == e], "dataset")
        )
        seeds = ", ".join(_values(trained, "seed"))
        lines.append(f"Command: {commands} (the preset's sweep; the runs here: seeds {seeds}).")
    rescored = [r for r in runs if r.kind == "eval"]
    if _values(rescored, "experiment"):
        names = sorted({CHECKPOINT_FILES.get(str(r.checkpoint), "<checkpoint>.ckpt") for r in rescored})
        commands = "; ".join(
            f"`python eval.py -m rescore={e} ckpt=<run>/checkpoints/{'|'.join(names)}`"
            for e in _values(rescored, "experiment")
        )
        seeds = ", ".join(_values(rescored, "seed"))
        lines.append(
            f"Command: {commands}, with `<run>` each training run whose weights are scored (comma-separated "
            f"for one sweep; the runs here: seeds {seeds})."
        )
    return lines


def _condition_notes(group: TableGroup) -> list[str]:
    notes = []
    for label, runs in group.rows.items():
        for attr in ("split", "checkpoint", "scale", "prompt", "model"):
            values = _values(runs, attr)
            if len(values) > 1:
                notes.append(f"row '{label}' mixes {attr} values {values} across its runs")
    return notes


def to_markdown(summary: TableSummary) -> str:
    group = summary.group
    cols = [c for c in summary.columns if c.in_markdown]
    single_reference = len({r.test.reference for r in summary.rows if r.test.reference}) <= 1
    header = ["row", "n", *[c.header for c in cols], "p (Wilcoxon vs ref)"]
    lines = [
        f"## {summary.title}: {DATASET_TITLES.get(group.dataset, group.dataset)} (`{group.table}`)",
        "",
        *caption(summary),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in summary.rows:
        n = len(row.runs)
        cells = [format_cell(row.cells[c.key], c, n) for c in cols]
        test = format_test(row.test, row.label, single_reference)
        lines.append("| " + " | ".join([row.label, str(n), *cells, test]) + " |")
    return "\n".join(lines) + "\n"


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def to_csv(summary: TableSummary) -> str:
    """One line per row: conditions, then ``<key>_mean``, ``_std``, ``_n``, ``_paper`` per column, the
    paired test, the seeds and the run folders."""
    group = summary.group
    header = ["table", "dataset", "row", "n_seeds", "seeds", "split", "checkpoint", "scale", "prompt"]
    for c in summary.columns:
        header += [f"{c.key}_mean", f"{c.key}_std", f"{c.key}_n", f"{c.key}_paper"]
    header += ["reference_row", "p_value", "n_pairs", "runs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in summary.rows:
        line = [group.table, group.dataset, row.label, len(row.runs), " ".join(_values(row.runs, "seed"))]
        line += [" ".join(_values(row.runs, a)) for a in ("split", "checkpoint", "scale", "prompt")]
        for c in summary.columns:
            cell = row.cells[c.key]
            line += [_csv_number(cell.mean), _csv_number(cell.std), cell.n, _csv_number(cell.paper)]
        line += [row.test.reference or "", _csv_number(row.test.p_value), row.test.n_pairs]
        line.append(" ".join(str(r.path) for r in row.runs))
        writer.writerow(line)
    return buffer.getvalue()
