"""UNETR with pruning points: unpatched output when off, drop == mask, real savings when on."""

from functools import partial

import pytest
import torch

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo

SIZE = 64  # 4 x 4 = 16 tokens


def _net(pruner=None, **kwargs) -> PrunableUNETR:
    torch.manual_seed(0)
    return PrunableUNETR(
        1, 3, img_size=SIZE, hidden_size=48, mlp_dim=96, num_heads=3, pruner=pruner, **kwargs
    )


def _inputs(b: int = 2):
    torch.manual_seed(1)
    image = torch.rand(b, 1, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0]])[:b]
    return image, box


def test_no_pruner_reproduces_monai_unetr_exactly():
    net = _net().eval()
    image, box = _inputs()
    torch.testing.assert_close(net(image, box).logits, net.reference_forward(image))


def test_output_shape_and_trace_without_pruning():
    out = _net()(*_inputs())
    assert out.logits.shape == (2, 3, SIZE, SIZE)
    assert out.trace.sparsity() is None


@pytest.mark.parametrize("threshold", ["percentile", "fixed"])
def test_drop_and_mask_modes_agree(threshold):
    kwargs = {"budget": TokenBudget(q=50) if threshold == "percentile" else TokenBudget("fixed", tau=0.5)}
    drop = _net(partial(PrATo, mode="drop", **kwargs), prune_after=(3, 6)).eval()
    mask = _net(partial(PrATo, mode="mask", **kwargs), prune_after=(3, 6)).eval()
    mask.load_state_dict(drop.state_dict())
    image, box = _inputs()
    out_drop, out_mask = drop(image, box), mask(image, box)
    for a, b in zip(out_drop.trace.keep_grids, out_mask.trace.keep_grids, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_drop.logits, out_mask.logits, atol=1e-5, rtol=1e-4)


def test_percentile_pruning_sparsity_matches_configuration():
    out = _net(partial(PrATo, budget=TokenBudget(q=25)))(*_inputs())
    # 16 tokens, floor(0.25 * 16) = 4 pruned after block 3; blocks 4..12 run on 12 tokens
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [12, 12]
    torch.testing.assert_close(out.trace.sparsity(), torch.tensor([0.25, 0.25]))


def test_exempt_images_keep_all_tokens():
    image, box = _inputs()
    out = _net(partial(PrATo, budget=TokenBudget(q=50)))(image, box, torch.tensor([True, False]))
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [8, 16]


def test_drop_mode_really_skips_tokens_in_flops():
    image, box = _inputs(1)
    full = count_flops(_net(), image, box)
    pruned = count_flops(_net(partial(PrATo, budget=TokenBudget(q=50))), image, box)
    blocks = [f"unetr.vit.blocks.{i}" for i in range(3, 12)]
    ratio = pruned.flops_under(blocks) / full.flops_under(blocks)
    # token-wise FLOPs halve, attention FLOPs quarter
    assert 0.25 < ratio < 0.55


def test_mask_mode_saves_nothing():
    image, box = _inputs(1)
    full = count_flops(_net(), image, box)
    masked = count_flops(_net(partial(PrATo, budget=TokenBudget(q=50), mode="mask")), image, box)
    blocks = [f"unetr.vit.blocks.{i}" for i in range(3, 12)]
    assert masked.flops_under(blocks) >= full.flops_under(blocks)


def test_ste_trains_pruner_projections_through_the_task_loss():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)))
    net(*_inputs()).logits.square().mean().backward()
    pruner = net.pruners["3"]
    assert pruner.f1.weight.grad is not None and pruner.f1.weight.grad.abs().sum() > 0
    assert pruner.f2.weight.grad.abs().sum() > 0


def test_rejects_pruning_point_outside_depth():
    with pytest.raises(ValueError, match="prune_after"):
        _net(prune_after=(13,))


def _block_flops(n: int, c: int = 48, mlp: int = 96) -> int:
    """One MONAI ViT block on n tokens: QKV + out-proj 8nC^2, MLP 4nCM, QK^T and AV 4n^2C."""
    return 8 * n * c * c + 4 * n * c * mlp + 4 * n * n * c


@pytest.mark.parametrize("q", [25, 50, 75])
def test_block_flops_follow_the_kept_token_arithmetic(q):
    image, box = _inputs(1)
    report = count_flops(_net(partial(PrATo, budget=TokenBudget(q=q))), image, box)
    kept = 16 - (16 * q) // 100
    blocks = {f"unetr.vit.blocks.{i}": report.flops_under([f"unetr.vit.blocks.{i}"]) for i in range(12)}
    assert [blocks[f"unetr.vit.blocks.{i}"] for i in range(3)] == [_block_flops(16)] * 3
    assert [blocks[f"unetr.vit.blocks.{i}"] for i in range(3, 12)] == [_block_flops(kept)] * 9


def test_whole_image_fallback_box_gives_finite_output_and_exact_counts():
    image, _ = _inputs()
    whole = torch.tensor([[0.0, 0.0, SIZE, SIZE]] * 2)
    out = _net(partial(PrATo, budget=TokenBudget(q=25)))(image, whole)
    assert torch.isfinite(out.logits).all()
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [12, 12]
