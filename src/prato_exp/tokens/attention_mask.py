"""One key mask, resolved into every attention library's format.

Pruned tokens (``mask`` mode, padding slots of ``drop``, window slots without a token) must not be read
as attention keys. Each library takes that in its own shape and meaning; :class:`KeyMask` holds the one
fact, ``keep`` ``(B, K)`` bool with True = "may be attended to", and gives each format:

- :meth:`KeyMask.monai`: MONAI ``SABlock`` / ``TransformerBlock``'s ``attn_mask``, ``(B, K)`` bool;
- :meth:`KeyMask.sdpa`: ``torch.nn.functional.scaled_dot_product_attention`` and timm ``Attention``
  (fused and non-fused), ``(B, 1, 1, K)`` bool;
- :meth:`KeyMask.additive`: transformers' eager attention (SegFormer), ``(B, 1, 1, K)`` with 0 / ``-inf``;
- :meth:`KeyMask.apply` / :meth:`KeyMask.softmax`: hand-written attention (Swin's gathered windows,
  :mod:`prato_exp.tokens.blocks`): ``-inf`` on the masked keys of ``(B, heads, Q, K)`` logits;
- :func:`reduced_key_keep`: SegFormer's spatially reduced keys, kept where any of their parents is.

:class:`KeyPolicy` is the differentiable counterpart (DynamicViT's training): ``weights`` ``(B, K)`` in
``[0, 1]`` multiply each key's exponentiated score, so a dropped key is excluded in value while the
gradient still tells the policy what reading it would have given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class KeyMask:
    """``keep`` ``(B, K)`` bool, the keys attention may read (None: every key)."""

    keep: Tensor | None

    def monai(self) -> Tensor | None:
        """MONAI's ``attn_mask``: ``(B, K)`` bool, True = attend."""
        return self.keep

    def sdpa(self) -> Tensor | None:
        """SDPA's and timm's ``attn_mask``: ``(B, 1, 1, K)`` bool, True = attend (broadcast over heads and
        queries)."""
        return None if self.keep is None else self.keep[:, None, None, :]

    def additive(self, dtype: torch.dtype) -> Tensor | None:
        """``(B, 1, 1, K)`` additive mask, 0 where kept and ``-inf`` elsewhere; None when every key of
        every image is kept (the library then runs its unmasked path)."""
        if self.keep is None or bool(self.keep.all()):
            return None
        mask = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device)
        return mask.masked_fill(~self.keep, float("-inf"))[:, None, None, :]

    def apply(self, logits: Tensor) -> Tensor:
        """Attention ``logits`` ``(B, heads, Q, K)`` with ``-inf`` on the masked keys."""
        if self.keep is None:
            return logits
        return logits.masked_fill(~self.keep[:, None, None, :], float("-inf"))

    def softmax(self, logits: Tensor) -> Tensor:
        """Attention weights ``(B, heads, Q, K)``: softmax over the kept keys of ``logits``."""
        return self.apply(logits).softmax(dim=-1)


@dataclass(frozen=True)
class KeyPolicy:
    """``weights`` ``(B, K)`` float, a keep policy over the keys (1 kept, 0 dropped; may carry gradients).

    :meth:`softmax` is DynamicViT's ``softmax_with_policy``: the weights multiply the exponentiated scores,
    ``eps`` keeps a row with no kept key finite, and (``self_attend``, square attention only) a query
    always reads itself, so a dropped token stays defined while no kept token reads it.
    """

    weights: Tensor
    eps: float = 1e-6

    def softmax(self, logits: Tensor, self_attend: bool = True) -> Tensor:
        """Attention weights ``(B, heads, Q, K)`` of ``logits`` under the policy (float32 inside)."""
        n, in_dtype = logits.shape[-1], logits.dtype
        keys = self.weights.float()[:, None, None, :]
        if self_attend:
            eye = torch.eye(n, dtype=torch.float32, device=logits.device)
            keys = keys + (1.0 - keys) * eye
        scores = logits.float()
        exp = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * keys
        return ((exp + self.eps / n) / (exp.sum(dim=-1, keepdim=True) + self.eps)).to(in_dtype)


def reduced_key_policy(weights: Tensor, grid_hw: tuple[int, int], sr: int) -> Tensor:
    """The policy of SegFormer's spatially reduced keys: the largest of their ``sr x sr`` parents'.

    ``weights`` ``(B, h * w)`` -> ``(B, (h // sr) * (w // sr))``; the gradient goes to that parent.
    """
    b = weights.shape[0]
    return F.max_pool2d(weights.view(b, 1, *grid_hw), sr, sr).flatten(1)


def reduced_key_keep(keep: Tensor, grid_hw: tuple[int, int], sr: int) -> Tensor:
    """Which spatially reduced keys stay: those with at least one kept parent among their ``sr x sr``.

    Args:
        keep: ``(B, h * w)`` bool keep mask, row-major.
        grid_hw: ``(h, w)``.
        sr: the sequence-reduction ratio (kernel and stride of the reduction convolution).

    Returns:
        ``(B, (h // sr) * (w // sr))`` bool; all True for an image none of whose reduced keys has a kept
        parent (possible only where ``sr`` does not divide the grid), so its softmax stays finite.
    """
    b = keep.shape[0]
    pooled = F.max_pool2d(keep.view(b, 1, *grid_hw).float(), sr, sr).flatten(1) > 0
    return pooled | ~pooled.any(dim=1, keepdim=True)
