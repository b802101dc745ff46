"""A transformer block split into its attention and MLP residuals, with the attention weights exposed.

Pruners that read attention (Evo-ViT, TRAM) or reweight it (DynamicViT's policy in training) need
three things a library block does not give: the softmaxed attention of a block, a hook on how scores
become weights, and the two residuals separately (Evo-ViT's representative token updates placeholder
tokens by them). :class:`BlockParts` re-expresses one block with the block's own weights, without
copying any: for MONAI's ``TransformerBlock`` it follows ``SABlock``'s einsum path, for timm's
``Block`` the non-fused path of ``Attention``. With the default softmax,
``x + r1 + mlp(x + r1) == block(x)`` (tested against both libraries).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

WeightsFn = Callable[[Tensor], Tensor]
"""Turns attention scores ``(B, heads, N, N)`` into attention weights, e.g.
:meth:`~prato_exp.tokens.attention_mask.KeyMask.softmax` (softmax over the kept keys)."""


class BlockParts(Protocol):
    """One pre-norm transformer block as two residual functions."""

    def attention(self, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
        """``(r1 (B, N, C), weights (B, heads, N, N))``: the attention residual and its weights."""
        ...

    def mlp(self, x: Tensor) -> Tensor:
        """``r2`` ``(B, N, C)``, the MLP residual of ``x`` (already ``x + r1``)."""
        ...


def run_parts(parts: BlockParts, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
    """The whole block: ``(x + r1 + r2, attention weights)``."""
    r1, weights = parts.attention(x, weights_fn)
    x = x + r1
    return x + parts.mlp(x), weights


def call_within(block: nn.Module, fn: Callable[..., object], *args: object) -> object:
    """Run ``fn(*args)`` as if it were ``block``'s forward, so module hooks see it inside ``block``.

    FLOP counters attribute operations to the module whose call they happen in; the parts below call
    a block's submodules and functional ops directly, so they enter the block through this.
    """
    block.forward = fn
    try:
        return block(*args)
    finally:
        del block.forward


class MonaiBlockParts:
    """:class:`BlockParts` of a MONAI ``TransformerBlock`` (``SABlock`` einsum path)."""

    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        if getattr(attn, "use_flash_attention", False) or not getattr(attn, "use_combined_linear", True):
            raise ValueError("attention-reading pruners need MONAI's SABlock with use_flash_attention=False")
        if getattr(block, "with_cross_attention", False) or getattr(attn, "rel_positional_embedding", None):
            raise ValueError("cross attention and relative position embeddings are not supported here")
        self.block = block

    def attention(self, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
        return call_within(self.block, self._attention, x, weights_fn)

    def _attention(self, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
        block, attn = self.block, self.block.attn
        q, k, v = attn.input_rearrange(attn.qkv(block.norm1(x)))
        if attn.attention_dtype is not None:
            q, k = q.to(attn.attention_dtype), k.to(attn.attention_dtype)
        weights = weights_fn(torch.einsum("blxd,blyd->blxy", q, k) * attn.scale)
        out = torch.einsum("bhxy,bhyd->bhxd", attn.drop_weights(weights), v)
        out = attn.out_rearrange(out)
        if attn.include_fc:
            out = attn.out_proj(out)
        return attn.drop_output(out), weights

    def mlp(self, x: Tensor) -> Tensor:
        return call_within(self.block, lambda h: self.block.mlp(self.block.norm2(h)), x)


class TimmBlockParts:
    """:class:`BlockParts` of a timm ``Block`` (non-fused path of ``timm.layers.Attention``)."""

    def __init__(self, block: nn.Module) -> None:
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError("gated timm attention is not supported here")
        self.block = block

    def attention(self, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
        return call_within(self.block, self._attention, x, weights_fn)

    def _attention(self, x: Tensor, weights_fn: WeightsFn) -> tuple[Tensor, Tensor]:
        block, attn = self.block, self.block.attn
        b, n, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = weights_fn((q * attn.scale) @ k.transpose(-2, -1))
        out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
        out = attn.proj_drop(attn.proj(attn.norm(out)))
        return block.drop_path1(block.ls1(out)), weights

    def mlp(self, x: Tensor) -> Tensor:
        block = self.block
        return call_within(block, lambda h: block.drop_path2(block.ls2(block.mlp(block.norm2(h)))), x)


PartsFactory = Callable[[nn.Module], BlockParts]


UnequalCounts = Literal["pad", "group"]
"""How blocks run on gathered token sets whose images keep different counts: ``pad`` runs the batch
padded to its largest count (padding masked as keys); ``group`` runs each group of images with one count
on exactly that many tokens, so no FLOP is spent on padding."""


def run_by_count(run: Callable[[Tensor], Tensor], tokens: Tensor, valid: Tensor) -> Tensor:
    """``run`` on each group of images with the same count of valid slots, truncated to that count.

    Args:
        run: one block, ``(b, n, C) -> (b, n, C)``, on tokens without padding.
        tokens: ``(B, N, C)`` gathered tokens; each row's valid slots come first.
        valid: ``(B, N)`` bool, a prefix of each row.

    Returns:
        ``(B, N, C)``: the block's output on the valid slots, zeros on padding slots.
    """
    counts = valid.sum(dim=1)
    out = torch.zeros_like(tokens)
    for count in counts.unique().tolist():
        rows = (counts == count).nonzero().squeeze(1)
        if count:
            out[rows, :count] = run(tokens[rows, :count])
    return out
