"""scripts/score_distribution.py: score quantiles and the fraction above each fixed tau, known answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from prato_exp.cli.common import check_run_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "score_distribution.py"
spec = importlib.util.spec_from_file_location("score_distribution", SCRIPT)
scores_script = importlib.util.module_from_spec(spec)
sys.modules["score_distribution"] = scores_script
spec.loader.exec_module(scores_script)


def test_fraction_above_each_tau_counts_strictly_greater_scores():
    scores = torch.tensor([[0.05, 0.1, 0.25, 0.6], [0.15, 0.3, 0.5, 0.9]])
    assert scores_script.summarise_scores(scores).above == (0.75, 0.625, 0.375, 0.25)


def test_quantiles_of_evenly_spread_scores_are_their_levels():
    scores = torch.linspace(0, 1, 101)[None]
    assert scores_script.summarise_scores(scores).quantiles == (0.05, 0.25, 0.5, 0.75, 0.95)


def test_first_point_scores_has_one_row_per_slice_and_one_column_per_grid_token():
    net = check_run_config(compose_train(["pruning=percentile25", "model.img_size=64"]))
    batch = {
        "image": torch.randn(3, 1, 64, 64),
        "box_xyxy": torch.tensor([[8.0, 8.0, 40.0, 40.0]] * 3),
        "prune_enabled": torch.ones(3, dtype=torch.bool),
    }
    scores = scores_script.first_point_scores(net, [batch, batch])
    assert scores.shape == (6, 16) and bool(((scores >= 0) & (scores <= 1)).all())


def test_an_unpruned_network_is_refused_by_name():
    net = check_run_config(compose_train(["pruning=none", "model.img_size=64"]))
    batch = {
        "image": torch.randn(1, 1, 64, 64),
        "box_xyxy": torch.tensor([[8.0, 8.0, 40.0, 40.0]]),
        "prune_enabled": torch.ones(1, dtype=torch.bool),
    }
    with pytest.raises(ValueError, match="pruned nothing"):
        scores_script.first_point_scores(net, [batch])


def test_epoch_sparsity_reads_the_validation_lines_of_a_train_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "[x][prato_exp.lightning.module][INFO] - epoch 0 val: mean DSC 0.0, IoU 0.0, HD95 - (per case), "
        "sparsity 0.984\nother line\n"
        "[x][prato_exp.lightning.module][INFO] - epoch 1 val: mean DSC 0.1, IoU 0.05, HD95 9.1 (per case), "
        "sparsity 0.723\n"
    )
    assert scores_script.epoch_sparsity(log) == [(0, 0.984), (1, 0.723)]
