"""The six baseline pruners: promised keep counts, differentiable training paths, real savings."""

from functools import partial

import pytest
import torch
from conftest import BASELINES, compose_train, make_dtop_confident
from monai.networks.blocks import TransformerBlock
from timm.models.vision_transformer import Block

from prato_exp.cli.common import check_pruning_keys
from prato_exp.metrics.efficiency import count_flops
from prato_exp.models.unetr import PrunableUNETR
from prato_exp.pruning.base import PointState, PrunerContext, PruneResult, TokenPruner, pruning_disabled
from prato_exp.pruning.budget import TokenBudget, percentile_keep_count
from prato_exp.pruning.dtop import DToPPruner, exit_mask
from prato_exp.pruning.dynamicvit import DynamicViTPruner
from prato_exp.pruning.evovit import EvoViTPruner, EvoViTState, received_attention
from prato_exp.pruning.random_mask import RandomPruner
from prato_exp.pruning.stp import STPPruner
from prato_exp.pruning.trace import PruningTrace
from prato_exp.pruning.tram import TRAMPruner, TRAMState, layer_relevance
from prato_exp.tokens.attention_mask import KeyMask
from prato_exp.tokens.blocks import MonaiBlockParts, TimmBlockParts, run_parts

SIZE = 64  # 4 x 4 = 16 tokens
CONTEXT = PrunerContext(num_classes=3, grid_hw=(4, 4), depth=12)

COUNTED = ["random", "dynamicvit", "evovit", "stp", "tram"]


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


# --- keep counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COUNTED)
@pytest.mark.parametrize("training", [False, True])
def test_keep_count_is_prato_percentile_count_in_unetr(name, training):
    net = _net(BASELINES[name]).train(training)
    image, box = _inputs()
    out = net(image, box)
    kept = out.trace.keep_grids[0].sum(dim=1)
    expected = percentile_keep_count(torch.tensor([16, 16]), 25)
    if name == "dynamicvit" and training:  # Gumbel samples: stochastic count, pulled by the ratio loss
        assert "keep_ratio" in out.trace.aux_losses()
        return
    assert kept.tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["random", "stp", "tram"])
def test_keep_count_counts_only_valid_slots(name):
    pruner = BASELINES[name](dim=8, context=CONTEXT).eval()
    tokens = torch.randn(2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    state = PointState(carried=TRAMState(torch.rand(2, 10)))
    result = pruner(tokens, (4, 4), torch.zeros(2, 4), (64, 64), valid=valid, state=state)
    assert result.keep.sum(dim=1).tolist() == [10 - 2, 7 - 1]
    assert not result.keep[1, 7:].any()


def test_evovit_keeps_the_cumulative_count_at_a_second_point():
    net = _net(BASELINES["evovit"], prune_after=(3, 6)).eval()
    out = net(*_inputs())
    assert [k.sum(dim=1).tolist() for k in out.trace.keep_grids] == [[12, 12], [9, 9]]


def test_dtop_exits_exactly_the_confident_tokens_except_top_k_per_class():
    probs = torch.tensor(
        [
            [
                [0.95, 0.03, 0.02],
                [0.97, 0.02, 0.01],
                [0.92, 0.04, 0.04],
                [0.90, 0.05, 0.05],  # == p0: not over the threshold
                [0.02, 0.96, 0.02],
                [0.05, 0.05, 0.90],
                [0.99, 0.005, 0.005],
            ]
        ]
    )
    valid = torch.ones(1, 7, dtype=torch.bool)
    exits = exit_mask(probs, valid, p0=0.9, k_keep=2)
    # class 0 candidates by confidence: 6 (0.99), 1 (0.97), 0 (0.95), 2 (0.92): the top 2 stay;
    # class 1 has one candidate (4): it stays; token 5 is not over p0
    assert exits.tolist() == [[True, False, True, False, False, False, False]]


def test_dtop_keeps_all_when_no_token_is_confident():
    probs = torch.full((2, 5, 3), 1 / 3)
    assert not exit_mask(probs, torch.ones(2, 5, dtype=torch.bool), 0.9, 5).any()


def test_dtop_in_unetr_keeps_only_the_per_class_top_k_and_writes_head_logits():
    net = _net(partial(DToPPruner, p0=0.9, k_keep=5)).eval()
    make_dtop_confident(net)
    image, box = _inputs()
    out = net(image, box)
    assert out.trace.keep_grids[0].sum(dim=1).tolist() == [5, 5]
    result = out.trace.results[0]
    assert result.early_exit.exit_grid.sum(dim=1).tolist() == [11, 11]
    exited = result.early_exit.exit_grid.view(2, 1, 4, 4).repeat_interleave(16, -2).repeat_interleave(16, -1)
    early = result.early_exit.logits.repeat_interleave(16, -2).repeat_interleave(16, -1)
    assert torch.equal(out.logits.masked_select(exited), early.masked_select(exited))


def test_final_logits_are_the_decoders_without_early_exits():
    logits = torch.randn(2, 3, 8, 8)
    assert PruningTrace(grid_hw=(2, 2)).final_logits(logits) is logits


# --- random: reproducible ------------------------------------------------------------------------


def test_random_is_reproducible_from_the_seed_and_fresh_per_image_and_call():
    tokens = torch.zeros(2, 16, 4)
    a, b = RandomPruner(seed=7).eval(), RandomPruner(seed=7).eval()
    first = a(tokens, (4, 4), torch.zeros(2, 4), (64, 64)).keep
    assert torch.equal(first, b(tokens, (4, 4), torch.zeros(2, 4), (64, 64)).keep)
    assert not torch.equal(first[0], first[1])
    second = a(tokens, (4, 4), torch.zeros(2, 4), (64, 64)).keep
    assert not torch.equal(first, second)
    a.reset_rng()
    assert torch.equal(first, a(tokens, (4, 4), torch.zeros(2, 4), (64, 64)).keep)
    other = RandomPruner(seed=8).eval()(tokens, (4, 4), torch.zeros(2, 4), (64, 64)).keep
    assert not torch.equal(first, other)


# --- training paths are differentiable -------------------------------------------------------------


@pytest.mark.parametrize("name", ["dynamicvit", "stp", "dtop"])
def test_training_gradients_reach_every_learnable_part(name):
    net = _net(BASELINES[name]).train()
    if name == "dtop":
        make_dtop_confident(net)
    image, box = _inputs()
    out = net(image, box)
    loss = out.logits.square().mean() + sum(out.trace.aux_losses().values())
    for result in out.trace.results:
        if result.early_exit is not None:
            loss = loss + result.early_exit.logits.square().mean()
    loss.backward()
    missing = [n for n, p in net.pruners.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert net.unetr.vit.blocks[-1].mlp.linear1.weight.grad.abs().sum() > 0


def test_dynamicvit_predictor_gets_gradients_from_the_task_loss_alone():
    net = _net(BASELINES["dynamicvit"]).train()
    net(*_inputs()).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.pruners.parameters())


def test_stp_token_scale_is_one_in_value():
    pruner = STPPruner(dim=8, budget=TokenBudget(q=25), context=CONTEXT).train()
    result = pruner(torch.randn(2, 16, 8), (4, 4), torch.zeros(2, 4), (64, 64))
    torch.testing.assert_close(result.token_scale, torch.ones(2, 16))
    assert result.token_scale.requires_grad


@pytest.mark.parametrize("name", ["dynamicvit", "stp"])
def test_training_masks_are_stochastic_and_inference_is_deterministic(name):
    net = _net(BASELINES[name])
    image, box = _inputs()
    torch.manual_seed(0)
    train_masks = [net.train()(image, box).trace.keep_grids[0] for _ in range(2)]
    assert not torch.equal(*train_masks)
    eval_masks = [net.eval()(image, box).trace.keep_grids[0] for _ in range(2)]
    assert torch.equal(*eval_masks)


def test_dynamicvit_ratio_loss_is_zero_at_the_target():
    pruner = DynamicViTPruner(dim=8, budget=TokenBudget(q=25), context=CONTEXT)
    assert pruner.target_ratio() == 0.75
    second = DynamicViTPruner(
        dim=8, budget=TokenBudget(q=25), context=PrunerContext(3, (4, 4), 12, point_index=1, num_points=2)
    )
    assert second.target_ratio() == pytest.approx(0.5625)


# --- inference really drops tokens -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(BASELINES))
def test_inference_flops_fall_on_the_executed_graph(name):
    net = _net(BASELINES[name]).eval()
    if name == "dtop":
        make_dtop_confident(net)
    image, box = _inputs(1)
    pruned = count_flops(net, image, box)
    with pruning_disabled(net):
        full = count_flops(net, image, box)
    blocks = [f"unetr.vit.blocks.{i}" for i in range(3, 12)]
    # 12 of 16 tokens kept (Evo-ViT: 12 + its representative token; DToP: 5 per confident class)
    assert pruned.flops_under(blocks) < 0.85 * full.flops_under(blocks)


def test_stp_assembler_cost_is_counted_in_the_pruned_part():
    net = _net(BASELINES["stp"]).eval()
    assert "pruners.3.assemblers" in net.pruned_part()
    report = count_flops(net, *_inputs(1))
    assert report.flops_under(["pruners.3.assemblers"]) > 0


# --- attention-reading pruners ------------------------------------------------------------------------


def test_monai_block_parts_reproduce_the_block_with_and_without_a_key_mask():
    torch.manual_seed(0)
    block = TransformerBlock(16, 32, 4).eval()
    x = torch.randn(2, 6, 16)
    keep = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    out, weights = run_parts(MonaiBlockParts(block), x, KeyMask(None).softmax)
    torch.testing.assert_close(out, block(x))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    masked, weights = run_parts(MonaiBlockParts(block), x, KeyMask(keep).softmax)
    torch.testing.assert_close(masked, block(x, attn_mask=keep))
    assert weights[1, :, :, 4:].abs().max() == 0


def test_timm_block_parts_reproduce_the_block():
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    x = torch.randn(2, 6, 16)
    out, _ = run_parts(TimmBlockParts(block), x, KeyMask(None).softmax)
    torch.testing.assert_close(out, block(x))


def test_tram_layer_relevance_by_hand():
    attn = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]]])  # (1, 3, 3)
    other_head = torch.zeros(1, 3, 3)
    weights = torch.stack([attn, other_head], dim=1)
    # head max = attn; in-degrees c_in = [0.7, 1.7, 0.6]; r_j = sum_i A[i, j] c_in[i]
    expected = torch.tensor([[0.5 * 0.7 + 0.2 * 1.7, 0.5 * 0.7 + 0.2 * 1.7 + 1.0 * 0.6, 0.6 * 1.7]])
    torch.testing.assert_close(layer_relevance(weights, torch.ones(1, 3, dtype=torch.bool)), expected)


def test_tram_centrality_accumulates_with_layer_weights():
    pruner = TRAMPruner(context=PrunerContext(3, (2, 2), depth=4))
    valid = torch.ones(1, 4, dtype=torch.bool)
    w1, w2 = torch.rand(1, 2, 4, 4).softmax(-1), torch.rand(1, 2, 4, 4).softmax(-1)
    state = pruner.observe_attention(w2, valid, pruner.observe_attention(w1, valid, PointState(), 1), 2)
    expected = 0.25 * layer_relevance(w1, valid) + 0.5 * layer_relevance(w2, valid)
    torch.testing.assert_close(state.carried.centrality, expected)


def test_tram_padding_does_not_change_the_relevance_of_valid_tokens():
    weights = torch.rand(1, 2, 4, 4).softmax(-1)
    padded = torch.zeros(1, 2, 6, 6)
    padded[:, :, :4, :4] = weights
    padded[:, :, 4:, :] = 0.3
    valid = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(
        layer_relevance(padded, valid)[:, :4], layer_relevance(weights, torch.ones(1, 4, dtype=torch.bool))
    )


def test_evovit_received_attention_sums_to_heads_over_keys():
    weights = torch.rand(2, 3, 5, 5).softmax(-1)
    received = received_attention(weights, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(received.sum(-1), torch.full((2,), 3.0))


def _evovit_stage(representative: bool):
    pruner = EvoViTPruner(budget=TokenBudget(q=25), representative=representative)
    torch.manual_seed(0)
    block = TransformerBlock(16, 32, 4).eval()
    tokens = torch.randn(1, 8, 16)
    keep = torch.tensor([[True, False, True, True, False, True, True, True]])
    state = PointState(keep=keep, carried=EvoViTState(torch.rand(1, 8)))
    out, new_state = pruner.run_block(MonaiBlockParts(block), tokens, state)
    return tokens, keep, out, new_state


def test_evovit_placeholders_all_move_by_the_representative_residual():
    tokens, keep, out, _ = _evovit_stage(representative=True)
    delta = (out - tokens)[~keep]
    torch.testing.assert_close(delta[0], delta[1])
    assert delta.abs().sum() > 0


def test_evovit_without_representative_freezes_placeholders():
    tokens, keep, out, _ = _evovit_stage(representative=False)
    assert torch.equal(out[~keep], tokens[~keep])
    assert (out[keep] != tokens[keep]).any()


def test_evovit_with_everything_informative_reproduces_the_block():
    pruner = EvoViTPruner(budget=TokenBudget(q=25))
    torch.manual_seed(0)
    block = TransformerBlock(16, 32, 4).eval()
    tokens = torch.randn(2, 6, 16)
    state = PointState(keep=torch.ones(2, 6, dtype=torch.bool), carried=EvoViTState(torch.rand(2, 6)))
    out, _ = pruner.run_block(MonaiBlockParts(block), tokens, state)
    torch.testing.assert_close(out, block(tokens))


@pytest.mark.parametrize("name", ["random", "tram", "stp"])
def test_drop_and_mask_give_the_same_prediction(name):
    if name == "stp":  # the assembler reads the carried grid in both modes
        factory = partial(STPPruner, budget=TokenBudget(q=25))
        drop, mask = _net(factory).eval(), _net(partial(factory, mode="mask")).eval()
    else:
        drop = _net(partial(BASELINES[name].func, **BASELINES[name].keywords)).eval()
        mask = _net(partial(BASELINES[name].func, **BASELINES[name].keywords, mode="mask")).eval()
    image, box = _inputs()
    torch.testing.assert_close(drop(image, box).logits, mask(image, box).logits, atol=2e-5, rtol=1e-4)


def test_baselines_refuse_fixed_thresholds_with_a_clear_error():
    with pytest.raises(ValueError, match=r"pruning=random .* supports only percentile budgets"):
        RandomPruner(budget=TokenBudget("fixed", tau=0.3))


def test_random_trains_on_the_global_stream_and_evaluates_on_its_own():
    pruner = RandomPruner(seed=3).train()
    tokens = torch.zeros(1, 16, 4)
    torch.manual_seed(0)
    first = pruner(tokens, (4, 4), torch.zeros(1, 4), (64, 64)).keep
    torch.manual_seed(0)
    assert torch.equal(first, pruner(tokens, (4, 4), torch.zeros(1, 4), (64, 64)).keep)
    pruner.eval()
    evaluated = pruner(tokens, (4, 4), torch.zeros(1, 4), (64, 64)).keep
    pruner.reset_rng()
    assert torch.equal(evaluated, pruner(tokens, (4, 4), torch.zeros(1, 4), (64, 64)).keep)


def test_dynamicvit_exempt_images_neither_count_in_the_ratio_loss_nor_train_the_predictor():
    net = _net(BASELINES["dynamicvit"]).train()
    image, box = _inputs()
    out = net(image, box, prune_enabled=torch.tensor([False, False]))
    assert out.trace.keep_grids[0].all()
    assert out.trace.aux_losses()["keep_ratio"] == 0
    out.logits.square().mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.pruners.parameters())


class _OneBlock(torch.nn.Module):
    def __init__(self, use_parts: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = TransformerBlock(16, 32, 4)
        self.use_parts = use_parts

    def forward(self, x):
        if self.use_parts:
            return run_parts(MonaiBlockParts(self.block), x, KeyMask(None).softmax)[0]
        return self.block(x)


def test_block_parts_flops_are_counted_inside_the_block():
    x = torch.randn(1, 8, 16)
    library, parts = count_flops(_OneBlock(False), x), count_flops(_OneBlock(True), x)
    assert parts.flops_under(["block"]) == library.flops_under(["block"]) == library.total_flops


def _hierarchical(backbone: str, pruner) -> torch.nn.Module:
    """A small Swin UNETR or SegFormer for 64 px, 3 classes, pruned at its default point."""
    from prato_exp.models.segformer import PrunableSegFormer
    from prato_exp.models.swin_unetr import PrunableSwinUNETR

    torch.manual_seed(0)
    if backbone == "swin":
        return PrunableSwinUNETR(1, 3, img_size=SIZE, feature_size=12, pruner=pruner)
    return PrunableSegFormer(
        1,
        3,
        img_size=SIZE,
        hidden_sizes=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_attention_heads=(1, 1, 1, 1),
        decoder_hidden_size=16,
        drop_path_rate=0.0,
        classifier_dropout_prob=0.0,
        pruner=pruner,
    )


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_dtop_in_hierarchical_backbones_exits_at_its_stage_and_writes_head_logits(backbone):
    net = _hierarchical(backbone, partial(DToPPruner, p0=0.9, k_keep=5)).eval()
    make_dtop_confident(net)
    image, box = _inputs()
    out = net(image, box)
    h, w = out.trace.grid_hw
    assert (h, w) == {"swin": (16, 16), "segformer": (8, 8)}[backbone]
    assert out.trace.keep_grids[0].sum(dim=1).tolist() == [5, 5]
    result = out.trace.results[0]
    patch = SIZE // h
    exited = result.early_exit.exit_grid.view(2, 1, h, w)
    exited = exited.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    early = result.early_exit.logits.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    assert torch.equal(out.logits.masked_select(exited), early.masked_select(exited))
    assert not torch.equal(out.logits.masked_select(~exited), early.masked_select(~exited))


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_dtop_in_hierarchical_backbones_trains_its_head(backbone):
    net = _hierarchical(backbone, partial(DToPPruner, p0=0.9, k_keep=5)).train()
    image, box = _inputs()
    out = net(image, box)
    losses = out.trace.early_prediction_losses(
        torch.nn.functional.cross_entropy, torch.zeros(2, SIZE, SIZE).long()
    )
    losses["early_head"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.pruners.parameters())


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_dynamicvit_trains_in_hierarchical_backbones_with_drop_values_and_policy_gradients(backbone):
    net = _hierarchical(backbone, BASELINES["dynamicvit"]).train()
    image, box = _inputs()
    out = net(image, box)
    assert "keep_ratio" in out.trace.aux_losses()
    keep = out.trace.keep_grids[0]
    assert 0 < keep.sum() < keep.numel()
    out.logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.pruners.parameters())


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_dynamicvit_training_computes_what_drop_computes_for_its_sampled_keep(backbone):
    """With the same Gumbel sample, the weighted execution equals dropping the sampled tokens."""
    net = _hierarchical(backbone, BASELINES["dynamicvit"]).train()
    image, box = _inputs()
    torch.manual_seed(3)
    soft = net(image, box)
    sampled = soft.trace.keep_grids[0]

    class Replay(TokenPruner):
        def select(self, alive, prompt, state):
            return PruneResult(keep=sampled.clone(), scores=sampled.float())

    net.pruners[next(iter(net.pruners))] = Replay()
    torch.testing.assert_close(net(image, box).logits, soft.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_stp_assembles_every_decoder_grid_from_the_pruning_point_on(backbone):
    net = _hierarchical(backbone, BASELINES["stp"]).eval()
    pruner = next(iter(net.pruners.values()))
    calls = []
    assemble = pruner.assemble

    def spy(final, carry, exit_point, results, index=0):
        calls.append((index, tuple(final.shape[1:]), int((exit_point == 0).sum())))
        return assemble(final, carry, exit_point, results, index)

    pruner.assemble = spy
    image, box = _inputs()
    out = net(image, box)
    grids = [(a.grid_hw[0] * a.grid_hw[1], a.out.out_features) for a in pruner.assemblers]
    assert len(grids) == {"swin": 4, "segformer": 3}[backbone]  # the point's grid and every later stage
    assert [index for index, _, _ in calls] == list(range(len(grids)))
    assert [shape for _, shape, _ in calls] == grids
    assert calls[0][2] == int((~out.trace.keep_grids[0]).sum())  # pruned at the point: the first group
    assert any(name.endswith("assemblers") for name in net.pruned_part())


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_stp_trains_every_assembler_in_hierarchical_backbones(backbone):
    """The score net and every assembler get gradients (the pruned group's own layers at the later
    stages only where a place stays pruned there; at 64 px the parent rule keeps them all)."""
    net = _hierarchical(backbone, BASELINES["stp"]).train()
    out = net(*_inputs())
    out.logits.square().mean().backward()
    pruner = next(iter(net.pruners.values()))
    trained = [pruner.predictor, pruner.assemblers[0]] + [a.blocks for a in pruner.assemblers]
    missing = [m for m in trained for p in m.parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tram_in_swin_scores_each_window_as_the_block_diagonal_attention_graph():
    """Per-window relevance put back on the grid equals TRAM's relevance of the dense attention
    matrix holding every window's map at its grid places (block-diagonal), for a shifted block too."""
    from prato_exp.models.swin_unetr import _observed_stage
    from prato_exp.tokens.windows import window_layout

    net = _hierarchical("swin", BASELINES["tram"]).eval()
    tram = next(iter(net.pruners.values()))
    layer = net.stages()[0]
    x = net.swin_unetr.swinViT.patch_embed(_inputs()[0])  # (2, C, 32, 32)
    grid_hw = (x.shape[-2], x.shape[-1])
    maps = []
    hooks = [blk.attn.softmax.register_forward_hook(lambda _m, _i, o: maps.append(o)) for blk in layer.blocks]
    recorded = []

    class Recorder(TRAMPruner):
        def observe_scores(self, scores, valid, state, block_index):
            recorded.append(scores)
            return super().observe_scores(scores, valid, state, block_index)

    recorder = Recorder(context=PrunerContext(3, (16, 16), depth=tram.depth))
    with torch.no_grad():
        _, state = _observed_stage(layer, x, recorder, PointState(), first_block=1)
    for hook in hooks:
        hook.remove()
    b, z = x.shape[0], grid_hw[0] * grid_hw[1]
    for block, weights, scores in zip(layer.blocks, maps[: len(recorded)], recorded, strict=True):
        from monai.networks.nets.swin_unetr import get_window_size

        window, shift = get_window_size(grid_hw, block.window_size, block.shift_size)
        slot = window_layout(grid_hw, window, shift, x.device).slot_of_position  # (Z,)
        t = window[0] * window[1]
        per_image = weights.view(b, -1, weights.shape[1], t, t)  # (B, nW, heads, T, T)
        dense = torch.zeros(b, weights.shape[1], z, z)
        same_window = (slot[:, None] // t) == (slot[None, :] // t)
        rows, cols = same_window.nonzero(as_tuple=True)
        pair_weights = per_image[:, slot[rows] // t, :, slot[rows] % t, slot[cols] % t]  # (P, B, heads)
        dense[:, :, rows, cols] = pair_weights.permute(1, 2, 0)
        expected = layer_relevance(dense, torch.ones(b, z, dtype=torch.bool))
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    assert state.carried.centrality.shape == (b, z // 4)  # carried across the 2 x 2 merge (summed)
    expected_sum = sum((i / tram.depth) * s for i, s in enumerate(recorded, start=1)).sum(dim=1)
    torch.testing.assert_close(state.carried.centrality.sum(dim=1), expected_sum)


def test_tram_in_swin_keeps_prato_percentile_count():
    net = _hierarchical("swin", BASELINES["tram"]).eval()
    out = net(*_inputs())
    kept = out.trace.keep_grids[0].sum(dim=1)
    assert kept.tolist() == percentile_keep_count(torch.tensor([256, 256]), 25).tolist()


def test_segformer_refuses_attention_rankers_with_the_reason():
    with pytest.raises(ValueError, match="spatially reduced keys"):
        _hierarchical("segformer", BASELINES["tram"])


@pytest.mark.parametrize("backbone", ["swin", "segformer"])
def test_hierarchical_backbones_refuse_evovit_with_its_reason(backbone):
    with pytest.raises(ValueError, match=r"EvoViTPruner cannot run in .*representative token.*model=unetr"):
        _hierarchical(backbone, BASELINES["evovit"])


def test_dtop_refuses_a_threshold_choice_with_a_clear_error():
    with pytest.raises(ValueError, match=r"pruning\.budget is not a setting of .*DToPPruner .*token budget"):
        check_pruning_keys(compose_train(["pruning=dtop", "threshold=percentile50"]).pruning)


def test_dtop_exits_nothing_during_its_warm_up_steps():
    net = _net(partial(DToPPruner, p0=0.9, exit_warmup_steps=10))
    make_dtop_confident(net)
    pruner = net.pruners["3"]
    pruner.on_train_batch(9)
    assert net(*_inputs()).trace.keep_grids[0].all()
    pruner.on_train_batch(10)
    assert net(*_inputs()).trace.keep_grids[0].sum(dim=1).tolist() == [5, 5]


def test_trace_exit_points_name_the_point_that_removed_each_place():
    trace = PruningTrace(grid_hw=(1, 4))
    trace.keep_grids = [torch.tensor([[True, True, False, True]]), torch.tensor([[True, False, False, True]])]
    assert trace.exit_points().tolist() == [[-1, 1, 0, -1]]
