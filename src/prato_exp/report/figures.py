"""The paper's figures from run folders: qualitative panels from each run's ``report_samples.npz``
(:mod:`prato_exp.report.samples`) and efficiency bars from ``metrics.json``.

- Figs. 3 / 4 / 6 / 9 (:func:`qualitative_figure`): the same slices, one column per row of a table (the
  lowest seed that stored samples), each prediction filled over the image with the ground truth drawn as
  contours and, where the row reads it, the box prompt. Fig. 3 is Table IV on ACDC, Fig. 4 Table IV on
  ISIC, Fig. 6 Table V, Fig. 9 Table VI (each column then has its own box); other tables get the same
  panel under a ``samples_`` name.
- Fig. 5 (:func:`efficiency_figure`): GFLOPs and token sparsity per backbone, unpruned beside pruned.
- Fig. 7 (:func:`retention_figure`): PrATo's token-retention maps, kept patches highlighted, box drawn.
- Fig. 8 (:func:`score_figure`): the distribution of PrATo's relevance scores and of its inverse-entropy
  weights, each against the flat "true uniform" density.

Every figure is written as PNG (256 colours, small enough to commit) and, on request, PDF (no creation
date, so reruns differ only where the drawing does).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from prato_exp.report.runs import RunRecord
from prato_exp.report.samples import (
    SampleDataError,
    dataset_slice_reader,
    load_report_samples,
    restore_dataset_slices,
)
from prato_exp.report.tables import DATASET_TITLES, TableGroup, paper_table_key, run_value
from prato_exp.visualize import LABEL_COLOURS, draw_retention_map

QUALITATIVE_FIGURES = {"table4": "fig3", "table5": "fig6", "table6": "fig9"}
"""Paper figure of each table's qualitative panel (Table IV on a single-class dataset is Fig. 4)."""


@dataclass(frozen=True)
class Figure:
    """A written figure: its file stem (PNG and PDF beside each other) and what it shows."""

    stem: Path
    caption: str


@cache
def _samples_or_error(path: Path) -> dict[str, np.ndarray] | SampleDataError:
    """A run's samples with the dataset's slices (read back from its dataset when archived without), or
    why they cannot be read back; either is read once per report, however many tables share the run."""
    arrays = load_report_samples(path)
    if "image" in arrays:
        return arrays
    try:
        reader = dataset_slice_reader(path.parent / "config.yaml")
        return restore_dataset_slices(arrays, reader, str(path))
    except SampleDataError as err:
        return err


def _samples(path: Path) -> dict[str, np.ndarray]:
    result = _samples_or_error(path)
    if isinstance(result, SampleDataError):
        raise result
    return result


def samples_of(run: RunRecord) -> dict[str, np.ndarray] | None:
    return None if run.samples is None else _samples(run.samples)


def _save(fig: plt.Figure, stem: Path, pdf: bool) -> None:
    """Write ``stem.png`` (120 dpi, 256 colours: a few hundred kB for a page of MR slices, small enough to
    commit) and, with ``pdf``, ``stem.pdf`` (no creation date, so a rerun writes the same bytes)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        ).save(stem.with_suffix(".png"), optimize=True)
    if pdf:
        fig.savefig(
            stem.with_suffix(".pdf"), metadata={"CreationDate": None, "Producer": None, "Creator": None}
        )
    plt.close(fig)


def _show_image(ax: plt.Axes, image: np.ndarray) -> None:
    """``image`` ``(C, H, W)``: RGB clipped to [0, 1], or grey scaled to its 1st-99th percentile."""
    image = image.astype(np.float32)
    if image.shape[0] == 3:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    else:
        lo, hi = np.percentile(image[0], [1, 99])
        ax.imshow(image[0], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_box(ax: plt.Axes, box: np.ndarray, colour: str = "yellow") -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    # pixel i covers [i, i+1); imshow centres pixel i at i, so its edges sit at i - 0.5
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2, ls="--"))


def _fill(ax: plt.Axes, label: np.ndarray) -> None:
    ax.imshow(
        np.ma.masked_equal(label, 0),
        cmap=LABEL_COLOURS,
        vmin=0,
        vmax=LABEL_COLOURS.N - 1,
        alpha=0.45,
        interpolation="nearest",
    )


def _contours(ax: plt.Axes, label: np.ndarray) -> None:
    for cls in np.unique(label):
        if cls == 0:
            continue
        ax.contour(
            (label == cls).astype(float),
            levels=[0.5],
            colors=[LABEL_COLOURS(int(cls))],
            linewidths=1.0,
            path_effects=[patheffects.withStroke(linewidth=2.2, foreground="white")],
        )


def _legends(fig: plt.Figure, arrays: dict[str, np.ndarray], extra: Sequence) -> None:
    """Two legend lines at the bottom: the classes, then what the lines and fills mean."""
    names = [str(n) for n in arrays.get("class_names", [])] or [
        f"class {c}" for c in range(1, int(arrays["label"].max()) + 1)
    ]
    classes = [Patch(color=LABEL_COLOURS(i + 1), alpha=0.6, label=n) for i, n in enumerate(names)]
    lift = 0.22 / fig.get_figheight()
    for handles, y in ((classes, lift), (list(extra), 0.0)):
        fig.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, y),
            ncol=len(handles),
            fontsize=7,
            frameon=False,
        )


def _representative(runs: Sequence[RunRecord]) -> RunRecord | None:
    """The lowest-seed run of a row that stored samples."""
    with_samples = [r for r in runs if r.samples is not None]
    return min(with_samples, key=lambda r: (r.seed is None, r.seed or 0)) if with_samples else None


def _keys(arrays: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    return [(str(c), int(z)) for c, z in zip(arrays["case_ids"], arrays["slice_indices"], strict=True)]


def figure_name(group: TableGroup) -> str:
    key = paper_table_key(group.table) or ""
    fig = QUALITATIVE_FIGURES.get(key)
    if fig is None:
        return f"samples_{group.name}"
    if key == "table4":
        runs = group.runs
        single = runs and all(len(r.class_names) <= 1 for r in runs)
        fig = "fig4" if single else "fig3"
    return f"{fig}_{group.name}"


def qualitative_figure(group: TableGroup, folder: Path, title: str, pdf: bool = False) -> Figure | None:
    """Figs. 3 / 4 / 6 / 9: each row of ``group`` side by side on the same slices; None without samples."""
    columns = [(label, run) for label, runs in group.rows.items() if (run := _representative(runs))]
    if not columns:
        return None
    for _, run in columns:  # every column's slices are read before a figure is opened
        samples_of(run)
    base = samples_of(columns[0][1])
    keys = _keys(base)
    n_rows, n_cols = len(keys), 1 + len(columns)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(max(1.9 * n_cols, 5.0), 1.9 * n_rows + 0.7), squeeze=False
    )
    for i, key in enumerate(keys):
        ax = axes[i, 0]
        _show_image(ax, base["image"][i])
        _fill(ax, base["label"][i])
        ax.set_ylabel(f"{key[0]}\nz={key[1]}", fontsize=6)
        if i == 0:
            ax.set_title("image + ground truth", fontsize=7)
        for j, (label, run) in enumerate(columns, start=1):
            ax = axes[i, j]
            arrays = samples_of(run)
            where = _keys(arrays)
            if key not in where:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "slice not\nrecorded", ha="center", va="center", fontsize=7)
                continue
            k = where.index(key)
            _show_image(ax, arrays["image"][k])
            _fill(ax, arrays["pred"][k])
            _contours(ax, arrays["label"][k])
            if run.prompted:
                _draw_box(ax, arrays["box_xyxy"][k])
            if i == 0:
                ax.set_title(f"{label}\n(seed {run.seed})", fontsize=7)
    extra = [
        Line2D([], [], color="grey", lw=1.0, label="line: ground truth; fill: prediction"),
        Line2D([], [], color="yellow", lw=1.2, ls="--", label="oracle box prompt"),
    ]
    _legends(fig, base, extra)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 0.97))
    stem = folder / figure_name(group)
    _save(fig, stem, pdf)
    rows = ", ".join(label for label, _ in columns)
    return Figure(stem, f"{title}: {len(keys)} slices; columns: image + ground truth, {rows}")


def _backbone_pairs(group: TableGroup) -> list[tuple[str, str | None, str]]:
    """``(backbone, unpruned row or None, pruned row)`` for every ``<backbone> + PrATo`` row."""
    suffix = " + PrATo"
    return [
        (label[: -len(suffix)], label[: -len(suffix)] if label[: -len(suffix)] in group.rows else None, label)
        for label in group.rows
        if label.endswith(suffix)
    ]


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return np.nan, 0.0
    return float(kept.mean()), float(kept.std(ddof=1)) if kept.size > 1 else 0.0


def efficiency_figure(group: TableGroup, folder: Path, title: str, pdf: bool = False) -> Figure | None:
    """Fig. 5: (a) GFLOPs and (b) token sparsity per backbone, unpruned beside PrATo-pruned.

    The unpruned bar is the separately trained ``<backbone>`` row where the table has one, else the
    pruned runs' own weights measured with pruning off (hatched). Error bars: sample std over seeds.
    """
    pairs = _backbone_pairs(group)
    if not pairs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(pairs) + 3), 3.2))
    x = np.arange(len(pairs))
    width = 0.38
    for ax, key, ylabel in ((axes[0], "gflops", "GFLOPs per image"), (axes[1], "sparsity", "token sparsity")):
        base_m, base_s, pruned_m, pruned_s, hatched = [], [], [], [], []
        for _, base_row, pruned_row in pairs:
            pruned_runs = group.rows[pruned_row]
            m, s = _mean_std([run_value(r, key) for r in pruned_runs])
            pruned_m.append(m)
            pruned_s.append(s)
            if base_row is not None:
                m, s = _mean_std([run_value(r, key) for r in group.rows[base_row]])
                hatched.append(False)
            elif key == "gflops":
                values = [(r.efficiency.get("unpruned") or {}).get("gflops_per_image") for r in pruned_runs]
                m, s = _mean_std(values)
                hatched.append(True)
            else:
                m, s = 0.0, 0.0
                hatched.append(True)
            base_m.append(m)
            base_s.append(s)
        bars = ax.bar(
            x - width / 2, base_m, width, yerr=base_s, label="unpruned", color="tab:gray", capsize=2
        )
        for bar, hatch in zip(bars, hatched, strict=True):
            if hatch:
                bar.set_hatch("//")
        ax.bar(x + width / 2, pruned_m, width, yerr=pruned_s, label="+ PrATo", color="tab:orange", capsize=2)
        ax.set_xticks(x, [p[0] for p in pairs], fontsize=7, rotation=15)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_title("(a) GFLOPs (multiply-add = 2 FLOPs)", fontsize=8)
    axes[1].set_title("(b) token sparsity", fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    stem = folder / f"fig5_{group.name}"
    _save(fig, stem, pdf)
    return Figure(
        stem,
        f"{title}: GFLOPs and token sparsity of {', '.join(p[0] for p in pairs)}, unpruned vs + PrATo "
        "(hatched: the pruned weights with pruning off, where the table has no separate unpruned row)",
    )


PRATO_ROW_PREFERENCE = ("PrATo (ours)", "k=5", "q=25", "tight")


def prato_runs(groups: Sequence[TableGroup], unreadable: list[str] | None = None) -> dict[str, RunRecord]:
    """Per dataset, the PrATo run whose samples Figs. 7 and 8 show: the lowest seed of the first row
    named in :data:`PRATO_ROW_PREFERENCE` (Table IV first), else of any PrATo row with samples.

    A run whose archived slices cannot be read back is passed over, its reason appended to
    ``unreadable``.
    """

    def order(group: TableGroup) -> tuple[int, str]:
        key = paper_table_key(group.table) or "table99"
        return (0 if key == "table4" else int(key[5:]), group.table)

    chosen: dict[str, RunRecord] = {}
    for preferred in [*PRATO_ROW_PREFERENCE, None]:
        for group in sorted(groups, key=order):
            if group.dataset in chosen:
                continue
            for label, runs in group.rows.items():
                if preferred is not None and label != preferred:
                    continue
                candidates = [r for r in runs if r.pruner.lower().startswith("prato") and r.samples]
                run = _representative(candidates)
                if run is None:
                    continue
                try:
                    pruned = samples_of(run)["keep_grid"].shape[1] > 0
                except SampleDataError as err:
                    if unreadable is not None and str(err) not in unreadable:
                        unreadable.append(str(err))
                    continue
                if pruned:
                    chosen[group.dataset] = run
                    break
    return dict(sorted(chosen.items()))


def retention_figure(runs: dict[str, RunRecord], folder: Path, pdf: bool = False) -> Figure | None:
    """Fig. 7: tokens alive after the last pruning point, on the same slices as the other figures."""
    if not runs:
        return None
    n_cols = max(len(samples_of(r)["case_ids"]) for r in runs.values())
    size = (max(2.2 * n_cols, 5.0), 2.7 * len(runs) + 0.4)
    fig, axes = plt.subplots(len(runs), n_cols, figsize=size, squeeze=False)
    for i, (dataset, run) in enumerate(runs.items()):
        arrays = samples_of(run)
        h, w = (int(v) for v in arrays["grid_hw"])
        for j in range(n_cols):
            ax = axes[i, j]
            if j >= len(arrays["case_ids"]):
                ax.set_axis_off()
                continue
            keep = torch.from_numpy(arrays["keep_grid"][j, -1].reshape(-1))
            image = torch.from_numpy(arrays["image"][j].astype(np.float32))
            draw_retention_map(ax, image, keep, (h, w), torch.from_numpy(arrays["box_xyxy"][j]))
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{arrays['case_ids'][j]} z={arrays['slice_indices'][j]}\n{ax.get_title()}", fontsize=6
            )
            if j == 0:
                ax.set_ylabel(f"{DATASET_TITLES.get(dataset, dataset).split(' (')[0]}\n{run.row}", fontsize=7)
    fig.suptitle(
        "Fig. 7: PrATo token-retention maps\n(gold: tokens kept after the last pruning point; yellow: box)",
        fontsize=8,
    )
    fig.tight_layout()
    stem = folder / "fig7_retention_maps"
    _save(fig, stem, pdf)
    described = "; ".join(f"{d}: {r.table} '{r.row}' seed {r.seed}" for d, r in runs.items())
    return Figure(stem, f"Fig. 7: token-retention maps after the last pruning point ({described})")


def score_figure(runs: dict[str, RunRecord], folder: Path, pdf: bool = False) -> Figure | None:
    """Fig. 8: (a) density of the first pruning point's relevance scores (min-max scaled per image) and
    (b) density of PrATo's inverse-entropy weights, each slice a line, against the uniform density 1."""
    runs = {d: r for d, r in runs.items() if "weights" in samples_of(r)}
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(8, 2.8 * len(runs)), squeeze=False)
    for i, (dataset, run) in enumerate(runs.items()):
        arrays = samples_of(run)
        scores = arrays["scores"][:, 0].reshape(len(arrays["case_ids"]), -1).astype(np.float64)
        weights = arrays["weights"].astype(np.float64)
        panels = (
            (axes[i, 0], scores, "(a) relevance scores s\n(min-max scaled per image)", 20),
            # sqrt(M) bins hold equally many of M = k * k evenly spaced ranks: flat when uniform
            (
                axes[i, 1],
                weights,
                "(b) inverse-entropy weights Omega\n(normalised ranks: uniform by construction)",
                max(2, round(weights.shape[1] ** 0.5)),
            ),
        )
        for ax, values, label, bins in panels:
            for k, row in enumerate(values):
                row = row[np.isfinite(row)]
                span = row.max() - row.min() if row.size else 0.0
                scaled = (row - row.min()) / span if span > 0 else np.zeros_like(row)
                density, edges = np.histogram(scaled, bins=bins, range=(0, 1), density=True)
                ax.stairs(density, edges, label=str(arrays["case_ids"][k]), lw=1.5)
            ax.axhline(1.0, color="red", ls="--", lw=1.2, label="true uniform", zorder=3)
            ax.set_ylim(0, max(2.0, 1.1 * ax.get_ylim()[1]))
            ax.set_xlabel("normalised value", fontsize=7)
            ax.set_ylabel("density", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_title(
                f"{label}\n{DATASET_TITLES.get(dataset, dataset).split(' (')[0]}, {run.row}", fontsize=7
            )
            ax.legend(fontsize=5)
    fig.suptitle(
        "Fig. 8: PrATo's token relevance and its inverse-entropy weights against uniform", fontsize=8
    )
    fig.tight_layout()
    stem = folder / "fig8_scores_weights"
    _save(fig, stem, pdf)
    return Figure(
        stem,
        "Fig. 8: distribution of relevance scores (a) and inverse-entropy weights (b) vs uniform; the "
        "weights are normalised ranks of the query entropies (spec step 6), so (b) is flat by construction",
    )


def write_figures(
    groups: Sequence[TableGroup], folder: Path, pdf: bool = False
) -> tuple[list[Figure], list[str]]:
    """Every figure the runs allow; returns the figures and one line per figure that could not be drawn
    (no run stored samples, or archived samples whose slices could not be read back from the dataset)."""
    figures: list[Figure] = []
    missing: list[str] = []
    for group in groups:
        dataset = DATASET_TITLES.get(group.dataset, group.dataset)
        name = figure_name(group)
        title = f"{name.split('_')[0].replace('fig', 'Fig. ')}: {group.table}, {dataset}"
        if name.startswith("samples_"):
            title = f"{group.table}, {dataset}: predictions on the same slices"
        try:
            fig = qualitative_figure(group, folder, title, pdf)
        except SampleDataError as err:
            missing.append(f"{name}: {err}")
        else:
            if fig is None:
                missing.append(f"{name}: no run of {group.name} stored report samples")
            else:
                figures.append(fig)
        if paper_table_key(group.table) == "table5":
            fig5 = efficiency_figure(group, folder, f"Fig. 5: {group.table}, {dataset}", pdf)
            if fig5 is None:
                missing.append(f"fig5_{group.name}: no '<backbone> + PrATo' row")
            else:
                figures.append(fig5)
    unreadable: list[str] = []
    chosen = prato_runs(groups, unreadable)
    drawn = ((retention_figure(chosen, folder, pdf), "fig7"), (score_figure(chosen, folder, pdf), "fig8"))
    for fig, name in drawn:
        if fig is None:
            missing.append(f"{name}: no PrATo run with report samples (and, for Fig. 8, entropy weights)")
            missing += [f"{name}: passed over: {reason}" for reason in unreadable]
        else:
            figures.append(fig)
    return figures, missing
