"""3-D HD95 per volume: known distances, spacing in mm, the empty-mask table, and the train.py wiring."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_train

from prato_exp.cli.train import train
from prato_exp.metrics.volume import hd95_volume, summarise_volume_hd95, volume_diagonal


def _cube(z0: int) -> torch.Tensor:
    volume = torch.zeros(12, 16, 16, dtype=torch.long)
    volume[z0 : z0 + 4, 4:10, 4:10] = 1
    return volume


def test_a_volume_shifted_two_slices_is_two_voxels_away():
    assert hd95_volume(_cube(4), _cube(2), num_classes=2)[0] == pytest.approx(2.0)


def test_slice_spacing_turns_the_shift_into_millimetres():
    assert hd95_volume(_cube(4), _cube(2), 2, spacing_dhw=(5.0, 1.2, 1.2))[0] == pytest.approx(10.0)


def test_a_missed_class_scores_the_volume_diagonal_and_an_absent_one_is_excluded():
    target = _cube(2)
    target[0, 0, 0] = 2  # class 2 present in the truth only; class 3 absent from both
    values = hd95_volume(_cube(2), target, num_classes=4, spacing_dhw=(10.0, 1.0, 1.0))
    assert values[0] == 0.0
    assert values[1] == pytest.approx(volume_diagonal((12, 16, 16), (10.0, 1.0, 1.0)))
    assert math.isnan(values[2])


def test_summary_averages_cases_per_class_then_classes():
    rows = {"a": {"hd95_3d/RV": 2.0, "hd95_3d/LV": float("nan")}, "b": {"hd95_3d/RV": 4.0, "hd95_3d/LV": 6.0}}
    summary = summarise_volume_hd95(rows, ["RV", "LV"])
    assert summary == {"case/hd95_3d/RV": 3.0, "case/hd95_3d/LV": 6.0, "case/hd95_3d_mean": 4.5}


def _value(v: float | None) -> float:
    return np.nan if v is None else v  # metrics.json writes NaN as null


def test_training_on_volumes_writes_3d_hd95_per_case_and_its_unit(tmp_path):
    cfg = compose_train(
        [
            "dataset=synthetic_cardiac",
            "model.img_size=32",
            "datamodule.batch_size=4",
            "dataset.num_train=4",
            "dataset.num_val=2",
            "dataset.num_test=2",
            "dataset.size=48",
            "+dataset.slices_per_case=3",
            "efficiency.flop_images=1",
            "efficiency.latency_repeats=2",
            "logger=none",
            "+trainer.fast_dev_run=true",
        ]
    )
    train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["test/hd95_3d_unit"] == "voxels"  # phantoms carry no spacing
    rows = metrics["per_case"]["test"]
    per_case = [row["hd95_3d_mean"] for row in rows if row.get("hd95_3d_mean") is not None]
    assert len(per_case) == 2
    assert metrics["test"]["test/case/hd95_3d_mean"] == pytest.approx(
        np.nanmean([np.nanmean([_value(r[f"hd95_3d/{c}"]) for r in rows]) for c in ("RV", "Myo", "LV")])
    )
