"""The token set: gathering kept tokens, the grid layout of ``mask``, scattering back, the parent rule."""

import pytest
import torch

from prato_exp.tokens.token_set import TokenSet, child_keep, child_weight, write_to_grid

GRID_HW = (2, 3)


def _grid_tokens(b: int = 2, c: int = 3) -> torch.Tensor:
    z = GRID_HW[0] * GRID_HW[1]
    return torch.arange(b * z * c, dtype=torch.float32).view(b, z, c) + 1


def _full() -> TokenSet:
    return TokenSet.full(_grid_tokens(), GRID_HW)


def test_drop_keeps_grid_order_and_positions():
    keep = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    kept = _full().select(keep, "drop")
    assert kept.positions.tolist() == [[1, 3, 4], [0, 4, 5]]
    torch.testing.assert_close(kept.tokens[0], _grid_tokens()[0, [1, 3, 4]])
    assert bool(kept.valid.all()) and not kept.on_grid


def test_drop_pads_unequal_counts_with_invalid_zero_slots():
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    kept = _full().select(keep, "drop")
    assert kept.tokens.shape[1] == 4
    assert kept.valid.tolist() == [[True] * 4, [True, False, False, False]]
    assert bool((kept.tokens[1, 1:] == 0).all())
    assert kept.slots.tolist() == kept.valid.tolist()


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_keeping_every_place_gives_the_full_grid_for_the_unpruned_code(mode):
    kept = _full().select(torch.ones(2, 6, dtype=torch.bool), mode)
    assert kept.is_full_grid
    assert torch.equal(kept.tokens, _grid_tokens()) and torch.equal(kept.to_grid(), _grid_tokens())


def test_equal_counts_mark_the_gathered_set_complete_and_unequal_ones_do_not():
    equal = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    unequal = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert _full().select(equal, "drop").complete
    assert not _full().select(unequal, "drop").complete
    assert not _full().select(equal, "drop").is_full_grid


def test_rezero_of_a_complete_set_changes_nothing_and_of_a_padded_set_zeroes_the_padding():
    unequal = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    padded = _full().select(unequal, "drop")
    ones = torch.ones_like(padded.tokens)
    assert torch.equal(padded.rezero(ones)[1, 1:], torch.zeros(3, 3))
    assert torch.equal(_full().rezero(torch.ones(2, 6, 3)), torch.ones(2, 6, 3))


def test_mask_keeps_the_grid_and_zeroes_pruned_places():
    keep = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    masked = _full().select(keep, "mask")
    assert masked.on_grid and torch.equal(masked.valid, keep)
    assert bool(masked.slots.all())
    torch.testing.assert_close(masked.tokens, _grid_tokens() * keep[..., None])


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_to_grid_inverts_select_with_zero_fill(mode):
    keep = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    grid = _full().select(keep, mode).to_grid()
    torch.testing.assert_close(grid, _grid_tokens() * keep[..., None])


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_to_grid_carry_fill_keeps_pruned_values_and_ignores_padding(mode):
    carry = -torch.ones_like(_grid_tokens())
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    grid = _full().select(keep, mode).to_grid(fill=carry)
    torch.testing.assert_close(grid, torch.where(keep[..., None], _grid_tokens(), carry))


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_keep_grid_marks_alive_places_only(mode):
    keep = torch.tensor([[0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(_full().select(keep, mode).keep_grid(), keep)


def test_a_second_drop_selects_among_the_alive_slots():
    first = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    kept = _full().select(first, "drop")
    second = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)[
        :, : kept.tokens.shape[1]
    ]
    assert kept.select(second, "drop").positions.tolist() == [[1, 3], [0, 5]]


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_from_map_reads_the_alive_places_of_a_map(mode):
    keep = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    kept = _full().select(keep, mode)
    feature_map = kept.to_map()  # (B, C, h, w)
    assert feature_map.shape == (2, 3, *GRID_HW)
    torch.testing.assert_close(kept.from_map(feature_map), kept.rezero())


def test_full_refuses_tokens_that_do_not_fill_the_grid():
    with pytest.raises(ValueError, match="do not fill"):
        TokenSet.full(torch.zeros(1, 5, 2), GRID_HW)


def test_child_keep_uses_the_two_by_two_footprint():
    keep = torch.zeros(1, 4 * 4, dtype=torch.bool)
    keep[0, 5] = True  # row 1, col 1: parent of child (0, 0)
    keep[0, 15] = True  # row 3, col 3: parent of child (1, 1)
    child, child_hw = child_keep(keep, (4, 4))
    assert child_hw == (2, 2) and child.tolist() == [[True, False, False, True]]


def test_child_keep_gives_odd_sides_a_one_wide_footprint():
    odd = torch.zeros(1, 3 * 3, dtype=torch.bool)
    odd[0, 8] = True  # the last row/column
    child, child_hw = child_keep(odd, (3, 3))
    assert child_hw == (2, 2) and child.tolist() == [[False, False, False, True]]


def test_write_to_grid_writes_valid_slots_only_and_keeps_the_rest():
    grid = torch.full((1, 5, 2), -1.0)
    values = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    positions = torch.tensor([[3, 0, 0]])
    valid = torch.tensor([[True, True, False]])
    out = write_to_grid(grid, values, positions, valid)
    expected = torch.tensor([[[2.0, 2.0], [-1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(grid, torch.full((1, 5, 2), -1.0))


def test_weighted_set_runs_every_place_and_weights_its_grid_reads():
    tokens = torch.ones(1, 4, 2)
    weight = torch.tensor([[1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    weighted = TokenSet.full(tokens, (2, 2)).weighted(weight)
    assert weighted.valid.all()
    assert weighted.keep_grid().tolist() == [[True, False, True, False]]
    grid = weighted.to_grid()
    assert grid[..., 0].tolist() == [[1.0, 0.0, 1.0, 0.0]]
    grid.sum().backward()
    assert weight.grad.tolist() == [[2.0, 2.0, 2.0, 2.0]]  # dropped places still pass a gradient


def test_weighted_set_refuses_a_selection():
    weighted = TokenSet.full(torch.ones(1, 4, 2), (2, 2)).weighted(torch.ones(1, 4))
    with pytest.raises(ValueError, match="weighted"):
        weighted.select(torch.ones(1, 4, dtype=torch.bool), "drop")


def test_child_weight_is_the_largest_parent_weight_with_odd_sides_padded():
    weight = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # 3 x 3, place (0, 2) kept
    assert child_weight(weight, (3, 3)).tolist() == [[0.0, 1.0, 0.0, 0.0]]
