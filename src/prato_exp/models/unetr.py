"""UNETR (MONAI, 2-D) with pruning points between its ViT blocks.

The wrapper owns an unmodified :class:`monai.networks.nets.UNETR` and re-implements only its
``forward``: it embeds the patches, runs the ViT blocks through
:func:`prato_exp.models.plain_vit.run_pruned_blocks` and feeds the grid-shaped hidden states to
MONAI's own encoders and decoders. With the ``none`` pruner the output equals ``UNETR.forward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNETR
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
)
from prato_exp.models.weights import load_pretrained
from prato_exp.pruning.base import PrunerFactory, grid_module_names

DECODER_MODULES = ("encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3")
DECODER_MODULES += ("decoder2", "out")
"""MONAI UNETR's convolutional modules, all of which the decoder window crops."""


class PrunableUNETR(nn.Module):
    """MONAI UNETR (2-D, patch 16, 12 blocks) with a pruner after configurable blocks.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        img_size: square input side in pixels (a multiple of 16).
        feature_size, hidden_size, mlp_dim, num_heads, norm_name, res_block, dropout_rate, qkv_bias:
            passed to MONAI's ``UNETR``.
        skip_blocks: 1-based ViT blocks whose outputs feed the decoder skips (MONAI: 3, 6, 9 as
            0-based ``hidden_states_out`` indices, i.e. blocks 4, 7, 10).
        prune_after: 1-based blocks after which the pruner runs (default: after block 3).
        pruner: a factory ``pruner(dim=..., context=...) -> TokenPruner`` (Hydra ``_partial_``); one
            pruner instance is built per pruning point. None means no pruning.
        pretrained: optional local path of a state dict (never downloaded).
        pretrained_ignore: glob patterns of keys that may be missing, unknown or reshaped in
            ``pretrained`` (a partial load); any other mismatch is an error listing the keys.
        decoder_window: None (off: the paper's dense decoder) or a margin in tokens: while a pruner is
            active, the convolutional encoders and the decoder run only on the tokens under the box
            dilated by this margin, and the rest of the image is background
            (:mod:`prato_exp.models.decoder_window`).
        decoder_window_batch: in evaluation, ``shared`` (every image decodes the batch's largest
            rectangle, one decoder call) or ``by_size`` (one call per size of the images' own windows:
            each image's logits equal its batch-1 logits). Training always shares.
        unequal_counts: ``pad`` (the batch padded to its largest keep count) or ``group`` (each group of
            images with one count runs on exactly that many tokens; no FLOP on padding).
    """

    display_name = "UNETR"
    """The backbone's name in tables and figures."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 224,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        norm_name: str = "instance",
        res_block: bool = True,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        skip_blocks: Sequence[int] = (4, 7, 10),
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
            raise ValueError(f"UNETR needs an input side divisible by its patch size 16, got {img_size}")
        self.unetr = UNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=(img_size, img_size),
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            norm_name=norm_name,
            res_block=res_block,
            dropout_rate=dropout_rate,
            spatial_dims=2,
            qkv_bias=qkv_bias,
        )
        depth = len(self.unetr.vit.blocks)
        check_block_indices("skip_blocks", skip_blocks, depth)
        if len(skip_blocks) != 3:
            raise ValueError(f"UNETR's decoder reads exactly 3 intermediate skips, got {list(skip_blocks)}")
        self.skip_blocks = tuple(skip_blocks)
        self.prune_after = check_block_indices("prune_after", prune_after, depth)
        self.grid_hw = (img_size // 16, img_size // 16)
        self.hidden_size = hidden_size
        self.pruners = build_pruners(
            pruner, self.prune_after, hidden_size, num_classes=out_channels, grid_hw=self.grid_hw, depth=depth
        )
        self.decoder_window = decoder_window
        self.unequal_counts = unequal_counts
        self.register_buffer("background", background_logits(out_channels), persistent=False)
        if pretrained:
            load_pretrained(self.unetr, pretrained, ignore=pretrained_ignore)

    def forward(
        self, image: Tensor, box_xyxy: Tensor | None = None, prune_enabled: Tensor | None = None
    ) -> SegOutput:
        """Segment ``image`` ``(B, C, H, W)`` given one box per image ``box_xyxy`` ``(B, 4)``."""
        net = self.unetr
        tokens = net.vit.patch_embedding(image)  # (B, Z, C)
        encoded = run_pruned_blocks(
            tokens,
            blocks=net.vit.blocks,
            norm=net.vit.norm,
            pruners={int(i): p for i, p in self.pruners.items()},
            skip_blocks=self.skip_blocks,
            grid_hw=self.grid_hw,
            image_hw=(image.shape[-2], image.shape[-1]),
            box_xyxy=box_xyxy,
            prune_enabled=prune_enabled,
            unequal_counts=self.unequal_counts,
        )
        window = pruning_window(self.decoder_window, self.pruners, box_xyxy, image.shape[-2:], self.grid_hw)
        inputs = [image, *(encoded.skips[i] for i in self.skip_blocks), encoded.final]
        by_size = self.decoder_window_batch == "by_size" and not self.training
        logits = decode_in_window(window, inputs, self._decode, self.background, by_size)
        return SegOutput(logits=encoded.trace.final_logits(logits), trace=encoded.trace)

    def _decode(self, inputs: Sequence[Tensor], window: GridWindow | None) -> Tensor:
        """Logits ``(B, K, h, w)`` on ``window`` (the whole image when None) of the image ``(B, C, H, W)``,
        the three skips and the final tokens ``(B, Z, C)``."""
        net = self.unetr
        crop = window.crop if window is not None else whole
        image, skip2, skip3, skip4, final = inputs
        enc1 = net.encoder1(crop(image))
        enc2 = net.encoder2(crop(net.proj_feat(skip2)))
        enc3 = net.encoder3(crop(net.proj_feat(skip3)))
        enc4 = net.encoder4(crop(net.proj_feat(skip4)))
        dec3 = net.decoder5(crop(net.proj_feat(final)), enc4)
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        return net.out(net.decoder2(dec1, enc1))

    def pruned_part(self) -> list[str]:
        """Module names of the blocks that run after the first pruning point (for FLOP ratios)."""
        first = self.prune_after[0] if self.prune_after else len(self.unetr.vit.blocks)
        blocks = [f"unetr.vit.blocks.{i}" for i in range(first, len(self.unetr.vit.blocks))]
        decoder = [f"unetr.{name}" for name in DECODER_MODULES] if self.decoder_window is not None else []
        return blocks + grid_module_names(self.pruners) + decoder

    @torch.no_grad()
    def reference_forward(self, image: Tensor) -> Tensor:
        """MONAI's own, unpatched ``UNETR.forward`` (for tests that pruning-off changes nothing)."""
        return self.unetr(image)
