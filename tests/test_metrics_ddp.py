"""Evaluation under DDP: with 2 CPU processes (gloo) every slice is scored once, as by 1 process.

The 2-process runs feed each rank a different shard of the same synthetic slices (a
``DistributedSampler`` shard with its padding duplicate, contiguous shards overlapping at their edges,
and one rank without data) and compare the gathered result with one process on all the data. They also
replay the old per-process ``SegmentationMeter`` (``log_dict(sync_dist=True)``: the mean of the ranks'
means; ``per_case`` of rank 0 only) and check that it differs, so the scenarios do expose the bug.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from prato_exp.metrics.segmentation import SegmentationMeter
from prato_exp.metrics.synced import CaseSegmentationMetric, ImageMeanMetric, stable_code

CLASSES = ["RV", "LV"]
WORLD = 2

Item = tuple[str, int, torch.Tensor, torch.Tensor, tuple[float, float] | None]


def _slice_pair(rng: random.Random, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(H, W)`` truth of random boxes per class and a prediction that shifts, drops or invents them."""
    truth = torch.zeros(h, w, dtype=torch.long)
    pred = torch.zeros(h, w, dtype=torch.long)
    for cls in (1, 2):
        r0, c0 = rng.randrange(h - 3), rng.randrange(w - 3)
        r1, c1 = r0 + rng.randint(1, 3), c0 + rng.randint(1, 3)
        dr, dc = rng.randint(-1, 1), rng.randint(-1, 1)
        in_truth, in_pred = rng.random() < 0.75, rng.random() < 0.75
        if in_truth:
            truth[r0:r1, c0:c1] = cls
        if in_pred:
            pred[max(r0 + dr, 0) : r1 + dr, max(c0 + dc, 0) : c1 + dc] = cls
    return pred, truth


def make_items() -> list[Item]:
    """11 slices of 4 cases in dataset order (an odd count, so a 2-way ``DistributedSampler`` pads);
    the last slice has no foreground at all."""
    rng = random.Random(0)
    layout = [("c0", 3, (12, 10), (1.5, 0.7)), ("c1", 4, (9, 11), None), ("c2", 1, (10, 10), None)]
    layout.append(("c3", 2, (8, 12), (1.0, 2.0)))
    items: list[Item] = []
    for case_id, n_slices, (h, w), spacing in layout:
        for z in range(n_slices):
            pred, truth = _slice_pair(rng, h, w)
            items.append((case_id, z, pred, truth, spacing))
    empty = torch.zeros(8, 12, dtype=torch.long)
    items.append(("c3", 2, empty, empty.clone(), (1.0, 2.0)))
    return items


def token_value(item: Item) -> float:
    """A per-image value standing in for a token statistic: the truth's foreground fraction, NaN if none."""
    fg = float((item[3] > 0).float().mean())
    return fg if fg > 0 else float("nan")


def shards(n: int) -> dict[str, list[list[int]]]:
    """Per scenario, the item indices each rank scores."""
    sampler = [
        list(DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=False)) for r in range(WORLD)
    ]
    half = n // 2
    return {
        "distributed_sampler": sampler,  # interleaved; rank 1 ends with item 0 again (padding)
        "overlapping_edges": [list(range(0, half + 1)), list(range(half - 1, n))],
        "one_rank_empty": [list(range(n)), []],
    }


def score(items: list[Item], metric: CaseSegmentationMetric, tokens: ImageMeanMetric, batch: int = 2) -> None:
    """Feed ``items`` to both metrics in batches, as ``SegmentationModule._eval_step`` does."""
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        ids, slices = [it[0] for it in chunk], [it[1] for it in chunk]
        metric.update(ids, slices, [it[2] for it in chunk], [it[3] for it in chunk], [it[4] for it in chunk])
        tokens.update("value", ids, torch.tensor(slices), torch.tensor([token_value(it) for it in chunk]))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        items = make_items()
        results: dict[str, Any] = {}
        for name, per_rank in shards(len(items)).items():
            mine = [items[i] for i in per_rank[rank]]
            metric, tokens = CaseSegmentationMetric(3, CLASSES), ImageMeanMetric()
            score(mine, metric, tokens)
            with warnings.catch_warnings():  # the empty rank's "compute before update"
                warnings.simplefilter("ignore")
                meter = metric.compute()
                token_means = tokens.compute()
            # the old module: one SegmentationMeter per process, log_dict(sync_dist=True) averaging the
            # processes' values, last_per_case from the process's own meter
            old = SegmentationMeter(3, CLASSES)
            for case_id, z, pred, truth, spacing in mine:
                old.update(case_id, z, pred, truth, spacing)
            gathered: list[Any] = [None] * WORLD
            dist.all_gather_object(gathered, old.compute())
            old_logged = {k: float(np.mean([g[k] for g in gathered])) for k in gathered[0]}
            results[name] = {
                "metrics": meter.compute(),
                "per_case": meter.per_case(),
                "tokens": token_means,
                "old_logged": old_logged,
                "old_per_case": old.per_case(),
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def same(a: Any, b: Any) -> bool:
    """Equal up to float rounding, NaN equal to NaN, for dicts, lists and scalars."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


def reference(items: list[Item]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """One ``SegmentationMeter`` on all the data (cases in sorted order, as the metric lists them)."""
    meter = SegmentationMeter(3, CLASSES)
    for case_id, z, pred, truth, spacing in sorted(items, key=lambda it: (it[0], it[1])):
        meter.update(case_id, z, pred, truth, spacing)
    values = [token_value(it) for it in items]
    return meter.compute(), meter.per_case(), {"value": float(np.nanmean(values))}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(shards(11)))
def test_two_processes_score_every_case_once_like_one_process(two_process_results, scenario):
    items = make_items()
    ref_metrics, ref_per_case, ref_tokens = reference(items)
    assert ref_metrics["counts/cases"] == 4 and ref_metrics["counts/slices"] == 11
    for rank, results in enumerate(two_process_results):
        got = results[scenario]
        assert same(got["metrics"], ref_metrics), f"rank {rank}"
        assert same(got["per_case"], ref_per_case), f"rank {rank}"
        assert same(got["tokens"], ref_tokens), f"rank {rank}"


@pytest.mark.parametrize("scenario", list(shards(11)))
def test_old_per_process_meters_get_these_scenarios_wrong(two_process_results, scenario):
    """Guards the scenarios: the replaced approach gives other metrics and misses cases on rank 0."""
    ref_metrics, ref_per_case, _ = reference(make_items())
    rank0 = two_process_results[0][scenario]
    old = {k: v for k, v in rank0["old_logged"].items() if not k.startswith("counts/")}
    assert not same(old, {k: v for k, v in ref_metrics.items() if not k.startswith("counts/")})
    if scenario != "one_rank_empty":  # there rank 0 saw every case, and only the logged means are wrong
        assert not same(rank0["old_per_case"], ref_per_case)


def test_one_process_metric_matches_segmentation_meter():
    items = make_items()
    metric, tokens = CaseSegmentationMetric(3, ["background", *CLASSES]), ImageMeanMetric()
    score(items, metric, tokens, batch=3)
    ref_metrics, ref_per_case, ref_tokens = reference(items)
    meter = metric.compute()
    assert same(meter.compute(), ref_metrics)
    assert same(meter.per_case(), ref_per_case)
    assert [r["case_id"] for r in meter.per_case()] == ["c0", "c1", "c2", "c3"]
    assert same(tokens.compute(), ref_tokens)


def test_repeated_slices_are_counted_once_keeping_the_first():
    items = make_items()
    metric, tokens = CaseSegmentationMetric(3, CLASSES), ImageMeanMetric()
    score(items, metric, tokens)
    case_id, z, _, truth, spacing = items[0]
    metric.update([case_id], [z], [truth], [truth], [spacing])  # a different prediction of a seen slice
    tokens.update("value", [case_id], [z], torch.tensor([123.0]))
    ref_metrics, ref_per_case, ref_tokens = reference(items)
    meter = metric.compute()
    assert same(meter.compute(), ref_metrics) and same(meter.per_case(), ref_per_case)
    assert same(tokens.compute(), ref_tokens)


def test_reset_and_compute_without_data():
    metric, tokens = CaseSegmentationMetric(3, CLASSES), ImageMeanMetric()
    score(make_items()[:2], metric, tokens)
    metric.reset()
    tokens.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meter = metric.compute()
        assert tokens.compute() == {}
    out = meter.compute()
    assert (out["counts/cases"], out["counts/slices"]) == (0, 0)
    assert math.isnan(out["case/dsc_mean"]) and meter.per_case() == []


def test_stable_code_is_a_fixed_63_bit_code():
    assert stable_code("patient001_frame01") == stable_code("patient001_frame01")
    assert stable_code("a") != stable_code("b")
    assert 0 <= stable_code("ISIC_0000000") < 2**63


class _DumpEval(pl.Callback):
    """Writes each rank's ``last_metrics`` / ``last_per_case`` of ``val`` (the spawned module is a copy)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"metrics": pl_module.last_metrics["val"], "per_case": pl_module.last_per_case["val"]}
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, allow_nan=True))


def test_lightning_ddp_spawn_validate_scores_every_case_once(tmp_path):
    """``trainer.validate`` with 2 CPU processes: ``last_per_case['val']`` holds every case once, on every
    rank, and the metrics equal those of a 1-process run of the same weights."""
    from conftest import compose_train  # here, so the spawned workers of the tests above skip Hydra
    from hydra.utils import instantiate

    from prato_exp.cli.common import build_datamodule
    from prato_exp.lightning.checkpoint import build_net
    from prato_exp.lightning.module import SegmentationModule

    cfg = compose_train(
        [
            "model.img_size=32",
            "dataset.num_train=2",
            "dataset.num_val=3",
            "dataset.size=32",
            "+dataset.slices_per_case=3",  # 9 slices: shards 5 + 4, padded with a repeat of slice 0
            "datamodule.eval_batch_size=2",
            "logger=none",
        ]
    )
    pl.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = SegmentationModule(
        net=build_net(cfg.model, datamodule.source),
        loss=instantiate(cfg.loss),
        optimizer=torch.optim.AdamW,
        class_names=datamodule.source.class_names,
    )
    common = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    pl.Trainer(devices=1, **common).validate(module, datamodule=datamodule, verbose=False)
    one_metrics, one_per_case = module.last_metrics["val"], module.last_per_case["val"]

    trainer = pl.Trainer(devices=2, strategy="ddp_spawn", callbacks=[_DumpEval(str(tmp_path))], **common)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val_ids = datamodule.source.split_ids()["val"]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [row["case_id"] for row in record["per_case"]] == sorted(val_ids)
        assert [row["num_slices"] for row in record["per_case"]] == [3, 3, 3]
        assert record["metrics"]["val/counts/slices"] == 9
        assert same(record["per_case"], one_per_case)
        for key, value in one_metrics.items():
            assert value == pytest.approx(record["metrics"][key], rel=1e-6, abs=1e-9, nan_ok=True), key
