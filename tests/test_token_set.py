"""Gathering kept tokens and scattering them back onto the grid."""

import torch

from prato_exp.tokens.token_set import AliveTokens, gather_kept, keep_on_grid, scatter_to_grid, write_to_grid


def _grid_tokens(b: int = 2, z: int = 6, c: int = 3) -> torch.Tensor:
    return torch.arange(b * z * c, dtype=torch.float32).view(b, z, c) + 1


def test_gather_keeps_grid_order_and_positions():
    alive = AliveTokens.full_grid(_grid_tokens())
    keep = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    kept = gather_kept(alive, keep)
    assert kept.positions.tolist() == [[1, 3, 4], [0, 4, 5]]
    torch.testing.assert_close(kept.tokens[0], alive.tokens[0, [1, 3, 4]])
    assert bool(kept.valid.all())


def test_gather_pads_unequal_counts_with_invalid_zero_slots():
    alive = AliveTokens.full_grid(_grid_tokens())
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    kept = gather_kept(alive, keep)
    assert kept.tokens.shape[1] == 4
    assert kept.valid.tolist() == [[True] * 4, [True, False, False, False]]
    assert bool((kept.tokens[1, 1:] == 0).all())


def test_scatter_inverts_gather_with_zero_fill():
    tokens = _grid_tokens()
    alive = AliveTokens.full_grid(tokens)
    keep = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    grid = scatter_to_grid(gather_kept(alive, keep), num_grid=6)
    torch.testing.assert_close(grid, tokens * keep[..., None])


def test_scatter_carry_fill_keeps_pruned_values_and_ignores_padding():
    tokens = _grid_tokens()
    carry = -torch.ones_like(tokens)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    kept = gather_kept(AliveTokens.full_grid(tokens), keep)
    grid = scatter_to_grid(kept, num_grid=6, fill=carry)
    torch.testing.assert_close(grid, torch.where(keep[..., None], tokens, carry))


def test_keep_on_grid_marks_alive_places_only():
    keep = torch.tensor([[0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    kept = gather_kept(AliveTokens.full_grid(_grid_tokens()), keep)
    assert torch.equal(keep_on_grid(kept, 6), keep)


def test_write_to_grid_writes_valid_slots_only_and_keeps_the_rest():
    grid = torch.full((1, 5, 2), -1.0)
    values = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    positions = torch.tensor([[3, 0, 0]])
    valid = torch.tensor([[True, True, False]])
    out = write_to_grid(grid, values, positions, valid)
    expected = torch.tensor([[[2.0, 2.0], [-1.0, -1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(grid, torch.full((1, 5, 2), -1.0))
