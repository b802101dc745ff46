"""Nothing silent: bad data, bad boxes, bad config values, non-finite losses, resume and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train
from test_data_acdc import _make_h5_root
from test_train_e2e import TINY

from prato_exp.cli.train import train
from prato_exp.data.acdc import ACDCSource
from prato_exp.data.base import DataContentError
from prato_exp.data.prompts import BoxError, sanitize_boxes
from prato_exp.lightning.callbacks import NonFiniteLossError
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.models.weights import load_pretrained
from prato_exp.pruning.prato import PrATo

# --- data --------------------------------------------------------------------------------------------


def _poison(path: Path, index: tuple) -> None:
    with h5py.File(path, "r+") as f:
        image = f["image"][()]
        image[index] = np.nan
        del f["image"]
        f.create_dataset("image", data=image)


def test_a_nan_patch_in_a_training_slice_names_the_file(tmp_path):
    root = _make_h5_root(tmp_path)
    _poison(root / "data/slices/patient001_frame01_slice_2.h5", (slice(2, 5), slice(2, 5)))
    source = ACDCSource(root)
    with pytest.raises(DataContentError, match=r"patient001_frame01_slice_2\.h5: image has 9 NaN/inf value"):
        for ref in source.train_slices():
            source.load_slice(ref)


def test_an_inf_in_a_validation_volume_names_the_file_and_slice(tmp_path):
    root = _make_h5_root(tmp_path)
    _poison(root / "data" / "patient003_frame02.h5", (2, 0, 0))
    source = ACDCSource(root)
    with pytest.raises(
        DataContentError, match=r"patient003_frame02\.h5: image has 1 NaN/inf value\(s\), first in slice 2"
    ):
        source.load_case("patient003_frame02")


# --- boxes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([float("nan"), 2, 10, 10], r"box \(nan, 2, 10, 10\) of image 'scan7' is not finite"),
        ([2, 2, float("inf"), 10], r"of image 'scan7' is not finite"),
        ([20, 2, 10, 10], r"box \(20, 2, 10, 10\) of image 'scan7' has x1 < x0 or y1 < y0"),
        ([200, 200, 220, 220], r"of image 'scan7' lies wholly outside the image \(H=64, W=64\)"),
        ([0.1, 0.2, 0.6, 0.9], r"box \(0.1, 0.2, 0.6, 0.9\) of image 'scan7' looks like 0-1 normalised"),
    ],
)
def test_each_bad_box_is_an_error_naming_the_image_and_the_box(box, message):
    with pytest.raises(BoxError, match=message):
        sanitize_boxes(torch.tensor([box]), (64, 64), ["scan7"])


def test_a_normalised_looking_box_passes_where_pixels_are_known():
    out = sanitize_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), (64, 64), check_normalised=False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_a_nan_box_reaching_prato_is_an_error_not_a_crash():
    pruner = PrATo(dim=8).eval()
    with pytest.raises(ValueError, match="box prompts must be finite"):
        pruner(torch.randn(1, 16, 8), (4, 4), torch.tensor([[float("nan"), 0.0, 8.0, 8.0]]), (64, 64))


def test_datamodule_boxes_go_through_the_box_validation(monkeypatch):
    from prato_exp.cli.common import build_datamodule
    from prato_exp.lightning import datamodule as dm

    seen = []
    original = dm.sanitize_boxes

    def spy(*args, **kwargs):
        seen.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(dm, "sanitize_boxes", spy)
    datamodule = build_datamodule(compose_train(TINY))
    datamodule.setup("fit")
    datamodule.train_set[0]
    datamodule.eval_set("val")[0]
    assert len(seen) == 2 and all(" slice " in ids[0] for ids in seen)


# --- config values, checked before any data is read ---------------------------------------------------

MISSING_DATA = [
    *(o for o in TINY if not o.startswith("dataset.")),
    "dataset=acdc",
    "dataset.root=/nonexistent/acdc",
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pruning=percentile25", "pruning.mode=dorp"], r"pruning.mode must be one of .*got 'dorp'"),
        (["pruning=percentile25", "pruning.fill=mean"], r"pruning.fill must be one of"),
        (["pruning=percentile25", "pruning.budget.rule=otsu"], r"pruning.budget.rule must be one of"),
        (["pruning=percentile25", "pruning.query=crop"], r"pruning.query must be one of"),
        (["pruning=percentile25", "pruning.budget.q=120"], r"pruning.budget.q \(percentile\) must lie in"),
        (
            ["pruning=percentile25", "threshold=fixed0.3", "pruning.budget.tau=1.5"],
            r"budget.tau .* must lie in",
        ),
        (
            ["pruning=percentile25", "pruning.budget.tau=0.3"],
            r"pruning.budget.tau=0.3 is not used with rule=percentile",
        ),
        (["pruning=percentile25", "pruning.budget.min_keep=0"], r"pruning.budget.min_keep must be >= 1"),
        (["pruning=dtop", "threshold=percentile50"], r"pruning.budget is not a setting of .*DToPPruner"),
        (["pruning=random", "+pruning.k=7"], r"pruning.k is not a setting of .*RandomPruner; its settings"),
        (["pruning=random", "threshold=fixed0.3"], r"pruning=random keeps a fixed token count"),
        (["prompt.condition=tihgt"], r"unknown box condition 'tihgt'"),
        (["eval_checkpoint=best_ever"], r"eval_checkpoint must be one of \('auto', 'best', 'last'\)"),
        (["+trainer.limit_val_batches=0"], r"trainer.limit_val_batches=0 is not supported"),
    ],
)
def test_a_bad_config_value_fails_before_the_data_is_looked_at(tmp_path, overrides, message):
    cfg = compose_train([*MISSING_DATA, *overrides])
    with pytest.raises(Exception, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_missing_data_folder_itself_is_the_error_once_the_config_is_valid(tmp_path):
    with pytest.raises(Exception, match=r"/nonexistent/acdc does not exist\. Expected"):
        train(compose_train(MISSING_DATA), tmp_path / "run")


# --- non-finite loss ---------------------------------------------------------------------------------


class _NaNAfter(torch.nn.Module):
    """Wraps a net and makes its logits NaN from the ``after``-th training call on."""

    def __init__(self, net: torch.nn.Module, after: int) -> None:
        super().__init__()
        self.net, self.after, self.calls = net, after, 0
        self.pruners = net.pruners

    def pruned_part(self) -> list[str]:
        return self.net.pruned_part()

    def forward(self, image, box_xyxy, prune_enabled=None):
        out = self.net(image, box_xyxy, prune_enabled)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out.logits = out.logits * float("nan")
        return out


def test_a_non_finite_loss_stops_the_run_naming_step_and_cases(tmp_path, monkeypatch):
    import prato_exp.cli.train as train_cli

    real_check = train_cli.check_run_config
    monkeypatch.setattr(train_cli, "check_run_config", lambda cfg: _NaNAfter(real_check(cfg), after=2))
    cfg = compose_train([*TINY, "trainer.max_epochs=2"])
    with pytest.raises(
        NonFiniteLossError, match=r"training loss is nan at global step 2 .*cases \(case:slice\): "
    ):
        train(cfg, tmp_path / "run")
    kept = tmp_path / "run" / "checkpoints" / "before-nonfinite.ckpt"
    state = torch.load(kept, weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()


# --- pretrained weights ------------------------------------------------------------------------------


def _tiny_unetr(out_channels: int = 3) -> PrunableUNETR:
    return PrunableUNETR(
        1, out_channels, img_size=32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2
    )


def test_pretrained_weights_of_another_head_are_refused_with_the_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_tiny_unetr(out_channels=5).unetr.state_dict(), path)
    with pytest.raises(
        ValueError, match=r"of another shape: \['out.conv.conv.weight \(5, 4, 1, 1\) vs \(3, 4, 1, 1\)"
    ):
        load_pretrained(_tiny_unetr().unetr, path)


def test_a_partial_load_needs_the_keys_named_and_loads_the_rest(tmp_path):
    source = _tiny_unetr(out_channels=5).unetr
    path = tmp_path / "w.pt"
    state = source.state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    target = _tiny_unetr().unetr
    with pytest.raises(ValueError, match=r"1 unknown to the model: \['extra.weight'\]"):
        load_pretrained(target, path, ignore=["out.*"])
    load_pretrained(target, path, ignore=["out.*", "extra.*"])
    torch.testing.assert_close(
        target.vit.patch_embedding.position_embeddings, source.vit.patch_embedding.position_embeddings
    )


# --- determinism and resume --------------------------------------------------------------------------

DETERMINISM = [*TINY, "pruning=random", "model.img_size=32", "trainer.max_epochs=3", "eval_checkpoint=last"]


def _final_metrics(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {"val": metrics["val"], "test": metrics["test"], "per_case": metrics["per_case"]}


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("determinism") / "unbroken"
    train(compose_train(DETERMINISM), run)
    return run


def test_two_runs_with_one_seed_give_identical_metrics(unbroken_run, tmp_path):
    train(compose_train(DETERMINISM), tmp_path / "again")
    assert _final_metrics(tmp_path / "again") == _final_metrics(unbroken_run)


def test_a_run_killed_mid_epoch_and_resumed_ends_where_the_unbroken_run_ends(unbroken_run, tmp_path):
    killed = tmp_path / "killed"
    cfg = compose_train(
        [*DETERMINISM, "+callbacks.kill._target_=test_reliability.Interrupt", "+callbacks.kill.at_step=5"]
    )
    with pytest.raises(InterruptedError, match="killed at step 5"):
        train(cfg, killed)
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    train(compose_train([*DETERMINISM, f"ckpt_path={last}"]), tmp_path / "resumed")
    assert _final_metrics(tmp_path / "resumed") == _final_metrics(unbroken_run)


class Interrupt(pl.Callback):
    """Stands in for a kill: raises at the start of global step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise InterruptedError(f"killed at step {self.at_step}")
