"""Swin UNETR (MONAI, 2-D) with PrATo on the tokens of a Swin stage's ``PatchMerging``.

The wrapper owns MONAI's :class:`monai.networks.nets.SwinUNETR` (its modules and weights; two class
swaps, listed at the end, change no output where MONAI runs) and runs its parts itself: the
patch embedding and the stages up to the pruning point through MONAI's own ``BasicLayer``, then the
pruner on the merged tokens (``prune_after = [1]``: the output of ``swinViT.layers1``, 1/4 of the
input side with MONAI's patch size 2), then the later stages on the kept tokens, and finally MONAI's
convolutional encoders and decoders on the hidden states scattered back to their grids.

What ``drop`` executes in a Swin block after the pruning point:

- on the kept tokens only: ``norm1``, ``qkv``, ``proj``, ``norm2`` and the MLP (gathered tokens);
- on the grid: the window partition and the cyclic shift. Each kept token is placed in its window
  of the padded, shifted grid; windows holding no kept token are not computed at all. In a computed
  window, pruned places are masked as keys with ``-inf`` on top of the relative-position bias and
  MONAI's shift mask; padded places hold ``qkv(0)`` as in MONAI (they are keys there too), so an image
  exempt from pruning gets MONAI's own computation.

Between stages a merged token is kept if any of its 2 x 2 parents is kept; the merge reads the grid
with pruned places zero (``fill`` does not change what kept tokens compute), and its ``norm`` and
``reduction`` run on the kept merged tokens only. The hidden states MONAI's decoder reads
(``hidden_states_out[s:]`` from the pruning point on) are scattered back to their grids, pruned places
filled per ``fill``: zeros, or (``carry``) the value at the pruning point, carried through the later
merges (``norm`` and ``reduction`` then also run on the pruned merged places) but through no block; a
pruner with a token assembly (STP) rebuilds each of those grids from the kept and the carried tokens.

A differentiable keep (``PruneResult.soft_keep``, DynamicViT's training) removes nothing: every block
runs on the full grid, each slot weighted as a key by the policy (a slot always reads itself; no
re-zeroing), and the merges and the decoder read the tokens times the policy; a merged token's policy is
its largest parent's, so ``drop`` is what it computes in value.

``mask`` runs every block on the full grid, with the same key mask and the pruned places re-zeroed
after each residual branch; it equals ``drop`` up to floating-point error. ``zero_once`` zeroes the
pruned tokens once and runs MONAI's stages unchanged. The ``none`` pruner runs MONAI's computation.

To count attention FLOPs under their stage, the blocks after the pruning point are given the class
:class:`PrunableSwinBlock` (a subclass of MONAI's block whose forward without the extra arguments is
MONAI's), and the instance norms :class:`InstanceNormAnySize` (MONAI's SwinUNETR cannot run at a 32 px
input otherwise); parameters, state-dict keys and outputs are unchanged wherever MONAI runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    PatchMerging,
    SwinTransformerBlock,
    WindowAttention,
    get_window_size,
)
from torch import Tensor, nn

from prato_exp.models.base import SegOutput
from prato_exp.models.decoder_window import (
    GridWindow,
    background_logits,
    check_window_batch,
    decode_in_window,
    pruning_window,
    whole,
)
from prato_exp.models.weights import load_pretrained
from prato_exp.pruning.base import (
    NoPruner,
    PointState,
    PruneMode,
    PrunerContext,
    PrunerFactory,
    TokenPruner,
    grid_module_names,
    refuse_plain_vit_only,
)
from prato_exp.pruning.execute import apply_pruner
from prato_exp.pruning.trace import PruningTrace
from prato_exp.tokens.attention_mask import KeyPolicy
from prato_exp.tokens.token_set import TokenSet, child_keep, child_merged_into, child_weight
from prato_exp.tokens.windows import (
    WindowBatch,
    gather_windows,
    merge_2x2,
    scatter_windows,
    window_batch,
    window_layout,
)

NUM_STAGES = 4
DECODER_MODULES = (
    "encoder1",
    "encoder2",
    "encoder3",
    "encoder4",
    "encoder10",
    "decoder5",
    "decoder4",
    "decoder3",
    "decoder2",
    "decoder1",
    "out",
)
"""MONAI SwinUNETR's convolutional modules, all of which the decoder window crops."""


def window_attention(
    attn: WindowAttention, qkv: Tensor, batch: WindowBatch, key_weight: Tensor | None = None
) -> Tensor:
    """MONAI's window attention on gathered windows, with non-key slots masked by ``-inf``.

    Args:
        attn: the block's ``WindowAttention`` (its bias table, scale, softmax and dropout are used).
        qkv: ``(Wa, T, 3C)`` the ``qkv`` projections of the window slots.
        batch: the computed windows, their key mask and shift mask.
        key_weight: ``(Wa, T)`` a differentiable keep policy of the slots
            (:class:`~prato_exp.tokens.attention_mask.KeyPolicy`, a slot always reads itself), or None.

    Returns:
        ``(Wa, T, C)`` attention output before ``proj``.
    """
    wa, t, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(wa, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    index = attn.relative_position_index[:t, :t].reshape(-1)
    bias = attn.relative_position_bias_table[index].reshape(t, t, -1).permute(2, 0, 1)  # (nh, T, T)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)  # (Wa, nh, T, T)
    if batch.attn_bias is not None:  # the shift mask and -inf on the slots that are no keys, in one add
        logits = logits + batch.attn_bias
    probs = attn.softmax(logits) if key_weight is None else KeyPolicy(key_weight).softmax(logits)
    probs = attn.attn_drop(probs).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(wa, t, c)


def _observed_stage(
    layer: BasicLayer, x: Tensor, observer: TokenPruner, state: PointState, first_block: int
) -> tuple[Tensor, PointState]:
    """MONAI's stage ``layer`` on ``x`` ``(B, C, h, w)``, showing each block's window attention to
    ``observer`` (its ``attention_score`` per window, put back on the grid; blocks numbered from
    ``first_block``), then carrying the observed state across the stage's 2 x 2 patch merging."""
    grid_hw = (x.shape[-2], x.shape[-1])
    captured: list[Tensor] = []
    hooks = [
        block.attn.softmax.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        for block in layer.blocks
    ]
    try:
        out = layer(x.contiguous())
    finally:
        for hook in hooks:
            hook.remove()
    b = x.shape[0]
    grid_valid = torch.ones(b, grid_hw[0] * grid_hw[1], dtype=torch.bool, device=x.device)
    for offset, (block, weights) in enumerate(zip(layer.blocks, captured, strict=True)):
        window, shift = get_window_size(grid_hw, block.window_size, block.shift_size)
        layout = window_layout(grid_hw, window, shift, x.device)
        t = layout.window_tokens
        real = ~layout.pad_slots.view(1, -1, t).expand(b, -1, -1).reshape(-1, t)  # (B * nW, T)
        scores = observer.attention_score(weights, real).reshape(b, -1)  # (B, nW * T)
        state = observer.observe_scores(
            scores[:, layout.slot_of_position], grid_valid, state, first_block + offset
        )
    if state.carried is not None and layer.downsample is not None:
        state = replace(state, carried=state.carried.merged_2x2(grid_hw))
    return out, state


class InstanceNormAnySize(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` that also takes a 1 x 1 map (torch raises there).

    Normalising one value gives 0 (then the affine part): ``x - mean`` is 0 and so is the variance.
    Larger maps go through ``nn.InstanceNorm2d`` unchanged. MONAI's SwinUNETR has a 1 x 1 bottleneck
    (``encoder10``) at a 32 px input, where it cannot run at all without this.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Instance norm of ``x`` ``(B, C, h, w)``."""
        if x.shape[-2] * x.shape[-1] > 1 or self.track_running_stats:
            return super().forward(x)
        out = x - x.mean(dim=(-2, -1), keepdim=True)
        if self.affine:
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
        return out


class PrunableSwinBlock(SwinTransformerBlock):
    """MONAI's ``SwinTransformerBlock`` that can also run on a set of alive tokens.

    Called as MONAI calls it (``block(x (B, h, w, C), mask_matrix)``) it is MONAI's block. Called with
    ``windows`` it runs on tokens ``(B, N, C)``: token-wise layers on those tokens, attention in the
    windows of ``windows``.
    """

    def forward(
        self,
        x: Tensor,
        mask_matrix: Tensor | None = None,
        *,
        windows: WindowBatch | None = None,
        valid: Tensor | None = None,
        rezero: Tensor | None = None,
        key_weight: Tensor | None = None,
    ) -> Tensor:
        """MONAI's forward, or (with ``windows``) the pruned forward on tokens ``x`` ``(B, N, C)``.

        Args:
            x: ``(B, h, w, C)`` grid (MONAI) or ``(B, N, C)`` alive tokens.
            mask_matrix: MONAI's shift mask (MONAI's forward only).
            windows: where the tokens sit in the windows; selects the pruned forward.
            valid: ``(B, N)`` bool, False on padding slots.
            rezero: ``(B, N)`` bool or None; tokens outside it are set to zero after each residual
                branch (pruned places in ``mask`` mode, padding slots in ``drop`` mode).
            key_weight: ``(B, N)`` a differentiable keep policy weighting the tokens as keys, or None.
        """
        if windows is None:
            return super().forward(x, mask_matrix)
        if valid is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        qkv = self.attn.qkv(self.norm1(x))  # (B, N, 3C)
        pad_value = self.attn.qkv.bias if self.attn.qkv.bias is not None else qkv.new_zeros(qkv.shape[-1])
        slot_weight = None
        if key_weight is not None:  # padded places are keys, as in MONAI
            ones = key_weight.new_ones(1)
            slot_weight = gather_windows(key_weight[..., None], windows, ones).squeeze(-1)
        attended = window_attention(self.attn, gather_windows(qkv, windows, pad_value), windows, slot_weight)
        attended = scatter_windows(attended, windows, valid)  # (B, N, C)
        x = x + self.drop_path(self.attn.proj_drop(self.attn.proj(attended)))
        if rezero is not None:
            x = x * rezero[..., None].to(x.dtype)
        x = x + self.forward_part2(x)
        if rezero is not None:
            x = x * rezero[..., None].to(x.dtype)
        return x


@dataclass
class _PrunedGrid:
    """The state between pruned stages: the alive tokens and, with ``fill="carry"``, ``carry``
    ``(B, Z, C)``: what the pruned places show (None with ``fill="zero"``)."""

    alive: TokenSet
    carry: Tensor | None


class PrunableSwinUNETR(nn.Module):
    """MONAI SwinUNETR (2-D, patch 2, four stages) with a pruner after a configurable stage.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        img_size: square input side in pixels (a multiple of 32); inputs of any multiple of 32 run.
        feature_size: channels of the first stage (a multiple of 12); stage ``k`` has
            ``feature_size * 2 ** (k - 1)``.
        depths: Swin blocks per stage (four stages).
        num_heads: attention heads per stage.
        window_size: attention window side (MONAI pads a grid that it does not divide and uses the
            whole grid as window where the grid is not larger than the window).
        mlp_ratio, qkv_bias, norm_name, drop_rate, attn_drop_rate, dropout_path_rate, normalize:
            passed to MONAI's ``SwinUNETR``.
        prune_after: the pruning point as one 1-based stage, the key every backbone shares (blocks in
            plain ViTs, stages in hierarchical ones): ``[s]`` runs the pruner on the output of
            ``swinViT.layers<s>`` (after its ``PatchMerging``), so stages ``s + 1 .. 4`` run on kept
            tokens; ``s`` is 1, 2 or 3, and there is one point (a list of length 1).
        pruner: a factory ``pruner(dim=..., context=...) -> TokenPruner`` (Hydra ``_partial_``). None: no
            pruning.
        pretrained: optional local path of a state dict for MONAI's ``SwinUNETR`` (never downloaded).
        pretrained_ignore: glob patterns of keys that may be missing, unknown or reshaped in
            ``pretrained`` (a partial load); any other mismatch is an error listing the keys.
        decoder_window: None (off: MONAI's dense decoder) or a margin: while a pruner is active, MONAI's
            convolutional encoders and decoders run only on the box dilated by this many cells of the
            bottleneck grid (1/32 of the input, the coarsest map the decoder reads, so every map's window
            is whole pixels), and the rest of the image is background
            (:mod:`prato_exp.models.decoder_window`).
        decoder_window_batch: in evaluation, ``shared`` (every image decodes the batch's largest
            rectangle, one decoder call) or ``by_size`` (one call per size of the images' own windows:
            each image's logits equal its batch-1 logits). Training always shares.
    """

    display_name = "Swin UNETR"
    """The backbone's name in tables and figures."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 224,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_name: str = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
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
        if img_size % 32:
            raise ValueError(
                f"SwinUNETR needs an input side divisible by 32 (patch 2, 4 merges), got {img_size}"
            )
        if len(depths) != NUM_STAGES or len(num_heads) != NUM_STAGES:
            raise ValueError(f"depths and num_heads need one entry per stage (4), got {depths}, {num_heads}")
        if len(prune_after) != 1 or not 1 <= prune_after[0] < NUM_STAGES:
            raise ValueError(
                f"Swin UNETR's prune_after must be one stage, 1, 2 or 3 (the stages after it run pruned), "
                f"got {list(prune_after)}"
            )
        prune_after_stage = int(prune_after[0])
        self.swin_unetr = SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            norm_name=norm_name,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            normalize=normalize,
            spatial_dims=2,
        )
        self.img_size = img_size
        self.normalize = normalize
        self.depths = tuple(depths)
        self.prune_after = (prune_after_stage,)
        self.prune_after_stage = prune_after_stage
        for module in self.swin_unetr.modules():
            if type(module) is nn.InstanceNorm2d:
                module.__class__ = InstanceNormAnySize
        for layer in self.stages()[prune_after_stage:]:
            for block in layer.blocks:
                block.__class__ = PrunableSwinBlock
        factory = pruner or NoPruner
        dim = feature_size * 2**prune_after_stage
        sides = {k: img_size // 2 // 2**k for k in range(NUM_STAGES + 1)}  # patch 2, a 2 x 2 merge per stage
        context = PrunerContext(
            num_classes=out_channels,
            grid_hw=(sides[prune_after_stage],) * 2,
            depth=sum(self.depths),
            decoder_grids=tuple(
                (feature_size * 2**k, (sides[k], sides[k])) for k in range(prune_after_stage, NUM_STAGES + 1)
            ),
        )
        self.pruners = nn.ModuleDict({str(prune_after_stage): factory(dim=dim, context=context)})
        refuse_plain_vit_only(self.pruners[str(prune_after_stage)], "Swin UNETR")
        self.decoder_window = decoder_window
        self.register_buffer("background", background_logits(out_channels), persistent=False)
        if pretrained:
            load_pretrained(self.swin_unetr, pretrained, ignore=pretrained_ignore)

    def stages(self) -> list[BasicLayer]:
        """MONAI's four Swin stages, ``swinViT.layers1[0]`` .. ``layers4[0]``."""
        vit = self.swin_unetr.swinViT
        return [vit.layers1[0], vit.layers2[0], vit.layers3[0], vit.layers4[0]]

    def forward(
        self, image: Tensor, box_xyxy: Tensor | None = None, prune_enabled: Tensor | None = None
    ) -> SegOutput:
        """Segment ``image`` ``(B, C, H, W)`` given one box per image ``box_xyxy`` ``(B, 4)``."""
        net = self.swin_unetr
        net._check_input_size(image.shape[2:])
        vit = net.swinViT
        point = self.prune_after_stage
        pruner = self.pruners[str(point)]
        if pruner.active and box_xyxy is None:
            raise ValueError("a box prompt (box_xyxy) is required when a pruner is active")
        stages = self.stages()

        x = vit.pos_drop(vit.patch_embed(image))  # (B, C, H/2, W/2)
        hidden = [vit.proj_out(x, self.normalize)]
        observed = PointState()
        observer = pruner if pruner.active and pruner.needs_attention else None
        for index, layer in enumerate(stages[:point]):
            if observer is None:
                x = layer(x.contiguous())
            else:
                x, observed = _observed_stage(
                    layer, x, observer, observed, first_block=sum(self.depths[:index]) + 1
                )
            hidden.append(vit.proj_out(x, self.normalize))

        ones = x.new_ones(x.shape[0])
        fractions = [ones] * sum(self.depths[:point])
        trace = PruningTrace(grid_hw=(x.shape[-2], x.shape[-1]), first_pruned_block=sum(self.depths) + 1)
        image_hw = (image.shape[-2], image.shape[-1])
        if pruner.active:
            trace.first_pruned_block = sum(self.depths[:point]) + 1
        if pruner.active and pruner.mode != "zero_once":
            pruned_hidden, pruned_fractions = self._run_pruned(
                x, stages[point:], pruner, image_hw, box_xyxy, prune_enabled, trace, observed
            )
            hidden[point:] = pruned_hidden
            fractions += pruned_fractions
        else:
            if pruner.active:  # zero_once: the paper's literal Y' = beta * Y, then MONAI's stages
                alive, _, _, _ = apply_pruner(
                    pruner,
                    TokenSet.full(x.flatten(2).transpose(1, 2), trace.grid_hw),
                    torch.ones(x.shape[0], x.shape[2] * x.shape[3], dtype=torch.bool, device=x.device),
                    image_hw,
                    box_xyxy,
                    prune_enabled,
                    trace,
                    observed,
                )
                x = alive.tokens.transpose(1, 2).reshape(x.shape)
                hidden[point] = vit.proj_out(x, self.normalize)
            for layer in stages[point:]:
                x = layer(x.contiguous())
                hidden.append(vit.proj_out(x, self.normalize))
            fractions += [ones] * sum(self.depths[point:])
        trace.block_keep_fraction = torch.stack(fractions, dim=1)
        bottleneck_hw = (hidden[-1].shape[-2], hidden[-1].shape[-1])
        window = pruning_window(self.decoder_window, self.pruners, box_xyxy, image_hw, bottleneck_hw)
        by_size = self.decoder_window_batch == "by_size" and not self.training
        logits = decode_in_window(window, [image, *hidden], self._decode_window, self.background, by_size)
        return SegOutput(logits=trace.final_logits(logits), trace=trace)

    def _run_pruned(
        self,
        x: Tensor,
        stages: Sequence[BasicLayer],
        pruner: TokenPruner,
        image_hw: tuple[int, int],
        box_xyxy: Tensor,
        prune_enabled: Tensor | None,
        trace: PruningTrace,
        observed: PointState,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Prune the grid ``x`` ``(B, C, h, w)`` and run ``stages`` on what is kept (drop or mask);
        ``observed`` is what the pruner saw of the stages before the point.

        Returns the hidden states from the pruning point on (``(B, C_k, h_k, w_k)`` each) and the
        ``(B,)`` keep fraction at the input of every block of ``stages``.
        """
        mode = pruner.mode
        b, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, Z, C)
        full = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
        alive, _, _, _ = apply_pruner(
            pruner, TokenSet.full(tokens, (h, w)), full, image_hw, box_xyxy, prune_enabled, trace, observed
        )
        state = _PrunedGrid(alive, tokens if pruner.fill == "carry" else None)
        hidden = [self._hidden(state, pruner, trace, 0)]
        fractions: list[Tensor] = []
        for index, layer in enumerate(stages, start=1):
            state, stage_fractions = self._run_blocks(layer, state)
            fractions += stage_fractions
            state = self._merge(layer.downsample, state, mode)
            hidden.append(self._hidden(state, pruner, trace, index))
        return hidden, fractions

    @staticmethod
    def _run_blocks(layer: BasicLayer, state: _PrunedGrid) -> tuple[_PrunedGrid, list[Tensor]]:
        """Run the Swin blocks of ``layer`` on the alive tokens of ``state``.

        A stage none of whose places is pruned in any image runs MONAI's blocks on the grid: the pruned
        forward with nothing to leave out computes the same, with gathers on top."""
        alive = state.alive
        tokens = alive.tokens
        if alive.is_full_grid:
            fraction = tokens.new_ones(tokens.shape[0])
            b, (h, w) = tokens.shape[0], alive.grid_hw
            grid = tokens.reshape(b, h, w, -1)
            for block in layer.blocks:
                window, shift = get_window_size(alive.grid_hw, block.window_size, block.shift_size)
                grid = block(grid, window_layout(alive.grid_hw, window, shift, tokens.device).shift_mask)
            tokens = grid.reshape(b, h * w, -1)
            return _PrunedGrid(alive.with_tokens(tokens), state.carry), [fraction] * len(layer.blocks)
        key_alive = alive.valid
        rezero = None if alive.complete or bool(key_alive.all()) else key_alive
        fraction = alive.keep_grid().sum(dim=1).to(tokens.dtype) / alive.num_grid
        batches: dict[tuple[tuple[int, ...], tuple[int, ...]], WindowBatch] = {}
        for block in layer.blocks:
            window, shift = get_window_size(alive.grid_hw, block.window_size, block.shift_size)
            if (window, shift) not in batches:
                layout = window_layout(alive.grid_hw, window, shift, tokens.device)
                batches[window, shift] = window_batch(
                    layout, alive.positions, alive.slots, key_alive, all_valid=alive.complete
                )
            tokens = block(
                tokens,
                windows=batches[window, shift],
                valid=alive.slots,
                rezero=rezero,
                key_weight=alive.weight,
            )
        return _PrunedGrid(alive.with_tokens(tokens), state.carry), [fraction] * len(layer.blocks)

    @staticmethod
    def _merge(downsample: PatchMerging, state: _PrunedGrid, mode: PruneMode) -> _PrunedGrid:
        """MONAI's ``PatchMerging`` on the zero-filled grid, computed for the kept merged tokens only."""
        alive = state.alive
        b = alive.tokens.shape[0]
        h, w = alive.grid_hw

        def merge(grid: Tensor) -> Tensor:
            return merge_2x2(grid.view(b, h, w, -1)).flatten(1, 2)  # (B, Z2, 4C)

        def reduce(merged: TokenSet) -> TokenSet:
            return merged.with_tokens(merged.rezero(downsample.reduction(downsample.norm(merged.tokens))))

        keep, merged_hw = child_keep(alive.keep_grid(), alive.grid_hw)
        merged = TokenSet.full(merge(alive.to_grid()), merged_hw)
        if alive.weight is not None:
            merged = reduce(merged.weighted(child_weight(alive.weight, alive.grid_hw)))
        else:
            merged = reduce(merged.select(keep, mode))
        if alive.merged_into is not None:
            into, _ = child_merged_into(alive.merged_into, alive.keep_grid(), alive.grid_hw)
            merged = replace(merged, merged_into=into)
        carry = None
        if state.carry is not None:
            pruned = TokenSet.full(merge(alive.to_grid(state.carry)), merged_hw).select(~keep, "drop")
            carry = reduce(pruned).to_grid()
        return _PrunedGrid(merged, carry)

    def _hidden(self, state: _PrunedGrid, pruner: TokenPruner, trace: PruningTrace, index: int) -> Tensor:
        """MONAI's ``proj_out`` of the grid of ``state``: ``(B, C, h, w)``, pruned places per ``fill``, or
        the pruner's assembly of it (its ``decoder_grids[index]``, with ``fill=carry``)."""
        alive = state.alive
        grid = None
        if state.carry is not None:
            exit_point = -alive.keep_grid().long()  # -1 kept to the end, 0 pruned at the point
            grid = pruner.assemble(alive.to_grid(), state.carry, exit_point, trace.results, index)
        if grid is None:
            return self.swin_unetr.swinViT.proj_out(alive.to_map(state.carry), self.normalize)
        feature_map = grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], *alive.grid_hw)
        return self.swin_unetr.swinViT.proj_out(feature_map, self.normalize)

    def _decode_window(self, inputs: Sequence[Tensor], window: GridWindow | None) -> Tensor:
        """:meth:`_decode` of the image and hidden states ``inputs`` on ``window`` (None: everywhere)."""
        return self._decode(inputs[0], inputs[1:], window.crop if window is not None else whole)

    def _decode(
        self, image: Tensor, hidden: Sequence[Tensor], crop: Callable[[Tensor], Tensor] = whole
    ) -> Tensor:
        """MONAI's encoders and decoders on the five hidden states (as in ``SwinUNETR.forward``), each
        input cut to the decoder window by ``crop`` (the whole map by default)."""
        net = self.swin_unetr
        hidden = [crop(h) for h in hidden]
        enc0 = net.encoder1(crop(image))
        enc1 = net.encoder2(hidden[0])
        enc2 = net.encoder3(hidden[1])
        enc3 = net.encoder4(hidden[2])
        dec4 = net.encoder10(hidden[4])
        dec3 = net.decoder5(dec4, hidden[3])
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        return net.out(net.decoder1(dec0, enc0))

    def pruned_part(self) -> list[str]:
        """Module names of the stages after the pruning point, the pruners' grid modules and, with a
        decoder window, MONAI's convolutional encoders and decoders (FLOP ratios)."""
        stages = [f"swin_unetr.swinViT.layers{k}" for k in range(self.prune_after_stage + 1, NUM_STAGES + 1)]
        windowed = self.decoder_window is not None
        decoder = [f"swin_unetr.{name}" for name in DECODER_MODULES] if windowed else []
        return stages + grid_module_names(self.pruners) + decoder

    def stage_names(self) -> list[str]:
        """Module names of the 4 encoder stages (per-stage FLOPs in benchmarks)."""
        return [f"swin_unetr.swinViT.layers{k}" for k in range(1, NUM_STAGES + 1)]

    def stage_keep_fraction(self, trace: PruningTrace) -> Tensor:
        """``(B, 4)`` fraction of each stage's grid alive in its blocks (1 before the pruning point)."""
        if trace.block_keep_fraction is None:
            raise ValueError("the trace has no block_keep_fraction; pass the trace of this model's forward")
        return torch.stack([f.mean(dim=1) for f in trace.block_keep_fraction.split(self.depths, dim=1)], 1)

    @torch.no_grad()
    def reference_forward(self, image: Tensor) -> Tensor:
        """MONAI's own ``SwinUNETR.forward`` (for tests that pruning-off changes nothing)."""
        return self.swin_unetr(image)
