"""The one interface every token pruner implements, so a backbone calls "the pruner", never a name.

A backbone wrapper calls a pruner at each pruning point with the tokens still alive there::

    result = pruner(tokens, grid_hw, box_xyxy, image_hw, positions=..., valid=..., state=...)

and then executes ``result.keep`` according to ``pruner.mode``:

- ``drop``: gather the kept tokens and run every later block on them alone (FLOPs and time fall);
- ``mask``: keep the grid, exclude pruned tokens as attention keys and re-zero them after every
  token-wise operation (the exact emulation of ``drop``);
- ``zero_once``: the paper's literal ``Y' = beta * Y`` once; later blocks may refill the tokens.

Pruning state lives in typed objects, never in the pruner: what one point hands to the next
(DynamicViT's policy, Evo-ViT's global attention, TRAM's centrality, DToP's canvas) is the method's own
:class:`CarriedState` dataclass in ``PruneResult.carried``; the backbone gathers its slot-aligned fields
with the kept tokens and hands it back inside the :class:`PointState` of the next point.

Optional hooks, all off by default, let a method do more than select tokens:

- ``needs_attention``: the backbone runs the blocks before the point with their attention exposed and
  calls :meth:`TokenPruner.observe_attention` on each (TRAM, Evo-ViT);
- :meth:`TokenPruner.runs_blocks`: the pruner runs the blocks after its point itself through
  :meth:`TokenPruner.run_block` (Evo-ViT's slow-fast update);
- ``PruneResult.soft_keep``: a differentiable keep; every backbone runs all tokens with policy-weighted
  keys (DynamicViT's training);
- ``PruneResult.early_exit``: final predictions made at the point (DToP);
- :meth:`TokenPruner.assemble`: rebuild the full token grid for the decoder (STP's token assembly);
- ``PruneResult.merge``: tokens merged instead of dropped, unmerged before the decoder (ToMe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Self

from prato_exp.tokens.token_set import TokenSet, gather_slots

if TYPE_CHECKING:
    from prato_exp.tokens.blocks import BlockParts

PruneMode = Literal["drop", "mask", "zero_once"]
FillMode = Literal["zero", "carry"]


SLOT_ALIGNED: dict[str, Any] = {"slots": True}
"""Metadata of a :class:`CarriedState` field ``(B, N, ...)`` aligned with the alive tokens (gathered with
them): ``name: Tensor = field(metadata=SLOT_ALIGNED)``."""


@dataclass
class CarriedState:
    """Base of a method's own state, carried from one pruning point to the next.

    A subclass is a dataclass of tensors. Fields declared with :func:`slot_field` are slot-aligned with
    the alive tokens and gathered with them when ``drop`` removes tokens; the others (on the full grid,
    ``(B, Z, ...)``) are handed on as they are.
    """

    def merged_2x2(self, grid_hw: tuple[int, int]) -> Self:
        """The state after a 2 x 2 patch merging of its ``grid_hw`` grid (Swin): every slot-aligned field
        (full grid, ``(B, h * w, ...)``) summed over each place's 2 x 2 parents (odd sides padded).

        Summing fits the per-token quantities methods carry (attention received, centrality, patch
        counts): a merged token receives what its parents received.
        """
        merged = {}
        for f in fields(self):
            if f.metadata.get("slots"):
                values = getattr(self, f.name)
                b, z = values.shape[:2]
                h, w = grid_hw
                grid = values.reshape(b, z, -1).transpose(1, 2).reshape(b, -1, h, w)
                grid = F.pad(grid, (0, w % 2, 0, h % 2))
                pooled = grid.view(b, grid.shape[1], (h + 1) // 2, 2, (w + 1) // 2, 2).sum(dim=(3, 5))
                merged[f.name] = pooled.flatten(2).transpose(1, 2).reshape(b, -1, *values.shape[2:])
        return replace(self, **merged)

    def gathered(self, order: Tensor, valid: Tensor) -> Self:
        """The state after a gather by ``order`` ``(B, N')`` (``valid`` False on padding slots)."""
        slots = {
            f.name: gather_slots(getattr(self, f.name), order, valid)
            for f in fields(self)
            if f.metadata.get("slots")
        }
        return replace(self, **slots)


@dataclass
class PointState:
    """What the backbone hands a pruner at a pruning point (and to the blocks a pruner runs itself).

    Attributes:
        exempt: ``(B,)`` bool, images the ``no_pruning`` fallback exempts from pruning, or None.
        keep: ``(B, Z)`` bool, the last point's keep mask (exemptions applied); set only for pruners that
            run the blocks after their point themselves.
        carried: the method's own state from the previous point (or its attention observer).
        soft_keep: ``(B, N)`` the differentiable keep the tokens run under (the previous point's
            ``PruneResult.soft_keep``, exemptions applied; the token set's ``weight``), or None.
    """

    exempt: Tensor | None = None
    keep: Tensor | None = None
    carried: CarriedState | None = None
    soft_keep: Tensor | None = None


@dataclass
class EarlyExit:
    """Predictions made at a pruning point and final where ``exit_grid`` holds (DToP).

    Attributes:
        logits: ``(B, K, h, w)`` per-token class logits on the token grid; the backbone writes them into
            its output (:meth:`~prato_exp.pruning.trace.PruningTrace.final_logits`) and the LightningModule
            supervises them with the task loss times ``loss_weight``.
        exit_grid: ``(B, Z)`` bool, grid places whose prediction became final at this point.
        loss_weight: weight of their task loss.
    """

    logits: Tensor
    exit_grid: Tensor
    loss_weight: float = 1.0


@dataclass
class TokenMerge:
    """Tokens merged instead of dropped at a pruning point (ToMe).

    Attributes:
        tokens: ``(B, N, C)`` the tokens after merging (every destination the size-weighted mean of
            itself and what was merged into it), executed in place of the tokens before ``keep`` applies.
        target: ``(B, N)`` long, the slot each token was merged into (its own slot when it was not). A
            merged-away place reads as its destination wherever the grid is read later.
    """

    tokens: Tensor
    target: Tensor


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
        carried: the method's state for the next pruning point (and :meth:`TokenPruner.run_block`), or
            None; the backbone gathers its slot fields with the kept tokens.
        early_exit: final predictions made at this point (DToP), or None.
        merge: tokens merged instead of dropped (ToMe), or None.
        soft_keep: ``(B, N)`` float or None; a keep policy equal to ``keep`` in value that carries the
            selector's gradient (DynamicViT's Gumbel sample in training). When set, nothing is removed:
            the later blocks run on every token, each key weighted by the policy
            (:class:`~prato_exp.tokens.attention_mask.KeyPolicy`), and every read of the grid (the
            decoder's, merges, convolutions) sees the tokens times it.
    """

    keep: Tensor
    scores: Tensor
    token_scale: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    carried: CarriedState | None = None
    early_exit: EarlyExit | None = None
    merge: TokenMerge | None = None
    soft_keep: Tensor | None = None

    def __getattr__(self, name: str) -> Tensor:
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)


@dataclass(frozen=True)
class PrunerContext:
    """What a backbone tells each pruner it builds (``factory(dim=..., context=...)``).

    Attributes:
        num_classes: output classes of the network, background included (DToP's heads).
        grid_hw: ``(h, w)`` of the token grid.
        depth: number of transformer blocks.
        point_index: 0-based index of this pruner's pruning point.
        num_points: number of pruning points.
        decoder_grids: ``(channels, (h, w))`` of each grid the decoder reads from the pruning point on,
            in order, that :meth:`TokenPruner.assemble` may rebuild (``index`` into this tuple); empty
            for a plain ViT, whose decoder reads one grid: ``grid_hw`` at the pruner's ``dim``.
    """

    num_classes: int
    grid_hw: tuple[int, int]
    depth: int
    point_index: int = 0
    num_points: int = 1
    decoder_grids: tuple[tuple[int, tuple[int, int]], ...] = ()


@dataclass(frozen=True)
class BoxPrompt:
    """The box prompt of a batch: ``box_xyxy`` ``(B, 4)`` in input pixels (``x0, y0, x1, y1``) on a network
    input of ``image_hw`` ``(H, W)``."""

    box_xyxy: Tensor
    image_hw: tuple[int, int]


class TokenPruner(nn.Module):
    """Base class of all pruners.

    Subclasses implement :meth:`select`. ``mode`` and ``fill`` select the execution of the
    keep mask; ``needs_attention`` asks the backbone to call :meth:`observe_attention` with the
    attention weights of each block before the point (computed on the non-fused path only then).
    """

    needs_attention: bool = False
    rescorable: ClassVar[frozenset[str]] = frozenset()
    """Constructor keys that ``eval.py`` may change on a trained checkpoint: those no learned part of the
    pruner depends on (PrATo's ``q``: its projections never see it). Any other change is refused."""
    grid_modules: ClassVar[tuple[str, ...]] = ()
    """Names of submodules that run on the full grid after pruning (STP's token assemblers); a backbone
    counts them with its pruned part (:func:`grid_module_names`)."""
    plain_vit_only: ClassVar[str] = ""
    """Why the method needs global attention over one token grid, which only UNETR and TransUNet have
    (a sentence naming what it needs); non-empty makes hierarchical backbones refuse it with that reason.
    Empty for methods that run in every backbone."""

    def __init__(self, mode: PruneMode = "drop", fill: FillMode = "zero") -> None:
        super().__init__()
        if mode not in get_args(PruneMode):
            raise ValueError(f"pruning.mode must be one of {get_args(PruneMode)}, got {mode!r}")
        if fill not in get_args(FillMode):
            raise ValueError(f"pruning.fill must be one of {get_args(FillMode)}, got {fill!r}")
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
        state: PointState | None = None,
    ) -> PruneResult:
        """Score the alive tokens and select those to keep (the tensors are the :class:`TokenSet` and
        :class:`BoxPrompt` that :meth:`select` reads).

        Args:
            tokens: ``(B, N, C)`` tokens alive at this point.
            grid_hw: ``(h, w)`` of the full token grid (``Z = h * w``).
            box_xyxy: ``(B, 4)`` box prompt in input pixels, ``x0, y0, x1, y1``.
            image_hw: ``(H, W)`` of the network input.
            positions: ``(B, N)`` long, grid index of each token; ``arange(Z)`` when None.
            valid: ``(B, N)`` bool, False on padding slots; all True when None.
            state: exemptions and what the previous point's result (and the attention observer)
                carried, aligned with ``tokens``; no carried state at the first point.
        """
        b, n, _ = tokens.shape
        if positions is None:
            positions = torch.arange(n, device=tokens.device).expand(b, n)
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        alive = TokenSet(tokens, positions, valid, (int(grid_hw[0]), int(grid_hw[1])))
        result = self.select(alive, BoxPrompt(box_xyxy, image_hw), state or PointState())
        result.keep = result.keep & valid
        return result

    def observe_attention(
        self, weights: Tensor, valid: Tensor, state: PointState, block_index: int
    ) -> PointState:
        """Update ``state.carried`` from one block's attention ``weights`` ``(B, heads, N, N)`` (softmaxed).

        Called for every block after the previous pruning point up to this one, only when
        ``needs_attention``; ``block_index`` is 1-based, ``valid`` ``(B, N)`` marks real tokens. The
        default is :meth:`observe_scores` of :meth:`attention_score`.
        """
        return self.observe_scores(self.attention_score(weights, valid), valid, state, block_index)

    def attention_score(self, weights: Tensor, valid: Tensor) -> Tensor:
        """``(B, N)`` per-key score of attention maps ``weights`` ``(B, heads, N, N)`` over ``valid`` tokens.

        Must be separable over independent maps, so that a windowed backbone (Swin) can pass each
        window's map as a batch row and put the per-slot scores back on its grid.
        """
        raise NotImplementedError(f"{type(self).__name__} reads no attention")

    def observe_scores(
        self, scores: Tensor, valid: Tensor, state: PointState, block_index: int
    ) -> PointState:
        """Update ``state.carried`` from one block's :meth:`attention_score` ``(B, N)`` on the tokens."""
        return state

    def runs_blocks(self) -> bool:
        """True when the blocks after this point must be run by :meth:`run_block`, not the backbone."""
        return False

    def run_block(self, parts: BlockParts, tokens: Tensor, state: PointState) -> tuple[Tensor, PointState]:
        """Run one block on the full grid ``tokens`` ``(B, Z, C)``; ``state.keep`` is ``(B, Z)``."""
        raise NotImplementedError(f"{type(self).__name__} does not run blocks itself")

    def assemble(
        self, final: Tensor, carry: Tensor, exit_point: Tensor, results: list[PruneResult], index: int = 0
    ) -> Tensor | None:
        """Rebuild a complete ``(B, Z, C)`` grid for the decoder, or None to keep the filled grid.

        ``final``: the kept tokens on the grid (zero at pruned places; a plain ViT's last block, normed);
        ``carry``: each pruned place's value when it was pruned (carried through a hierarchical model's
        merges); ``exit_point`` ``(B, Z)`` long: the 0-based pruning point that removed a place, -1 for
        places alive to the end; ``results``: every point's result; ``index``: which of the context's
        ``decoder_grids`` this is (0: the pruning point's own grid). Called on the first pruning point's
        pruner, only when some pruner uses ``fill=carry``.
        """
        return None

    def reset_rng(self) -> None:
        """Restart any random stream (called at the start of every evaluation epoch)."""

    def on_train_batch(self, step: int) -> None:
        """Called by the LightningModule before every training batch with the global step (schedules)."""

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """The method: which of the ``alive`` tokens to keep, given the ``prompt`` and the ``state``.

        ``alive`` holds ``tokens`` ``(B, N, C)``, their grid ``positions`` ``(B, N)``, ``valid``
        ``(B, N)`` (False on padding slots) and ``grid_hw``; the returned ``keep`` is ``(B, N)``.
        """
        raise NotImplementedError


def grid_module_names(pruners: nn.ModuleDict, prefix: str = "pruners") -> list[str]:
    """Module names of the pruners' ``grid_modules`` (they run after pruning, on the full grid)."""
    return [
        f"{prefix}.{key}.{name}" for key, p in pruners.items() for name in p.grid_modules if hasattr(p, name)
    ]


def refuse_plain_vit_only(pruner: TokenPruner, backbone: str) -> None:
    """Raise a ValueError naming the pruner, ``backbone`` and the pruner's reason when it needs a plain
    ViT's global attention (``plain_vit_only``)."""
    if pruner.plain_vit_only:
        raise ValueError(
            f"{type(pruner).__name__} cannot run in {backbone}: {pruner.plain_vit_only} "
            "Use model=unetr or transunet (docs/baselines.md lists which method runs where)."
        )


PrunerFactory = Callable[..., "TokenPruner"]
"""How backbones receive a pruner: ``factory(dim=..., context=PrunerContext) -> TokenPruner``
(a Hydra ``_partial_``)."""


class NoPruner(TokenPruner):
    """The ``none`` pruner: keeps every token; backbones skip all pruning machinery for it.

    ``dim`` and ``context`` are accepted (and unused) because backbones build every pruner as
    ``pruner(dim=..., context=...)``.
    """

    def __init__(
        self,
        dim: int | None = None,
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        context: PrunerContext | None = None,
    ) -> None:
        super().__init__(mode=mode, fill=fill)

    @property
    def active(self) -> bool:
        return False

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        tokens, valid = alive.tokens, alive.valid
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
