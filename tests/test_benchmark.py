"""scripts/benchmark.py: one run over several backbones, refusals as rows, per-configuration memory."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _module():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _peak(pruning: str) -> float:
    config = json.dumps({"model": "unetr_small", "pruning": pruning, "mode": None})
    command = [sys.executable, str(SCRIPT), "--peak-of", config, "--peak-batch", "4", "--images", "2"]
    command += ["--threads", "1", "--override", "model.decoder_window=0", "model.prune_after=[2]"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peak memory needs Linux /proc")
def test_peak_memory_is_each_configurations_own():
    # q = 75 after block 2 with the decoder windowed on the box: far less activation memory than unpruned
    assert _peak("percentile75") < 0.8 * _peak("none")


def test_one_run_covers_several_backbones_refusals_and_stages(tmp_path):
    benchmark = _module()
    args = ["--models", "unetr_small", "swin_unetr_small", "--pruning", "percentile50", "evovit"]
    args += ["--input-size", "64", "--batch-sizes", "1", "--repeats", "1", "--rounds", "1", "--warmup", "0"]
    args += ["--images", "1", "--threads", "1", "--no-peak-memory", "--out", str(tmp_path / "bench")]
    assert benchmark.main(args) == 0
    rows = {(r["model"], r["pruning"]): r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows[("swin_unetr_small", "evovit")]["status"].startswith("refused: EvoViTPruner cannot run")
    assert rows[("unetr_small", "evovit")]["status"] == "ok"
    pruned = rows[("swin_unetr_small", "percentile50")]
    assert pruned["part_time_ratio_b1_fp32"] > 0 and pruned["flop_ratio"] < 1
    assert pruned["stage3_pruned"] > 0 and 0 < pruned["stage3_tokenwise_saved"] < 1
    noise = rows[("unetr_small", "none (A/A)")]  # a copy of the unpruned model: same FLOPs, timed apart
    assert noise["flop_ratio"] == 1 and noise["time_ratio_b1_fp32"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "## swin_unetr_small" in table and "Per stage (swin_unetr_small)" in table


def test_part_time_counts_the_glue_between_part_modules_and_not_other_modules():
    import time

    import torch
    from torch import nn

    class Sleep(nn.Module):
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            time.sleep(self.seconds)
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Identity(), nn.Identity()
            self.decoder = Sleep(0.08)

        def forward(self, x):
            x = self.first(x)
            time.sleep(0.04)  # glue inside the part's span: counts
            x = self.decoder(x)  # a module outside the part inside the span: taken off
            x = self.second(x)
            time.sleep(0.08)  # after the part's last module: not the part's
            return x

    net = Net()
    timer = _module().PartTimer(net, ["first", "second"], torch.device("cpu"))
    timer.start()
    net(torch.zeros(1))
    part = timer.stop()
    timer.remove()
    assert 0.04 <= part < 0.075


def test_an_entrys_own_overrides_win_over_the_runs():
    benchmark = _module()
    entry = benchmark.Config("unetr_small", "prato@fixed0.5+model.prune_after=[1,2]", None)
    net = benchmark.build(entry, 64, ["model.prune_after=[3]", "model.decoder_window=1"])
    assert list(net.prune_after) == [1, 2] and net.decoder_window == 1
    assert net.pruners["1"].budget.tau == 0.5


@pytest.mark.parametrize("entry", ["+model.decoder_window=1", "percentile50+decoder_window"])
def test_a_malformed_entry_names_itself_and_the_grammar(entry):
    benchmark = _module()
    with pytest.raises(SystemExit, match=r"PRESET\[@THRESHOLD\]\[\+KEY=VALUE"):
        benchmark.Config("unetr_small", entry, None).overrides(64)


def test_each_rows_part_time_is_against_the_same_modules_unpruned(tmp_path):
    benchmark = _module()
    args = ["--models", "unetr_small", "--pruning", "percentile50", "percentile50+model.prune_after=[1]"]
    args += ["--input-size", "64", "--batch-sizes", "1", "--repeats", "1", "--rounds", "1", "--warmup", "0"]
    args += ["--images", "1", "--threads", "1", "--no-peak-memory", "--no-noise-row"]
    args += ["--out", str(tmp_path / "bench")]
    assert benchmark.main(args) == 0
    rows = {r["pruning"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    late, early = rows["percentile50"], rows["percentile50+model.prune_after=[1]"]
    # the unpruned FLOPs of each row's own part: blocks 2-12 against blocks 4-12
    assert early["ref_part_gflops"] == pytest.approx(late["ref_part_gflops"] * 11 / 9, rel=1e-6)
    assert early["part_flop_ratio"] < 0.6 and late["part_flop_ratio"] < 0.6  # each halves its own part
    assert early["part_time_ratio_b1_fp32"] is not None and late["part_time_ratio_b1_fp32"] is not None


def test_per_image_flops_of_a_batch_equal_the_batch1_mean_when_every_image_keeps_the_same_count():
    import statistics

    benchmark = _module()
    net = benchmark.build(benchmark.Config("unetr_small", "percentile50", None), 64, [])
    images, boxes = benchmark.phantom_batch(64, 2)
    batch1_mean = statistics.fmean(r.total_flops for r in benchmark.flop_reports(net, images, boxes)) / 1e9
    per_image = benchmark.batch_flops(net, images, boxes, [1, 4])
    assert list(per_image) == ["gflops_per_img_b4"]  # batch 1 is the `gflops` column
    assert per_image["gflops_per_img_b4"] == pytest.approx(batch1_mean, rel=1e-9)


def test_rounds_alternate_direction_so_no_configuration_always_runs_first():
    benchmark = _module()
    assert [benchmark.round_order(3, k) for k in range(3)] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_time_ratio_pairs_rounds_so_a_drift_between_rounds_cancels():
    benchmark = _module()
    reference = [100.0, 200.0, 400.0, 800.0, 1600.0]  # the machine slows down round by round
    ratio, low, high = benchmark.paired_ratio([0.9 * t for t in reference], reference)
    assert ratio == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(0.9)
    # per-round ratios 0.9, 1.1, 1.0, 1.1, 0.9: their median, and an interval that shows their spread
    ratio, low, high = benchmark.paired_ratio([90.0, 220.0, 400.0, 880.0, 1440.0], reference)
    assert ratio == pytest.approx(1.0) and low == pytest.approx(0.9) and high == pytest.approx(1.1)
