"""The decoder window: a rectangle of the token grid around the box, computed exactly, background outside."""

from functools import partial

import pytest
import torch
from torch import nn

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.decoder_window import GridWindow, check_window_batch, pruning_window
from prato_exp.models.segformer import PrunableSegFormer
from prato_exp.models.swin_unetr import DECODER_MODULES as SWIN_DECODER_MODULES
from prato_exp.models.swin_unetr import PrunableSwinUNETR
from prato_exp.models.transunet import PrunableTransUNet
from prato_exp.models.unetr import DECODER_MODULES, PrunableUNETR
from prato_exp.pruning.base import pruning_disabled
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo

SIZE = 128  # 8 x 8 tokens
BOXES = torch.tensor([[20.0, 40.0, 50.0, 60.0], [70.0, 90.0, 128.0, 128.0]])


def test_window_is_the_dilated_box_in_tokens():
    window = GridWindow.around_boxes(BOXES[:1], (SIZE, SIZE), (8, 8), margin=1)
    # box rows 40..60 px -> tokens 2..3, dilated 1..4; columns 20..50 px -> tokens 1..3, dilated 0..4
    assert (window.top.tolist(), window.left.tolist(), window.size_hw) == ([1], [0], (4, 5))


def test_every_image_gets_the_batchs_largest_window_inside_the_grid():
    window = GridWindow.around_boxes(BOXES, (SIZE, SIZE), (8, 8), margin=1)
    # second box: rows 5..8 dilated 4..8 (4 tokens), columns 4..8 dilated 3..8 (5 tokens)
    assert window.size_hw == (4, 5)
    assert window.top.tolist() == [1, 4] and window.left.tolist() == [0, 3]


def test_the_window_covers_each_images_dilated_box():
    torch.manual_seed(0)
    corners = torch.rand(16, 2, 2) * SIZE
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    window = GridWindow.around_boxes(boxes, (SIZE, SIZE), (8, 8), margin=1)
    inside = window.mask(16)[:, 0]
    for b, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        r0, c0 = max(int(y0 // 16) - 1, 0), max(int(x0 // 16) - 1, 0)
        r1, c1 = min(-int(-y1 // 16) + 1, 8), min(-int(-x1 // 16) + 1, 8)
        assert inside[b, r0 * 16 : r1 * 16, c0 * 16 : c1 * 16].all()


def test_inset_shrinks_the_window_only_where_it_does_not_reach_the_grid_edge():
    # second image: rows 4..8 and columns 3..8 reach the bottom and right edges of the 8 x 8 grid
    window = GridWindow.around_boxes(BOXES, (SIZE, SIZE), (8, 8), margin=1)
    inner = window.mask(1, inset=1)[:, 0]

    def spans(b: int) -> tuple[list[int], list[int]]:
        rows, cols = inner[b].any(dim=1), inner[b].any(dim=0)
        return rows.nonzero().flatten().tolist(), cols.nonzero().flatten().tolist()

    assert spans(0) == ([2, 3], [0, 1, 2, 3])  # rows 1..4 inset on both sides; columns 0..4 on the right
    assert spans(1) == ([5, 6, 7], [4, 5, 6, 7])  # inset at the top and left only


def test_paste_puts_the_crop_back_and_fills_the_rest():
    window = GridWindow.around_boxes(BOXES, (SIZE, SIZE), (8, 8), margin=0)
    x = torch.randn(2, 3, 32, 32)  # 4 pixels per token
    fill = torch.tensor([1.0, 2.0, 3.0])
    pasted = window.paste(window.crop(x), fill)
    inside = window.mask(4).expand_as(x)
    assert torch.equal(pasted[inside], x[inside])
    assert torch.equal(pasted[~inside], fill.view(1, 3, 1, 1).expand_as(x)[~inside])


def test_a_negative_margin_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model\.decoder_window must be >= 0"):
        PrunableUNETR(1, 3, img_size=SIZE, hidden_size=48, mlp_dim=96, num_heads=3, decoder_window=-1)


def _net(decoder_window=None, norm_name="batch", **kwargs) -> PrunableUNETR:
    torch.manual_seed(0)
    return PrunableUNETR(
        1,
        3,
        img_size=SIZE,
        hidden_size=48,
        mlp_dim=96,
        num_heads=3,
        feature_size=8,
        norm_name=norm_name,
        pruner=partial(PrATo, budget=TokenBudget(q=50)),
        decoder_window=decoder_window,
        **kwargs,
    )


def _randomise_norms(net: nn.Module) -> None:
    """Give batch norms non-trivial running statistics, so evaluation is not the identity."""
    torch.manual_seed(2)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)


def _assert_window_equals_masked_dense(
    windowed: nn.Module, dense: nn.Module, masked: list[nn.Module], size: int = SIZE
) -> None:
    """``windowed``'s logits equal ``dense``'s (same weights) with every module in ``masked`` reading
    zeros outside the window, inside the window; background elsewhere. The window is cut on an 8 x 8
    grid of the ``size`` px input (the boxes scaled from 128 px)."""
    _randomise_norms(windowed)
    dense.load_state_dict(windowed.state_dict())
    torch.manual_seed(1)
    image = torch.rand(2, 1, size, size)
    boxes = BOXES * size / SIZE
    window = pruning_window(1, windowed.pruners, boxes, (size, size), (8, 8))
    assert window is not None and window.size_hw == (4, 5)

    def mask_input(module, args):
        return (args[0] * window.mask(args[0].shape[-2] // 8).to(args[0].dtype), *args[1:])

    handles = [module.register_forward_pre_hook(mask_input) for module in masked]
    with torch.no_grad():
        got, want = windowed(image, boxes).logits, dense(image, boxes).logits
    for handle in handles:
        handle.remove()
    inside = window.mask(size // 8).expand_as(got)
    torch.testing.assert_close(got[inside], want[inside], atol=1e-5, rtol=1e-4)
    assert bool((got.argmax(dim=1)[~inside[:, 0]] == 0).all())


def test_windowed_decoding_equals_the_masked_dense_decoder_inside_and_is_background_outside():
    windowed, dense = _net(decoder_window=1).eval(), _net().eval()
    decoder = [getattr(dense.unetr, name) for name in DECODER_MODULES]
    convs = [m for part in decoder for m in part.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    _assert_window_equals_masked_dense(windowed, dense, convs)


def test_decoder_flops_fall_with_the_window_area():
    windowed, dense = _net(decoder_window=1).eval(), _net().eval()
    image = torch.rand(2, 1, SIZE, SIZE)
    names = [f"unetr.{m}" for m in DECODER_MODULES]
    got = count_flops(windowed, image, BOXES).flops_under(names)
    full = count_flops(dense, image, BOXES).flops_under(names)
    assert got == pytest.approx(full * 20 / 64, rel=1e-9)  # a 4 x 5 window of the 8 x 8 grid


def test_without_pruning_the_decoder_runs_everywhere():
    net = _net(decoder_window=0, norm_name="instance").eval()
    image = torch.rand(2, 1, SIZE, SIZE)
    with pruning_disabled(net), torch.no_grad():
        assert pruning_window(0, net.pruners, BOXES, (SIZE, SIZE), (8, 8)) is None
        torch.testing.assert_close(net(image, BOXES).logits, net.reference_forward(image))


def test_gradients_reach_the_decoder_and_the_pruner_through_the_window():
    net = _net(decoder_window=1).train()
    out = net(torch.rand(2, 1, SIZE, SIZE), BOXES)
    out.logits.logsumexp(dim=1).mean().backward()
    assert net.unetr.decoder2.conv_block.conv1.conv.weight.grad.abs().sum() > 0
    assert net.pruners["3"].f1.weight.grad.abs().sum() > 0


def _transunet(decoder_window=None, **kwargs) -> PrunableTransUNet:
    torch.manual_seed(0)
    return PrunableTransUNet(
        1,
        3,
        img_size=SIZE,
        cnn_layers=(1, 1, 1),
        cnn_channels=(16, 32, 64),
        stem_channels=16,
        cnn_norm_groups=8,
        hidden_size=48,
        depth=4,
        num_heads=3,
        head_channels=32,
        decoder_channels=(32, 16, 16, 8),
        pruner=partial(PrATo, budget=TokenBudget(q=50)),
        decoder_window=decoder_window,
        **kwargs,
    )


def test_transunet_windowed_decoding_equals_the_masked_dense_decoder_inside():
    windowed, dense = _transunet(decoder_window=1).eval(), _transunet().eval()
    masked = [m for m in dense.decoder.modules() if isinstance(m, nn.Conv2d | nn.UpsamplingBilinear2d)]
    _assert_window_equals_masked_dense(windowed, dense, masked)
    assert windowed.pruned_part()[-1] == "decoder"


def _swin(decoder_window=None, **kwargs) -> PrunableSwinUNETR:
    """A small Swin UNETR at 256 px, so its 1/32 bottleneck, where the window is cut, is 8 x 8."""
    torch.manual_seed(0)
    return PrunableSwinUNETR(
        1,
        3,
        img_size=2 * SIZE,
        feature_size=12,
        depths=(1, 1, 1, 1),
        num_heads=(3, 3, 3, 3),
        window_size=4,
        norm_name="batch",
        pruner=partial(PrATo, budget=TokenBudget(q=50)),
        decoder_window=decoder_window,
        **kwargs,
    )


def test_swin_unetr_windowed_decoding_equals_the_masked_dense_decoder_inside():
    windowed, dense = _swin(decoder_window=1).eval(), _swin().eval()
    decoder = [getattr(dense.swin_unetr, name) for name in SWIN_DECODER_MODULES]
    convs = [m for part in decoder for m in part.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    _assert_window_equals_masked_dense(windowed, dense, convs, size=2 * SIZE)


def test_swin_unetr_decoder_flops_fall_with_the_window_area():
    windowed, dense = _swin(decoder_window=1).eval(), _swin().eval()
    image, boxes = torch.rand(2, 1, 2 * SIZE, 2 * SIZE), BOXES * 2
    names = [f"swin_unetr.{m}" for m in SWIN_DECODER_MODULES]
    got = count_flops(windowed, image, boxes).flops_under(names)
    full = count_flops(dense, image, boxes).flops_under(names)
    assert got == pytest.approx(full * 20 / 64, rel=1e-9)  # a 4 x 5 window of the 8 x 8 bottleneck grid
    assert windowed.pruned_part()[-1] == "swin_unetr.out"


def _segformer(decoder_window=None, **kwargs) -> PrunableSegFormer:
    """A small SegFormer at 256 px, so its last stage's grid, where the window is cut, is 8 x 8."""
    torch.manual_seed(0)
    return PrunableSegFormer(
        1,
        3,
        img_size=2 * SIZE,
        hidden_sizes=(16, 32, 48, 64),
        depths=(1, 1, 1, 1),
        num_attention_heads=(1, 2, 3, 4),
        decoder_hidden_size=32,
        pruner=partial(PrATo, budget=TokenBudget(q=50)),
        decoder_window=decoder_window,
        **kwargs,
    )


def test_segformer_windowed_decoding_is_the_dense_decoder_on_the_dilated_box():
    windowed, dense = _segformer(decoder_window=1).eval(), _segformer().eval()
    _randomise_norms(windowed)
    dense.load_state_dict(windowed.state_dict())
    image, boxes = torch.rand(2, 1, 2 * SIZE, 2 * SIZE), BOXES * 2
    with torch.no_grad():
        got, want = windowed(image, boxes).logits, dense(image, boxes).logits
    dilated = GridWindow.around_boxes(boxes, (2 * SIZE, 2 * SIZE), (8, 8), margin=1).mask(32)
    outer = pruning_window(2, windowed.pruners, boxes, (2 * SIZE, 2 * SIZE), (8, 8))
    exact = outer.own_mask(32, inset=1)
    assert bool((exact | ~dilated).all())  # the exact region covers each image's dilated box
    torch.testing.assert_close(got[exact.expand_as(got)], want[exact.expand_as(want)], atol=1e-5, rtol=1e-4)
    assert bool((got.argmax(dim=1)[~exact[:, 0]] == 0).all())


def test_segformer_decoder_flops_fall_with_the_window():
    windowed, dense = _segformer(decoder_window=1).eval(), _segformer().eval()
    image, boxes = torch.rand(2, 1, 2 * SIZE, 2 * SIZE), BOXES * 2
    got = count_flops(windowed, image, boxes).flops_under(["segformer.decode_head"])
    full = count_flops(dense, image, boxes).flops_under(["segformer.decode_head"])
    window = pruning_window(2, windowed.pruners, boxes, (2 * SIZE, 2 * SIZE), (8, 8))
    assert got == pytest.approx(full * window.fraction(), rel=1e-9)
    assert windowed.pruned_part()[-1] == "segformer.decode_head"


@pytest.mark.parametrize("build", [_swin, _segformer], ids=["swin_unetr", "segformer"])
def test_hierarchical_models_without_pruning_decode_everywhere(build):
    net = build(decoder_window=0).eval()
    image = torch.rand(1, 1, 2 * SIZE, 2 * SIZE)
    with pruning_disabled(net), torch.no_grad():
        torch.testing.assert_close(net(image, BOXES[:1] * 2).logits, net.reference_forward(image))


def test_each_image_keeps_its_own_box_when_another_box_sets_a_larger_window():
    boxes = torch.tensor([[20.0, 40.0, 50.0, 60.0], [0.0, 0.0, 128.0, 128.0]])  # the second: an empty slice
    window = GridWindow.around_boxes(boxes, (SIZE, SIZE), (8, 8), margin=0)
    assert window.is_full and not window.covers_every_grid
    own = window.own_mask(1)[:, 0]
    assert own[1].all()
    rows, cols = own[0].any(dim=1).nonzero().flatten(), own[0].any(dim=0).nonzero().flatten()
    assert (rows.tolist(), cols.tolist()) == ([2, 3], [1, 2, 3])  # box rows 40..60, columns 20..50 px


@pytest.mark.parametrize(
    ("build", "size", "own_margin", "inset"),
    [
        (partial(_net, decoder_window=0), SIZE, 0, 0),
        (partial(_transunet, decoder_window=0), SIZE, 0, 0),
        (partial(_swin, decoder_window=0), 2 * SIZE, 0, 0),
        (partial(_segformer, decoder_window=0), 2 * SIZE, 1, 1),  # one cell of context, exact one inside
    ],
    ids=["unetr", "transunet", "swin_unetr", "segformer"],
)
def test_outside_its_own_box_an_image_is_background_even_beside_a_whole_image_box(
    build, size, own_margin, inset
):
    net = build().eval()
    boxes = torch.tensor([[20.0, 40.0, 50.0, 60.0], [0.0, 0.0, 128.0, 128.0]]) * (size / SIZE)
    torch.manual_seed(1)
    with torch.no_grad():
        logits = net(torch.rand(2, 1, size, size), boxes).logits
    window = GridWindow.around_boxes(boxes, (size, size), (8, 8), margin=own_margin)  # every test grid: 8 x 8
    own = window.own_mask(size // 8, inset=inset)[:, 0]
    outside = logits[0].permute(1, 2, 0)[~own[0]]  # (pixels, K)
    assert outside.shape[0] > 0
    torch.testing.assert_close(outside, net.background.expand_as(outside))


# rows 2-3 x cols 1-3 | the whole grid | rows 0-2 x cols 5-7 | rows 4-5 x cols 0-2
MIXED_BOXES = torch.tensor(
    [[20.0, 40.0, 50.0, 60.0], [0.0, 0.0, 128.0, 128.0], [84.0, 8.0, 120.0, 40.0], [0.0, 64.0, 40.0, 90.0]]
)


def test_by_size_groups_the_images_by_the_size_of_their_own_window():
    window = GridWindow.around_boxes(MIXED_BOXES, (SIZE, SIZE), (8, 8), margin=0)
    groups = window.by_size()
    assert [(g.size_hw, index.tolist()) for index, g in groups] == [
        ((2, 3), [0, 3]),
        ((3, 3), [2]),
        ((8, 8), [1]),
    ]
    first = groups[0][1]
    assert (first.top.tolist(), first.left.tolist()) == ([2, 4], [1, 0])


def test_an_unknown_window_batch_is_refused_with_its_key_and_choices():
    with pytest.raises(
        ValueError, match=r"model.decoder_window_batch must be one of \('shared', 'by_size'\)"
    ):
        check_window_batch("per_image")


BY_SIZE_BUILDS = [
    pytest.param(partial(_net, decoder_window=0), SIZE, id="unetr"),
    pytest.param(partial(_transunet, decoder_window=0), SIZE, id="transunet"),
    pytest.param(partial(_swin, decoder_window=0), 2 * SIZE, id="swin_unetr"),
    pytest.param(partial(_segformer, decoder_window=0), 2 * SIZE, id="segformer"),
]


@pytest.mark.parametrize(("build", "size"), BY_SIZE_BUILDS)
def test_by_size_gives_each_image_its_batch_of_one_logits(build, size):
    net = build(decoder_window_batch="by_size").eval()
    _randomise_norms(net)
    torch.manual_seed(3)
    image, boxes = torch.rand(4, 1, size, size), MIXED_BOXES * (size / SIZE)
    with torch.no_grad():
        batched = net(image, boxes).logits
        alone = torch.cat([net(image[i : i + 1], boxes[i : i + 1]).logits for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_a_shared_window_lets_a_neighbour_change_an_images_logits():
    net = _net(decoder_window=0).eval()
    _randomise_norms(net)
    torch.manual_seed(3)
    image = torch.rand(4, 1, SIZE, SIZE)
    with torch.no_grad():
        batched = net(image, MIXED_BOXES).logits[0]
        alone = net(image[:1], MIXED_BOXES[:1]).logits[0]
    assert (batched - alone).abs().max() > 1e-3


def test_by_size_flops_are_the_sum_over_the_images():
    net = _net(decoder_window=0, decoder_window_batch="by_size")
    image = torch.rand(4, 1, SIZE, SIZE)
    batched = count_flops(net, image, MIXED_BOXES).total_flops
    alone = sum(count_flops(net, image[i : i + 1], MIXED_BOXES[i : i + 1]).total_flops for i in range(4))
    assert batched == alone


def test_training_shares_one_window_whatever_the_evaluation_setting():
    by_size, shared = _net(decoder_window=0, decoder_window_batch="by_size"), _net(decoder_window=0)
    torch.manual_seed(3)
    image = torch.rand(4, 1, SIZE, SIZE)
    torch.testing.assert_close(
        by_size.train()(image, MIXED_BOXES).logits, shared.train()(image, MIXED_BOXES).logits
    )
