"""SegFormer (HuggingFace ``transformers``: Mix Transformer encoder + all-MLP decoder) with PrATo.

The wrapper owns an unmodified :class:`transformers.SegformerForSemanticSegmentation` built offline from a
``SegformerConfig`` (random init, eager attention so ``FlopCounterMode`` sees it) and iterates its stages
and blocks itself. The pruner runs once, on the tokens of the overlapping patch embedding of stage 2 by
default (the 1/8 scale of spec section 3; set as ``prune_after=[1]``: after stage 1); that stage and every
later one run on kept tokens. With the ``none`` pruner every library module runs unchanged, so the logits
equal the library's (upsampled to the input size as :meth:`PrunableSegFormer.forward` does).

What ``drop`` executes per block, on the kept tokens only (gather/scatter):

- ``layernorm_before``, the query projection, the output projection, ``layernorm_after`` and the Mix-FFN
  linear layers ``fc1`` and ``fc2``;
- attention of the kept queries over the keys (eager ``QK^T`` and ``AV``).

What stays on the grid (computed on the zero-filled ``h x w`` map, pruned places zero):

- the keys and values at ``sr > 1``: the spatial-reduction convolution and its LayerNorm read the grid; a
  reduced key is masked (``-inf``) only if all of its ``sr x sr`` parents are pruned (if none of an image's
  reduced keys has a kept parent, which happens only where ``sr`` does not divide the grid, no key is
  masked). At ``sr = 1`` the keys are the kept tokens themselves;
- the depth-wise convolution of the Mix-FFN, whose output is read back at the kept places only;
- the next stage's overlapping patch embedding (a strided convolution) on the zero-filled grid.

Keep rule across stages: a token of stage ``s + 1`` is kept if any of its ``stride x stride`` parents
(its stride footprint, rows ``[i * stride, (i + 1) * stride)``, 2 x 2 in MiT) of stage ``s`` is kept.
The decoder reads every stage's output (after the stage's LayerNorm) scattered to its grid, pruned places
holding zeros (``fill="zero"``) or, with ``fill="carry"``, the stage's LayerNorm of the token's patch
embedding (its value where it was dropped); a pruner with a token assembly (STP) rebuilds each of those
grids from the kept and the carried tokens. ``mask`` runs the same code on the full grid (alive tokens
``=`` all places, ``valid = keep``, every token-wise output re-zeroed), so it equals ``drop`` up to float
error. ``zero_once`` zeroes the pruned tokens once and runs the unmodified blocks on the whole grid.

A differentiable keep (``PruneResult.soft_keep``, DynamicViT's training) runs ``mask``'s code with the
policy in place of the keep mask: every token-wise output is multiplied by it (dropped tokens are zero in
value, with the policy's gradient), keys are weighted by it (:class:`KeyPolicy`; a reduced key takes its
largest parent's, and a query reads itself only at ``sr = 1``), and a next-stage token's policy is its
largest parent's.

``PrunableSegformerLayer`` is the one patch: the blocks of the pruned stages get this subclass (as ToMe
patches timm), whose ``forward`` is the library's unless the stage's token set is passed, so the pruned
forward runs inside each block's own module call and ``FlopCounterMode`` attributes its FLOPs to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.segformer.modeling_segformer import (
    SegformerAttention,
    SegformerLayer,
    eager_attention_forward,
)

from prato_exp.models.base import SegOutput
from prato_exp.models.decoder_window import (
    GridWindow,
    background_logits,
    check_window_batch,
    decode_in_window,
    pruning_window,
)
from prato_exp.models.weights import load_pretrained
from prato_exp.pruning.base import (
    NoPruner,
    PrunerContext,
    PrunerFactory,
    TokenPruner,
    grid_module_names,
    refuse_plain_vit_only,
)
from prato_exp.pruning.execute import apply_pruner
from prato_exp.pruning.trace import PruningTrace
from prato_exp.tokens.attention_mask import KeyMask, KeyPolicy, reduced_key_keep, reduced_key_policy
from prato_exp.tokens.token_set import TokenSet, child_keep, child_merged_into, child_weight

AttnImplementation = Literal["eager", "sdpa"]


def next_stage_keep(keep: Tensor, grid_hw: tuple[int, int], child_hw: tuple[int, int], stride: int) -> Tensor:
    """Keep mask of the next stage by the parent rule (:func:`~prato_exp.tokens.token_set.child_keep`),
    checked against the next stage's own grid ``child_hw``.

    Args:
        keep: ``(B, h * w)`` bool keep mask of this stage, row-major.
        grid_hw: ``(h, w)`` of this stage.
        child_hw: ``(h', w')`` of the next stage (``ceil(h / stride)``, ``ceil(w / stride)``).
        stride: the next patch embedding's stride.

    Returns:
        ``(B, h' * w')`` bool.
    """
    child, footprints_hw = child_keep(keep, grid_hw, stride)
    if footprints_hw != tuple(child_hw):
        raise ValueError(
            f"a {grid_hw} grid with stride {stride} gives {footprints_hw} footprints, but the "
            f"next stage's grid is {child_hw}; use odd patch sizes (padding = patch_size // 2)"
        )
    return child


def stage_key_keep(layout: TokenSet, sr: int) -> Tensor:
    """``(B, K)`` bool: the keys attention may use (the alive tokens at ``sr = 1``, else the reduced keys
    with a kept parent)."""
    if sr == 1:
        return layout.valid
    return reduced_key_keep(layout.keep_grid(), layout.grid_hw, sr)


class PrunableSegformerLayer(SegformerLayer):
    """``SegformerLayer`` whose forward runs on a stage's kept tokens when given their
    :class:`~prato_exp.tokens.token_set.TokenSet` (``stage_grid``).

    Without one it is the library's forward, unchanged.
    """

    def forward(
        self,
        hidden_states: Tensor,
        height: int,
        width: int,
        stage_grid: TokenSet | None = None,
        key_bias: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """``hidden_states`` ``(B, N, C)``: the whole ``height x width`` grid, or the alive tokens of
        ``stage_grid``, whose keys ``key_bias`` masks (:func:`stage_key_bias`, once per stage)."""
        if stage_grid is None:
            return super().forward(hidden_states, height, width, **kwargs)
        layout = stage_grid
        residual = hidden_states
        x = layout.rezero(self.layernorm_before(hidden_states))
        x = layout.rezero(_attention_on_kept(self.attention, x, layout, key_bias))
        x = self.drop_path(self.hidden_dropout(x)) + residual

        residual = x
        mlp = self.mlp
        x = layout.rezero(self.layernorm_after(x))
        x = mlp.fc1(x)  # (B, N, C_mlp)
        x = layout.from_map(mlp.dwconv.dwconv(layout.with_tokens(x).to_map()))
        x = mlp.dropout(mlp.activation_fn(x))
        x = layout.rezero(mlp.dropout(mlp.fc2(x)))
        return self.drop_path(x) + residual


def stage_key_bias(layout: TokenSet, sr: int, dtype: torch.dtype) -> Tensor | None:
    """The additive key mask ``(B, 1, 1, K)`` of a stage's attention (0 / ``-inf``, :func:`stage_key_keep`),
    or None when every key may be read; the same for every block of the stage."""
    if sr == 1 and layout.complete:
        return None
    return KeyMask(stage_key_keep(layout, sr)).additive(dtype)


def _attention_on_kept(
    attn: SegformerAttention, tokens: Tensor, layout: TokenSet, key_bias: Tensor | None
) -> Tensor:
    """Efficient self-attention of the alive ``tokens`` ``(B, N, C)`` (normed, re-zeroed) -> ``(B, N, C)``.

    Queries and the output projection run on the alive tokens; at ``sr > 1`` keys and values come from the
    zero-filled grid through the reduction convolution and its LayerNorm. ``key_bias``: the stage's
    :func:`stage_key_bias` (unused under a differentiable keep, which weights the keys instead).
    """
    b, n, _ = tokens.shape
    sr = attn.sequence_reduction_ratio
    query = attn.q_proj(tokens).view(b, n, -1, attn.head_dim).transpose(1, 2)  # (B, heads, N, d)
    kv = attn.sequence_reduction(layout.with_tokens(tokens).to_grid(), *layout.grid_hw) if sr > 1 else tokens
    k = kv.shape[1]
    key = attn.k_proj(kv).view(b, k, -1, attn.head_dim).transpose(1, 2)  # (B, heads, K, d)
    value = attn.v_proj(kv).view(b, k, -1, attn.head_dim).transpose(1, 2)
    if layout.weight is not None:  # a differentiable keep: every key weighted by its policy
        key_weight = layout.weight if sr == 1 else reduced_key_policy(layout.weight, layout.grid_hw, sr)
        scores = (query @ key.transpose(-2, -1)) * attn.scaling  # (B, heads, N, K)
        probs = KeyPolicy(key_weight).softmax(scores, self_attend=sr == 1)
        probs = F.dropout(probs, p=attn.attention_dropout, training=attn.training)
        return attn.o_proj((probs @ value).transpose(1, 2).reshape(b, n, -1))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, eager_attention_forward
    )
    out, _ = interface(
        attn,
        query,
        key,
        value,
        key_bias,
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
    )
    return attn.o_proj(out.reshape(b, n, -1))  # out: (B, N, heads, d)


class PrunableSegFormer(nn.Module):
    """HuggingFace SegFormer (MiT encoder + all-MLP decoder) with a pruner at one stage's patch embedding.

    Per-stage sequences have one entry per stage (4 in MiT). Defaults are MiT-B2.

    Args:
        in_channels: image channels (``num_channels``).
        out_channels: classes, background included (``num_labels``).
        img_size: square input side the model is built for (any side works; every stage's grid must be
            at least its ``sr``).
        hidden_sizes, depths, num_attention_heads, sr_ratios, patch_sizes, strides, mlp_ratios: the
            Mix Transformer per stage, passed to ``SegformerConfig``.
        decoder_hidden_size: width of the all-MLP decoder.
        drop_path_rate, classifier_dropout_prob: passed to ``SegformerConfig``.
        attn_implementation: ``"eager"`` (``FlopCounterMode`` counts it) or ``"sdpa"``.
        prune_after: the pruning point as one 1-based stage count, the key every backbone shares (blocks
            in plain ViTs, stages in hierarchical ones): ``[s]`` prunes the tokens of stage ``s + 1``'s
            patch embedding (``[0]``: the first stage's), so stages ``s + 1 ..`` run on kept tokens.
            One point only (a list of length 1).
        pruner: a factory ``pruner(dim=..., context=...) -> TokenPruner`` (Hydra ``_partial_``). None means
            no pruning.
        pretrained: optional local path of a ``SegformerForSemanticSegmentation`` state dict.
        pretrained_ignore: glob patterns of keys that may be missing, unknown or reshaped in
            ``pretrained`` (a partial load); any other mismatch is an error listing the keys.
        decoder_window: None (off: the library's dense decoder) or a margin: while a pruner is active,
            the all-MLP decoder and the final upsampling run only on the box dilated by this many cells
            of the last stage's grid, plus one cell of context on every side that does not reach the
            image's edge, and the rest of the image is background. The decoder's only cross-pixel
            operation is bilinear upsampling, which reads one neighbour, so inside the dilated box the
            logits are the dense decoder's exactly (:mod:`prato_exp.models.decoder_window`).
        decoder_window_batch: in evaluation, ``shared`` (every image decodes the batch's largest
            rectangle, one decoder call) or ``by_size`` (one call per size of the images' own windows:
            each image's logits equal its batch-1 logits). Training always shares.
    """

    display_name = "SegFormer"
    """The backbone's name in tables and figures."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 224,
        hidden_sizes: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_attention_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        mlp_ratios: Sequence[int] = (4, 4, 4, 4),
        decoder_hidden_size: int = 768,
        drop_path_rate: float = 0.1,
        classifier_dropout_prob: float = 0.1,
        attn_implementation: AttnImplementation = "eager",
        prune_after: Sequence[int] = (1,),
        pruner: PrunerFactory | None = None,
        pretrained: str | None = None,
        pretrained_ignore: Sequence[str] = (),
        decoder_window: int | None = None,
        decoder_window_batch: str = "shared",
    ) -> None:
        super().__init__()
        if decoder_window is not None and decoder_window < 0:
            raise ValueError(f"model.decoder_window must be >= 0 cells or null (off), got {decoder_window}")
        self.decoder_window_batch = check_window_batch(decoder_window_batch)
        per_stage = {
            "hidden_sizes": hidden_sizes,
            "depths": depths,
            "num_attention_heads": num_attention_heads,
            "sr_ratios": sr_ratios,
            "patch_sizes": patch_sizes,
            "strides": strides,
            "mlp_ratios": mlp_ratios,
        }
        stages = {name: tuple(int(v) for v in values) for name, values in per_stage.items()}
        prune_at_stage = _stage_of_point(prune_after, len(stages["depths"]))
        _check_stages(stages, img_size, prune_at_stage)
        if attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
        num_stages = len(stages["depths"])
        config = SegformerConfig(
            num_channels=in_channels,
            num_labels=out_channels,
            num_encoder_blocks=num_stages,
            decoder_hidden_size=decoder_hidden_size,
            drop_path_rate=drop_path_rate,
            classifier_dropout_prob=classifier_dropout_prob,
            attn_implementation=attn_implementation,
            **{name: list(values) for name, values in stages.items()},
        )
        self.segformer = SegformerForSemanticSegmentation(config)
        if not hasattr(self.segformer.segformer, "stages"):
            raise RuntimeError(
                "PrunableSegFormer needs the SegFormer module layout of transformers >= 5 (stages, q_proj, "
                f"fc1); transformers {transformers.__version__} is installed"
            )
        self.img_size = img_size
        self.depths = stages["depths"]
        self.strides = stages["strides"]
        self.prune_after = (prune_at_stage - 1,)
        self.prune_at_stage = prune_at_stage
        for stage in self.stages[prune_at_stage - 1 :]:
            for block in stage.blocks:
                block.__class__ = PrunableSegformerLayer
        factory = pruner or NoPruner
        sides = [img_size]
        for stride in stages["strides"]:
            sides.append(-(-sides[-1] // stride))  # an odd patch with padding patch // 2: ceil(side / stride)
        context = PrunerContext(
            num_classes=out_channels,
            grid_hw=(sides[prune_at_stage],) * 2,
            depth=sum(stages["depths"]),
            decoder_grids=tuple(
                (stages["hidden_sizes"][s - 1], (sides[s], sides[s]))
                for s in range(prune_at_stage, num_stages + 1)
            ),
        )
        point = factory(dim=stages["hidden_sizes"][prune_at_stage - 1], context=context)
        refuse_plain_vit_only(point, "SegFormer")
        if point.needs_attention:
            raise ValueError(
                f"{type(point).__name__} ranks tokens by the attention they received in the blocks before "
                "the pruning point; SegFormer's tokens there are new (stage "
                f"{prune_at_stage}'s patch embedding) and its attention reads spatially reduced keys, so no "
                "token has received any; use model=unetr, transunet or swin_unetr"
            )
        self.pruners = nn.ModuleDict({str(prune_at_stage - 1): point})
        self.decoder_window = decoder_window
        self.register_buffer("background", background_logits(out_channels), persistent=False)
        if pretrained:
            load_pretrained(self.segformer, pretrained, ignore=pretrained_ignore)

    @property
    def stages(self) -> nn.ModuleList:
        """The library's encoder stages (``patch_embeddings``, ``blocks``, ``layer_norm``)."""
        return self.segformer.segformer.stages

    def forward(
        self, image: Tensor, box_xyxy: Tensor | None = None, prune_enabled: Tensor | None = None
    ) -> SegOutput:
        """Segment ``image`` ``(B, C, H, W)`` given one box per image ``box_xyxy`` ``(B, 4)``.

        Returns logits ``(B, K, H, W)``: the decoder's 1/4-scale logits upsampled bilinearly.
        """
        pruner: TokenPruner = self.pruners[str(self.prune_after[0])]
        active = pruner.active
        if active and box_xyxy is None:
            raise ValueError("a box prompt (box_xyxy) is required when a pruner is active")
        total = sum(self.depths)
        first = sum(self.depths[: self.prune_at_stage - 1]) + 1
        trace = PruningTrace(first_pruned_block=first if active else total + 1)
        image_hw = (image.shape[-2], image.shape[-1])
        ones = image.new_ones(image.shape[0])
        fractions: list[Tensor] = []
        maps: list[Tensor] = []
        hidden = image
        keep: Tensor | None = None  # (B, Z) grid keep of the current stage once pruning runs on kept tokens
        weight: Tensor | None = None  # (B, Z) its differentiable keep (PruneResult.soft_keep), if any
        merged_into: Tensor | None = None  # (B, Z) its merge map (ToMe), if any
        grid_hw = (0, 0)
        for index, stage in enumerate(self.stages, start=1):
            tokens, h, w = stage.patch_embeddings(hidden)  # (B, Z, C)
            carry = tokens
            alive: TokenSet | None = None  # the stage's kept tokens once pruning runs on them
            if active and index == self.prune_at_stage:
                trace.grid_hw = (h, w)
                full = TokenSet.full(tokens, (h, w))
                pruned, point_keep, _, _ = apply_pruner(
                    pruner, full, full.valid, image_hw, box_xyxy, prune_enabled, trace
                )
                if pruner.mode == "zero_once":
                    tokens = pruned.tokens
                else:
                    alive, keep, weight, merged_into = pruned, point_keep, pruned.weight, pruned.merged_into
            elif keep is not None:
                stride = self.strides[index - 1]
                parent_keep = keep
                keep = next_stage_keep(keep, grid_hw, (h, w), stride)
                alive = TokenSet.full(tokens, (h, w))
                if weight is not None:
                    weight = child_weight(weight, grid_hw, stride)
                    alive = alive.weighted(weight)
                else:
                    alive = alive.select(keep, pruner.mode)
                if merged_into is not None:
                    merged_into, _ = child_merged_into(merged_into, parent_keep, grid_hw, stride)
                    alive = replace(alive, merged_into=merged_into)
            grid_hw = (h, w)

            if alive is None:
                for block in stage.blocks:
                    tokens = block(tokens, h, w)
                out = stage.layer_norm(tokens)  # (B, Z, C)
                decoder_in = out
                fractions += [ones] * len(stage.blocks)
            else:
                normed = self._run_pruned_stage(stage, alive)
                out = normed.to_grid()
                decoder_in = out
                if pruner.fill == "carry":
                    carried = stage.layer_norm(carry)
                    exit_point = -normed.keep_grid().long()  # -1 kept, 0 pruned at the point
                    index_at_point = index - self.prune_at_stage
                    assembled = pruner.assemble(out, carried, exit_point, trace.results, index_at_point)
                    decoder_in = normed.to_grid(carried) if assembled is None else assembled
                fractions += [normed.keep_grid().to(image.dtype).mean(dim=1)] * len(stage.blocks)
            maps.append(_to_map(decoder_in, h, w))
            hidden = _to_map(out, h, w)

        trace.block_keep_fraction = torch.stack(fractions, dim=1)
        margin = None if self.decoder_window is None else self.decoder_window + 1  # + 1 cell of context
        window = pruning_window(margin, self.pruners, box_xyxy, image_hw, grid_hw)
        by_size = self.decoder_window_batch == "by_size" and not self.training
        # inset 1: the context cell is dropped, so the logits are exact wherever they are not background
        decode = lambda x, win: self._decode(x, win, image_hw)  # noqa: E731
        logits = decode_in_window(window, maps, decode, self.background, by_size, inset=1)
        return SegOutput(logits=trace.final_logits(logits), trace=trace)

    def _decode(self, maps: Sequence[Tensor], window: GridWindow | None, image_hw: tuple[int, int]) -> Tensor:
        """Logits ``(B, K, h, w)`` of the decode head on the four stage maps, cut to ``window`` (None:
        the whole image ``image_hw``), upsampled to input pixels."""
        if window is not None:
            maps = [window.crop(m) for m in maps]
        logits = self.segformer.decode_head(tuple(maps))  # (B, K, h/4, w/4)
        out_hw = image_hw if window is None else tuple(4 * n for n in maps[0].shape[-2:])
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)

    @staticmethod
    def _run_pruned_stage(stage: nn.Module, alive: TokenSet) -> TokenSet:
        """A stage's blocks and LayerNorm on its kept tokens (the same layout, normed tokens).

        A stage none of whose places is pruned in any image runs the library's blocks on the grid, which
        compute the same as the pruned forward with nothing to leave out (and without its gathers)."""
        x = alive.tokens
        if alive.is_full_grid:
            for block in stage.blocks:
                x = block(x, *alive.grid_hw)
            return alive.with_tokens(stage.layer_norm(x))
        sr = stage.blocks[0].attention.sequence_reduction_ratio
        key_bias = None if alive.weight is not None else stage_key_bias(alive, sr, x.dtype)
        for block in stage.blocks:
            x = block(x, *alive.grid_hw, stage_grid=alive, key_bias=key_bias)
        return alive.with_tokens(stage.layer_norm(x))

    def stage_names(self) -> list[str]:
        """Module names of the encoder stages (per-stage FLOPs in benchmarks)."""
        return [f"segformer.segformer.stages.{i}" for i in range(len(self.depths))]

    def stage_keep_fraction(self, trace: PruningTrace) -> Tensor:
        """``(B, stages)`` fraction of each stage's grid alive (from ``trace.block_keep_fraction``)."""
        if trace.block_keep_fraction is None:
            raise ValueError("the trace holds no block_keep_fraction; take it from this model's forward")
        starts = [sum(self.depths[:i]) for i in range(len(self.depths))]
        return trace.block_keep_fraction[:, starts]

    def pruned_part(self) -> list[str]:
        """Module names of what runs after the pruning point (for FLOP ratios).

        The pruned stage's blocks and final norm, every later stage whole (its patch embedding runs on
        the zero-filled grid) and the pruners' grid modules.
        """
        s = self.prune_at_stage - 1
        prefix = "segformer.segformer.stages"
        names = [f"{prefix}.{s}.blocks", f"{prefix}.{s}.layer_norm"]
        later = [f"{prefix}.{i}" for i in range(s + 1, len(self.stages))]
        decoder = ["segformer.decode_head"] if self.decoder_window is not None else []
        return names + later + grid_module_names(self.pruners) + decoder

    @torch.no_grad()
    def reference_forward(self, image: Tensor) -> Tensor:
        """The library's own, unpatched forward, its logits upsampled as :meth:`forward` does."""
        logits = self.segformer(pixel_values=image).logits
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def _stage_of_point(prune_after: Sequence[int], num_stages: int) -> int:
    """The 1-based stage whose patch-embedding tokens ``prune_after = [s]`` prunes (``s + 1``)."""
    points = list(prune_after)
    if len(points) != 1 or not 0 <= points[0] < num_stages:
        raise ValueError(
            f"SegFormer's prune_after must be one stage count in 0..{num_stages - 1} (the tokens of the next "
            f"stage's patch embedding are pruned), got {points}"
        )
    return int(points[0]) + 1


def _check_stages(stages: dict[str, tuple[int, ...]], img_size: int, prune_at_stage: int) -> None:
    """Raise a ValueError naming the setting when the per-stage configuration cannot run."""
    num_stages = len(stages["depths"])
    wrong = {name: len(v) for name, v in stages.items() if len(v) != num_stages}
    if num_stages == 0 or wrong:
        raise ValueError(f"every per-stage setting needs one entry per stage ({num_stages}), got {wrong}")
    bad = {name: list(v) for name, v in stages.items() if min(v) < 1}
    if bad:
        raise ValueError(f"per-stage settings must be positive integers, got {bad}")
    for stage, (c, heads) in enumerate(
        zip(stages["hidden_sizes"], stages["num_attention_heads"], strict=True), 1
    ):
        if c % heads:
            raise ValueError(f"stage {stage}: hidden size {c} is not divisible by {heads} heads")
    even = [i + 1 for i in range(prune_at_stage, num_stages) if stages["patch_sizes"][i] % 2 == 0]
    if even:
        raise ValueError(
            f"stages {even} after the pruning point need odd patch sizes, so each token has a whole "
            f"stride footprint of parents; got patch_sizes={list(stages['patch_sizes'])}"
        )
    side = img_size
    for stage, (stride, sr) in enumerate(zip(stages["strides"], stages["sr_ratios"], strict=True), 1):
        side = -(-side // stride)
        if side < sr:
            raise ValueError(
                f"img_size {img_size} gives stage {stage} a {side} x {side} grid, smaller than its "
                f"sr ratio {sr}; use a larger input"
            )


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """``(B, h * w, C)`` row-major tokens -> ``(B, C, h, w)``, as the library's stages reshape."""
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
