"""Executing one pruning point, the same in every backbone: score, exempt, scale, select, record.

A backbone hands the pruner the :class:`~prato_exp.tokens.token_set.TokenSet` alive at its point and
gets back the set its later blocks run on: gathered (``drop``), on the grid with pruned places zero
(``mask``), or whole with the pruned tokens zeroed once (``zero_once``); a differentiable keep
(``PruneResult.soft_keep``) gives the whole set weighted by it; pruners that run the next blocks
themselves get the set unchanged and their keep mask in the state.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from prato_exp.pruning.base import PointState, PruneResult, TokenPruner
from prato_exp.pruning.trace import PruningTrace
from prato_exp.tokens.token_set import TokenSet, follow_merges, kept_order, write_to_grid


def exempt_and_scale(
    result: PruneResult, tokens: Tensor, full_keep: Tensor, prune_enabled: Tensor | None
) -> Tensor:
    """Apply the ``no_pruning`` exemption, the pruner's merge and its token scale at one pruning point.

    Images with ``prune_enabled`` False get ``result.keep = full_keep`` (``(B, N)`` bool), a scale of 1
    and no merge (``result`` is updated in place); returns ``tokens`` ``(B, N, C)`` (or the pruner's
    ``merge.tokens``) times the (STE) scale.
    """
    scale = result.token_scale
    if prune_enabled is not None:
        exempt = ~prune_enabled.to(device=result.keep.device, dtype=torch.bool)[:, None]
        result.keep = torch.where(exempt, full_keep, result.keep)
        if result.early_exit is not None:
            result.early_exit.exit_grid = result.early_exit.exit_grid & ~exempt
        if scale is not None:
            scale = torch.where(exempt, torch.ones_like(scale), scale)
            result.token_scale = scale
        if result.merge is not None:
            own = torch.arange(tokens.shape[1], device=tokens.device).expand_as(result.merge.target)
            result.merge.tokens = torch.where(exempt[..., None], tokens, result.merge.tokens)
            result.merge.target = torch.where(exempt, own, result.merge.target)
    if result.merge is not None:
        tokens = result.merge.tokens
    return tokens if scale is None else tokens * scale[..., None].to(tokens.dtype)


def merge_places(result: PruneResult, alive: TokenSet) -> Tensor | None:
    """``(B, Z)`` long: for each grid place merged away at this point the place it was merged into,
    -1 elsewhere; None when the point merged nothing."""
    if result.merge is None:
        return None
    target = result.merge.target
    own = torch.arange(target.shape[1], device=target.device)
    merged = alive.valid & ~result.keep & (target != own)
    into = torch.gather(alive.positions, 1, target)
    unmerged = torch.full((into.shape[0], alive.num_grid), -1, dtype=torch.long, device=into.device)
    return write_to_grid(unmerged, into, alive.positions, merged)


def apply_pruner(
    pruner: TokenPruner,
    alive: TokenSet,
    grid_alive: Tensor,
    image_hw: tuple[int, int],
    box_xyxy: Tensor,
    prune_enabled: Tensor | None,
    trace: PruningTrace,
    state: PointState | None = None,
) -> tuple[TokenSet, Tensor, Tensor | None, PointState]:
    """Score, select and execute one pruning point.

    ``grid_alive`` ``(B, Z)`` is what the trace counts as alive (for pruners that run blocks themselves
    it differs from the places the set holds). Returns the new token set, the grid keep mask, the key
    mask for later blocks and the state handed to the next point (gathered with the kept tokens in
    ``drop`` mode).
    """
    state = replace(state or PointState(), soft_keep=alive.weight)
    result = pruner(
        alive.tokens,
        alive.grid_hw,
        box_xyxy,
        image_hw,
        positions=alive.positions,
        valid=alive.valid,
        state=state,
    )
    scaled = alive.with_tokens(exempt_and_scale(result, alive.tokens, alive.valid, prune_enabled))
    keep = result.keep
    new_state = PointState(exempt=state.exempt, carried=result.carried)
    trace.results.append(result)
    places = merge_places(result, alive)
    trace.merges.append(places)

    if result.soft_keep is not None:  # every token runs, weighted by the keep policy (value: keep)
        gradient = result.soft_keep - result.soft_keep.detach()
        if prune_enabled is not None:  # exempt images keep everything and pass no gradient
            enabled = prune_enabled.to(device=keep.device, dtype=torch.bool)
            gradient = gradient * enabled[:, None].to(gradient.dtype)
        trace.keep_grids.append(keep)
        return scaled.weighted(keep.to(gradient.dtype) + gradient), keep, None, new_state
    if pruner.runs_blocks():  # the pruner runs the next blocks on the full grid itself
        new_state.keep = keep
        trace.keep_grids.append(keep)  # re-selected from the full grid at every point (Evo-ViT)
        return scaled, keep, None, new_state
    if pruner.mode == "zero_once":  # the paper's literal Y' = beta * Y; later blocks may refill the tokens
        zeroed = keep & grid_alive
        trace.keep_grids.append(zeroed)
        return (
            scaled.with_tokens(scaled.tokens * zeroed[..., None].to(scaled.tokens.dtype)),
            grid_alive,
            None,
            new_state,
        )
    kept = scaled.select(keep, pruner.mode)
    if places is not None:  # later reads of the grid show merged-away places with their destination
        kept = replace(kept, merged_into=follow_merges(alive.merged_into, places))
    if pruner.mode == "drop":
        if new_state.carried is not None:
            order, valid = kept_order(keep & alive.valid)
            new_state.carried = new_state.carried.gathered(order, valid)
        key_keep = None if bool(kept.valid.all()) else kept.valid
    else:
        key_keep = kept.valid
    new_grid_alive = kept.keep_grid()
    trace.keep_grids.append(new_grid_alive)
    return kept, new_grid_alive, key_keep, new_state
