"""TransUNet: unpatched timm output when off, drop == mask on both attention paths, real savings when on."""

from functools import partial

import pytest
import torch
from conftest import BASELINES, make_dtop_confident
from timm.layers import Attention

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.transunet import PrunableTransUNet
from prato_exp.pruning.base import NoPruner, pruning_disabled
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.prato import PrATo

SIZE = 64  # ViT on the 1/16 map: 4 x 4 = 16 tokens
HIDDEN, MLP = 48, 192
TINY = {
    "img_size": SIZE,
    "cnn_layers": (1, 1, 1),
    "cnn_channels": (32, 32, 64),
    "stem_channels": 8,
    "cnn_norm_groups": 8,
    "hidden_size": HIDDEN,
    "num_heads": 3,
    "head_channels": 16,
    "decoder_channels": (16, 8, 8, 8),
}


def _net(pruner=None, fused: bool = True, **kwargs) -> PrunableTransUNet:
    torch.manual_seed(0)
    net = PrunableTransUNet(1, 3, pruner=pruner, **{**TINY, **kwargs})
    for module in net.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused
    return net


def _inputs(b: int = 2):
    torch.manual_seed(1)
    image = torch.rand(b, 1, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0]])[:b]
    return image, box


@pytest.mark.parametrize("fused", [True, False])
def test_no_pruner_reproduces_timm_encoder_exactly(fused):
    net = _net(fused=fused).eval()
    image, box = _inputs()
    torch.testing.assert_close(net(image, box).logits, net.reference_forward(image))


@pytest.mark.parametrize(
    "pruner", [None, partial(PrATo, budget=TokenBudget(q=25))], ids=["none", "percentile25"]
)
def test_forward_backward_shape(pruner):
    net = _net(pruner)
    out = net(*_inputs())
    assert out.logits.shape == (2, 3, SIZE, SIZE)
    out.logits.square().mean().backward()
    grads = [p.grad for p in net.encoder.blocks[-1].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (out.trace.sparsity() is None) == (pruner is None)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("threshold", ["percentile", "fixed"])
def test_drop_and_mask_modes_agree(threshold, fused):
    kwargs = {"budget": TokenBudget(q=50) if threshold == "percentile" else TokenBudget("fixed", tau=0.5)}
    drop = _net(partial(PrATo, mode="drop", **kwargs), fused=fused, prune_after=(3, 6)).eval()
    mask = _net(partial(PrATo, mode="mask", **kwargs), fused=fused, prune_after=(3, 6)).eval()
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


def test_three_points_compound():
    out = _net(partial(PrATo, budget=TokenBudget(q=25)), prune_after=(3, 6, 9))(*_inputs())
    # 16 -> 12 -> 9 -> 7 tokens; blocks 4..12 run on 12, 12, 12, 9, 9, 9, 7, 7, 7
    assert [int(k[0].sum()) for k in out.trace.keep_grids] == [12, 9, 7]
    expected = 1 - (12 + 9 + 7) * 3 / (9 * 16)
    torch.testing.assert_close(out.trace.sparsity(), torch.tensor([expected, expected]))


def test_exempt_images_keep_all_tokens_and_their_unpruned_output():
    image, box = _inputs()
    net = _net(partial(PrATo, budget=TokenBudget(q=50))).eval()
    out = net(image, box, torch.tensor([True, False]))
    assert [int(k.sum()) for k in out.trace.keep_grids[0]] == [8, 16]
    with pruning_disabled(net):
        unpruned = net(image, box).logits
    torch.testing.assert_close(out.logits[1], unpruned[1], atol=1e-5, rtol=1e-4)


def _block_flops(n: int, c: int = HIDDEN, mlp: int = MLP) -> int:
    """One timm ViT block on n tokens: QKV + out-proj 8nC^2, MLP 4nCM, QK^T and AV 4n^2C."""
    return 8 * n * c * c + 4 * n * c * mlp + 4 * n * n * c


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("q", [25, 50, 75])
def test_block_flops_follow_the_kept_token_arithmetic(q, fused):
    image, box = _inputs(1)
    net = _net(partial(PrATo, budget=TokenBudget(q=q)), fused=fused)
    report = count_flops(net, image, box)
    kept = 16 - (16 * q) // 100
    blocks = [report.flops_under([f"encoder.blocks.{i}"]) for i in range(12)]
    assert blocks == [_block_flops(16)] * 3 + [_block_flops(kept)] * 9
    assert report.flops_under(net.pruned_part()) == 9 * _block_flops(kept)


def test_drop_mode_lowers_whole_model_flops_and_mask_mode_saves_nothing():
    image, box = _inputs(1)
    full = count_flops(_net(), image, box)
    dropped = count_flops(_net(partial(PrATo, budget=TokenBudget(q=50))), image, box)
    masked = count_flops(_net(partial(PrATo, budget=TokenBudget(q=50), mode="mask")), image, box)
    saved = 9 * (_block_flops(16) - _block_flops(8))
    # the CNN and the decoder are untouched; the pruner itself adds a little
    assert 0 < full.total_flops - dropped.total_flops <= saved
    part = _net().pruned_part()
    assert masked.flops_under(part) >= full.flops_under(part)


def test_ste_trains_pruner_projections_through_the_task_loss():
    net = _net(partial(PrATo, budget=TokenBudget(q=25)))
    net(*_inputs()).logits.square().mean().backward()
    pruner = net.pruners["3"]
    assert pruner.f1.weight.grad is not None and pruner.f1.weight.grad.abs().sum() > 0
    assert pruner.f2.weight.grad.abs().sum() > 0


def test_pretrained_encoder_weights_from_a_local_file(tmp_path):
    source = _net()
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(5)
    net = PrunableTransUNet(1, 3, pruner=NoPruner, pretrained=str(path), **TINY)
    for name, value in source.encoder.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[name], value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_after": (13,)}, "prune_after"),
        ({"img_size": 40}, "divisible by 16"),
        ({"cnn_channels": (32, 64)}, "3 stages"),
        ({"cnn_norm_groups": 16}, "cnn_norm_groups"),
        ({"decoder_channels": (16, 8, 8)}, "4 upsampling blocks"),
    ],
)
def test_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _net(**kwargs)


@pytest.mark.parametrize("name", ["random", "dynamicvit", "evovit", "dtop", "stp", "tram"])
def test_every_baseline_trains_and_drops_tokens_in_transunet(name):
    net = _net(BASELINES[name]).train()
    if name == "dtop":
        make_dtop_confident(net)
    image, box = _inputs()
    out = net(image, box)
    (out.logits.square().mean() + sum(out.trace.aux_losses().values(), torch.tensor(0.0))).backward()
    net.eval()
    pruned = count_flops(net, image[:1], box[:1])
    with pruning_disabled(net):
        full = count_flops(net, image[:1], box[:1])
    assert pruned.flops_under(net.pruned_part()[:1]) < full.flops_under(net.pruned_part()[:1])
