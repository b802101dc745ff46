import math

import numpy as np
import pytest
import torch

from prato_exp.pruning.budget import TokenBudget, fixed_keep, percentile_keep
from prato_exp.pruning.prato import (
    PrATo,
    box_overlap_mask,
    entropy_weights,
    naive_query_mask,
    query_entropy,
    roialign_queries,
    tokens_to_grid,
)


def _identity_pruner(dim: int, **kwargs) -> PrATo:
    pruner = PrATo(dim, d_v=dim, **kwargs)
    with torch.no_grad():
        pruner.f1.weight.copy_(torch.eye(dim))
        pruner.f2.weight.copy_(torch.eye(dim))
    return pruner


def _coord_tokens(h: int, w: int, batch: int = 1) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    feats = torch.stack([rows, cols], dim=-1).reshape(1, h * w, 2).float()
    return feats.expand(batch, -1, -1).clone()


def _full(batch: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(z).expand(batch, z).clone()
    return positions, torch.ones(batch, z, dtype=torch.bool)


def test_equations_match_numpy_on_hand_example():
    torch.manual_seed(0)
    c, h, w = 2, 4, 4
    tokens = torch.randn(1, h * w, c)
    pruner = _identity_pruner(c, k=2, budget=TokenBudget(q=25))
    result = pruner(tokens, (h, w), torch.tensor([[0.0, 0.0, 64.0, 64.0]]), (64, 64))

    y = tokens[0].double().numpy()
    f = y.reshape(2, 2, 2, 2, c).mean(axis=(1, 3)).reshape(4, c)
    s_mat = f @ y.T / math.sqrt(c)
    rho = np.exp(s_mat - s_mat.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    ent = -(rho * np.log(rho)).sum(1)
    rank = np.empty(4)
    rank[np.argsort(ent, kind="stable")] = np.arange(4)
    omega = 1 - rank / 3
    r = omega @ s_mat / 4
    s = 1 / (1 + np.exp(-r))
    expected_keep = np.zeros(16, dtype=bool)
    expected_keep[np.argsort(-s, kind="stable")[:12]] = True

    torch.testing.assert_close(result.entropy[0].double(), torch.from_numpy(ent), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.weights[0].double(), torch.from_numpy(omega), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.relevance[0].double(), torch.from_numpy(r), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.scores[0].double(), torch.from_numpy(s), atol=1e-5, rtol=1e-5)
    assert torch.equal(result.keep[0], torch.from_numpy(expected_keep))


def test_entropy_weights_rank_ascending_ties_by_index():
    weights = entropy_weights(torch.tensor([[0.3, 0.1, 0.2, 0.1]]))
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0, 1 / 3, 2 / 3]]))


def test_entropy_weights_single_query_is_one():
    assert entropy_weights(torch.tensor([[2.7]])).item() == 1.0


def test_entropy_weights_use_per_image_query_count():
    ent = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.4, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    weights = entropy_weights(ent, mask)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("q", [25, 50, 75])
@pytest.mark.parametrize("z", [1, 2, 3, 5, 10, 13, 49, 196])
def test_percentile_keeps_exact_count_of_top_scores(q, z):
    scores = torch.rand(3, z, generator=torch.Generator().manual_seed(z))
    valid = torch.ones(3, z, dtype=torch.bool)
    keep = percentile_keep(scores, valid, q)
    assert keep.sum(1).tolist() == [z - (q * z) // 100] * 3
    kept_min = scores.masked_fill(~keep, math.inf).amin(1)
    dropped_max = scores.masked_fill(keep, -math.inf).amax(1)
    assert bool((kept_min > dropped_max).all())


@pytest.mark.parametrize("q", [25, 50, 75])
def test_percentile_counts_only_valid_slots(q):
    z = 23
    n = torch.tensor([23, 17, 10, 1])
    valid = torch.arange(z) < n[:, None]
    scores = torch.rand(4, z, generator=torch.Generator().manual_seed(1))
    scores[~valid] = 2.0
    keep = percentile_keep(scores, valid, q)
    assert keep.sum(1).tolist() == (n - (q * n) // 100).tolist()
    assert not bool((keep & ~valid).any())


def test_percentile_ties_do_not_change_count():
    scores = torch.full((2, 13), 0.5)
    keep = percentile_keep(scores, torch.ones(2, 13, dtype=torch.bool), 25)
    assert keep.sum(1).tolist() == [10, 10]
    assert bool(keep[:, :10].all())


def test_fixed_threshold_keeps_scores_above_tau():
    scores = torch.tensor([[0.1, 0.35, 0.3, 0.9, 0.31]])
    keep = fixed_keep(scores, torch.ones(1, 5, dtype=torch.bool), tau=0.3)
    assert keep.tolist() == [[False, True, False, True, True]]


def test_fixed_threshold_enforces_min_keep_when_none_pass():
    scores = torch.tensor([[0.1, 0.25, 0.2, 0.05], [0.3, 0.1, 0.2, 0.0]])
    valid = torch.tensor([[True] * 4, [True, False, True, True]])
    keep = fixed_keep(scores, valid, tau=0.5, min_keep=2)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]


def test_fixed_threshold_module_keeps_min_keep():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4, budget=TokenBudget("fixed", tau=0.99, min_keep=3))
    tokens = 0.01 * torch.randn(2, 16, 8)
    result = pruner(tokens, (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert result.keep.sum(1).tolist() == [3, 3]


def _scaled_loss(tokens: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return (tokens * (1.0 if scale is None else scale.unsqueeze(-1))).pow(2).sum()


def test_ste_gradients_reach_projections():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4)
    tokens = torch.randn(2, 16, 8)
    result = pruner(tokens, (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 60.0, 40.0]]), (64, 64))
    _scaled_loss(tokens, result.token_scale).backward()
    assert pruner.f1.weight.grad is not None and pruner.f1.weight.grad.abs().sum() > 0
    assert pruner.f2.weight.grad is not None and pruner.f2.weight.grad.abs().sum() > 0


def test_ste_scale_equals_keep_in_value():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4)
    result = pruner(torch.randn(2, 16, 8), (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert torch.equal(result.token_scale, result.keep.float())


def test_no_straight_through_scale_without_gradients():
    # in inference the scale would be 1 on every kept token: nothing to multiply
    pruner = PrATo(8, k=2, d_v=4)
    with torch.no_grad():
        result = pruner(torch.randn(2, 16, 8), (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert result.token_scale is None


def test_without_ste_no_gradient_reaches_projections():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4, ste=False)
    tokens = torch.randn(2, 16, 8, requires_grad=True)
    result = pruner(tokens, (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert result.token_scale is None
    _scaled_loss(tokens, result.token_scale).backward()
    assert pruner.f1.weight.grad is None and pruner.f2.weight.grad is None


def test_soft_keeps_all_and_scales_by_scores():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4, mode="zero_once", soft=True)
    result = pruner(torch.randn(2, 16, 8), (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert bool(result.keep.all())
    assert torch.equal(result.token_scale, result.scores)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": "crop"}, r"pruning.query must be one of \('roialign', 'naive'\), got 'crop'"),
        ({"soft": True}, "soft=true requires pruning.mode=zero_once"),
        ({"mode": "dorp"}, r"pruning.mode must be one of \('drop', 'mask', 'zero_once'\), got 'dorp'"),
        ({"fill": "mean"}, r"pruning.fill must be one of \('zero', 'carry'\), got 'mean'"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrATo(8, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q": 0}, r"pruning.budget.q \(percentile\) must lie in \(0, 100\)"),
        ({"q": 100}, r"pruning.budget.q \(percentile\) must lie in"),
        ({"rule": "fixed"}, "tau"),
        ({"rule": "fixed", "tau": 1.0}, "tau"),
        ({"rule": "otsu"}, r"pruning.budget.rule must be one of \('percentile', 'fixed'\)"),
        ({"min_keep": -1}, "min_keep must be >= 1"),
        ({"min_keep": 0}, "min_keep must be >= 1"),
        ({"tau": 0.3}, "pruning.budget.tau=0.3 is not used with rule=percentile"),
        ({"rule": "fixed", "tau": 0.3, "q": 25}, "pruning.budget.q=25 is not used with rule=fixed"),
    ],
)
def test_invalid_budgets_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenBudget(**kwargs)


def test_a_percentile_budget_defaults_to_the_papers_q():
    assert (TokenBudget().rule, TokenBudget().q, TokenBudget().label) == ("percentile", 25, "q=25")


def test_budget_keep_applies_its_rule():
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.4]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert TokenBudget(q=50).keep(scores, valid).tolist() == [[True, False, True, False]]
    assert TokenBudget("fixed", tau=0.3).keep(scores, valid).tolist() == [[True, False, True, True]]
    assert TokenBudget("fixed", tau=0.95, min_keep=1).keep(scores, valid).tolist() == [
        [True, False, False, False]
    ]


def test_a_count_is_refused_for_a_fixed_threshold_with_the_method_named():
    with pytest.raises(ValueError, match=r"pruning=random keeps a fixed token count .*budget.rule='fixed'"):
        TokenBudget("fixed", tau=0.3).require_count("pruning=random")


def _assert_finite_with_grads(pruner: PrATo, tokens: torch.Tensor, box: torch.Tensor) -> None:
    result = pruner(tokens, (4, 4), box, (64, 64))
    for value in (result.scores, result.entropy, result.weights, result.relevance):
        assert bool(torch.isfinite(value).all())
    _scaled_loss(tokens, result.token_scale).backward()
    for param in (pruner.f1.weight, pruner.f2.weight):
        assert param.grad is not None and bool(torch.isfinite(param.grad).all())


def test_one_hot_similarity_rows_give_zero_entropy_without_nan():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4)
    tokens = 1e3 * torch.randn(1, 16, 8)
    _assert_finite_with_grads(pruner, tokens, torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    sim = torch.tensor([[[1e4, 0.0, -1e4], [0.0, 5e3, 0.0]]])
    ent = query_entropy(sim, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(ent, torch.zeros(1, 2))


def test_zero_width_box_does_not_nan():
    torch.manual_seed(0)
    _assert_finite_with_grads(
        PrATo(8, k=2, d_v=4), torch.randn(1, 16, 8), torch.tensor([[20.0, 10.0, 20.0, 50.0]])
    )


def test_box_partly_outside_image_does_not_nan():
    torch.manual_seed(0)
    boxes = torch.tensor([[-30.0, -30.0, 20.0, 20.0], [50.0, 40.0, 100.0, 90.0]])
    _assert_finite_with_grads(PrATo(8, k=2, d_v=4), torch.randn(2, 16, 8), boxes)


def test_padding_slots_leave_softmax_unchanged():
    torch.manual_seed(0)
    sim = torch.randn(1, 2, 5)
    valid = torch.tensor([[True, True, False, True, False]])
    padded = query_entropy(sim.masked_fill(~valid[:, None], 1e6), valid)
    torch.testing.assert_close(padded, query_entropy(sim[..., valid[0]], torch.ones(1, 3, dtype=torch.bool)))


def test_naive_query_count_equals_centres_inside_box():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 45.0], [20.0, 20.0, 64.0, 64.0]])
    positions, valid = _full(2, 16)
    pruner = PrATo(8, k=2, d_v=4, query="naive")
    result = pruner(torch.randn(2, 16, 8), (4, 4), boxes, (64, 64), positions=positions, valid=valid)
    centres = (np.arange(4) + 0.5) * 16
    expected = [
        int(((centres >= x0) & (centres < x1)).sum() * ((centres >= y0) & (centres < y1)).sum())
        for x0, y0, x1, y1 in boxes.tolist()
    ]
    assert expected == [6, 9]
    assert result.query_mask.sum(1).tolist() == expected
    assert sorted(result.weights[0].tolist()) == pytest.approx([0, 0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_naive_queries_only_alive_tokens():
    positions = torch.tensor([[0, 1, 4, 5, 15, 0]])
    valid = torch.tensor([[True, True, True, False, True, False]])
    mask = naive_query_mask(positions, valid, (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]]), (64, 64))
    assert mask.tolist() == [[True, True, True, False, False, False]]


def test_naive_empty_box_falls_back_to_centre_token():
    torch.manual_seed(0)
    positions, valid = _full(1, 16)
    box = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    mask = naive_query_mask(positions, valid, (4, 4), box, (64, 64))
    assert mask.nonzero().tolist() == [[0, 0]]
    tokens = torch.randn(1, 16, 3)
    result = _identity_pruner(3, query="naive")(tokens, (4, 4), box, (64, 64))
    assert result.query_mask.tolist() == [[True]]
    torch.testing.assert_close(result.relevance[0], tokens[0] @ tokens[0, 0] / math.sqrt(3))


def test_naive_fallback_clamps_and_skips_pruned_centre():
    positions, valid = _full(1, 16)
    outside = torch.tensor([[100.0, 100.0, 120.0, 130.0]])
    assert naive_query_mask(positions, valid, (4, 4), outside, (64, 64)).nonzero().tolist() == [[0, 15]]
    alive = torch.tensor([[9, 0, 6, 4, 1]])
    centre_pruned = torch.tensor([[16.0, 16.0, 20.0, 20.0]])
    mask = naive_query_mask(alive, torch.ones(1, 5, dtype=torch.bool), (4, 4), centre_pruned, (64, 64))
    assert mask.nonzero().tolist() == [[0, 0]]


def test_entropy_false_gives_unit_weights():
    torch.manual_seed(0)
    pruner = PrATo(8, k=3, d_v=4, entropy=False)
    result = pruner(torch.randn(2, 16, 8), (4, 4), torch.tensor([[0.0, 0.0, 40.0, 40.0]] * 2), (64, 64))
    assert torch.equal(result.weights, torch.ones(2, 9))


def test_roialign_reads_boxed_quadrant_in_row_major_order():
    tokens = _coord_tokens(8, 8)
    positions, valid = _full(1, 64)
    grid = tokens_to_grid(tokens, positions, valid, (8, 8))
    queries = roialign_queries(grid, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), (128, 128), k=2)
    expected = torch.tensor([[[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]])
    torch.testing.assert_close(queries, expected)


def test_roialign_rescales_y_for_non_square_grid_scale():
    tokens = _coord_tokens(4, 8)
    positions, valid = _full(1, 32)
    grid = tokens_to_grid(tokens, positions, valid, (4, 8))
    queries = roialign_queries(grid, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), (64, 64), k=1)
    torch.testing.assert_close(queries, torch.tensor([[[0.5, 1.5]]]))


def test_grid_scatter_places_alive_tokens_and_zero_fills():
    tokens = _coord_tokens(3, 3) + 1
    perm = torch.tensor([[7, 2, 0, 5, 8]])
    alive = tokens.gather(1, perm.unsqueeze(-1).expand(-1, -1, 2))
    alive = torch.cat([alive, torch.full((1, 1, 2), 99.0)], dim=1)
    positions = torch.cat([perm, torch.tensor([[4]])], dim=1)
    valid = torch.tensor([[True] * 5 + [False]])
    grid = tokens_to_grid(alive, positions, valid, (3, 3))
    full = tokens.transpose(1, 2).reshape(1, 2, 3, 3)
    present = torch.zeros(9, dtype=torch.bool)
    present[perm[0]] = True
    torch.testing.assert_close(grid, full * present.reshape(1, 1, 3, 3))


def test_pruning_twice_keeps_percentile_of_valid_tokens():
    torch.manual_seed(0)
    b, h, w, c = 2, 7, 7, 8
    pruner = PrATo(c, k=3, d_v=4, budget=TokenBudget(q=25))
    boxes = torch.tensor([[10.0, 20.0, 70.0, 90.0], [0.0, 0.0, 112.0, 50.0]])
    first = pruner(torch.randn(b, h * w, c), (h, w), boxes, (112, 112))
    assert first.keep.sum(1).tolist() == [37, 37]
    positions = first.keep.nonzero()[:, 1].reshape(b, 37)
    valid = torch.ones(b, 37, dtype=torch.bool)
    valid[1, -5:] = False
    positions[1, -5:] = 0
    second = pruner(torch.randn(b, 37, c), (h, w), boxes, (112, 112), positions=positions, valid=valid)
    assert second.keep.sum(1).tolist() == [37 - 9, 32 - 8]
    assert not bool((second.keep & ~valid).any())
    assert bool((second.scores[~valid] == 0).all())


def test_autocast_bfloat16_gives_float32_scores():
    torch.manual_seed(0)
    pruner = PrATo(8, k=2, d_v=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = pruner(torch.randn(2, 16, 8), (4, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2), (64, 64))
    assert result.scores.dtype == torch.float32
    assert bool(torch.isfinite(result.scores).all())
    assert result.keep.sum(1).tolist() == [12, 12]


def test_box_overlap_mask_marks_every_patch_the_box_touches():
    positions, valid = _full(1, 16)
    box = torch.tensor([[17.0, 1.0, 33.0, 16.0]])  # 16 px patches: cols 1-2 (33 reaches col 2), row 0 only
    mask = box_overlap_mask(positions, valid, (4, 4), box, (64, 64))
    assert mask.view(4, 4).nonzero().tolist() == [[0, 1], [0, 2]]


def test_box_overlap_mask_skips_padding_slots():
    positions = torch.tensor([[0, 1, 0]])
    valid = torch.tensor([[True, True, False]])
    mask = box_overlap_mask(positions, valid, (4, 4), torch.tensor([[0.0, 0.0, 64.0, 64.0]]), (64, 64))
    assert mask.tolist() == [[True, True, False]]


def _outward_pruner(**kwargs) -> tuple[PrATo, torch.Tensor, torch.Tensor]:
    """A PrATo whose scores favour the tokens far from the box (bottom right) over those under it."""
    pruner = _identity_pruner(2, k=1, **kwargs)
    tokens = _coord_tokens(4, 4)
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # the top-left 2 x 2 tokens: 0, 1, 4, 5
    return pruner, tokens, box


def test_learned_scores_alone_can_prune_the_tokens_under_the_box():
    pruner, tokens, box = _outward_pruner(budget=TokenBudget("percentile", q=75))
    keep = pruner(tokens, (4, 4), box, (64, 64)).keep[0]
    assert not keep[[0, 1, 4, 5]].any()


def test_box_first_fills_a_percentile_budget_with_the_box_tokens():
    pruner, tokens, box = _outward_pruner(budget=TokenBudget("percentile", q=75), box_first=True)
    result = pruner(tokens, (4, 4), box, (64, 64))
    assert result.keep[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    plain, _, _ = _outward_pruner(budget=TokenBudget("percentile", q=75))
    assert torch.equal(result.scores, plain(tokens, (4, 4), box, (64, 64)).scores)


def test_box_first_keeps_the_count_and_the_best_box_tokens_when_the_box_is_larger():
    pruner, tokens, _ = _outward_pruner(budget=TokenBudget("percentile", q=75), box_first=True)
    box = torch.tensor([[0.0, 0.0, 48.0, 48.0]])  # nine tokens under the box, four kept
    result = pruner(tokens, (4, 4), box, (64, 64))
    kept = result.keep[0].nonzero().flatten().tolist()
    under = [0, 1, 2, 4, 5, 6, 8, 9, 10]
    best_under = sorted(under, key=lambda z: -result.scores[0, z].item())[:4]
    assert sorted(kept) == sorted(best_under)


def test_box_first_adds_the_box_tokens_to_a_fixed_threshold():
    pruner, tokens, box = _outward_pruner(budget=TokenBudget("fixed", tau=0.5), box_first=True)
    result = pruner(tokens, (4, 4), box, (64, 64))
    above = (result.scores[0] > 0.5).nonzero().flatten().tolist()
    assert set(result.keep[0].nonzero().flatten().tolist()) == set(above) | {0, 1, 4, 5}
