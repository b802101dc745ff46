"""Run the blocks of a plain (non-hierarchical) ViT with token pruning between them.

Shared by UNETR and TransUNet: the backbone wrapper embeds the patches, hands its blocks to
:func:`run_pruned_blocks`, and gets back the grid-shaped hidden states its decoder reads. The pruner
is called at each pruning point without knowing the backbone; its keep mask is executed according
to ``pruner.mode`` (see :mod:`prato_exp.pruning.base`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import get_args

import torch
from torch import Tensor, nn

from prato_exp.pruning.base import NoPruner, PointState, PrunerContext, TokenPruner
from prato_exp.pruning.execute import apply_pruner
from prato_exp.pruning.trace import PruningTrace
from prato_exp.tokens.attention_mask import KeyMask, KeyPolicy
from prato_exp.tokens.blocks import MonaiBlockParts, PartsFactory, UnequalCounts, run_by_count, run_parts
from prato_exp.tokens.token_set import TokenSet

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


def check_unequal_counts(value: str) -> UnequalCounts:
    """``value`` if it is an :data:`~prato_exp.tokens.blocks.UnequalCounts` choice, else a ValueError."""
    if value not in get_args(UnequalCounts):
        raise ValueError(f"model.unequal_counts must be one of {get_args(UnequalCounts)}, got {value!r}")
    return value


def monai_block_runner(block: nn.Module, tokens: Tensor, key_keep: Tensor | None) -> Tensor:
    """Run a MONAI ``TransformerBlock``; its einsum attention takes a ``(B, N)`` bool keep mask."""
    return block(tokens, attn_mask=KeyMask(key_keep).monai())


def timm_block_runner(block: nn.Module, tokens: Tensor, key_keep: Tensor | None) -> Tensor:
    """Run a timm ``Block``; its attention takes a bool mask broadcastable to ``(B, heads, N, N)``.

    ``key_keep`` ``(B, N)`` bool (True = attend) becomes ``(B, 1, 1, N)``: SDPA (fused path) and
    timm's ``resolve_self_attn_mask`` (non-fused path, bool -> 0 / -inf) both read it that way.
    """
    return block(tokens, attn_mask=KeyMask(key_keep).sdpa())


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
    unequal_counts: UnequalCounts = "pad",
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
        unequal_counts: ``pad`` or ``group`` (:data:`~prato_exp.tokens.blocks.UnequalCounts`): how the
            blocks after a ``drop`` point run when the images keep different counts.
    """
    num_grid = tokens.shape[1]
    depth = len(blocks)
    active = {i: p for i, p in pruners.items() if p.active}
    if active and box_xyxy is None:
        raise ValueError("a box prompt (box_xyxy) is required when a pruner is active")
    alive = TokenSet.full(tokens, grid_hw)
    grid_alive = alive.valid.clone()
    carry = tokens.new_zeros(tokens.shape) if any(p.fill == "carry" for p in active.values()) else None
    key_keep: Tensor | None = None
    mode = next(iter(active.values())).mode if active else "drop"
    if len({p.mode for p in active.values()}) > 1:
        raise ValueError("all pruning points of one model must share one mode")

    trace = PruningTrace(grid_hw=grid_hw, first_pruned_block=min(active, default=depth) + 1)
    keep_fraction = []
    skips: dict[int, Tensor] = {}
    state = PointState()
    if prune_enabled is not None and active:
        state.exempt = ~prune_enabled.to(device=tokens.device, dtype=torch.bool)
    runner: TokenPruner | None = None

    for index, block in enumerate(blocks, start=1):
        keep_fraction.append(grid_alive.sum(dim=1).to(tokens.dtype) / num_grid)
        observer = next((active[p] for p in sorted(active) if p >= index), None)
        if runner is not None:
            out, state = runner.run_block(block_parts(block), alive.tokens, state)
        elif alive.weight is not None:
            out, _ = run_parts(block_parts(block), alive.tokens, KeyPolicy(alive.weight).softmax)
        elif observer is not None and observer.needs_attention:
            out, weights = run_parts(block_parts(block), alive.tokens, KeyMask(key_keep).softmax)
            state = observer.observe_attention(weights.detach(), alive.valid, state, index)
        elif unequal_counts == "group" and mode == "drop" and key_keep is not None:
            out = run_by_count(partial(run_block, block, key_keep=None), alive.tokens, key_keep)
        else:
            out = run_block(block, alive.tokens, key_keep)
        if mode == "mask" and key_keep is not None:
            out = out * key_keep[..., None].to(out.dtype)
        alive = alive.with_tokens(out)

        pruner = active.get(index)
        if pruner is not None:
            if carry is not None:
                carry = alive.to_grid(carry)
            alive, grid_alive, key_keep, state = apply_pruner(
                pruner, alive, grid_alive, image_hw, box_xyxy, prune_enabled, trace, state
            )
            runner = pruner if pruner.runs_blocks() else None
        if index in skip_blocks:
            skips[index] = alive.to_grid(carry)

    normed = alive.with_tokens(norm(alive.tokens))
    final = normed.to_grid(norm(carry) if carry is not None else None)
    trace.block_keep_fraction = torch.stack(keep_fraction, dim=1)
    if active and carry is not None:
        first_point = min(active)
        assembled = active[first_point].assemble(final, carry, trace.exit_points(), trace.results)
        if assembled is not None:
            final = assembled
            skips = {i: assembled if i >= first_point else grid for i, grid in skips.items()}
    return EncoderOutput(skips=skips, final=final, trace=trace)
