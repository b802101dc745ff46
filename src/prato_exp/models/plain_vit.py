"""Run the blocks of a plain (non-hierarchical) ViT with token pruning between them.

Shared by UNETR and TransUNet: the backbone wrapper embeds the patches, hands its blocks to
:func:`run_pruned_blocks`, and gets back the grid-shaped hidden states its decoder reads. The pruner
is called at each pruning point without knowing the backbone; its keep mask is executed according
to ``pruner.mode`` (see :mod:`prato_exp.pruning.base`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prato_exp.models.base import PruningTrace
from prato_exp.pruning.base import NoPruner, PrunerContext, PruneResult, TokenPruner
from prato_exp.tokens.blocks import MonaiBlockParts, PartsFactory, key_bias, run_parts
from prato_exp.tokens.token_set import (
    AliveTokens,
    gather_kept,
    gather_slots,
    keep_on_grid,
    kept_order,
    scatter_to_grid,
)

BlockRunner = Callable[[nn.Module, Tensor, "Tensor | None"], Tensor]
"""``runner(block, tokens (B, N, C), key_keep (B, N) bool or None) -> tokens``."""


@dataclass
class EncoderOutput:
    """Grid-shaped hidden states of a pruned plain-ViT encoder.

    Attributes:
        skips: 1-based block index -> ``(B, Z, C)`` hidden state read after that block (and after
            pruning, where the block is a pruning point), pruned places filled per ``fill``.
        final: ``(B, Z, C)`` the last block's output after the final norm, on the grid.
        trace: what pruning did.
    """

    skips: dict[int, Tensor]
    final: Tensor
    trace: PruningTrace


def check_block_indices(name: str, points: Sequence[int], depth: int) -> tuple[int, ...]:
    """``points`` sorted, or a ValueError when one is not a 1-based block index in ``1..depth``."""
    if any(not 1 <= i <= depth for i in points):
        raise ValueError(f"{name} must be 1-based block indices in 1..{depth}, got {list(points)}")
    return tuple(sorted(points))


def build_pruners(
    factory: Callable[..., TokenPruner] | None,
    points: Sequence[int],
    dim: int,
    *,
    num_classes: int,
    grid_hw: tuple[int, int],
    depth: int,
) -> nn.ModuleDict:
    """One pruner per pruning point, keyed by the point; the ``none`` pruner when ``factory`` is None."""
    factory = factory or NoPruner
    return nn.ModuleDict(
        {
            str(i): factory(
                dim=dim,
                context=PrunerContext(num_classes, grid_hw, depth, point_index=j, num_points=len(points)),
            )
            for j, i in enumerate(points)
        }
    )


def assembler_names(pruners: nn.ModuleDict, prefix: str = "pruners") -> list[str]:
    """Module names of token assemblers (STP's MTA): they run after pruning, on the full grid."""
    return [
        f"{prefix}.{key}.assembler" for key, p in pruners.items() if getattr(p, "assembler", None) is not None
    ]


def monai_block_runner(block: nn.Module, tokens: Tensor, key_keep: Tensor | None) -> Tensor:
    """Run a MONAI ``TransformerBlock``; its einsum attention takes a ``(B, N)`` bool keep mask."""
    return block(tokens, attn_mask=key_keep)


def timm_block_runner(block: nn.Module, tokens: Tensor, key_keep: Tensor | None) -> Tensor:
    """Run a timm ``Block``; its attention takes a bool mask broadcastable to ``(B, heads, N, N)``.

    ``key_keep`` ``(B, N)`` bool (True = attend) becomes ``(B, 1, 1, N)``: SDPA (fused path) and
    timm's ``resolve_self_attn_mask`` (non-fused path, bool -> 0 / -inf) both read it that way.
    """
    return block(tokens, attn_mask=None if key_keep is None else key_keep[:, None, None, :])


def run_pruned_blocks(
    tokens: Tensor,
    blocks: Sequence[nn.Module],
    norm: nn.Module,
    pruners: Mapping[int, TokenPruner],
    skip_blocks: Sequence[int],
    grid_hw: tuple[int, int],
    image_hw: tuple[int, int],
    box_xyxy: Tensor | None,
    prune_enabled: Tensor | None = None,
    run_block: BlockRunner = monai_block_runner,
    block_parts: PartsFactory = MonaiBlockParts,
) -> EncoderOutput:
    """Run ``blocks`` on ``tokens`` ``(B, Z, C)``, pruning after each 1-based block in ``pruners``.

    Args:
        tokens: patch embeddings with positions added, ``(B, Z, C)``, row-major on ``grid_hw``.
        blocks: the transformer blocks, in order.
        norm: the final norm (applied to the last block's output before it goes on the grid).
        pruners: 1-based block index -> pruner run on that block's output. Inactive pruners
            (the ``none`` pruner) are skipped, so the unpatched computation runs unchanged.
        skip_blocks: 1-based block indices whose outputs the decoder reads.
        grid_hw: token grid ``(h, w)``.
        image_hw: network input ``(H, W)``; boxes are in these pixels.
        box_xyxy: ``(B, 4)`` box prompt per image (None only when no pruner is active).
        prune_enabled: ``(B,)`` bool; False exempts an image from pruning (empty-slice
            ``no_pruning`` fallback). All True when None.
        run_block: how to call one block with an optional ``(B, N)`` key keep mask.
        block_parts: how to split a block into residuals with its attention exposed; used only for
            pruners that read attention or run blocks themselves.
    """
    num_grid = tokens.shape[1]
    depth = len(blocks)
    active = {i: p for i, p in pruners.items() if p.active}
    if active and box_xyxy is None:
        raise ValueError("a box prompt (box_xyxy) is required when a pruner is active")
    alive = AliveTokens.full_grid(tokens)
    grid_alive = alive.valid.clone()
    carry = tokens.new_zeros(tokens.shape) if any(p.fill == "carry" for p in active.values()) else None
    key_keep: Tensor | None = None
    mode = next(iter(active.values())).mode if active else "drop"
    if len({p.mode for p in active.values()}) > 1:
        raise ValueError("all pruning points of one model must share one mode")

    trace = PruningTrace(grid_hw=grid_hw, first_pruned_block=min(active, default=depth) + 1)
    keep_fraction = []
    skips: dict[int, Tensor] = {}
    state: dict[str, Tensor] = {}
    if prune_enabled is not None and active:
        exempt = ~prune_enabled.to(device=tokens.device, dtype=torch.bool)
        state["exempt"] = exempt[:, None].expand(-1, num_grid)
    runner: TokenPruner | None = None

    def on_grid(values: AliveTokens, fill: Tensor | None) -> Tensor:
        if runner is not None:
            return runner.grid_view(values.tokens, state)
        if mode == "drop":
            return scatter_to_grid(values, num_grid, fill)
        grid = values.tokens * grid_alive[..., None].to(values.tokens.dtype)
        if fill is not None:
            grid = torch.where(grid_alive[..., None], grid, fill)
        return grid

    for index, block in enumerate(blocks, start=1):
        keep_fraction.append(grid_alive.sum(dim=1).to(tokens.dtype) / num_grid)
        observer = next((active[p] for p in sorted(active) if p >= index), None)
        if runner is not None:
            out, state = runner.run_block(block_parts(block), alive.tokens, state)
        elif observer is not None and observer.needs_attention:
            out, weights = run_parts(block_parts(block), alive.tokens, key_bias(key_keep))
            seen = alive.valid if key_keep is None else key_keep
            state = observer.observe_attention(weights.detach(), seen, state, index)
        else:
            out = run_block(block, alive.tokens, key_keep)
        if mode == "mask" and key_keep is not None:
            out = out * key_keep[..., None].to(out.dtype)
        alive = AliveTokens(out, alive.positions, alive.valid)

        pruner = active.get(index)
        if pruner is not None:
            if carry is not None:
                carry = on_grid(alive, carry)
            alive, grid_alive, key_keep, state = apply_pruner(
                pruner, alive, grid_alive, grid_hw, image_hw, box_xyxy, prune_enabled, trace, state
            )
            runner = pruner if pruner.runs_blocks() else None
        if index in skip_blocks:
            skips[index] = on_grid(alive, carry)

    normed = AliveTokens(norm(alive.tokens), alive.positions, alive.valid)
    final = on_grid(normed, norm(carry) if carry is not None else None)
    trace.block_keep_fraction = torch.stack(keep_fraction, dim=1)
    if active and carry is not None:
        first_point = min(active)
        assembled = active[first_point].assemble(final, carry, exit_points(trace.keep_grids), trace.results)
        if assembled is not None:
            final = assembled
            skips = {i: assembled if i >= first_point else grid for i, grid in skips.items()}
    return EncoderOutput(skips=skips, final=final, trace=trace)


def exit_points(keep_grids: Sequence[Tensor]) -> Tensor:
    """``(B, Z)`` long: the 0-based pruning point that removed each place, -1 if alive to the end."""
    exit_point = torch.full_like(keep_grids[0], -1, dtype=torch.long)
    alive = torch.ones_like(keep_grids[0])
    for point, keep in enumerate(keep_grids):
        exit_point = torch.where(alive & ~keep, torch.full_like(exit_point, point), exit_point)
        alive = alive & keep
    return exit_point


def exempt_and_scale(
    result: PruneResult, tokens: Tensor, full_keep: Tensor, prune_enabled: Tensor | None
) -> Tensor:
    """Apply the ``no_pruning`` exemption and the pruner's token scale at one pruning point.

    Images with ``prune_enabled`` False get ``result.keep = full_keep`` (``(B, N)`` bool) and a scale
    of 1 (``result`` is updated in place); returns ``tokens`` ``(B, N, C)`` times the (STE) scale.
    """
    scale = result.token_scale
    if prune_enabled is not None:
        exempt = ~prune_enabled.to(device=result.keep.device, dtype=torch.bool)[:, None]
        result.keep = torch.where(exempt, full_keep, result.keep)
        if result.exit_grid is not None:
            result.exit_grid = result.exit_grid & ~exempt
        if scale is not None:
            scale = torch.where(exempt, torch.ones_like(scale), scale)
            result.token_scale = scale
    return tokens if scale is None else tokens * scale[..., None].to(tokens.dtype)


def apply_pruner(
    pruner: TokenPruner,
    alive: AliveTokens,
    grid_alive: Tensor,
    grid_hw: tuple[int, int],
    image_hw: tuple[int, int],
    box_xyxy: Tensor,
    prune_enabled: Tensor | None,
    trace: PruningTrace,
    state: dict[str, Tensor] | None = None,
) -> tuple[AliveTokens, Tensor, Tensor | None, dict[str, Tensor]]:
    """Score, select and execute one pruning point.

    Returns the new alive set, the grid keep mask, the key mask for later blocks and the state handed
    to the next point (gathered with the kept tokens in ``drop`` mode).
    """
    num_grid = grid_alive.shape[1]
    state = state or {}
    if pruner.mode == "drop":
        result = pruner(
            alive.tokens,
            grid_hw,
            box_xyxy,
            image_hw,
            positions=alive.positions,
            valid=alive.valid,
            state=state,
        )
    else:
        result = pruner(alive.tokens, grid_hw, box_xyxy, image_hw, valid=grid_alive, state=state)
    full_keep = alive.valid if pruner.mode == "drop" else grid_alive
    tokens = exempt_and_scale(result, alive.tokens, full_keep, prune_enabled)
    keep = result.keep
    new_state = {**({"exempt": state["exempt"]} if "exempt" in state else {}), **result.state}
    trace.results.append(result)

    if pruner.runs_blocks():  # the pruner runs the next blocks on the full grid itself
        new_state["keep"] = keep
        new_grid_alive = keep  # re-selected from the full grid at every point (Evo-ViT)
        trace.keep_grids.append(new_grid_alive)
        return AliveTokens(tokens, alive.positions, alive.valid), new_grid_alive, None, new_state
    if pruner.mode == "drop":
        order, valid = kept_order(keep & alive.valid)
        kept = gather_kept(AliveTokens(tokens, alive.positions, alive.valid), keep)
        new_state = {
            k: v if k.startswith("grid_") else gather_slots(v, order, valid) for k, v in new_state.items()
        }
        new_grid_alive = keep_on_grid(kept, num_grid)
        key_keep = None if bool(kept.valid.all()) else kept.valid
    elif pruner.mode == "mask":
        new_grid_alive = keep & grid_alive
        kept = AliveTokens(tokens * new_grid_alive[..., None].to(tokens.dtype), alive.positions, alive.valid)
        key_keep = new_grid_alive
    else:  # zero_once: the paper's literal Y' = beta * Y; later blocks run on (and may refill) all
        zeroed = keep & grid_alive
        kept = AliveTokens(tokens * zeroed[..., None].to(tokens.dtype), alive.positions, alive.valid)
        trace.keep_grids.append(zeroed)
        return kept, grid_alive, None, new_state
    trace.keep_grids.append(new_grid_alive)
    return kept, new_grid_alive, key_keep, new_state
