"""The one interface every token pruner implements, so a backbone calls "the pruner", never a name.

A backbone wrapper calls a pruner at each pruning point with the tokens still alive there::

    result = pruner(tokens, grid_hw, box_xyxy, image_hw, positions=..., valid=..., attn=...)

and then executes ``result.keep`` according to ``pruner.mode``:

- ``drop``: gather the kept tokens and run every later block on them alone (FLOPs and time fall);
- ``mask``: keep the grid, exclude pruned tokens as attention keys and re-zero them after every
  token-wise operation (the exact emulation of ``drop``);
- ``zero_once``: the paper's literal ``Y' = beta * Y`` once; later blocks may refill the tokens.

Pruning state lives in the returned :class:`PruneResult`, never in the pruner or a shared dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

PruneMode = Literal["drop", "mask", "zero_once"]
FillMode = Literal["zero", "carry"]


@dataclass
class PruneResult:
    """What a pruner returns at one pruning point.

    Attributes:
        keep: ``(B, N)`` bool, True for tokens that go on; always False on padding slots.
        scores: ``(B, N)`` the pruner's relevance score per token (for logging and plots).
        token_scale: ``(B, N)`` or None; a multiplier applied to the tokens before they are
            gathered (PrATo's straight-through ``beta + s - s.detach()``), which carries gradients
            to the pruner's parameters.
        aux_losses: named scalar losses the LightningModule adds to the task loss and logs.
        extras: pruner-specific tensors for plots and diagnostics (e.g. PrATo's entropy, weights).
    """

    keep: Tensor
    scores: Tensor
    token_scale: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Tensor:
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)


class TokenPruner(nn.Module):
    """Base class of all pruners.

    Subclasses implement :meth:`score_and_select`. Class attributes tell the backbone how to run:
    ``needs_attention`` asks for the previous block's attention weights (computed on the non-fused
    path only then); ``mode`` and ``fill`` select the execution of the keep mask.
    """

    needs_attention: bool = False

    def __init__(self, mode: PruneMode = "drop", fill: FillMode = "zero") -> None:
        super().__init__()
        if mode not in ("drop", "mask", "zero_once"):
            raise ValueError(f"mode must be 'drop', 'mask' or 'zero_once', got {mode!r}")
        if fill not in ("zero", "carry"):
            raise ValueError(f"fill must be 'zero' or 'carry', got {fill!r}")
        self.mode: PruneMode = mode
        self.fill: FillMode = fill

    @property
    def active(self) -> bool:
        """False for the ``none`` pruner: the backbone then runs exactly the unpatched model."""
        return True

    def forward(
        self,
        tokens: Tensor,
        grid_hw: tuple[int, int],
        box_xyxy: Tensor,
        image_hw: tuple[int, int],
        *,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        attn: Tensor | None = None,
    ) -> PruneResult:
        """Score the alive tokens and select those to keep.

        Args:
            tokens: ``(B, N, C)`` tokens alive at this point.
            grid_hw: ``(h, w)`` of the full token grid (``Z = h * w``).
            box_xyxy: ``(B, 4)`` box prompt in input pixels, ``x0, y0, x1, y1``.
            image_hw: ``(H, W)`` of the network input.
            positions: ``(B, N)`` long, grid index of each token; ``arange(Z)`` when None.
            valid: ``(B, N)`` bool, False on padding slots; all True when None.
            attn: ``(B, heads, N, N)`` attention weights of the previous block, only for pruners
                with ``needs_attention``.
        """
        b, n, _ = tokens.shape
        if positions is None:
            positions = torch.arange(n, device=tokens.device).expand(b, n)
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        result = self.score_and_select(tokens, grid_hw, box_xyxy, image_hw, positions, valid, attn)
        result.keep = result.keep & valid
        return result

    def score_and_select(
        self,
        tokens: Tensor,
        grid_hw: tuple[int, int],
        box_xyxy: Tensor,
        image_hw: tuple[int, int],
        positions: Tensor,
        valid: Tensor,
        attn: Tensor | None,
    ) -> PruneResult:
        raise NotImplementedError


PrunerFactory = Callable[..., "TokenPruner"]
"""How backbones receive a pruner: ``factory(dim=...) -> TokenPruner`` (a Hydra ``_partial_``)."""


class NoPruner(TokenPruner):
    """The ``none`` pruner: keeps every token; backbones skip all pruning machinery for it.

    ``dim`` is accepted (and unused) because backbones build every pruner as ``pruner(dim=...)``.
    """

    def __init__(self, dim: int | None = None, mode: PruneMode = "drop", fill: FillMode = "zero") -> None:
        super().__init__(mode=mode, fill=fill)

    @property
    def active(self) -> bool:
        return False

    def score_and_select(self, tokens, grid_hw, box_xyxy, image_hw, positions, valid, attn):
        ones = torch.ones(tokens.shape[:2], device=tokens.device)
        return PruneResult(keep=valid.clone(), scores=ones)


@contextmanager
def pruning_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """Temporarily give every pruner of ``net`` (its ``pruners`` ModuleDict) the ``none`` pruner.

    The network then runs its unpruned computation, e.g. to count the FLOPs of the same weights
    without pruning. The original pruners are put back on exit.
    """
    pruners: nn.ModuleDict = net.pruners
    saved = dict(pruners.items())
    try:
        for name in saved:
            pruners[name] = NoPruner()
        yield net
    finally:
        for name, pruner in saved.items():
            pruners[name] = pruner
