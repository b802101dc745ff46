import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prato_exp.metrics.efficiency import count_flops, measure_latency


class Attention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, c)


class EncDec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.decoder = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)
        for block in self.blocks:
            x = block(x)
        return self.decoder(x)


def test_linear_flops_count_a_multiply_add_as_two():
    report = count_flops(nn.Linear(8, 4), torch.randn(1, 8))
    assert report.total_flops == 64
    assert report.gmacs == pytest.approx(32e-9)
    assert report.gflops == pytest.approx(64e-9)


def test_flops_are_split_by_top_level_module():
    report = count_flops(EncDec(), torch.randn(1, 8))
    assert report.by_module == {"encoder": 64, "blocks": 64, "decoder": 16}
    assert report.flops_under(["blocks.1", "decoder"]) == 48
    assert report.to_dict()["total_flops"] == 144


def test_training_modes_are_restored():
    model = EncDec().train()
    model.decoder.eval()
    count_flops(model, torch.randn(1, 8))
    assert model.training and model.encoder.training and not model.decoder[0].training


def test_sdpa_attention_flops_counted_on_cpu():
    report = count_flops(Attention(), torch.randn(1, 10, 16))
    assert report.total_flops == 2 * 2 * 10 * 10 * (8 + 8)


def test_attention_flops_grow_quadratically_with_tokens():
    small = count_flops(Attention(), torch.randn(1, 16, 16)).total_flops
    large = count_flops(Attention(), torch.randn(1, 32, 16)).total_flops
    assert small > 0
    assert large == 4 * small


def test_roi_align_flops_counted():
    torchvision = pytest.importorskip("torchvision")

    class Roi(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            box = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
            return torchvision.ops.roi_align(x, box, 5, 1.0, 2, True)

    assert count_flops(Roi(), torch.randn(1, 4, 8, 8)).total_flops == 8 * 4 * 25 * 4 + 4 * 25


def test_latency_report_fields_are_sane():
    calls = []
    report = measure_latency(lambda: calls.append(torch.ones(64, 64).sum()), warmup=2, repeats=7)
    assert len(calls) == 9 and len(report.times_ms) == 7
    assert 0 < report.min_ms <= report.median_ms <= report.p90_ms <= report.max_ms
    assert report.num_threads == torch.get_num_threads()
    assert report.memory_method.startswith("cpu_") and report.peak_memory_mb >= report.baseline_memory_mb
    assert "times_ms" not in report.to_dict() and report.to_dict()["device"] == "cpu"


def test_latency_peak_memory_is_at_least_the_baseline():
    # CPU peak RSS is best effort (the allocator may reuse resident pages), so only its order is checked
    report = measure_latency(lambda: torch.ones(96 * 2**20, dtype=torch.uint8).add_(1), warmup=0, repeats=1)
    assert report.peak_memory_mb >= report.baseline_memory_mb > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latency_on_cuda_reports_allocator_peak():
    report = measure_latency(lambda: torch.ones(2**20, device="cuda"), warmup=1, repeats=3, device="cuda")
    assert report.memory_method == "cuda_max_memory_allocated"
    assert report.peak_delta_mb >= 4 - 1e-6
