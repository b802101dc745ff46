"""``prato-report`` on run folders built here: cells, paired tests, both metrics shapes, determinism,
refusals, figures, and the figure samples a run saves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import wilcoxon

from prato_exp.data.phantoms import SyntheticCardiacSource
from prato_exp.data.prompts import BoxPrompter
from prato_exp.data.transforms import resize_pair
from prato_exp.lightning.datamodule import EvalSlices
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.pruning.prato import PrATo
from prato_exp.report.cli import main, report
from prato_exp.report.runs import ReportError, load_runs
from prato_exp.report.samples import (
    SAMPLES_FILENAME,
    SampleDataError,
    dataset_slice_reader,
    load_report_samples,
    pick_report_slices,
    restore_dataset_slices,
    save_report_samples,
    write_network_samples,
)
from prato_exp.report.tables import budget_lines

CLASSES = ("RV", "Myo", "LV")
CASES = [f"patient{i:03d}_frame01" for i in range(1, 7)]
SOURCES = {"acdc": "prato_exp.data.acdc.ACDCSource", "isic": "prato_exp.data.isic.ISICSource"}
PRATO = "prato_exp.pruning.prato.PrATo"
NONE = "prato_exp.pruning.base.NoPruner"


def _per_case(rng: np.random.Generator, offset: float, classes=CLASSES, hd95_3d: bool = False) -> list[dict]:
    rows = []
    for case_id in CASES:
        row = {"case_id": case_id, "num_slices": 8 if len(classes) > 1 else 1}
        for metric, scale in (("dsc", 1.0), ("iou", 1.0), ("hd95", 30.0)):
            values = np.clip(rng.uniform(0.3, 0.8, len(classes)) + offset, 0, 1) * scale
            row.update({f"{metric}/{c}": float(v) for c, v in zip(classes, values, strict=True)})
            row[f"{metric}_mean"] = float(values.mean())
        if hd95_3d:
            row.update(
                {f"hd95_3d/{c}": float(v) for c, v in zip(classes, rng.uniform(5, 15, 3), strict=True)}
            )
        rows.append(row)
    return rows


def _flat(split: str, rows: list[dict], classes=CLASSES, sparsity: float | None = None) -> dict:
    """The run-level figures of the rows, as the meter reduces them (per class over cases, then mean)."""
    flat = {}
    for metric in ("dsc", "iou", "hd95"):
        per_class = [float(np.mean([r[f"{metric}/{c}"] for r in rows])) for c in classes]
        flat.update({f"{split}/case/{metric}/{c}": v for c, v in zip(classes, per_class, strict=True)})
        flat[f"{split}/case/{metric}_mean"] = float(np.mean(per_class))
    flat[f"{split}/counts/slices"] = 48.0
    flat[f"{split}/counts/slice/no_foreground"] = 3.0
    if sparsity is not None:
        flat[f"{split}/sparsity"] = sparsity
        flat[f"{split}/fg_token_recall"] = 1.0 - sparsity / 2
    return flat


def _samples(path: Path, rng: np.random.Generator, pruned: bool, classes=CLASSES, size: int = 32) -> None:
    """A samples file with the keys of ``save_report_samples`` (3 slices, grid 4 x 4, 2 points)."""
    n, grid = 3, 4
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for c in range(1, len(classes) + 1):
            label[i][(yy - 8 - 4 * c) ** 2 + (xx - 10 - 3 * c - i) ** 2 < (10 - 2 * c) ** 2] = c
    pred = label.copy()
    pred[:, rng.random((size, size)) < 0.05] = 0
    arrays = {
        "case_ids": np.array(CASES[:n]),
        "slice_indices": np.array([2, 3, 4]),
        "image": rng.random((n, 1, size, size)).astype(np.float16),
        "label": label,
        "pred": pred,
        "box_xyxy": np.tile(np.array([6.0, 6.0, 26.0, 26.0], np.float32), (n, 1)),
        "prune_enabled": np.ones(n, bool),
        "grid_hw": np.array([grid, grid] if pruned else [0, 0]),
        "keep_grid": rng.random((n, 2, grid, grid)) < 0.7 if pruned else np.zeros((n, 0, 0, 0), bool),
        "scores": rng.random((n, 2, grid, grid)).astype(np.float16)
        if pruned
        else np.zeros((n, 0, 0, 0), np.float16),
        "class_names": np.array(classes),
    }
    if pruned:
        arrays["weights"] = np.stack([1 - rng.permutation(25) / 24 for _ in range(n)]).astype(np.float16)
    np.savez_compressed(path / SAMPLES_FILENAME, **arrays)


def make_run(
    folder: Path,
    *,
    table: str,
    row: str,
    seed: int,
    offset: float,
    reference: str | None,
    dataset: str = "acdc",
    pruned: bool = True,
    kind: str = "train",
    prompt: str = "tight",
    hd95_3d: bool = False,
    samples: bool = True,
    report_block: bool = True,
    size_ratio: float | None = None,
) -> Path:
    """One fake run folder; per-case values drawn from ``seed`` and ``offset``, figures reduced from them."""
    rng = np.random.default_rng([seed, round(offset * 1000) + 1000, len(row)])
    classes = CLASSES if dataset == "acdc" else ("lesion",)
    rows = _per_case(rng, offset, classes, hd95_3d)
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "dataset": {"_target_": SOURCES[dataset]},
        "model": {"_target_": "prato_exp.models.unetr.PrunableUNETR", "prune_after": [3]},
        "pruning": {"_target_": PRATO if pruned else NONE},
        "prompt": {"condition": prompt},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    gflops = 1.0 + offset + 0.01 * seed
    efficiency = {"gflops_per_image": gflops, "latency": {"median_ms": 10.0 + seed}}
    if pruned:
        efficiency.update(
            unpruned={"gflops_per_image": 2.0, "latency": {"median_ms": 12.0}},
            flop_ratio=gflops / 2.0,
            pruned_part_flop_ratio=0.5 + 0.01 * seed,
            latency_ratio=(10.0 + seed) / 12.0,
        )
    metrics: dict = {"environment": {"commit": "abc1234"}, "efficiency": efficiency}
    sparsity = 0.25 + 0.01 * seed if pruned else None
    flat = _flat("val", rows, classes, sparsity)
    if size_ratio is not None:
        flat["val/case/size_ratio_mean"] = size_ratio
    if kind == "train":
        metrics.update(
            choices={"dataset": dataset, "model": "unetr_small", "experiment": table},
            seed=seed,
            val=flat,
            test=None,
            per_case={"val": rows},
        )
    else:
        metrics.update(
            split="val",
            prompt_condition=prompt,
            metrics=flat,
            per_case=rows,
            checkpoint="/somewhere/best-009.ckpt",
        )
    if report_block:
        metrics["report"] = {
            "table": table,
            "row": row,
            "reference_row": reference,
            "split": "val",
            "checkpoint": "best",
            "scale": "cpu",
            "prompt": prompt,
        }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if samples:
        _samples(folder, rng, pruned, classes)
    return folder


TABLE1 = {"PrATo (ours)": 0.0, "w/o entropy weighting": -0.05, "naive crop": -0.02}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Table I (3 rows x 3 seeds, training shape), Table VI (eval shape), one Table V pair on ISIC."""
    root = tmp_path_factory.mktemp("multirun")
    for i, (row, offset) in enumerate(TABLE1.items()):
        for seed in range(3):
            make_run(
                root / f"t1_{i}_{seed}",
                table="table1_components",
                row=row,
                seed=seed,
                offset=offset,
                reference="PrATo (ours)",
                hd95_3d=row != "naive crop",
            )
    for i, prompt in enumerate(("tight", "misleading")):
        for seed in range(2):
            make_run(
                root / f"t6_{i}_{seed}",
                table="table6_prompts",
                row=prompt,
                seed=seed,
                offset=-0.1 * i,
                reference="tight",
                kind="eval",
                prompt=prompt,
            )
    for i, row in enumerate(("UNETR", "UNETR + PrATo")):
        for seed in range(2):
            make_run(
                root / f"t5_{i}_{seed}",
                table="table5_backbones",
                row=row,
                seed=seed,
                offset=0.02 * i,
                reference="UNETR + PrATo",
                dataset="isic",
                pruned=row.endswith("PrATo"),
            )
    return root


@pytest.fixture(scope="module")
def out(runs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    report([runs], folder)
    return folder


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def _metrics(runs: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob(f"{pattern}/metrics.json"))]


def test_cells_are_mean_std_and_n_over_seeds(runs, out):
    table = _csv(out / "table1_components_acdc.csv")
    assert list(table) == list(TABLE1)  # paper_values.yaml's row order
    for i, row in enumerate(TABLE1):
        metrics = _metrics(runs, f"t1_{i}_*")
        for key, column in (("val/case/dsc_mean", "dsc_mean"), ("val/case/dsc/LV", "dsc/LV")):
            values = np.array([m["val"][key] for m in metrics])
            assert float(table[row][f"{column}_mean"]) == pytest.approx(values.mean(), abs=1e-12)
            assert float(table[row][f"{column}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-12)
            assert table[row][f"{column}_n"] == "3"
        gflops = np.array([m["efficiency"]["gflops_per_image"] for m in metrics])
        assert float(table[row]["gflops_mean"]) == pytest.approx(gflops.mean())
        assert float(table[row]["latency_ratio_mean"]) == pytest.approx(
            np.mean([m["efficiency"]["latency_ratio"] for m in metrics])
        )
        assert table[row]["n_seeds"] == "3" and table[row]["seeds"] == "0 1 2"
    assert float(table["PrATo (ours)"]["dsc/LV_paper"]) == 0.6146
    assert float(table["naive crop"]["hd95_mean_paper"]) == 15.89
    assert table["PrATo (ours)"]["dsc_mean_paper"] == ""  # Table I gives no mean DSC


def test_paired_wilcoxon_against_the_reference_row(runs, out):
    table = _csv(out / "table1_components_acdc.csv")
    assert table["PrATo (ours)"]["p_value"] == ""
    reference = {m["seed"]: m for m in _metrics(runs, "t1_0_*")}
    for i, row in enumerate(("w/o entropy weighting", "naive crop"), start=1):
        x, y = [], []
        for m in _metrics(runs, f"t1_{i}_*"):
            ref = {r["case_id"]: r["dsc_mean"] for r in reference[m["seed"]]["per_case"]["val"]}
            for r in sorted(m["per_case"]["val"], key=lambda r: r["case_id"]):
                x.append(r["dsc_mean"])
                y.append(ref[r["case_id"]])
        assert float(table[row]["p_value"]) == pytest.approx(wilcoxon(x, y).pvalue, rel=1e-12)
        assert table[row]["n_pairs"] == str(len(CASES) * 3)
        assert table[row]["reference_row"] == "PrATo (ours)"


def test_markdown_has_caption_cells_and_missing_3d_hd95(out):
    text = (out / "table1_components_acdc.md").read_text()
    assert "Box prompts are oracle boxes from the ground truth." in text
    assert "validation" in text and "best on validation" in text and "abc1234" in text
    assert "Seeds: 0, 1, 2" in text
    assert "(paper 0.6146)" in text
    lines = [line for line in text.splitlines() if line.startswith("| naive crop")]
    assert "n/a (not recorded)" in lines[0]
    prato = next(line for line in text.splitlines() if line.startswith("| PrATo (ours)"))
    assert "n/a" not in prato and " ± " in prato


def test_eval_only_runs_make_table6(runs, out):
    table = _csv(out / "table6_prompts_acdc.csv")
    assert list(table) == ["tight", "misleading"]
    for i, row in enumerate(table):
        metrics = _metrics(runs, f"t6_{i}_*")
        values = np.array([m["metrics"]["val/case/iou_mean"] for m in metrics])
        assert float(table[row]["iou_mean_mean"]) == pytest.approx(values.mean())
        assert table[row]["prompt"] == row and table[row]["seeds"] == "0 1"
    assert float(table["misleading"]["dsc_mean_paper"]) == 0.6528
    assert float(table["misleading"]["p_value"]) > 0


def test_rescored_table_names_its_eval_command(out):
    text = (out / "table6_prompts_acdc.md").read_text()
    assert "`python eval.py -m rescore=table6_prompts ckpt=<run>/checkpoints/best-<epoch>.ckpt`" in text
    assert "python train.py" not in text


def test_trained_table_names_its_preset_and_dataset(out):
    text = (out / "table5_backbones_isic.md").read_text()
    assert "`python train.py -m experiment=table5_backbones dataset=isic`" in text


def test_recorded_rescore_choice_wins_over_the_table_name(tmp_path):
    folder = make_run(
        tmp_path / "r",
        table="my_table",
        row="tight",
        seed=0,
        offset=0.0,
        reference="tight",
        kind="eval",
        samples=False,
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    assert load_runs([folder], warn=print)[0][0].experiment is None  # no preset named my_table
    metrics["choices"] = {"rescore": "table6_prompts"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert load_runs([folder], warn=print)[0][0].experiment == "table6_prompts"


def test_a_budget_without_the_samples_count_joins_the_same_budget_with_it():
    runs = [
        SimpleNamespace(budget=b, seed=k)
        for k, b in enumerate(
            (
                "15 epochs (19,680 training samples), batch 16",
                "15 epochs, batch 16",
                "15 epochs (19,680 training samples), batch 16",
            )
        )
    ]
    lines = budget_lines(runs)
    assert lines[0] == "Training budget: 15 epochs (19,680 training samples), batch 16."
    assert lines[1].startswith("1 of 3 runs (seed 1) scored weights whose checkpoint predates")


def test_budgets_that_differ_name_their_rows():
    runs = [
        SimpleNamespace(budget=b, seed=0, row=row)
        for row, b in (
            ("unpruned", "15 epochs (19,680 training samples), lr 0.0003"),
            ("BasicUNet", "15 epochs (19,680 training samples), lr 0.001"),
            ("PrATo", "15 epochs, lr 0.0003"),
        )
    ]
    assert budget_lines(runs)[0] == (
        "Training budget: 15 epochs (19,680 training samples), lr 0.0003 (unpruned, PrATo); "
        "15 epochs (19,680 training samples), lr 0.001 (BasicUNet)."
    )


def test_size_ratio_column_only_where_a_run_recorded_it(out, tmp_path):
    assert "size ratio" not in (out / "table1_components_acdc.md").read_text()
    for seed, ratio in ((0, 1.25), (1, None)):
        make_run(
            tmp_path / "runs" / f"r{seed}",
            table="table6_prompts",
            row="oversized",
            seed=seed,
            offset=0.0,
            reference="tight",
            kind="eval",
            prompt="oversized",
            size_ratio=ratio,
            samples=False,
        )
    report([tmp_path / "runs"], tmp_path / "out", figures=False)
    row = _csv(tmp_path / "out" / "table6_prompts_acdc.csv")["oversized"]
    assert (float(row["size_ratio_mean_mean"]), row["size_ratio_mean_n"]) == (1.25, "1")
    text = (tmp_path / "out" / "table6_prompts_acdc.md").read_text()
    assert "| size ratio |" in text and "above 1 the model over-segments" in text


def test_isic_table_has_single_class_layout_and_figures(out):
    text = (out / "table5_backbones_isic.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert "| DSC | IoU | HD95 |" in header and "lesion DSC" not in header and "HD95 3-D" not in header
    assert "(paper 0.8754)" in text
    names = sorted(p.name for p in (out / "figures").iterdir())
    for stem in (
        "fig5_table5_backbones_isic",
        "fig6_table5_backbones_isic",
        "fig7_retention_maps",
        "fig8_scores_weights",
        "fig9_table6_prompts_acdc",
        "samples_table1_components_acdc",
    ):
        assert f"{stem}.png" in names and f"{stem}.pdf" not in names
    index = (out / "index.md").read_text()
    assert "fig3: no runs of table4" in index


def test_caption_names_command_budget_and_machine_of_real_runs():
    record = load_runs([Path(__file__).parent / "data" / "report_run"], warn=print)[0][0]
    assert record.experiment == "table3_roialign_k"
    assert record.budget == "15 epochs (19,680 training samples), batch 16, lr 0.0003, 128 px"
    assert record.machine.endswith("torch 2.14.1+cu130, 2 threads, CPU")


def test_rerun_gives_identical_tables(runs, out, tmp_path):
    report([runs], tmp_path, figures=False)
    for name in ("table1_components_acdc", "table6_prompts_acdc", "table5_backbones_isic"):
        for ext in (".md", ".csv"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (out / f"{name}{ext}").read_bytes()


def test_a_hand_written_discussion_goes_under_its_table_and_survives_a_rerun(runs, tmp_path):
    (tmp_path / "discussion").mkdir()
    (tmp_path / "discussion" / "table1_components_acdc.md").write_text("k = 5 holds at this scale.\n")
    report([runs], tmp_path, figures=False)
    first = (tmp_path / "table1_components_acdc.md").read_text()
    table, discussion = first.split("### Discussion")
    assert "| PrATo (ours) |" in table and "k = 5 holds at this scale." in discussion
    report([runs], tmp_path, figures=False)
    assert (tmp_path / "table1_components_acdc.md").read_text() == first
    assert "### Discussion" not in (tmp_path / "table6_prompts_acdc.md").read_text()


def _archive_script(*args: str) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[1] / "scripts" / "archive_runs.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_archived_runs_give_the_same_tables(runs, out, tmp_path):
    done = _archive_script(str(runs), "--dest", str(tmp_path / "archive"))
    assert done.returncode == 0, done.stderr
    report([tmp_path / "archive"], tmp_path / "report", figures=False)
    for name in ("table1_components_acdc", "table6_prompts_acdc", "table5_backbones_isic"):
        archived, original = _csv(tmp_path / "report" / f"{name}.csv"), _csv(out / f"{name}.csv")
        assert archived.keys() == original.keys()
        for row, cells in original.items():  # every cell but the run folders' paths
            assert {k: v for k, v in archived[row].items() if k != "runs"} == {
                k: v for k, v in cells.items() if k != "runs"
            }
            assert [Path(p).name for p in archived[row]["runs"].split()] == [
                Path(p).name for p in cells["runs"].split()
            ]


def test_archiving_leaves_out_unfinished_runs_and_never_overwrites(runs, tmp_path):
    unfinished = tmp_path / "sweep" / "7_unfinished"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("seed: 0\n")
    finished = tmp_path / "sweep" / "t1_0_0"
    finished.mkdir()
    for name in ("config.yaml", "metrics.json"):
        (finished / name).write_bytes((runs / "t1_0_0" / name).read_bytes())
    first = _archive_script(str(tmp_path / "sweep"), "--dest", str(tmp_path / "archive"))
    assert first.returncode == 0 and "7_unfinished" in first.stderr
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == ["t1_0_0"]
    again = _archive_script(str(tmp_path / "sweep"), "--dest", str(tmp_path / "archive"))
    assert again.returncode != 0 and "never overwritten" in again.stderr


def test_all_zero_differences_and_a_lone_reference(tmp_path):
    for row in ("k=5", "k=3"):
        make_run(
            tmp_path / row, table="table3_k", row=row, seed=0, offset=0.0, reference="k=5", samples=False
        )
    # identical per-case values: rename k=3's metrics to k=5's
    k5 = json.loads((tmp_path / "k=5" / "metrics.json").read_text())
    k5["report"]["row"] = "k=3"
    (tmp_path / "k=3" / "metrics.json").write_text(json.dumps(k5))
    report([tmp_path], tmp_path / "out", figures=False)
    table = _csv(tmp_path / "out" / "table3_k_acdc.csv")
    assert table["k=3"]["p_value"] == "1.0" and table["k=5"]["p_value"] == ""
    assert table["k=3"]["dsc_mean_std"] == ""  # one seed: no std
    assert "k=5 | 1 |" in (tmp_path / "out" / "table3_k_acdc.md").read_text()


def test_a_row_decoded_only_around_the_box_is_named_in_the_caption(tmp_path):
    for row in ("fast", "PrATo (ours)"):
        make_run(tmp_path / row, table="fast_t", row=row, seed=0, offset=0.0, reference="fast", samples=False)
    make_run(tmp_path / "unpruned", table="fast_t", row="unpruned", seed=0, offset=0.0, reference="fast",
             pruned=False, samples=False)  # fmt: skip
    for row in ("fast", "unpruned"):  # the unpruned row's window setting never runs: no pruner is active
        config = yaml.safe_load((tmp_path / row / "config.yaml").read_text())
        config["model"]["decoder_window"] = 1
        (tmp_path / row / "config.yaml").write_text(yaml.safe_dump(config))
    report([tmp_path], tmp_path / "out", figures=False)
    caption = (tmp_path / "out" / "fast_t_acdc.md").read_text()
    assert "Decoder window: fast (margin 1) ran the decoder only on the box" in caption
    assert "PrATo (ours) (" not in caption and "unpruned (" not in caption


def test_time_cells_leave_out_runs_timed_on_a_busy_machine(tmp_path):
    for seed, load in ((0, 1.9), (1, 4.2), (2, None)):
        folder = make_run(
            tmp_path / f"s{seed}",
            table="table3_k",
            row="k=5",
            seed=seed,
            offset=0.0,
            reference="k=5",
            samples=False,
        )
        metrics = json.loads((folder / "metrics.json").read_text())
        if load is not None:
            metrics["efficiency"]["machine_load"] = {
                "load_average_1min": load,
                "cores": 2,
                "torch_threads": 2,
            }
        (folder / "metrics.json").write_text(json.dumps(metrics))
    report([tmp_path], tmp_path / "out", figures=False)
    row = _csv(tmp_path / "out" / "table3_k_acdc.csv")["k=5"]
    # seed 0 (quiet) and seed 2 (load not recorded) count; seed 1 (load 4.2 on 2 cores) does not
    assert float(row["latency_ms_mean"]) == pytest.approx((10.0 + 12.0) / 2)
    assert row["latency_ms_n"] == "2" and row["gflops_n"] == "3"
    caption = (tmp_path / "out" / "table3_k_acdc.md").read_text()
    assert "leave out 1 of 3 runs timed while other work shared the machine" in caption
    assert "1 of 3 runs did not record the machine's load" in caption


def test_a_run_without_report_block_is_an_error_naming_it(runs, tmp_path, capsys):
    bad = make_run(
        tmp_path / "old_run", table="", row="", seed=0, offset=0.0, reference=None, report_block=False
    )
    with pytest.raises(ReportError, match="old_run"):
        report([runs, bad], tmp_path / "out", figures=False)
    assert main([str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert "old_run" in capsys.readouterr().err
    result = report([runs, bad], tmp_path / "out3", allow_incomplete=True, figures=False)
    assert len(result["problems"]) == 1
    assert "old_run" in capsys.readouterr().err
    assert "old_run" in (tmp_path / "out3" / "index.md").read_text()


def test_a_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run folder"):
        report([tmp_path / "empty"], tmp_path / "out")


def test_script_runs_the_same_main(runs, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
    subprocess.run(
        [sys.executable, str(script), str(runs / "t6_0_0"), "--out", str(tmp_path), "--no-figures"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "table6_prompts_acdc.csv").is_file()


# --------------------------------------------------------------------------------------------------------
# figure samples


@pytest.fixture(scope="module")
def eval_set() -> EvalSlices:
    source = SyntheticCardiacSource(num_train=0, num_val=5, num_test=0, size=64, seed=0, slices_per_case=3)
    return EvalSlices(source, source.split_ids()["val"], 64, BoxPrompter(condition="tight"))


def _unetr(seed: int, pruner=None, **kwargs) -> PrunableUNETR:
    torch.manual_seed(seed)
    return PrunableUNETR(1, 4, img_size=64, hidden_size=48, mlp_dim=96, num_heads=3, pruner=pruner, **kwargs)


class _Volumes(torch.utils.data.Dataset):
    """Slices of volumes whose foreground per slice is given; with ``cases`` like ``EvalSlices`` or not."""

    def __init__(self, foreground: dict[str, list[int]], with_cases: bool) -> None:
        self.labels = {}
        for cid, counts in foreground.items():
            label = np.zeros((len(counts), 8, 8), np.int64)
            for z, n in enumerate(counts):
                label[z].flat[:n] = 1
            self.labels[cid] = label
        self.index = [(cid, z) for cid in foreground for z in range(len(foreground[cid]))]
        if with_cases:
            self.cases = {
                c: SimpleNamespace(label=lab, num_slices=len(lab)) for c, lab in self.labels.items()
            }

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        cid, z = self.index[i]
        return {"case_id": cid, "slice_index": z, "label": torch.as_tensor(self.labels[cid][z])}


@pytest.mark.parametrize("with_cases", [True, False])
def test_pick_report_slices_takes_the_fullest_slice_of_cases_spread_over_sorted_ids(with_cases):
    foreground = {"c": [0, 5, 9, 9], "a": [3, 1, 7], "d": [0, 0, 0], "b": [2, 8, 1], "e": [4, 6, 6]}
    dataset = _Volumes(foreground, with_cases)
    picked = [dataset.index[i] for i in pick_report_slices(dataset, 3)]
    assert picked == [("a", 2), ("c", 2), ("e", 1)]  # ids a..e spread: a, c, e; ties: lowest slice
    assert [dataset.index[i] for i in pick_report_slices(dataset, 9)][3] == ("d", 0)  # no foreground: slice 0
    assert pick_report_slices(dataset, 0) == []


def test_save_report_samples_picks_the_same_slices_for_two_nets(eval_set, tmp_path):
    pruned = _unetr(0, PrATo, prune_after=(3, 6))
    plain = _unetr(1)
    a = load_report_samples(save_report_samples(pruned, eval_set, tmp_path / "a.npz", count=3))
    b = load_report_samples(save_report_samples(plain, eval_set, tmp_path / "b", count=3))
    assert (tmp_path / "b" / SAMPLES_FILENAME).is_file()
    np.testing.assert_array_equal(a["case_ids"], b["case_ids"])
    np.testing.assert_array_equal(a["slice_indices"], b["slice_indices"])
    np.testing.assert_array_equal(a["label"], b["label"])
    # three of five cases, spread over the sorted ids; each its slice with the most foreground
    ids = sorted(eval_set.cases)
    assert list(a["case_ids"]) == [ids[0], ids[2], ids[4]]
    for cid, z in zip(a["case_ids"], a["slice_indices"], strict=True):
        fg = (eval_set.cases[str(cid)].label > 0).reshape(3, -1).sum(1)
        assert z == int(np.argmax(fg))
    assert a["image"].shape == (3, 1, 64, 64) and a["image"].dtype == np.float16
    assert a["label"].dtype == np.uint8 and a["pred"].shape == (3, 64, 64)
    assert a["box_xyxy"].shape == (3, 4) and list(a["grid_hw"]) == [4, 4]
    assert a["keep_grid"].shape == (3, 2, 4, 4) and a["keep_grid"].dtype == bool
    assert a["scores"].shape == (3, 2, 4, 4)
    # at the second point only the places kept by the first were scored
    np.testing.assert_array_equal(np.isfinite(a["scores"][:, 1]), a["keep_grid"][:, 0])
    assert np.isfinite(a["scores"][:, 0]).all()
    assert a["weights"].shape == (3, 25)
    assert b["keep_grid"].shape[1] == 0 and "weights" not in b
    assert list(a["class_names"]) == list(CLASSES)
    assert pruned.training and plain.training  # the mode is restored
    assert (tmp_path / "a.npz").stat().st_size < 200_000


def _read_from(eval_set: EvalSlices, shift: float = 0.0):
    def read_slice(case_id: str, z: int) -> tuple[np.ndarray, np.ndarray]:
        case = eval_set.cases[case_id]
        image, label = resize_pair(case.image[:, z], case.label[z], eval_set.input_size)
        return image.numpy() + shift, label.numpy()

    return read_slice


def test_archived_samples_keep_the_network_part_and_no_pixels(eval_set, tmp_path):
    full = save_report_samples(_unetr(0, PrATo, prune_after=(3,)), eval_set, tmp_path / "full.npz", count=3)
    archived = load_report_samples(write_network_samples(full, tmp_path / "archived.npz"))
    original = load_report_samples(full)
    assert "image" not in archived and "label" not in archived
    for key in ("pred", "keep_grid", "scores", "weights", "box_xyxy", "case_ids", "slice_indices"):
        np.testing.assert_array_equal(archived[key], original[key])
    assert archived["label_pixels"].shape == (3, 4)
    np.testing.assert_array_equal(archived["label_pixels"].sum(1), [64 * 64] * 3)


def test_archived_samples_read_their_slices_back_from_the_dataset(eval_set, tmp_path):
    full = save_report_samples(_unetr(0), eval_set, tmp_path / "full.npz", count=3)
    archived = load_report_samples(write_network_samples(full, tmp_path / "archived.npz"))
    restored = restore_dataset_slices(archived, _read_from(eval_set), "archived.npz")
    original = load_report_samples(full)
    np.testing.assert_array_equal(restored["image"], original["image"])
    np.testing.assert_array_equal(restored["label"], original["label"])


def test_slices_that_differ_from_the_runs_are_refused_naming_case_and_slice(eval_set, tmp_path):
    full = save_report_samples(_unetr(0), eval_set, tmp_path / "full.npz", count=3)
    archived = load_report_samples(write_network_samples(full, tmp_path / "archived.npz"))
    first = f"case {archived['case_ids'][0]} slice {archived['slice_indices'][0]}"
    with pytest.raises(SampleDataError, match=f"archived.npz: {first} read from the dataset differs"):
        restore_dataset_slices(archived, _read_from(eval_set, shift=0.1), "archived.npz")


def test_a_runs_dataset_that_is_gone_is_named(tmp_path):
    config = {
        "dataset": {"_target_": SOURCES["acdc"], "root": str(tmp_path / "no_acdc")},
        "model": {"img_size": 64},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SampleDataError, match=r"cannot read the run.s dataset back .*no_acdc"):
        dataset_slice_reader(tmp_path / "config.yaml")


def _with_root(run: Path, root: Path) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["dataset"]["root"] = str(root)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_an_eval_runs_literal_root_gives_way_to_the_datasets_variable(tmp_path, monkeypatch):
    config = {"dataset": {"_target_": SOURCES["acdc"], "root": "/trained/here"}, "model": {"img_size": 64}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PRATO_ACDC_ROOT", str(tmp_path / "moved_acdc"))
    with pytest.raises(SampleDataError, match="moved_acdc does not exist"):
        dataset_slice_reader(tmp_path / "config.yaml")


def test_figures_whose_slices_cannot_be_read_back_are_listed_each_with_the_reason(tmp_path):
    run = make_run(
        tmp_path / "runs" / "t1",
        table="table1_components",
        row="PrATo (ours)",
        seed=0,
        offset=0.0,
        reference="PrATo (ours)",
    )
    _with_root(run, tmp_path / "gone")
    done = _archive_script(str(tmp_path / "runs"), "--dest", str(tmp_path / "archive"))
    assert done.returncode == 0, done.stderr
    result = report([tmp_path / "archive"], tmp_path / "report")
    assert result["figures"] == []
    for name in ("samples_table1_components_acdc", "fig7", "fig8"):
        lines = [line for line in result["missing"] if line.startswith(name)]
        assert any("gone does not exist" in line for line in lines), (name, result["missing"])
    assert not any(line.startswith("fig8: no runs") for line in result["missing"])


def test_archiving_an_archive_keeps_its_samples(runs, tmp_path):
    first = _archive_script(str(runs / "t1_0_0"), "--dest", str(tmp_path / "once"))
    again = _archive_script(str(tmp_path / "once"), "--dest", str(tmp_path / "twice"))
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    once, twice = (tmp_path / d / "t1_0_0" / SAMPLES_FILENAME for d in ("once", "twice"))
    assert twice.read_bytes() == once.read_bytes()


# --------------------------------------------------------------------------------------------------------
# end to end: real phantom runs through Hydra's compose API, then the report

TINY = [
    "model.img_size=32",
    "datamodule.batch_size=4",
    "dataset.num_train=8",
    "dataset.num_val=3",
    "dataset.num_test=0",
    "dataset.size=48",
    "efficiency.flop_images=2",
    "efficiency.latency_warmup=1",
    "efficiency.latency_repeats=3",
    "logger=none",
    "run_test=false",
    "+trainer.fast_dev_run=true",
]


@pytest.mark.slow
def test_report_of_real_phantom_runs_matches_their_metrics(tmp_path):
    from conftest import compose_train

    from prato_exp.cli.train import train

    rows = {"unpruned": "row=unpruned", "PrATo (ours)": "row=prato"}
    for choice in rows.values():
        for seed in (0, 1):
            run = tmp_path / "multirun" / f"{choice[4:]}_{seed}"
            preset = ["experiment=table4_pruners", "dataset=synthetic_cardiac"]
            train(compose_train([*preset, *TINY, choice, f"seed={seed}"]), run)

    result = report([tmp_path / "multirun"], tmp_path / "out")
    table = _csv(tmp_path / "out" / "table4_pruners_synthetic_cardiac.csv")
    assert list(table) == ["unpruned", "PrATo (ours)"]
    by_row = {row: _metrics(tmp_path / "multirun", f"{choice[4:]}_*") for row, choice in rows.items()}
    for row, metrics in by_row.items():
        for column in ("dsc/LV", "dsc_mean", "iou_mean", "hd95_mean"):
            values = np.array([m["val"][f"val/case/{column}"] for m in metrics])
            assert float(table[row][f"{column}_mean"]) == pytest.approx(values.mean())
            assert float(table[row][f"{column}_std"]) == pytest.approx(values.std(ddof=1))
        gflops = [m["efficiency"]["gflops_per_image"] for m in metrics]
        assert float(table[row]["gflops_mean"]) == pytest.approx(np.mean(gflops))
        assert table[row]["n_seeds"] == "2"
    sparsity = [m["val"]["val/sparsity"] for m in by_row["PrATo (ours)"]]
    assert float(table["PrATo (ours)"]["sparsity_mean"]) == pytest.approx(np.mean(sparsity))
    assert float(table["unpruned"]["sparsity_mean"]) == 0.0 and table["unpruned"]["flop_ratio_mean"] == ""
    x, y = [], []
    for plain, prato in zip(by_row["unpruned"], by_row["PrATo (ours)"], strict=True):
        assert plain["seed"] == prato["seed"]
        ref = {r["case_id"]: r["dsc_mean"] for r in prato["per_case"]["val"]}
        for r in sorted(plain["per_case"]["val"], key=lambda r: r["case_id"]):
            x.append(r["dsc_mean"])
            y.append(ref[r["case_id"]])
    expected = wilcoxon(x, y).pvalue if np.any(np.array(x) != np.array(y)) else 1.0
    assert float(table["unpruned"]["p_value"]) == pytest.approx(expected)
    stems = {f.stem.name for f in result["figures"]}
    assert {"fig3_table4_pruners_synthetic_cardiac", "fig7_retention_maps", "fig8_scores_weights"} <= stems

    archive = _archive_script(str(tmp_path / "multirun"), "--dest", str(tmp_path / "archive"))
    assert archive.returncode == 0, archive.stderr
    assert all(
        "image" not in load_report_samples(p) for p in (tmp_path / "archive").glob(f"*/{SAMPLES_FILENAME}")
    )
    from_archive = report([tmp_path / "archive"], tmp_path / "out_archive")
    assert {f.stem.name for f in from_archive["figures"]} == stems
    for fig in result["figures"]:
        png = fig.stem.with_suffix(".png")
        assert (tmp_path / "out_archive" / "figures" / png.name).read_bytes() == png.read_bytes()


def test_a_row_whose_images_each_decoded_their_own_window_says_so(tmp_path):
    for row, batching in (("own", "by_size"), ("shared", "shared")):
        make_run(tmp_path / row, table="win_t", row=row, seed=0, offset=0.0, reference="own", samples=False)
        config = yaml.safe_load((tmp_path / row / "config.yaml").read_text())
        config["model"].update(decoder_window=0, decoder_window_batch=batching)
        (tmp_path / row / "config.yaml").write_text(yaml.safe_dump(config))
    report([tmp_path], tmp_path / "out", figures=False)
    caption = (tmp_path / "out" / "win_t_acdc.md").read_text()
    assert "Decoder window: own (margin 0, each image its own window), shared (margin 0) ran" in caption


def test_a_shared_row_takes_the_seeds_its_table_lacks_from_the_tables_that_ran_it(tmp_path):
    for seed in (0, 1):
        for row, pruned in (("PrATo (ours)", True), ("unpruned", False)):
            make_run(
                tmp_path / f"t4_{row[:3]}_{seed}",
                table="table4_pruners",
                row=row,
                seed=seed,
                offset=0.0,
                reference="PrATo (ours)",
                pruned=pruned,
                samples=False,
            )
    _table5_with_transunet(tmp_path, seeds=(0, 1))
    for row in ("k=3", "k=5"):
        make_run(
            tmp_path / f"t3_{row}", table="table3_roialign_k", row=row, seed=0, offset=0.0, reference="k=5"
        )
    report([tmp_path], tmp_path / "out", figures=False)
    table5 = _csv(tmp_path / "out" / "table5_backbones_acdc.csv")
    assert set(table5) == {"UNETR", "UNETR + PrATo", "TransUNet + PrATo"}
    own = _csv(tmp_path / "out" / "table4_pruners_acdc.csv")
    for shared, original in (("UNETR + PrATo", "PrATo (ours)"), ("UNETR", "unpruned")):
        assert table5[shared]["dsc_mean_mean"] == own[original]["dsc_mean_mean"]
        assert table5[shared]["n_seeds"] == "2"
        assert table5[shared]["runs"] == own[original]["runs"]
    assert table5["UNETR"]["p_value"] != ""  # paired against its own reference, "UNETR + PrATo"
    caption = (tmp_path / "out" / "table5_backbones_acdc.md").read_text()
    assert "row 'UNETR + PrATo' seed(s) 0, 1: the run(s) of table4_pruners 'PrATo (ours)'" in caption
    # Table III has its own k = 5 seed 0, and no seed 1 in any row: nothing is taken
    table3 = _csv(tmp_path / "out" / "table3_roialign_k_acdc.csv")
    assert table3["k=5"]["n_seeds"] == "1" and "t3_k=5" in table3["k=5"]["runs"]
    assert "the same configuration" not in (tmp_path / "out" / "table3_roialign_k_acdc.md").read_text()


def _set_report(run: Path, **report_values) -> Path:
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["report"].update(report_values)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _table5_with_transunet(root: Path, seeds=(0, 1)) -> None:
    for seed in seeds:
        make_run(
            root / f"t5_{seed}",
            table="table5_backbones",
            row="TransUNet + PrATo",
            seed=seed,
            offset=0.01,
            reference="TransUNet + PrATo",
            samples=False,
        )


def _t4_prato(folder: Path, seed: int | None, offset: float = 0.0) -> Path:
    run = make_run(
        folder,
        table="table4_pruners",
        row="PrATo (ours)",
        seed=seed or 0,
        offset=offset,
        reference="PrATo (ours)",
        samples=False,
    )
    if seed is None:
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("seed")
        (run / "metrics.json").write_text(json.dumps(metrics))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.pop("seed")
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_a_shared_seed_run_twice_is_taken_as_its_own_table_keeps_it(tmp_path):
    _table5_with_transunet(tmp_path, seeds=(0,))
    _t4_prato(tmp_path / "t4_a", 0, offset=0.0)
    _t4_prato(tmp_path / "t4_b", 0, offset=-0.1)
    report([tmp_path], tmp_path / "out", figures=False)
    table4 = _csv(tmp_path / "out" / "table4_pruners_acdc.csv")
    table5 = _csv(tmp_path / "out" / "table5_backbones_acdc.csv")
    assert table4["PrATo (ours)"]["runs"] == table5["UNETR + PrATo"]["runs"]
    assert table5["UNETR + PrATo"]["runs"].endswith("t4_b")


def test_a_shared_row_is_not_taken_across_scales_or_budgets_or_without_a_seed(tmp_path):
    _table5_with_transunet(tmp_path, seeds=(0, 1))
    _set_report(_t4_prato(tmp_path / "t4_paper", 0), scale="paper")
    other_budget = _t4_prato(tmp_path / "t4_short", 1)
    config = yaml.safe_load((other_budget / "config.yaml").read_text())
    config["trainer"] = {"max_epochs": 2}
    (other_budget / "config.yaml").write_text(yaml.safe_dump(config))
    _t4_prato(tmp_path / "t4_unknown", None)
    report([tmp_path], tmp_path / "out", figures=False)
    assert set(_csv(tmp_path / "out" / "table5_backbones_acdc.csv")) == {"TransUNet + PrATo"}


def test_the_markdown_shows_each_pruned_rows_foreground_token_recall(runs, out):
    lines = (out / "table1_components_acdc.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| row |")).split(" | ")
    column = header.index("fg token recall")
    recalls = [
        json.loads(p.read_text())["val"]["val/fg_token_recall"]
        for p in sorted(runs.glob("t1_0_*/metrics.json"))
    ]
    prato = next(line for line in lines if line.startswith("| PrATo (ours) |")).split(" | ")
    assert prato[column] == f"{np.mean(recalls):.3f} ± {np.std(recalls, ddof=1):.3f}"


def test_pdf_figures_are_written_on_request_and_pngs_are_small(runs, tmp_path):
    report([runs], tmp_path / "out", pdf=True)
    figures = tmp_path / "out" / "figures"
    assert (figures / "fig7_retention_maps.pdf").is_file()
    assert "([pdf](figures/fig7_retention_maps.pdf))" in (tmp_path / "out" / "index.md").read_text()
    with Image.open(figures / "fig7_retention_maps.png") as png:
        assert png.mode == "P"  # a 256-colour palette
