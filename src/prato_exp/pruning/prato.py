r"""PrATo: prompt-driven adaptive token pruning (paper Sec. II-B, spec section 1).

At one pruning point, with the alive tokens ``Y`` (``B x N x C``, ``N <= Z = h * w``), a box prompt
``b = (x0, y0, x1, y1)`` in input pixels and the input size ``(H, W)``:

1. ``Y_map``: the alive valid tokens scattered onto a zero-filled ``B x C x h x w`` grid, row-major
   (for the full grid this is ``Y.transpose(1, 2).reshape(B, C, h, w)``; pruned places stay zero).
2. ``F = RoIAlign(Y_map, b, k x k, spatial_scale=w/W, sampling_ratio=2, aligned=True)``, then
   ``F.flatten(2).transpose(1, 2)``: ``M = k * k`` region queries (``query="roialign"``).
   Ablation ``query="naive"``: the queries are the alive tokens whose patch centres
   ``((col + 0.5) W / w, (row + 0.5) H / h)`` lie in the box, ``M_b`` per image, padded and masked.
3. ``V1 = F f1``, ``V2 = Y f2`` with ``f1, f2: C -> d_v``.
4. ``S = V1 V2^T / sqrt(d_v)``  (Eq. 2), ``B x M x N``.
5. ``rho = softmax_z(S)`` over valid tokens; ``H_i = -sum_z rho_iz log rho_iz``  (Eq. 3).
6. ``R_i = rank_i / (M_b - 1)`` of the entropies ascending (ties by query index, ``R = 0`` when
   ``M_b = 1``); ``Omega_i = 1 - R_i``; ``entropy=False`` gives ``Omega_i = 1``.
7. ``r_z = (1 / M_b) sum_i Omega_i S_iz``  (Eq. 4, with the spec's reading: a mean over queries).
8. ``s_z = sigmoid(r_z)``; ``beta_z = [s_z > tau]``  (Eq. 5), or, in percentile mode, the top
   ``n - floor(q n / 100)`` valid tokens by ``s`` (a top-k, so ties cannot change the count);
   at least ``min_keep`` tokens (the highest-scoring) are always kept.
   ``box_first=True`` (a prior from the prompt, off in the paper's settings): the tokens whose patches
   overlap the box rank before all others, so a percentile budget keeps the same count but fills it
   with the box's tokens first, and a fixed threshold keeps every box token besides ``s > tau``.
9. ``ste=True``: ``token_scale = beta + (s - s.detach())`` (spec 10), which equals ``beta`` exactly
   in value and carries gradients to ``f1`` and ``f2``. ``soft=True``: keep every token and scale
   it by ``s`` once (``mode="zero_once"`` only).

Choices beyond the spec, made here:

- ``f1`` and ``f2`` are ``nn.Linear(dim, d_v, bias=False)``: the paper's projection matrices.
- Non-square scaling: ``roi_align`` has one ``spatial_scale`` (``w / W``); when ``h / H`` differs,
  the box's y coordinates are first multiplied by ``(h / H) / (w / W)`` so both axes land on the grid.
- Naive queries: a centre is inside when ``x0 <= cx < x1`` and ``y0 <= cy < y1`` (half-open, the
  pixel-edge convention of the box). An empty set falls back to the token under the box centre,
  clamped into the grid; if that token was pruned earlier, to the alive token nearest to it on the
  grid (ties by slot index). Padded queries get weight 0, entropy 0 and are excluded from ranking.
- ``S``, the entropy, ``r`` and ``s`` are computed in float32 with autocast off (``S`` of ViT tokens
  overflows float16). The entropy is computed without gradient: ``Omega`` is a function of ranks,
  piecewise constant in ``S``, so no gradient flows through it anyway.
- ``scores`` and ``relevance`` are 0 on padding slots. ``token_scale`` has the tokens' dtype.
- ``q`` is checked only in percentile mode and ``tau`` only in fixed mode, where it is required; the
  other is ignored. ``floor(q n / 100)`` is computed exactly (``q`` as a fraction), not in floats.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from prato_exp.pruning.base import (
    BoxPrompt,
    FillMode,
    PointState,
    PruneMode,
    PrunerContext,
    PruneResult,
    TokenPruner,
)
from prato_exp.pruning.budget import TokenBudget
from prato_exp.tokens.token_set import TokenSet, scatter_slots

QueryMode = Literal["roialign", "naive"]


def tokens_to_grid(tokens: Tensor, positions: Tensor, valid: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Scatter the alive valid tokens onto a zero-filled feature map (spec step 1).

    Args:
        tokens: ``(B, N, C)`` alive tokens.
        positions: ``(B, N)`` long, row-major grid index of each token.
        valid: ``(B, N)`` bool, False on padding slots (these are not scattered).
        grid_hw: ``(h, w)`` of the full grid.

    Returns:
        ``(B, C, h, w)`` map; places of pruned tokens are zero.
    """
    b, _, c = tokens.shape
    h, w = grid_hw
    return scatter_slots(tokens, positions, valid, h * w).transpose(1, 2).reshape(b, c, h, w)


def roialign_queries(grid: Tensor, box_xyxy: Tensor, image_hw: tuple[int, int], k: int) -> Tensor:
    """Region features of the box by RoIAlign (spec step 2).

    Args:
        grid: ``(B, C, h, w)`` token map.
        box_xyxy: ``(B, 4)`` box in input pixels, ``x0, y0, x1, y1``.
        image_hw: ``(H, W)`` of the network input.
        k: output size; ``M = k * k``.

    Returns:
        ``(B, k * k, C)`` queries, bins in row-major order, in ``grid``'s dtype.
    """
    b, _, h, w = grid.shape
    img_h, img_w = image_hw
    scale_x = w / img_w
    y_factor = (h / img_h) / scale_x
    box = box_xyxy.to(device=grid.device, dtype=torch.float32)
    if not bool(torch.isfinite(box).all()):
        # roi_align reads out of bounds on NaN coordinates and can kill the process
        raise ValueError(f"box prompts must be finite, got {box_xyxy.tolist()}; validate with sanitize_boxes")
    box = box * box.new_tensor([1.0, y_factor, 1.0, y_factor])
    batch_index = torch.arange(b, device=grid.device, dtype=torch.float32).unsqueeze(1)
    rois = torch.cat([batch_index, box], dim=1)
    feats = roi_align(
        grid.float(), rois, output_size=k, spatial_scale=scale_x, sampling_ratio=2, aligned=True
    )
    return feats.flatten(2).transpose(1, 2).to(grid.dtype)


def naive_query_mask(
    positions: Tensor,
    valid: Tensor,
    grid_hw: tuple[int, int],
    box_xyxy: Tensor,
    image_hw: tuple[int, int],
) -> Tensor:
    """Which alive tokens are naive-cropping queries (ablation of spec step 2).

    A token is a query when its patch centre lies in the half-open box. An image with no such token
    gets the token under the box centre (clamped into the grid), or, if that token is not alive, the
    alive token nearest to it on the grid (ties by slot index).

    Args:
        positions: ``(B, N)`` long, row-major grid index of each token.
        valid: ``(B, N)`` bool, False on padding slots.
        grid_hw: ``(h, w)`` of the full grid.
        box_xyxy: ``(B, 4)`` box in input pixels.
        image_hw: ``(H, W)`` of the network input.

    Returns:
        ``(B, N)`` bool, True on the query tokens; at least one per image with a valid token.
    """
    h, w = grid_hw
    img_h, img_w = image_hw
    rows = torch.div(positions, w, rounding_mode="floor")
    cols = positions - rows * w
    cx = (cols.float() + 0.5) * (img_w / w)
    cy = (rows.float() + 0.5) * (img_h / h)
    x0, y0, x1, y1 = box_xyxy.to(device=positions.device, dtype=torch.float32).unbind(-1)
    inside = valid & (cx >= x0[:, None]) & (cx < x1[:, None]) & (cy >= y0[:, None]) & (cy < y1[:, None])
    centre_col = torch.floor((x0 + x1) / 2 * (w / img_w)).clamp(0, w - 1)
    centre_row = torch.floor((y0 + y1) / 2 * (h / img_h)).clamp(0, h - 1)
    dist = (rows.float() - centre_row[:, None]) ** 2 + (cols.float() - centre_col[:, None]) ** 2
    dist = dist.masked_fill(~valid, math.inf)
    fallback = F.one_hot(dist.argmin(dim=1), positions.shape[1]).bool() & valid
    empty = ~inside.any(dim=1, keepdim=True)
    return inside | (empty & fallback)


def box_overlap_mask(
    positions: Tensor,
    valid: Tensor,
    grid_hw: tuple[int, int],
    box_xyxy: Tensor,
    image_hw: tuple[int, int],
) -> Tensor:
    """Which alive tokens' patches overlap the box: the cells a margin-0 decoder window covers.

    A patch ``[col W / w, (col + 1) W / w)`` overlaps ``[x0, x1)`` when ``floor(x0 w / W) <= col <
    ceil(x1 w / W)``; rows likewise.

    Args:
        positions: ``(B, N)`` long, row-major grid index of each token.
        valid: ``(B, N)`` bool, False on padding slots.
        grid_hw: ``(h, w)`` of the full grid.
        box_xyxy: ``(B, 4)`` box in input pixels.
        image_hw: ``(H, W)`` of the network input.

    Returns:
        ``(B, N)`` bool, True on valid tokens under the box.
    """
    h, w = grid_hw
    img_h, img_w = image_hw
    rows = torch.div(positions, w, rounding_mode="floor")
    cols = positions - rows * w
    x0, y0, x1, y1 = box_xyxy.to(device=positions.device, dtype=torch.float64).unbind(-1)
    left, right = torch.floor(x0 * w / img_w), torch.ceil(x1 * w / img_w)
    top, bottom = torch.floor(y0 * h / img_h), torch.ceil(y1 * h / img_h)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    return valid & in_cols & in_rows


def gather_queries(tokens: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pack the selected tokens of each image to the front, padded to the batch's largest count.

    Args:
        tokens: ``(B, N, C)`` alive tokens.
        query_mask: ``(B, N)`` bool, True on the tokens to use as queries.

    Returns:
        ``(B, M, C)`` queries in slot order (padding zeroed) and ``(B, M)`` bool, True on real
        queries, with ``M = max(1, max_b M_b)``.
    """
    counts = query_mask.sum(dim=1)
    m = max(1, int(counts.max()))
    order = torch.argsort((~query_mask).to(torch.int8), dim=1, stable=True)[:, :m]
    queries = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    packed_mask = torch.arange(m, device=tokens.device) < counts[:, None]
    return queries.masked_fill(~packed_mask.unsqueeze(-1), 0), packed_mask


def similarity(v1: Tensor, v2: Tensor) -> Tensor:
    """Eq. 2: ``S = V1 V2^T / sqrt(d_v)``, in float32 with autocast off.

    Args:
        v1: ``(B, M, d_v)`` projected queries.
        v2: ``(B, N, d_v)`` projected tokens.

    Returns:
        ``(B, M, N)`` float32 similarity.
    """
    with torch.autocast(device_type=v1.device.type, enabled=False):
        return v1.float() @ v2.float().transpose(1, 2) / math.sqrt(v1.shape[-1])


def query_entropy(sim: Tensor, valid: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Eq. 3: entropy of each query's softmax over the valid tokens, NaN-free for one-hot rows.

    Args:
        sim: ``(B, M, N)`` similarity.
        valid: ``(B, N)`` bool; invalid tokens get ``-inf`` logits (probability 0).
        query_mask: ``(B, M)`` bool or None; padded queries get entropy 0.

    Returns:
        ``(B, M)`` entropies in nats.
    """
    invalid = ~valid.unsqueeze(1)
    log_rho = torch.log_softmax(sim.masked_fill(invalid, -math.inf), dim=-1).masked_fill(invalid, 0.0)
    rho = log_rho.exp().masked_fill(invalid, 0.0)
    entropy = -(rho * log_rho).sum(dim=-1)
    if query_mask is not None:
        entropy = entropy.masked_fill(~query_mask, 0.0)
    return entropy


def entropy_weights(entropy: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Inverse entropy weights ``Omega_i = 1 - rank_i / (M_b - 1)`` (spec step 6).

    Ranks ascend with the entropy, ties broken by query index; ``Omega = 1`` when ``M_b = 1``.

    Args:
        entropy: ``(B, M)`` query entropies.
        query_mask: ``(B, M)`` bool or None; padded queries are ranked last and get weight 0.

    Returns:
        ``(B, M)`` weights in ``[0, 1]``, float32.
    """
    b, m = entropy.shape
    if query_mask is None:
        query_mask = torch.ones(b, m, dtype=torch.bool, device=entropy.device)
    keyed = entropy.detach().float().masked_fill(~query_mask, math.inf)
    order = torch.argsort(keyed, dim=1, stable=True)
    arange = torch.arange(m, device=entropy.device).expand(b, m)
    rank = torch.empty_like(order).scatter_(1, order, arange).float()
    m_b = query_mask.sum(dim=1, keepdim=True).float()
    weights = 1.0 - rank / (m_b - 1).clamp(min=1)
    return weights.masked_fill(~query_mask, 0.0)


def relevance(sim: Tensor, weights: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Eq. 4 as the spec reads it: ``r_z = (1 / M_b) sum_i Omega_i S_iz``.

    Args:
        sim: ``(B, M, N)`` similarity.
        weights: ``(B, M)`` query weights ``Omega``.
        query_mask: ``(B, M)`` bool or None; padded queries are left out of the sum and of ``M_b``.

    Returns:
        ``(B, N)`` relevance.
    """
    if query_mask is None:
        m_b = torch.full_like(weights[:, :1], sim.shape[1])
    else:
        weights = weights.masked_fill(~query_mask, 0.0)
        m_b = query_mask.sum(dim=1, keepdim=True).to(weights.dtype)
    return torch.einsum("bm,bmn->bn", weights.to(sim.dtype), sim) / m_b.clamp(min=1).to(sim.dtype)


class PratoScores(NamedTuple):
    """Every intermediate of the score computation; shapes as in :func:`prato_scores`."""

    similarity: Tensor
    entropy: Tensor
    weights: Tensor
    relevance: Tensor
    scores: Tensor


def prato_scores(
    v1: Tensor,
    v2: Tensor,
    valid: Tensor,
    query_mask: Tensor | None = None,
    use_entropy: bool = True,
) -> PratoScores:
    """Eqs. 2-5 up to the threshold: similarity, entropy, weights, relevance and ``s = sigmoid(r)``.

    Args:
        v1: ``(B, M, d_v)`` projected queries.
        v2: ``(B, N, d_v)`` projected tokens.
        valid: ``(B, N)`` bool, False on padding slots.
        query_mask: ``(B, M)`` bool or None (all queries real).
        use_entropy: False for the "w/o entropy" ablation (``Omega = 1``).

    Returns:
        :class:`PratoScores` with ``similarity (B, M, N)``, ``entropy (B, M)`` (no gradient),
        ``weights (B, M)``, ``relevance (B, N)`` and ``scores (B, N)``, all float32; relevance and
        scores are 0 on padding slots.
    """
    sim = similarity(v1, v2)
    with torch.no_grad():
        ent = query_entropy(sim, valid, query_mask)
        if use_entropy:
            weights = entropy_weights(ent, query_mask)
        elif query_mask is None:
            weights = torch.ones_like(ent)
        else:
            weights = query_mask.float()
    rel = relevance(sim, weights, query_mask).masked_fill(~valid, 0.0)
    scores = torch.sigmoid(rel).masked_fill(~valid, 0.0)
    return PratoScores(sim, ent, weights, rel, scores)


class PrATo(TokenPruner):
    """Prompt-driven adaptive token pruner (see the module docstring for the equations).

    Args:
        dim: token channels ``C``.
        k: RoIAlign output size; ``M = k * k`` queries.
        d_v: projection width of ``f1`` and ``f2``.
        budget: how many tokens to keep: a percentile (prune ``q`` % of the valid tokens per image) or a
            fixed threshold (keep ``s > tau``), with ``min_keep`` (default: prune 25 %).
        entropy: False for the "w/o entropy" ablation (``Omega = 1``).
        query: ``"roialign"`` or ``"naive"`` (tokens with centres in the box).
        mode: how the backbone executes the keep mask (see :mod:`prato_exp.pruning.base`).
        fill: what pruned places hold when scattered back.
        ste: return the straight-through ``token_scale`` so ``f1`` and ``f2`` train (only where the scores
            carry gradients: its value is 1 on every kept token).
        soft: keep every token and scale it by ``s`` (requires ``mode="zero_once"``).
        box_first: rank the tokens under the box before all others when selecting (``scores`` stay
            ``s``): a learned ``s`` need not favour them, and a decoder window needs them.
        context: what the backbone tells its pruners (unused: PrATo needs only ``dim``).
    """

    rescorable = frozenset({"budget", "k", "mode", "box_first"})

    def __init__(
        self,
        dim: int,
        k: int = 5,
        d_v: int = 64,
        budget: TokenBudget | None = None,
        entropy: bool = True,
        query: QueryMode = "roialign",
        mode: PruneMode = "drop",
        fill: FillMode = "zero",
        ste: bool = True,
        soft: bool = False,
        box_first: bool = False,
        context: PrunerContext | None = None,
    ) -> None:
        if dim < 1 or k < 1 or d_v < 1:
            raise ValueError(f"dim, k and d_v must be positive, got dim={dim}, k={k}, d_v={d_v}")
        if query not in get_args(QueryMode):
            raise ValueError(f"pruning.query must be one of {get_args(QueryMode)}, got {query!r}")
        if soft and mode != "zero_once":
            raise ValueError(f"pruning.soft=true requires pruning.mode=zero_once, got mode={mode!r}")
        super().__init__(mode=mode, fill=fill)
        self.dim = dim
        self.k = k
        self.d_v = d_v
        self.budget = budget if budget is not None else TokenBudget()
        self.entropy = entropy
        self.query: QueryMode = query
        self.ste = ste
        self.soft = soft
        self.box_first = box_first
        self.f1 = nn.Linear(dim, d_v, bias=False)
        self.f2 = nn.Linear(dim, d_v, bias=False)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, d_v={self.d_v}, budget={self.budget}, entropy={self.entropy}, "
            f"query={self.query}, mode={self.mode}, fill={self.fill}, ste={self.ste}, soft={self.soft}, "
            f"box_first={self.box_first}"
        )

    def select(self, alive: TokenSet, prompt: BoxPrompt, state: PointState) -> PruneResult:
        """Score the alive tokens against the box prompt and select those to keep.

        Args:
            alive: the alive tokens ``(B, N, C)``, their grid positions ``(B, N)``, valid slots ``(B, N)``
                and the full grid's ``(h, w)``.
            prompt: the box ``(B, 4)`` in input pixels and the network input's ``(H, W)``.
            state: unused (PrATo carries nothing between points).

        Returns:
            :class:`PruneResult` with ``keep (B, N)``, ``scores (B, N)``, ``token_scale (B, N)`` or
            None, and extras ``entropy (B, M)``, ``weights (B, M)``, ``relevance (B, N)`` and
            ``query_mask (B, M)``.
        """
        tokens, grid_hw, positions, valid = alive.tokens, alive.grid_hw, alive.positions, alive.valid
        box_xyxy, image_hw = prompt.box_xyxy, prompt.image_hw
        if self.query == "roialign":
            grid = tokens_to_grid(tokens, positions, valid, grid_hw)
            queries = roialign_queries(grid, box_xyxy, image_hw, self.k)
            query_mask = None
        else:
            selected = naive_query_mask(positions, valid, grid_hw, box_xyxy, image_hw)
            queries, query_mask = gather_queries(tokens, selected)
        out = prato_scores(self.f1(queries), self.f2(tokens), valid, query_mask, self.entropy)
        s = out.scores
        if self.soft:
            keep = valid.clone()
            token_scale: Tensor | None = s.to(tokens.dtype)
        else:
            rank_by = s
            if self.box_first:
                under_box = box_overlap_mask(positions, valid, grid_hw, box_xyxy, image_hw)
                rank_by = s.detach() + 2.0 * under_box.to(s.dtype)  # s is in [0, 1]: the box ranks first
            keep = self.budget.keep(rank_by, valid)
            # the straight-through scale is 1 on every kept token: only its gradient matters
            straight_through = self.ste and s.requires_grad
            token_scale = (keep.to(s.dtype) + (s - s.detach())).to(tokens.dtype) if straight_through else None
        if query_mask is None:
            query_mask = torch.ones_like(out.entropy, dtype=torch.bool)
        extras = {
            "entropy": out.entropy,
            "weights": out.weights,
            "relevance": out.relevance,
            "query_mask": query_mask,
        }
        return PruneResult(keep=keep, scores=s, token_scale=token_scale, extras=extras)
