"""SegFormer with PrATo at the stage-2 embedding: unpatched output when off, drop == mask, real savings."""

from functools import partial

import pytest
import torch

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.segformer import PrunableSegFormer, next_stage_keep
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo
from prato_exp.tokens.attention_mask import reduced_key_keep

SIZE = 64  # stage grids 16 x 16, 8 x 8 (the pruning point, 64 tokens), 4 x 4, 2 x 2
HIDDEN = (8, 16, 24, 32)
DEPTHS = (1, 2, 1, 1)
SR = (8, 4, 2, 1)
GRIDS = (16, 8, 4, 2)
PREFIX = "segformer.segformer.stages"


def _net(pruner=None, **kwargs) -> PrunableSegFormer:
    torch.manual_seed(0)
    config = {
        "img_size": SIZE,
        "hidden_sizes": HIDDEN,
        "depths": DEPTHS,
        "num_attention_heads": (1, 2, 3, 4),
        "sr_ratios": SR,
        "decoder_hidden_size": 16,
    }
    return PrunableSegFormer(1, 3, pruner=pruner, **{**config, **kwargs})


def _inputs(b: int = 2):
    torch.manual_seed(1)
    image = torch.rand(b, 1, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0]])[:b]
    return image, box


def test_no_pruner_reproduces_transformers_segformer_exactly():
    net = _net().eval()
    image, box = _inputs()
    torch.testing.assert_close(net(image, box).logits, net.reference_forward(image))


def test_keeping_every_token_in_drop_mode_reproduces_the_library():
    net = _net(partial(PrATo, budget=TokenBudget(q=50))).eval()
    image, box = _inputs()
    out = net(image, box, torch.tensor([False, False]))
    torch.testing.assert_close(out.logits, net.reference_forward(image))


@pytest.mark.parametrize("pruning", ["none", "percentile25"])
def test_forward_backward_on_cpu(pruning):
    net = _net(None if pruning == "none" else partial(PrATo, budget=TokenBudget(q=25)))
    out = net(*_inputs())
    assert out.logits.shape == (2, 3, SIZE, SIZE)
    out.logits.square().mean().backward()
    for stage in range(4):
        grad = net.stages[stage].blocks[0].mlp.fc2.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert (out.trace.sparsity() is None) == (pruning == "none")


@pytest.mark.parametrize("threshold", ["percentile", "fixed"])
@pytest.mark.parametrize("fill", ["zero", "carry"])
def test_drop_and_mask_modes_agree(threshold, fill):
    budget = TokenBudget(q=50) if threshold == "percentile" else TokenBudget("fixed", tau=0.5)
    kwargs = {"budget": budget, "fill": fill}
    drop = _net(partial(PrATo, mode="drop", **kwargs)).eval()
    mask = _net(partial(PrATo, mode="mask", **kwargs)).eval()
    mask.load_state_dict(drop.state_dict())
    image, box = _inputs()
    for enabled in (None, torch.tensor([True, False])):  # the exempt image pads the drop batch
        out_drop, out_mask = drop(image, box, enabled), mask(image, box, enabled)
        assert torch.equal(out_drop.trace.keep_grids[0], out_mask.trace.keep_grids[0])
        torch.testing.assert_close(out_drop.trace.block_keep_fraction, out_mask.trace.block_keep_fraction)
        torch.testing.assert_close(out_drop.logits, out_mask.logits, atol=1e-5, rtol=1e-4)


def test_next_stage_keep_refuses_a_grid_its_footprints_do_not_tile():
    keep = torch.ones(1, 4 * 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="footprints"):
        next_stage_keep(keep, (4, 4), (3, 3), 2)


def test_reduced_key_is_masked_only_when_all_parents_are_pruned():
    keep = torch.ones(2, 4 * 4, dtype=torch.bool)
    keep[0, [0, 1, 4, 5]] = False  # the whole top-left 2 x 2 window
    keep[1, [0, 1, 4]] = False  # one parent of that window survives
    assert reduced_key_keep(keep, (4, 4), 2).tolist() == [[False, True, True, True], [True] * 4]
    lonely = torch.zeros(1, 3 * 3, dtype=torch.bool)
    lonely[0, 8] = True  # only a token outside every 2 x 2 window: no key is masked
    assert reduced_key_keep(lonely, (3, 3), 2).tolist() == [[True]]


def test_percentile_pruning_sparsity_matches_configuration():
    out = _net(partial(PrATo, budget=TokenBudget(q=25)))(*_inputs())
    keep = out.trace.keep_grids[0]
    # 64 tokens, floor(0.25 * 64) = 16 pruned at the stage-2 embedding
    assert out.trace.grid_hw == (8, 8) and [int(k.sum()) for k in keep] == [48, 48]
    assert out.trace.first_pruned_block == 2
    stage3 = next_stage_keep(keep, (8, 8), (4, 4), 2)
    stage4 = next_stage_keep(stage3, (4, 4), (2, 2), 2)
    expected = torch.stack(
        [torch.ones(2), *[torch.full((2,), 0.75)] * 2, stage3.float().mean(1), stage4.float().mean(1)], dim=1
    )
    torch.testing.assert_close(out.trace.block_keep_fraction, expected)
    torch.testing.assert_close(out.trace.sparsity(), 1 - expected[:, 1:].mean(dim=1))


def test_pruning_the_last_stage_gives_exactly_the_configured_sparsity():
    out = _net(partial(PrATo, budget=TokenBudget(q=25)), prune_after=[3])(*_inputs())
    # 2 x 2 = 4 tokens, 1 pruned; the last stage is the only one after the point
    torch.testing.assert_close(out.trace.sparsity(), torch.tensor([0.25, 0.25]))


def test_exempt_images_keep_all_tokens():
    out = _net(partial(PrATo, budget=TokenBudget(q=50)))(*_inputs(), torch.tensor([True, False]))
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [32, 64]
    assert bool((out.trace.block_keep_fraction[1] == 1).all())
    assert float(out.trace.sparsity()[1]) == 0.0


def test_ste_trains_pruner_projections_through_the_task_loss():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)))
    net(*_inputs()).logits.square().mean().backward()
    pruner = net.pruners["1"]
    assert pruner.f1.weight.grad is not None and pruner.f1.weight.grad.abs().sum() > 0
    assert pruner.f2.weight.grad.abs().sum() > 0


def _block_flops(n: int, stage: int) -> int:
    """One MiT block on n kept tokens: q, o, fc1, fc2 on kept; SR conv, k, v, dwconv on the grid."""
    c, z, sr = HIDDEN[stage], GRIDS[stage] ** 2, SR[stage]
    mlp = 4 * c
    flops = 4 * n * c * c + 4 * n * c * mlp + 18 * z * mlp  # q + o, fc1 + fc2, 3 x 3 depth-wise conv
    if sr == 1:
        return flops + 4 * n * c * c + 4 * n * n * c  # k + v on kept tokens, QK^T + AV
    zr = (GRIDS[stage] // sr) ** 2
    return flops + 2 * zr * c * c * sr * sr + 4 * zr * c * c + 4 * n * zr * c  # SR conv, k + v, QK^T + AV


@pytest.mark.parametrize("q", [25, 50, 75])
def test_block_flops_follow_the_kept_token_arithmetic(q):
    image, box = _inputs(1)
    net = _net(partial(PrATo, budget=TokenBudget(q=q)))
    report = count_flops(net, image, box)
    with torch.no_grad():
        kept = net.stage_keep_fraction(net(image, box).trace)[0] * torch.tensor(GRIDS) ** 2
    assert int(kept[1]) == 64 - (64 * q) // 100
    for stage, depth in enumerate(DEPTHS):
        for j in range(depth):
            block = f"{PREFIX}.{stage}.blocks.{j}"
            assert report.flops_under([block]) == _block_flops(int(kept[stage]), stage), block


def test_drop_mode_really_skips_tokens_in_flops():
    image, box = _inputs(1)
    net = _net()
    full = count_flops(net, image, box).flops_under(net.pruned_part())
    part, attention = [], []
    for q in (25, 50, 75):
        pruned = _net(partial(PrATo, budget=TokenBudget(q=q)))
        report = count_flops(pruned, image, box)
        part.append(report.flops_under(pruned.pruned_part()))
        blocks = [f"{PREFIX}.{s}.blocks.{j}" for s in range(1, 4) for j in range(DEPTHS[s])]
        children = [f"{b}.{m}" for b in blocks for m in ("attention", "mlp")]
        attention.append(report.flops_under(blocks) - report.flops_under(children))  # QK^T and AV
    assert full > part[0] > part[1] > part[2]
    assert attention[0] > attention[1] > attention[2] > 0


def test_mask_and_zero_once_modes_save_nothing():
    image, box = _inputs(1)
    net = _net()
    full = count_flops(net, image, box).flops_under(net.pruned_part())
    for mode in ("mask", "zero_once"):
        pruned = _net(partial(PrATo, budget=TokenBudget(q=50), mode=mode))
        assert count_flops(pruned, image, box).flops_under(pruned.pruned_part()) >= full


def test_zero_once_reports_no_sparsity():
    out = _net(partial(PrATo, budget=TokenBudget(q=50), mode="zero_once"))(*_inputs())
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [32, 32]
    torch.testing.assert_close(out.trace.sparsity(), torch.zeros(2))


def test_pruned_part_names_the_stages_after_the_point():
    assert _net().pruned_part() == [
        f"{PREFIX}.1.blocks",
        f"{PREFIX}.1.layer_norm",
        f"{PREFIX}.2",
        f"{PREFIX}.3",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_after": [4]}, "prune_after"),
        ({"prune_after": [1, 2]}, "one stage count"),
        ({"patch_sizes": (7, 3, 4, 3)}, "odd patch sizes"),
        ({"img_size": 16}, "img_size"),
        ({"strides": (4, 2, 2)}, "one entry per stage"),
    ],
)
def test_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _net(**kwargs)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = _net()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    path = tmp_path / "segformer.pt"
    torch.save(source.segformer.state_dict(), path)
    loaded = _net(pretrained=str(path))
    torch.testing.assert_close(loaded.state_dict(), source.state_dict())
