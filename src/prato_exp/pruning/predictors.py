"""The local-global token scorer of DynamicViT (``PredictorLG``), which STP reuses (``MlpPredictor``).

``y = GELU(Linear_{C->C}(LayerNorm(x)))``; each token's first half of ``y`` is concatenated with the
weighted mean of the second half over the image's tokens, and an MLP ``C -> C/2 -> C/4 -> out`` maps
the result to raw per-token outputs. DynamicViT reads them as keep/drop logits (``out = 2``, log-softmax),
STP as one score (``out = 1``, log-sigmoid). Parameter names follow the official code (``in_conv``,
``out_conv``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LocalGlobalScorer(nn.Module):
    """``(B, N, C)`` tokens and ``(B, N)`` weights for the global mean -> ``(B, N, out_features)``."""

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, out_features),
        )

    def forward(self, tokens: Tensor, weights: Tensor) -> Tensor:
        """``weights`` ``(B, N)``: 1 for tokens in the global mean (valid, or DynamicViT's policy)."""
        y = self.in_conv(tokens)
        half = y.shape[-1] // 2
        w = weights[..., None].to(y.dtype)
        global_ = (y[..., half:] * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1)
        return self.out_conv(torch.cat([y[..., :half], global_.expand(-1, y.shape[1], -1)], dim=-1))
