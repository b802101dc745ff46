"""TransUNet (Chen et al. 2021) on timm's hybrid R50-ViT, with pruning points between its ViT blocks.

The encoder is an unmodified timm :class:`~timm.models.vision_transformer.VisionTransformer` whose
patch embedding is a :class:`~timm.layers.HybridEmbed` around a
:class:`~timm.models.resnetv2.ResNetV2` (stem + 3 stages, 1/2 .. 1/16), as in timm's
``vit_base_r50_s16_224`` but without the class token (TransUNet has none). The wrapper iterates the CNN
itself to read the decoder's skips (stem at 1/2, stages 1 and 2 at 1/4 and 1/8), runs the ViT blocks on
the 1/16 map (1 x 1 patches) through :func:`prato_exp.models.plain_vit.run_pruned_blocks`, and feeds
the final tokens, scattered back to the 1/16 grid, to TransUNet's cascaded upsampler. With the ``none``
pruner the output equals timm's own ``forward_features`` followed by the same decoder.

Choices made here:

- The CNN is timm's hybrid-ViT ResNetV2 (``StdConv2dSame``, ``'same'`` stem, GroupNorm + ReLU,
  no pre-activation); the original TransUNet pads symmetrically, which differs only at borders.
- ``dropout_rate`` is timm's ``pos_drop_rate`` and ``proj_drop_rate`` (after the position embedding,
  the attention projection and both MLP layers); TransUNet's ViT-B config uses 0.1 in the MLP.
- Decoder upsampling is ``nn.UpsamplingBilinear2d`` (``align_corners=True``), as in TransUNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame, make_divisible
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
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
from prato_exp.models.plain_vit import (
    build_pruners,
    check_block_indices,
    check_unequal_counts,
    run_pruned_blocks,
    timm_block_runner,
)
from prato_exp.models.weights import load_pretrained
from prato_exp.pruning.base import PrunerFactory, grid_module_names
from prato_exp.tokens.blocks import TimmBlockParts

_BOTTLE_RATIO = 0.25  # ResNetV2's bottleneck width


class ConvBNReLU(nn.Sequential):
    """``conv3x3 -> BatchNorm -> ReLU`` (TransUNet's ``Conv2dReLU``; the conv has no bias)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """x2 bilinear upsampling, concatenation with an optional skip, two :class:`ConvBNReLU`."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None = None, window: GridWindow | None = None) -> Tensor:
        """``x`` ``(B, Cin, h, w)``, ``skip`` ``(B, Cs, 2h, 2w)`` -> ``(B, Cout, 2h, 2w)``.

        With a ``window``, ``x`` and ``skip`` are its crops and so is the output: ``x`` is upsampled on
        the whole map (zeros outside the window; bilinear sampling with aligned corners depends on the map
        size) and cropped again.
        """
        x = self.up(x if window is None else window.paste(x, x.new_zeros(x.shape[1])))
        if window is not None:
            x = window.crop(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CascadedUpsampler(nn.Module):
    """TransUNet's decoder ("CUP") and segmentation head.

    Args:
        hidden_size: ViT token channels.
        head_channels: channels of the 3 x 3 conv on the reshaped ViT output.
        decoder_channels: output channels of the upsampling blocks, coarsest first.
        skip_channels: channels of the CNN skips, coarsest first; the last
            ``len(decoder_channels) - len(skip_channels)`` blocks get no skip.
        out_channels: classes.
    """

    def __init__(
        self,
        hidden_size: int,
        head_channels: int,
        decoder_channels: Sequence[int],
        skip_channels: Sequence[int],
        out_channels: int,
    ) -> None:
        super().__init__()
        if len(skip_channels) > len(decoder_channels):
            raise ValueError(
                f"{len(skip_channels)} skips need at least as many decoder blocks, "
                f"got decoder_channels={list(decoder_channels)}"
            )
        self.conv_more = ConvBNReLU(hidden_size, head_channels)
        ins = [head_channels, *decoder_channels[:-1]]
        skips = [*skip_channels] + [0] * (len(decoder_channels) - len(skip_channels))
        self.blocks = nn.ModuleList(
            UpBlock(cin, cskip, cout) for cin, cskip, cout in zip(ins, skips, decoder_channels, strict=True)
        )
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], out_channels, 3, padding=1)

    def forward(self, grid: Tensor, skips: Sequence[Tensor], window: GridWindow | None = None) -> Tensor:
        """``grid`` ``(B, C, h, w)`` ViT tokens, ``skips`` coarsest first -> logits ``(B, K, H, W)``.

        With a ``window`` every convolution runs on its crop only; the logits are that crop.
        """
        crop = window.crop if window is not None else whole
        x = self.conv_more(crop(grid))
        for index, block in enumerate(self.blocks):
            x = block(x, crop(skips[index]) if index < len(skips) else None, window)
        return self.segmentation_head(x)


class PrunableTransUNet(nn.Module):
    """TransUNet (R50-ViT-B/16 hybrid encoder, cascaded upsampler) with a pruner after ViT blocks.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        img_size: square input side in pixels (a multiple of 16; the ViT grid is ``img_size / 16``).
        cnn_layers: bottleneck blocks in each of the 3 ResNetV2 stages (R50: 3, 4, 9).
        cnn_channels: output channels of the 3 stages (1/4, 1/8, 1/16; R50: 256, 512, 1024).
        stem_channels: channels of the 7 x 7 stem conv (1/2 scale).
        cnn_norm_groups: GroupNorm groups of the CNN (must divide every CNN width).
        hidden_size, depth, num_heads, mlp_ratio: the ViT (ViT-B: 768, 12, 12, 4).
        dropout_rate: timm's ``pos_drop_rate`` and ``proj_drop_rate``.
        attn_dropout_rate: dropout on the attention weights.
        head_channels: channels of the conv on the reshaped ViT output.
        decoder_channels: the 4 upsampling blocks' channels (to 1/8, 1/4, 1/2, 1/1).
        prune_after: 1-based ViT blocks after which the pruner runs (default: after block 3).
        pruner: a factory ``pruner(dim=...) -> TokenPruner`` (Hydra ``_partial_``); one instance per
            pruning point. None means no pruning.
        pretrained: optional local path of a state dict for the timm encoder ``encoder`` (keys as in
            timm's hybrid ViT, without class token; never downloaded).
        pretrained_ignore: glob patterns of keys that may be missing, unknown or reshaped in
            ``pretrained`` (a partial load); any other mismatch is an error listing the keys.
        decoder_window: None (off: the paper's dense decoder) or a margin in tokens: while a pruner is
            active, the cascaded upsampler runs only on the tokens under the box dilated by this margin,
            and the rest of the image is background (:mod:`prato_exp.models.decoder_window`). The CNN
            encoder runs on the whole image, since the ViT's tokens come from it.
        decoder_window_batch: in evaluation, ``shared`` (every image decodes the batch's largest
            rectangle, one decoder call) or ``by_size`` (one call per size of the images' own windows:
            each image's logits equal its batch-1 logits). Training always shares.
        unequal_counts: ``pad`` (the batch padded to its largest keep count) or ``group`` (each group of
            images with one count runs on exactly that many tokens; no FLOP on padding).
    """

    display_name = "TransUNet"
    """The backbone's name in tables and figures."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 224,
        cnn_layers: Sequence[int] = (3, 4, 9),
        cnn_channels: Sequence[int] = (256, 512, 1024),
        stem_channels: int = 64,
        cnn_norm_groups: int = 32,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.1,
        attn_dropout_rate: float = 0.0,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        prune_after: Sequence[int] = (3,),
        pruner: PrunerFactory | None = None,
        pretrained: str | None = None,
        pretrained_ignore: Sequence[str] = (),
        decoder_window: int | None = None,
        decoder_window_batch: str = "shared",
        unequal_counts: str = "pad",
    ) -> None:
        super().__init__()
        check_unequal_counts(unequal_counts)
        self.decoder_window_batch = check_window_batch(decoder_window_batch)
        if decoder_window is not None and decoder_window < 0:
            raise ValueError(f"model.decoder_window must be >= 0 tokens or null (off), got {decoder_window}")
        if img_size % 16:
            raise ValueError(
                f"TransUNet needs an input side divisible by 16 (ViT on the 1/16 map), got {img_size}"
            )
        if len(cnn_layers) != 3 or len(cnn_channels) != 3:
            raise ValueError(
                f"the CNN has 3 stages (1/4, 1/8, 1/16): cnn_layers and cnn_channels need 3 entries, "
                f"got {list(cnn_layers)} and {list(cnn_channels)}"
            )
        if len(decoder_channels) != 4:
            raise ValueError(
                "4 upsampling blocks take the 1/16 map to full size, "
                f"got decoder_channels={list(decoder_channels)}"
            )
        _check_cnn_widths(stem_channels, cnn_channels, cnn_norm_groups)
        self.prune_after = check_block_indices("prune_after", prune_after, depth)

        backbone = ResNetV2(
            layers=list(cnn_layers),
            channels=tuple(cnn_channels),
            stem_chs=stem_channels,
            num_classes=0,
            global_pool="",
            in_chans=in_channels,
            preact=False,
            stem_type="same",
            conv_layer=partial(StdConv2dSame, eps=1e-8),
            norm_layer=partial(GroupNormAct, num_groups=cnn_norm_groups),
        )
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=1,
            in_chans=in_channels,
            num_classes=0,
            global_pool="",
            class_token=False,
            embed_dim=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            pos_drop_rate=dropout_rate,
            proj_drop_rate=dropout_rate,
            attn_drop_rate=attn_dropout_rate,
            embed_layer=partial(HybridEmbed, backbone=backbone),
        )
        skip_channels = (cnn_channels[1], cnn_channels[0], stem_channels)  # 1/8, 1/4, 1/2
        self.decoder = CascadedUpsampler(
            hidden_size, head_channels, decoder_channels, skip_channels, out_channels
        )
        self.grid_hw: tuple[int, int] = tuple(self.encoder.patch_embed.grid_size)
        self.hidden_size = hidden_size
        self.pruners = build_pruners(
            pruner,
            self.prune_after,
            hidden_size,
            num_classes=out_channels,
            grid_hw=self.grid_hw,
            depth=len(self.encoder.blocks),
        )
        self.decoder_window = decoder_window
        self.unequal_counts = unequal_counts
        self.register_buffer("background", background_logits(out_channels), persistent=False)
        if pretrained:
            load_pretrained(self.encoder, pretrained, ignore=pretrained_ignore)

    def forward(
        self, image: Tensor, box_xyxy: Tensor | None = None, prune_enabled: Tensor | None = None
    ) -> SegOutput:
        """Segment ``image`` ``(B, C, H, W)`` given one box per image ``box_xyxy`` ``(B, 4)`` in pixels."""
        tokens, skips = self._embed(image)
        vit = self.encoder
        encoded = run_pruned_blocks(
            tokens,
            blocks=vit.blocks,
            norm=vit.norm,
            pruners={int(i): p for i, p in self.pruners.items()},
            skip_blocks=(),
            grid_hw=self.grid_hw,
            image_hw=(image.shape[-2], image.shape[-1]),
            box_xyxy=box_xyxy,
            prune_enabled=prune_enabled,
            unequal_counts=self.unequal_counts,
            run_block=timm_block_runner,
            block_parts=TimmBlockParts,
        )
        window = pruning_window(self.decoder_window, self.pruners, box_xyxy, image.shape[-2:], self.grid_hw)
        by_size = self.decoder_window_batch == "by_size" and not self.training
        inputs = [self._to_map(encoded.final), *skips]
        logits = decode_in_window(
            window, inputs, lambda x, win: self.decoder(x[0], x[1:], win), self.background, by_size
        )
        return SegOutput(logits=encoded.trace.final_logits(logits), trace=encoded.trace)

    def _embed(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Tokens ``(B, Z, C)`` with positions, and the CNN skips at 1/8, 1/4, 1/2 (coarsest first)."""
        embed = self.encoder.patch_embed
        backbone = embed.backbone
        x = image
        features = []
        for index, layer in enumerate(backbone.stem):
            x = layer(x)
            if index == backbone.stem_feat_idx:
                features.append(x)  # (B, stem, H/2, W/2), before the stem pooling
        for stage in backbone.stages:
            x = stage(x)
            features.append(x)
        x = embed.proj(backbone.norm(x))  # (B, C, H/16, W/16)
        tokens = x.flatten(2).transpose(1, 2)  # (B, Z, C)
        tokens = self.encoder.norm_pre(self.encoder.patch_drop(self.encoder._pos_embed(tokens)))
        return tokens, features[-2::-1]

    def _to_map(self, tokens: Tensor) -> Tensor:
        """``(B, Z, C)`` row-major tokens -> ``(B, C, h, w)``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_hw)

    def pruned_part(self) -> list[str]:
        """Module names of the ViT blocks that run after the first pruning point (for FLOP ratios), and
        the decoder when it runs in a window."""
        depth = len(self.encoder.blocks)
        first = self.prune_after[0] if self.prune_after else depth
        decoder = ["decoder"] if self.decoder_window is not None else []
        blocks = [f"encoder.blocks.{i}" for i in range(first, depth)]
        return blocks + grid_module_names(self.pruners) + decoder

    @torch.no_grad()
    def reference_forward(self, image: Tensor) -> Tensor:
        """timm's own, unpatched encoder (``forward_features``, ``forward_intermediates``) + the decoder."""
        tokens = self.encoder.forward_features(image)
        features = self.encoder.patch_embed.backbone.forward_intermediates(
            image, indices=[0, 1, 2], intermediates_only=True
        )
        return self.decoder(self._to_map(tokens), features[::-1])


def _check_cnn_widths(stem_channels: int, cnn_channels: Sequence[int], groups: int) -> None:
    """Refuse CNN widths that timm would round, or that GroupNorm cannot split into ``groups``."""
    widths = {"stem_channels": stem_channels}
    for index, channels in enumerate(cnn_channels):
        widths[f"cnn_channels[{index}]"] = channels
        widths[f"bottleneck of cnn_channels[{index}]"] = make_divisible(channels * _BOTTLE_RATIO)
    bad = {name: c for name, c in widths.items() if c % groups or make_divisible(c) != c}
    if bad:
        raise ValueError(
            f"CNN widths must be multiples of 8 and of cnn_norm_groups={groups} "
            f"(bottlenecks are a quarter of the stage width, at least 8): {bad}"
        )
