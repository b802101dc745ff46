r"""DToP (Tang et al., "Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation",
ICCV 2023; official code github.com/zbwxp/Dynamic-Token-Pruning, ``mmseg_custom/backbone/vit_prune.py``,
``mmseg_custom/decode_heads/prune_head.py``).

Early exit by difficulty. At the end of a stage an auxiliary head predicts a class for every alive
token; tokens whose confidence exceeds ``p0`` are *easy*: their prediction is final and they leave all
later blocks. For context, the ``k_keep`` most confident easy tokens of every predicted class stay::

    p = softmax(H_m(x))              # (B, N, K)
    c, y = max_k p, argmax_k p
    E = {n valid : c_n > p0}                                  # strict >
    E -= top-min(|E_k|, k_keep) of E_k by c, for every class k  (E_k = {n in E : y_n = k})
    keep = valid & ~E

The final prediction combines early and late ones: places that exited take the head logits of the
point where they exited, nearest-upsampled to their patches; the decoder's logits stay elsewhere
(:meth:`prato_exp.pruning.trace.PruningTrace.final_logits`). Each head is supervised on its canvas (this
point's logits on alive places, earlier heads' where tokens exited before) with the task loss, added by
the LightningModule as ``early_head`` (``_<point>``) times ``head_loss_weight``. The exit decision is made
without gradient, in training too, as in the original.

Departures for this framework, and why:

- Head: ``LayerNorm -> Linear(C, K)`` per token (the exit rule needs a per-token classifier; SegViT's
  ATM query decoder is a decoder choice of the original, not part of the pruning rule). Loss: the
  model's Dice-CE on the bilinearly upsampled canvas, not the ATM set loss.
- The decoder here is convolutional, so exited places are zero-filled (as in the original's backbone)
  and their logits are explicitly replaced by the early prediction after decoding.
- One run instead of two: the original trains the heads without pruning (``p0 = 1``) and then fine-tunes
  with pruning. ``exit_warmup_steps`` reproduces that in one run (no exits, in training and validation,
  before that many optimiser steps); the default 0 prunes from the start. From scratch, heads become
  confident on the majority class (background) within an epoch: with 0 warm-up steps the paper-size
  UNETR exited 97 % of its tokens after one phantom epoch and predicted background everywhere.
- Keep counts depend on the image (confidence), not on a ratio; tables report DToP's measured sparsity.
- Hierarchical backbones (Swin UNETR, SegFormer; one pruning point at a stage): the head predicts on that
  stage's grid and an exited place's prediction covers its stage patch (``2^s`` or ``prod(strides)``
  input pixels a side); the finer stages before the point and the convolutional skips are not pruned,
  and their contribution is overwritten where a place exited, exactly as in the plain ViTs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prato_exp.pruning.base import (
    BoxPrompt,
    CarriedState,
    EarlyExit,
    FillMode,
    PointState,
    PruneMode,
    PrunerContext,
    PruneResult,
    TokenPruner,
)
from prato_exp.tokens.token_set import TokenSet, write_to_grid


def exit_mask(probs: Tensor, valid: Tensor, p0: float, k_keep: int) -> Tensor:
    """``(B, N)`` bool: tokens that exit, from class probabilities ``probs`` ``(B, N, K)``.

    Valid tokens with confidence strictly above ``p0``, except the ``k_keep`` most confident of each
    predicted class (ties by slot index).
    """
    confidence, label = probs.max(dim=-1)
    candidate = (confidence > p0) & valid
    protect = torch.zeros_like(candidate)
    k = min(k_keep, probs.shape[1])
    if k > 0:
        for cls in range(probs.shape[-1]):
            in_class = candidate & (label == cls)
            keyed = confidence.masked_fill(~in_class, -1.0)
            order = torch.sort(keyed, dim=1, descending=True, stable=True).indices[:, :k]
            top = torch.zeros_like(candidate).scatter(1, order, True)
            protect |= top & in_class
    return candidate & ~protect


@dataclass
class DToPState(CarriedState):
    """``canvas`` ``(B, Z, K)``: per grid place, the head logits of the point where it exited (or the
    latest head's where it is still alive); on the grid, so never gathered."""

    canvas: Tensor


class DToPPruner(TokenPruner):
    """DToP's auxiliary head and confidence-based early exit at one pruning point.

    Args:
        dim: token channels ``C``.
        p0: confidence above which a token exits (official: 0.9 for ViT-B).
        k_keep: most confident tokens per class kept for context (official: 5).
        head_loss_weight: weight of this head's task loss.
        mode, fill: execution of the keep mask (``fill=zero`` is DToP's zeroing of exited tokens).
        context: the backbone's pruning context (``num_classes`` for the head).
        exit_warmup_steps: training steps without exits (heads learn first, the original's first stage).
    """

    def __init__(
        self,
        dim: int,
        p0: float = 0.9,
        k_keep: int = 5,
        head_loss_weight: float = 1.0,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
        exit_warmup_steps: int = 0,
    ) -> None:
        if context is None:
            raise ValueError("dtop needs the class count: build it as pruner(dim=..., context=PrunerContext)")
        if not 0 < p0 <= 1:
            raise ValueError(f"p0 must lie in (0, 1], got {p0}")
        if k_keep < 1:
            raise ValueError(f"k_keep must be >= 1 (an image must keep a token to attend to), got {k_keep}")
        super().__init__(mode=mode, fill=fill)
        self.p0 = p0
        self.k_keep = k_keep
        self.head_loss_weight = head_loss_weight
        self.exit_warmup_steps = exit_warmup_steps
        self._train_step: int | None = None
        self.num_classes = context.num_classes
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, context.num_classes))

    def extra_repr(self) -> str:
        return f"p0={self.p0}, k_keep={self.k_keep}, warmup={self.exit_warmup_steps}"

    def on_train_batch(self, step: int) -> None:
        """Track the global step for the exit warm-up (unset outside training: exits are on)."""
        self._train_step = step

    def exits_enabled(self) -> bool:
        """False during the warm-up of a training run."""
        return self._train_step is None or self._train_step >= self.exit_warmup_steps

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Head logits for every alive token; easy tokens exit with their prediction."""
        tokens, grid_hw, positions, valid = alive.tokens, alive.grid_hw, alive.positions, alive.valid
        b = tokens.shape[0]
        h, w = grid_hw
        z = h * w
        logits = self.head(tokens).float()  # (B, N, K)
        with torch.no_grad():
            probs = logits.softmax(dim=-1)
            exits = exit_mask(probs, valid, self.p0, self.k_keep) & self.exits_enabled()
            confidence = probs.amax(dim=-1).masked_fill(~valid, 0.0)
        carried = state.carried
        previous = (
            carried.canvas if isinstance(carried, DToPState) else logits.new_zeros(b, z, self.num_classes)
        )
        canvas = write_to_grid(previous, logits, positions, valid)
        exit_grid = write_to_grid(exits.new_zeros(b, z), exits, positions, valid)
        return PruneResult(
            keep=valid & ~exits,
            scores=confidence,
            carried=DToPState(canvas),
            early_exit=EarlyExit(
                logits=canvas.transpose(1, 2).reshape(b, self.num_classes, h, w),
                exit_grid=exit_grid,
                loss_weight=self.head_loss_weight,
            ),
        )
