"""Table presets: composition does what the files say, every preset sweeps its table's rows and seeds, and
one preset runs end to end on the phantoms into ``prato-report``."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import compose_eval, compose_train, group_choices
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from prato_exp.cli.common import CONFIG_DIR
from prato_exp.report.cli import report
from prato_exp.report.tables import paper_spec

REPO = Path(__file__).resolve().parents[1]
TABLES = [c for c in group_choices("experiment") if c.startswith("table")]


def _set_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf key a YAML file sets (dotted), leaving out its defaults list and Hydra's own settings."""
    if not isinstance(node, dict):
        return {prefix: node}
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        if not prefix and key in ("defaults", "hydra"):
            continue
        leaves.update(_set_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def _preset_files() -> list[tuple[str, str]]:
    return [(group, choice) for group in ("experiment", "scale", "row") for choice in group_choices(group)]


@pytest.mark.parametrize(("group", "choice"), _preset_files(), ids=lambda v: str(v))
def test_every_key_a_preset_sets_survives_composition(group, choice):
    """lightning-hydra-template's rule: `_self_` first in train.yaml, so no preset value is overridden."""
    leaves = _set_keys(yaml.safe_load((CONFIG_DIR / group / f"{choice}.yaml").read_text()) or {})
    composed = _set_keys(OmegaConf.to_container(compose_train([f"{group}={choice}"]), resolve=False))
    assert leaves, f"{group}/{choice}.yaml sets no key"
    for key, value in leaves.items():
        assert composed.get(key) == value, f"{group}={choice}: {key}"


def test_the_ci_recipe_keys_of_scale_cpu_reach_the_run():
    cfg = compose_train(["experiment=table4_pruners"])
    assert (cfg.datamodule.batch_size, cfg.optimizer.lr, cfg.trainer.max_epochs) == (16, 3e-4, 15)
    assert cfg.model.img_size == 128 and cfg.model.hidden_size == 192
    assert [t._target_.rsplit(".", 1)[-1] for t in cfg.augment.transforms] == ["RandFlipd", "RandFlipd"]


def test_a_command_line_value_wins_over_the_experiment():
    cfg = compose_train(["experiment=table4_pruners", "datamodule.batch_size=4", "trainer.max_epochs=2"])
    assert (cfg.datamodule.batch_size, cfg.trainer.max_epochs) == (4, 2)


def test_the_fast_preset_fills_its_budget_with_the_box_and_its_reference_has_no_pruner():
    fast = compose_train(["experiment=fast", "dataset=acdc"])
    assert fast.pruning.box_first is True and fast.pruning.budget.q == 50
    assert list(fast.model.prune_after) == [2, 4] and fast.model.decoder_window == 0
    reference = compose_train(["experiment=fast", "dataset=acdc", "pruning=none"])
    assert reference.pruning._target_.endswith("NoPruner") and "box_first" not in reference.pruning


@pytest.mark.parametrize(("dataset", "lr"), [("acdc", 1e-3), ("isic", 3e-4), ("synthetic_cardiac", 1e-3)])
def test_the_cnn_row_takes_its_learning_rate_per_dataset(dataset, lr):
    assert compose_train(["row=basic_unet", f"dataset={dataset}"]).optimizer.lr == lr


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_the_cnn_row_of_an_isic_table_runs_at_the_isic_rate(scale):
    overrides = ["experiment=table4_pruners", "dataset=isic", f"scale={scale}"]
    assert compose_train([*overrides, "row=basic_unet"]).optimizer.lr == 3e-4
    assert compose_train([*overrides, "row=prato"]).optimizer.lr == (3e-4 if scale == "cpu" else 1e-4)


def test_no_row_composes_without_a_row_dataset_setting():
    assert compose_train(["dataset=isic", "scale=cpu"]).optimizer.lr == 3e-4


def _sweep(experiment: str) -> dict[str, list[str]]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize(
    ("overrides", "subdir"),
    [
        (["experiment=table2_thresholds", "threshold=fixed0.1"], "7_unetr_small_acdc_percentile25_fixed0.1"),
        (["experiment=table4_pruners", "row=box_channel"], "7_unetr_small_acdc_none_box_channel"),
        (["experiment=table4_pruners", "row=dynamicvit"], "7_unetr_small_acdc_dynamicvit"),
    ],
)
def test_a_sweep_job_folder_names_the_threshold_and_row_it_ran(overrides, subdir):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.job.num = 7
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.hydra.sweep.subdir == subdir
        assert str(cfg.hydra.run.dir).endswith(subdir.removeprefix("7"))
    finally:
        HydraConfig.instance().cfg = None


def _jobs(experiment: str) -> list[Any]:
    """The composed config of every job of a table preset's sweep (what `-m` launches)."""
    params = _sweep(experiment)
    jobs = []
    for values in itertools.product(*params.values()):
        overrides = [f"{k}={v}" for k, v in zip(params, values, strict=True)]
        jobs.append(compose_train([f"experiment={experiment}", *overrides]))
    return jobs


EXPECTED_ROWS = {
    "table1_components": {"PrATo (ours)", "w/o entropy weighting", "naive crop"},
    "table2_thresholds": {"q=25", "q=50", "q=75", "tau=0.1", "tau=0.2", "tau=0.3", "tau=0.5"},
    "table3_roialign_k": {"k=3", "k=5", "k=7", "k=9"},
    "table4_pruners": {
        "BasicUNet (CNN reference)",
        "unpruned",
        "unpruned + box channel",
        "Random",
        "DynamicViT",
        "EvoViT",
        "DToP",
        "STP",
        "TRAM",
        "PrATo (ours)",
    },
    "table5_backbones": {
        f"{name}{suffix}"
        for name in ("UNETR", "TransUNet", "Swin UNETR", "SegFormer")
        for suffix in ("", " + PrATo", " + box channel")
    },
}


def test_every_table_has_a_preset():
    assert set(TABLES) == set(EXPECTED_ROWS)


@pytest.mark.parametrize("experiment", TABLES)
def test_table_preset_sweeps_its_rows_over_seeds_0_1_2(experiment):
    jobs = _jobs(experiment)
    rows: dict[str, set[int]] = {}
    for cfg in jobs:
        assert cfg.report.table == experiment and cfg.report.scale == "cpu"
        rows.setdefault(cfg.report.row, set()).add(cfg.seed)
    assert set(rows) == EXPECTED_ROWS[experiment]
    assert all(seeds == {0, 1, 2} for seeds in rows.values())
    references = {cfg.report.reference_row for cfg in jobs}
    assert references <= set(rows) or experiment == "table5_backbones"


@pytest.mark.parametrize("experiment", sorted(EXPECTED_ROWS))
def test_every_row_a_preset_makes_has_its_place_in_the_paper_order(experiment):
    """A row missing from ``paper_values.yaml`` would be published after the paper's rows, out of place."""
    assert EXPECTED_ROWS[experiment] <= set(paper_spec(experiment)["rows"])


def test_table5_compares_each_backbone_with_its_own_prato_row():
    for cfg in _jobs("table5_backbones"):
        assert cfg.report.reference_row.endswith(" + PrATo")
        assert cfg.report.reference_row.split(" + ")[0] == cfg.report.row.split(" + ")[0]


def test_pruner_rows_of_table4_prune_and_the_control_rows_do_not():
    for cfg in _jobs("table4_pruners"):
        unpruned = cfg.pruning._target_.endswith("NoPruner")
        controls = {"BasicUNet (CNN reference)", "unpruned", "unpruned + box channel"}
        assert unpruned == (cfg.report.row in controls), cfg.report.row
        assert cfg.box_channel == (cfg.report.row == "unpruned + box channel")


def test_table6_rescoring_sweeps_the_four_prompt_conditions():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="eval", overrides=["rescore=table6_prompts", "ckpt=x"], return_hydra_config=True
        )
    assert str(cfg.hydra.sweeper.params.prompt).split(",") == ["tight", "oversized", "partial", "misleading"]
    for condition in ("tight", "misleading"):
        run = compose_eval(["rescore=table6_prompts", "ckpt=x", f"prompt={condition}"])
        assert OmegaConf.to_container(run.report, resolve=True)["row"] == condition


# --------------------------------------------------------------------------------------------------------
# end to end: `python train.py -m experiment=table3_roialign_k` at a tiny budget, then prato-report

TINY = [
    "dataset=synthetic_cardiac",
    "model.img_size=32",
    "datamodule.batch_size=4",
    "dataset.num_train=8",
    "dataset.num_val=3",
    "dataset.num_test=0",
    "dataset.size=48",
    "trainer.max_epochs=1",
    "efficiency.flop_images=1",
    "efficiency.latency_warmup=1",
    "efficiency.latency_repeats=2",
    "logger=none",
]


@pytest.fixture(scope="module")
def table3_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("table3") / "multirun"
    command = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=table3_roialign_k",
        "pruning.k=3,5",
        "seed=0,1",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["row"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_table3_preset_runs_and_the_report_cells_are_the_runs_mean_and_std(table3_sweep, tmp_path):
    metrics = [json.loads(p.read_text()) for p in sorted(table3_sweep.glob("*/metrics.json"))]
    assert len(metrics) == 4
    result = report([table3_sweep], tmp_path / "report")
    table = _csv_rows(tmp_path / "report" / "table3_roialign_k_synthetic_cardiac.csv")
    assert set(table) == {"k=3", "k=5"}
    for row in ("k=3", "k=5"):
        runs = [m for m in metrics if m["report"]["row"] == row]
        assert sorted(m["seed"] for m in runs) == [0, 1]
        for column in ("dsc_mean", "hd95_mean", "dsc/LV"):
            values = np.array([m["val"][f"val/case/{column}"] for m in runs])
            assert float(table[row][f"{column}_mean"]) == pytest.approx(values.mean(), abs=5e-4)
            assert float(table[row][f"{column}_std"]) == pytest.approx(values.std(ddof=1), abs=5e-4)
        assert float(table[row]["sparsity_mean"]) == pytest.approx(
            np.mean([m["val"]["val/sparsity"] for m in runs]), abs=5e-4
        )
        assert table[row]["n_seeds"] == "2"
    markdown = (tmp_path / "report" / "table3_roialign_k_synthetic_cardiac.md").read_text()
    assert "oracle boxes from the ground truth" in markdown and "final-epoch weights" in markdown
    assert any(f.stem.name.startswith("fig3") or f.stem.name.startswith("fig7") for f in result["figures"])


def test_the_decoder_window_sweep_tests_each_window_against_the_dense_decoder_of_its_condition():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="eval", overrides=["rescore=decoder_window", "ckpt=x"], return_hydra_config=True
        )
    assert str(cfg.hydra.sweeper.params.decoder_window).split(",") == ["dense", "0", "1"]
    run = compose_eval(["rescore=decoder_window", "ckpt=x", "prompt=partial", "decoder_window=1"])
    report = OmegaConf.to_container(run.report, resolve=True)
    assert (report["row"], report["reference_row"]) == ("partial, decoder 1", "partial, decoder dense")


# --------------------------------------------------------------------------------------------------------
# rows shared between tables (src/prato_exp/report/shared_rows.yaml)

SELECT_ROW = {
    ("table1_components", "PrATo (ours)"): ["row=prato"],
    ("table2_thresholds", "q=25"): ["threshold=percentile25"],
    ("table3_roialign_k", "k=5"): ["pruning.k=5"],
    ("table4_pruners", "PrATo (ours)"): ["row=prato"],
    ("table4_pruners", "unpruned"): ["row=unpruned"],
    ("table4_pruners", "unpruned + box channel"): ["row=box_channel"],
    ("table5_backbones", "UNETR + PrATo"): ["row=prato"],
    ("table5_backbones", "UNETR"): ["row=unpruned"],
    ("table5_backbones", "UNETR + box channel"): ["row=box_channel"],
}
"""The overrides that pick each shared row out of its preset's sweep."""
UNETR_OF_SCALE = {"cpu": "unetr_small", "paper": "unetr"}


def _shared_member_config(table: str, row: str, dataset: str, scale: str) -> tuple[dict, dict]:
    overrides = [f"experiment={table}", f"dataset={dataset}", f"scale={scale}", "seed=1"]
    overrides += SELECT_ROW[(table, row)]
    if table == "table5_backbones":
        overrides.append(f"model={UNETR_OF_SCALE[scale]}")
    cfg = OmegaConf.to_container(compose_train(overrides), resolve=True)
    return cfg, cfg.pop("report")


@pytest.mark.parametrize("dataset", ["acdc", "isic"])
@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_rows_declared_shared_are_one_configuration_in_every_table(dataset, scale):
    from prato_exp.report.tables import shared_row_sets

    for members in shared_row_sets():
        configs = []
        for member in members:
            cfg, report_block = _shared_member_config(member.table, member.row, dataset, scale)
            assert (report_block["table"], report_block["row"]) == (member.table, member.row)
            assert report_block["reference_row"] == member.reference_row
            configs.append(cfg)
        for member, cfg in zip(members[1:], configs[1:], strict=True):
            assert cfg == configs[0], f"{member} differs from {members[0]}"


def test_every_shared_row_is_picked_by_a_known_override():
    from prato_exp.report.tables import shared_row_sets

    assert {(m.table, m.row) for members in shared_row_sets() for m in members} == set(SELECT_ROW)
