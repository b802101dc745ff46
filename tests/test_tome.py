"""ToMe-style token merging: bipartite matching, size-weighted merges, unmerging before the decoder."""

import pytest
import torch

from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.plain_vit import EncoderOutput, run_pruned_blocks
from prato_exp.models.segformer import PrunableSegFormer
from prato_exp.models.swin_unetr import PrunableSwinUNETR
from prato_exp.models.transunet import PrunableTransUNet
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.pruning.base import PointState, pruning_disabled
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.tome import ToMeMerger, ToMeState, bipartite_sides, merge_tokens
from prato_exp.tokens.token_set import child_merged_into, follow_merges

SIZE = 64  # 4 x 4 = 16 tokens


def _unetr(**kwargs) -> PrunableUNETR:
    torch.manual_seed(0)
    return PrunableUNETR(1, 3, img_size=SIZE, hidden_size=48, mlp_dim=96, num_heads=3, **kwargs).eval()


def _encode(net: PrunableUNETR, image: torch.Tensor, box: torch.Tensor) -> EncoderOutput:
    vit = net.unetr.vit
    pruners = {int(i): p for i, p in net.pruners.items()}
    return run_pruned_blocks(
        vit.patch_embedding(image),
        vit.blocks,
        vit.norm,
        pruners,
        net.skip_blocks,
        net.grid_hw,
        (SIZE, SIZE),
        box,
    )


def _merger(**kwargs):
    return lambda dim, context=None: ToMeMerger(dim=dim, context=context, **kwargs)


def _inputs(b: int = 2):
    torch.manual_seed(1)
    image = torch.rand(b, 1, SIZE, SIZE)
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0], [20.0, 16.0, 60.0, 64.0]])[:b]
    return image, box


def test_sides_alternate_over_the_valid_slots_only():
    valid = torch.tensor([[True, False, True, True, False, True]])
    side_a, side_b = bipartite_sides(valid)
    assert side_a.tolist() == [[True, False, False, True, False, False]]
    assert side_b.tolist() == [[False, False, True, False, False, True]]


def test_the_most_similar_pair_is_merged_into_a_size_weighted_mean():
    # slots 0, 2 are side A; 1, 3 side B. Slot 2 is nearly parallel to slot 3: that pair merges.
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.1], [1.0, 1.0]]])
    size = torch.tensor([[1, 1, 1, 3]])
    result = ToMeMerger(dim=2, budget=TokenBudget(q=25)).eval()(
        tokens, (2, 2), torch.zeros(1, 4), (32, 32), state=PointState(carried=ToMeState(size=size))
    )
    assert result.keep.tolist() == [[True, True, False, True]]
    assert result.merge.target.tolist() == [[0, 1, 3, 3]]
    expected = (3 * torch.tensor([1.0, 1.0]) + 1 * torch.tensor([2.0, 2.1])) / 4
    torch.testing.assert_close(result.merge.tokens[0, 3], expected)
    torch.testing.assert_close(result.merge.tokens[0, :2], tokens[0, :2])
    assert result.carried.size[0, [0, 1, 3]].tolist() == [1, 1, 4]


def test_merging_preserves_the_size_weighted_sum():
    torch.manual_seed(0)
    tokens, size = torch.randn(2, 9, 5), torch.randint(1, 4, (2, 9))
    merged = torch.tensor([[True, False, True, False, False, False, True, False, False]] * 2)
    partner = torch.tensor([[1, 1, 3, 3, 5, 5, 1, 7, 7]] * 2)
    out, new_size, _ = merge_tokens(tokens, size, merged, partner)
    kept = ~merged
    before = (tokens * size[..., None]).sum(dim=1)
    after = (out * new_size[..., None] * kept[..., None]).sum(dim=1)
    torch.testing.assert_close(after, before)
    assert new_size[kept].sum() == size.sum()


@pytest.mark.parametrize("q", [25, 50])
def test_merges_floor_q_n_over_100_tokens_per_image_with_padding(q):
    tokens = torch.randn(2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    result = ToMeMerger(dim=8, budget=TokenBudget(q=q))(
        tokens, (4, 4), torch.zeros(2, 4), (64, 64), valid=valid
    )
    removed = (valid & ~result.keep).sum(dim=1).tolist()
    assert removed == [10 * q // 100, 7 * q // 100]
    assert not result.keep[1, 7:].any()


def test_merged_away_places_take_their_destinations_final_value_in_unetr():
    net = _unetr(pruner=_merger(budget=TokenBudget(q=50)), prune_after=(3, 6))
    encoded = _encode(net, *_inputs())
    trace = encoded.trace
    assert [k.sum(dim=1).tolist() for k in trace.keep_grids] == [[8, 8], [4, 4]]
    first, second = trace.merges
    for b in range(2):
        for place in range(16):
            into = int(first[b, place]) if first[b, place] >= 0 else place
            into = int(second[b, into]) if second[b, into] >= 0 else into
            torch.testing.assert_close(encoded.final[b, place], encoded.final[b, into])
            torch.testing.assert_close(encoded.skips[10][b, place], encoded.skips[10][b, into])
        assert len(torch.unique(encoded.final[b], dim=0)) == 4


TRANSUNET_TINY = {
    "cnn_layers": (1, 1, 1),
    "cnn_channels": (32, 32, 64),
    "stem_channels": 8,
    "cnn_norm_groups": 8,
    "head_channels": 16,
    "decoder_channels": (16, 8, 8, 8),
}


@pytest.mark.parametrize(
    ("net_cls", "kwargs"), [(PrunableUNETR, {"mlp_dim": 96}), (PrunableTransUNet, TRANSUNET_TINY)]
)
def test_drop_and_mask_give_the_same_prediction(net_cls, kwargs):
    image, box = _inputs()
    logits = {}
    for mode in ("drop", "mask"):
        torch.manual_seed(0)
        net = net_cls(1, 3, img_size=SIZE, hidden_size=48, num_heads=3, pruner=_merger(mode=mode), **kwargs)
        logits[mode] = net.eval()(image, box).logits
    torch.testing.assert_close(logits["drop"], logits["mask"], rtol=1e-4, atol=1e-5)


def test_an_exempt_image_is_predicted_as_by_the_unpruned_model():
    net = _unetr(pruner=_merger(budget=TokenBudget(q=50)))
    image, box = _inputs()
    enabled = torch.tensor([False, True])
    merged = net(image, box, enabled).logits
    with pruning_disabled(net):
        full = net(image, box).logits
    torch.testing.assert_close(merged[0], full[0])
    assert not torch.allclose(merged[1], full[1])


def test_inference_flops_fall_on_the_executed_graph():
    net = _unetr(pruner=_merger(budget=TokenBudget(q=50)))
    image, box = _inputs(1)
    with pruning_disabled(net):
        full = count_flops(net, image, box).total_flops
    assert count_flops(net, image, box).total_flops < full


def test_gradients_flow_through_merged_tokens():
    net = _unetr(pruner=_merger(budget=TokenBudget(q=50))).train()
    net(*_inputs()).logits.sum().backward()
    assert next(net.unetr.vit.blocks[0].parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": TokenBudget(q=75)}, "at most half"),
        ({"mode": "zero_once"}, "zero_once"),
        ({"budget": TokenBudget("fixed", tau=0.3)}, "percentile"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToMeMerger(dim=8, **kwargs)


def _hierarchical(backbone: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if backbone == "swin":
        return PrunableSwinUNETR(1, 3, img_size=SIZE, feature_size=12, pruner=_merger(**kwargs)).eval()
    return PrunableSegFormer(
        1,
        3,
        img_size=SIZE,
        hidden_sizes=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_attention_heads=(1, 1, 1, 1),
        decoder_hidden_size=16,
        pruner=_merger(**kwargs),
    ).eval()


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_hierarchical_backbones_merge_the_promised_count(backbone):
    net = _hierarchical(backbone, budget=TokenBudget(q=25))
    out = net(torch.rand(2, 1, SIZE, SIZE), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2))
    z = out.trace.grid_hw[0] * out.trace.grid_hw[1]
    assert out.trace.keep_grids[0].sum(dim=1).tolist() == [z - z // 4] * 2
    assert (out.trace.merges[0] >= 0).sum(dim=1).tolist() == [z // 4] * 2


def test_segformer_decoder_reads_merged_away_places_with_their_destinations_value():
    net = _hierarchical("segformer", budget=TokenBudget(q=50))
    maps = []
    net.segformer.decode_head.register_forward_pre_hook(lambda _m, args: maps.append(args[0]))
    out = net(torch.rand(2, 1, SIZE, SIZE), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2))
    into = out.trace.merges[0]  # (B, Z) on the pruning stage's grid (stage 2)
    stage = maps[0][net.prune_at_stage - 1].flatten(2)  # (B, C, Z)
    source = into >= 0
    destination = torch.gather(stage, 2, into.clamp(min=0)[:, None, :].expand_as(stage))
    torch.testing.assert_close(stage.transpose(1, 2)[source], destination.transpose(1, 2)[source])
    assert source.any()


def test_follow_merges_sends_an_earlier_merge_on_to_the_later_destination():
    earlier = torch.tensor([[-1, 0, -1, -1]])  # place 1 went into 0
    now = torch.tensor([[3, -1, -1, -1]])  # then place 0 went into 3
    assert follow_merges(earlier, now).tolist() == [[3, 3, -1, -1]]


def test_child_merged_into_maps_a_childless_footprint_to_its_destinations_child():
    # 4 x 4 grid, 2 x 2 children. Places 0, 1, 4, 5 (child 0) all merged into place 15 (child 3).
    into = torch.full((1, 16), -1)
    into[0, [0, 1, 4, 5]] = 15
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, [0, 1, 4, 5]] = False
    child, hw = child_merged_into(into, keep, (4, 4))
    assert hw == (2, 2)
    assert child.tolist() == [[3, -1, -1, -1]]
