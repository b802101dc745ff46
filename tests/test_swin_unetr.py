"""Swin UNETR with PrATo after a stage: MONAI's output when off, drop == mask, real savings when on."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import window_partition

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.swin_unetr import PrunableSwinUNETR
from prato_exp.pruning.base import PruneResult, TokenPruner
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo
from prato_exp.tokens.windows import merge_2x2, window_layout

SIZE = 64  # stage grids 32, 16, 8, 4; PrATo after stage 1 sees the 16 x 16 grid
FEATURES = 12
STAGE = "swin_unetr.swinViT.layers{}.0"


def _net(pruner=None, window_size: int = 4, **kwargs) -> PrunableSwinUNETR:
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE, "feature_size": FEATURES, "window_size": window_size, **kwargs}
    return PrunableSwinUNETR(1, 3, pruner=pruner, **kwargs)


def _inputs(b: int = 2):
    torch.manual_seed(1)
    image = torch.rand(b, 1, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0]])[:b]
    return image, box


class CornerPruner(TokenPruner):
    """Keeps the tokens in the top-left ``side x side`` corner of the grid (a known window pattern)."""

    def __init__(self, dim: int, side: int = 4, mode="drop", context=None) -> None:
        super().__init__(mode=mode)
        self.side = side

    def select(self, alive, prompt, state):
        grid_hw, positions = alive.grid_hw, alive.positions
        rows, cols = positions // grid_hw[1], positions % grid_hw[1]
        keep = (rows < self.side) & (cols < self.side)
        return PruneResult(keep=keep, scores=keep.float())


@pytest.mark.parametrize("window_size", [4, 3])
def test_no_pruner_reproduces_unpatched_monai_swin_unetr(window_size):
    net = _net(window_size=window_size).eval()
    monai_net = SwinUNETR(1, 3, feature_size=FEATURES, window_size=window_size, spatial_dims=2).eval()
    monai_net.load_state_dict(net.swin_unetr.state_dict())
    image, box = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(image, box).logits, monai_net(image))


def test_runs_at_32_px_where_the_bottleneck_is_one_pixel():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)), img_size=32)
    image, box = torch.rand(1, 1, 32, 32), torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    net(image, box).logits.mean().backward()
    monai_net = SwinUNETR(1, 3, feature_size=FEATURES, window_size=4, spatial_dims=2)
    with pytest.raises(ValueError, match="spatial element"):  # torch's InstanceNorm on the 1 x 1 map
        monai_net(image)


@pytest.mark.parametrize("pruning", ["none", "percentile25"])
def test_forward_backward_and_output_shape(pruning):
    net = _net(None if pruning == "none" else partial(PrATo, budget=TokenBudget(q=25)))
    out = net(*_inputs())
    assert out.logits.shape == (2, 3, SIZE, SIZE)
    out.logits.square().mean().backward()
    assert net.swin_unetr.swinViT.layers4[0].blocks[1].mlp.linear2.weight.grad is not None
    assert (out.trace.sparsity() is None) == (pruning == "none")


def test_ste_trains_pruner_projections_through_the_task_loss():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)))
    net(*_inputs()).logits.square().mean().backward()
    pruner = net.pruners["1"]
    assert pruner.f1.weight.grad is not None and pruner.f1.weight.grad.abs().sum() > 0
    assert pruner.f2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("window_size", "kwargs"),
    [
        (4, {"budget": TokenBudget(q=50)}),
        (4, {"budget": TokenBudget("fixed", tau=0.5)}),  # keep counts differ: padded token sets
        (3, {"budget": TokenBudget(q=75)}),  # padded grids, shifted windows with padding
        (4, {"budget": TokenBudget(q=50), "fill": "carry"}),
    ],
)
def test_drop_and_mask_modes_agree_for_the_whole_model(window_size, kwargs):
    drop = _net(partial(PrATo, mode="drop", **kwargs), window_size).eval()
    mask = _net(partial(PrATo, mode="mask", **kwargs), window_size).eval()
    mask.load_state_dict(drop.state_dict())
    image, box = _inputs()
    with torch.no_grad():
        out_drop, out_mask = drop(image, box), mask(image, box)
    assert torch.equal(out_drop.trace.keep_grids[0], out_mask.trace.keep_grids[0])
    torch.testing.assert_close(out_drop.trace.block_keep_fraction, out_mask.trace.block_keep_fraction)
    torch.testing.assert_close(out_drop.logits, out_mask.logits, atol=1e-5, rtol=1e-4)


def test_pruning_changes_the_output_and_zero_once_keeps_the_grid():
    image, box = _inputs()
    net = _net(partial(PrATo, budget=TokenBudget(q=50))).eval()
    zero_once = _net(partial(PrATo, budget=TokenBudget(q=50), mode="zero_once")).eval()
    with torch.no_grad():
        reference = net.reference_forward(image)
        dropped, zeroed = net(image, box), zero_once(image, box)
    assert not torch.allclose(dropped.logits, reference)
    assert not torch.allclose(zeroed.logits, reference)
    assert torch.equal(zeroed.trace.keep_grids[0], dropped.trace.keep_grids[0])
    assert torch.equal(zeroed.trace.block_keep_fraction, torch.ones(2, 8))


@pytest.mark.parametrize("window_size", [4, 3])
def test_exempt_images_keep_all_tokens_and_get_monai_output(window_size):
    image, box = _inputs()
    net = _net(partial(PrATo, budget=TokenBudget(q=50)), window_size).eval()
    with torch.no_grad():
        out = net(image, box, torch.tensor([True, False]))
        reference = net.reference_forward(image)
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [128, 256]
    torch.testing.assert_close(out.logits[1], reference[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out.logits[0], reference[0])


def test_sparsity_per_stage_follows_the_keep_rule():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)))
    out = net(*_inputs())
    trace = out.trace
    keep16 = trace.keep_grids[0]
    assert trace.grid_hw == (16, 16) and trace.first_pruned_block == 3
    assert [int(k.sum()) for k in keep16] == [256 - 64] * 2
    keep8 = F.max_pool2d(keep16.view(2, 1, 16, 16).float(), 2)
    keep4 = F.max_pool2d(keep8, 2)
    expected = torch.stack(
        [torch.ones(2), torch.full((2,), 0.75), keep8.mean(dim=(1, 2, 3)), keep4.mean(dim=(1, 2, 3))], 1
    )
    torch.testing.assert_close(net.stage_keep_fraction(trace), expected)
    torch.testing.assert_close(trace.block_keep_fraction, expected.repeat_interleave(2, dim=1))
    torch.testing.assert_close(trace.sparsity(), 1 - expected[:, 1:].mean(dim=1))


@pytest.fixture(scope="module")
def unpruned_flops():
    return count_flops(_net(), *_inputs(1))


def _token_wise_flops(report, block: str) -> int:
    return report.flops_under([f"{block}.attn.qkv", f"{block}.attn.proj", f"{block}.mlp"])


@pytest.mark.parametrize("q", [25, 50, 75])
def test_token_wise_flops_follow_the_kept_token_arithmetic(q, unpruned_flops):
    image, box = _inputs(1)
    net = _net(partial(PrATo, budget=TokenBudget(q=q)))
    report = count_flops(net, image, box)
    unpruned = unpruned_flops
    fraction = net(image, box).trace.block_keep_fraction[0]
    for stage, grid in ((2, 16), (3, 8), (4, 4)):
        dim = FEATURES * 2 ** (stage - 1)
        kept = round(float(fraction[2 * stage - 2]) * grid * grid)
        if stage == 2:
            assert kept == grid * grid - (grid * grid * q) // 100
        for b in range(2):
            block = f"{STAGE.format(stage)}.blocks.{b}"
            # qkv 6NC^2, proj 2NC^2, MLP 16NC^2
            assert _token_wise_flops(report, block) == 24 * kept * dim * dim
            assert _token_wise_flops(unpruned, block) == 24 * grid * grid * dim * dim
    part = net.pruned_part()
    assert part == [STAGE.format(k)[:-2] for k in (2, 3, 4)]
    assert report.flops_under(part) < unpruned.flops_under(part)


def test_windows_without_kept_tokens_are_skipped(unpruned_flops):
    image, box = _inputs(1)
    full = unpruned_flops
    corner = count_flops(_net(partial(CornerPruner, side=4)), image, box)
    masked = count_flops(_net(partial(CornerPruner, side=4, mode="mask")), image, box)

    def attention_flops(report, stage: int, b: int) -> int:
        block = f"{STAGE.format(stage)}.blocks.{b}"
        return report.flops_under([block]) - _token_wise_flops(report, block)

    per_window = 4 * 16 * 16 * (FEATURES * 2)  # QK^T and AV in one 4 x 4 window, stage-2 width
    # the 4 x 4 corner is one window; shifted by 2 it spans 4 windows; the 16 x 16 grid has 16
    assert attention_flops(corner, 2, 0) == per_window
    assert attention_flops(corner, 2, 1) == 4 * per_window
    assert attention_flops(full, 2, 0) == attention_flops(full, 2, 1) == 16 * per_window
    assert attention_flops(masked, 2, 0) == attention_flops(masked, 2, 1) == 16 * per_window


def test_window_layout_matches_monai_partition_of_the_rolled_grid():
    h, w, window, shift = 6, 7, (4, 4), (2, 2)
    layout = window_layout((h, w), window, shift, torch.device("cpu"))
    grid = F.pad(torch.arange(1, h * w + 1).view(1, h, w, 1), (0, 0, 0, 1, 0, 2))  # 0 on padding
    slots = window_partition(torch.roll(grid, (-2, -2), dims=(1, 2)), window).flatten()
    assert torch.equal(slots[layout.slot_of_position], torch.arange(1, h * w + 1))
    assert torch.equal(layout.pad_slots.flatten(), slots == 0)


@pytest.mark.parametrize("side", [8, 5])
def test_merge_helper_matches_monai_patch_merging(side):
    merging = _net().swin_unetr.swinViT.layers2[0].downsample
    grid = torch.rand(2, side, side, FEATURES * 2)
    torch.testing.assert_close(merging.reduction(merging.norm(merge_2x2(grid))), merging(grid))


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = _net()
    path = tmp_path / "swin_unetr.pt"
    torch.save(source.swin_unetr.state_dict(), path)
    torch.manual_seed(123)
    fresh = PrunableSwinUNETR(1, 3, img_size=SIZE, feature_size=FEATURES, window_size=4)
    torch.manual_seed(123)
    loaded = PrunableSwinUNETR(
        1, 3, img_size=SIZE, feature_size=FEATURES, window_size=4, pretrained=str(path)
    )
    assert not torch.equal(fresh.swin_unetr.out.conv.conv.weight, source.swin_unetr.out.conv.conv.weight)
    for a, b in zip(source.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_after": [4]}, "prune_after"),
        ({"prune_after": [1, 2]}, "one stage"),
        ({"img_size": 48}, "divisible by 32"),
    ],
)
def test_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _net(**kwargs)


def test_configs_give_the_paper_size_and_a_small_preset():
    paper = compose_train(["model=swin_unetr", "pruning=percentile25"]).model
    assert (paper.img_size, paper.feature_size, paper.window_size) == (224, 48, 7)
    assert list(paper.depths) == [2, 2, 2, 2] and list(paper.num_heads) == [3, 6, 12, 24]
    small = compose_train(["model=swin_unetr_small"]).model
    assert small.img_size == 128 and list(small.prune_after) == [1]
