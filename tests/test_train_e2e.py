"""End to end through Hydra's compose API: fast_dev_run, a short train + eval, bad checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_eval, compose_train

from prato_exp.cli.eval import evaluate
from prato_exp.cli.train import train

TINY = [
    "model.img_size=32",
    "datamodule.batch_size=4",
    "dataset.num_train=8",
    "dataset.num_val=2",
    "dataset.num_test=2",
    "dataset.size=48",
    "efficiency.flop_images=2",
    "efficiency.latency_warmup=1",
    "efficiency.latency_repeats=3",
    "logger=none",
]


def test_fast_dev_run_writes_metrics(tmp_path):
    cfg = compose_train([*TINY, "+trainer.fast_dev_run=true"])
    results = train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["efficiency"]["gflops_per_image"] > 0
    assert "val/case/dsc/LV" in metrics["val"] and "test/case/hd95/RV" in metrics["test"]
    assert results["splits"] == {"train": 8, "val": 2, "test": 2}
    assert metrics["environment"]["retain_freed_memory"] is sys.platform.startswith("linux")


@pytest.mark.parametrize("pruning", ["random", "dynamicvit", "evovit", "dtop", "stp", "tram", "tome"])
def test_every_baseline_pruner_trains_and_evaluates_through_hydra(tmp_path, pruning):
    cfg = compose_train([*TINY, "model.img_size=64", f"pruning={pruning}", "+trainer.fast_dev_run=true"])
    train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/case/dsc_mean"] <= 1.0
    assert metrics["efficiency"]["gflops_per_image"] > 0


def test_a_finished_run_folder_is_never_overwritten(tmp_path):
    cfg = compose_train([*TINY, "+trainer.fast_dev_run=true"])
    train(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds"):
        train(cfg, tmp_path / "run")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    wandb = ["logger=wandb", "val_images.every_n_epochs=1"]
    cfg_lesion = ["dataset=synthetic_lesion", "trainer.max_epochs=2", *wandb]
    cfg = compose_train([*TINY, *cfg_lesion])
    train(cfg, run_dir)
    return run_dir


def test_short_training_writes_checkpoint_metrics_and_wandb_run(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert Path(metrics["best_checkpoint"]).is_file()
    assert 0.0 <= metrics["test"]["test/case/dsc/lesion"] <= 1.0
    assert metrics["efficiency"]["latency"]["median_ms"] > 0
    load = metrics["efficiency"]["machine_load"]
    assert load["load_average_1min"] >= 0 and load["cores"] >= 1
    assert list((trained_run / "wandb").glob("offline-run-*"))


def test_wandb_run_gets_validation_panels_and_a_per_case_table(trained_run):
    (offline,) = (trained_run / "wandb").glob("offline-run-*")
    panels = list((offline / "files" / "media" / "images" / "val").glob("examples_*.png"))
    tables = list((offline / "files" / "media" / "table" / "val").glob("per_case_*.table.json"))
    assert len(panels) >= 2 * 2  # two slices (num_val=2) after each of two epochs
    (table,) = tables
    content = json.loads(table.read_text())
    assert "case_id" in content["columns"] and len(content["data"]) == 2


def test_eval_scores_a_checkpoint_and_draws_overlays(trained_run, tmp_path):
    ckpt = json.loads((trained_run / "metrics.json").read_text())["best_checkpoint"]
    cfg = compose_eval([f"ckpt={ckpt}", "dataset=synthetic_lesion", *TINY[2:6], "prompt=oversized"])
    results = evaluate(cfg, tmp_path / "eval")
    assert results["split"] == "test" and results["prompt_condition"] == "oversized"
    assert "test/case/dsc/lesion" in results["metrics"]
    assert [p for p in results["figures"] if p.endswith(".png")]
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_eval_refuses_a_checkpoint_of_another_model(trained_run, tmp_path):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["best_checkpoint"]
    checkpoint = torch.load(ckpt_path, weights_only=True)
    checkpoint["prato_run_config"]["model"]["hidden_size"] = 96
    bad = tmp_path / "other.ckpt"
    torch.save(checkpoint, bad)
    cfg = compose_eval([f"ckpt={bad}", "dataset=synthetic_lesion", *TINY[2:6]])
    with pytest.raises(ValueError, match="does not fit the model"):
        evaluate(cfg, tmp_path / "eval")


def test_resume_from_checkpoint_continues_training(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_train([*TINY, "dataset=synthetic_lesion", "trainer.max_epochs=3", f"ckpt_path={last}"])
    assert train(cfg, tmp_path / "resumed")["epochs_run"] == 3


@pytest.mark.slow
def test_multirun_sweep_runs_one_job_per_dataset(tmp_path):
    overrides = [o for o in TINY if not o.startswith("dataset.")]
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "dataset=synthetic_cardiac,synthetic_lesion",
        "trainer.max_epochs=1",
    ]
    cmd += [*overrides, f"hydra.sweep.dir={tmp_path}"]
    subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True)
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2


@pytest.mark.parametrize(
    ("fn", "epoch", "due"),
    [("fit", 0, False), ("fit", 1, True), ("fit", 2, False), ("fit", 4, True), ("validate", 0, True)],
)
def test_hd95_runs_every_n_epochs_and_at_the_last_in_training_and_always_when_scoring(fn, epoch, due):
    from types import SimpleNamespace

    from prato_exp.lightning.module import SegmentationModule

    nothing = torch.nn.Identity()
    module = SegmentationModule(nothing, nothing, torch.optim.SGD, class_names=["LV"], hd95_every_n_epochs=2)
    module._trainer = SimpleNamespace(
        state=SimpleNamespace(fn=fn), sanity_checking=False, current_epoch=epoch, max_epochs=5
    )
    assert module._hd95_due() is due


def test_recipe_table_reads_what_the_run_wrote(trained_run, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from recipe_table import main, recipe_row

    metrics = json.loads((trained_run / "metrics.json").read_text())
    row = recipe_row(trained_run)
    assert row["mean DSC"] == metrics["test"]["test/case/dsc_mean"]
    assert (row["batch"], row["epochs"], row["samples seen"]) == (4, 2, metrics["train_samples_seen"])
    assert row["samples seen"] == 2 * 2 * 4  # 8 slices, batch 4, drop_last: 2 steps per epoch
    assert row["augment"] == "Flip+Rotate+Zoom+ScaleIntensity+ShiftIntensity"
    assert main([str(trained_run), "--out", str(tmp_path / "t.md")]) == 0
    assert f"{metrics['test']['test/case/dsc_mean']:.4f}" in (tmp_path / "t.md").read_text()


def test_recipe_table_sets_a_plain_script_result_beside_the_runs(trained_run, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from recipe_table import main

    plain = {"model": "unetr", "epochs": 3, "samples_seen": 3936, "samples_per_second": 8.5,
             "val_mean_dsc_per_volume": 0.2245, "threads": 2, "seed": 0}  # fmt: skip
    (tmp_path / "plain_a.json").write_text(json.dumps(plain))
    assert main([str(trained_run), str(tmp_path / "plain_a.json"), "--out", str(tmp_path / "t.md")]) == 0
    plain_line = next(line for line in (tmp_path / "t.md").read_text().splitlines() if "plain script" in line)
    assert "| MONAI UNETR h192 128px | ACDC | 16 | 0.0003 |" in plain_line
    assert "| 3936 | 8.5000 |" in plain_line and "| 0.2245 |" in plain_line


def test_metrics_json_keeps_the_learning_curve(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert [p["epoch"] for p in metrics["val_history"]] == [1, 2]
    assert all(0.0 <= p["dsc_mean"] <= 1.0 for p in metrics["val_history"])


def test_last_checkpoint_holds_the_final_epoch_even_when_it_did_not_improve(tmp_path):
    # a monitored value that never changes improves once (epoch 0) and never again
    unchanging = ["pruning=percentile25", "checkpoint.monitor=val/sparsity", "checkpoint.mode=max"]
    cfg = compose_train([*TINY, "dataset=synthetic_lesion", "trainer.max_epochs=2", *unchanging])
    results = train(cfg, tmp_path / "run")
    best = torch.load(results["best_checkpoint"], weights_only=False)
    last = torch.load(results["last_checkpoint"], weights_only=False)
    assert Path(results["last_checkpoint"]).name == "last.ckpt"
    assert (best["epoch"], last["epoch"]) == (0, 1)
