"""A convolutional reference without tokens (MONAI ``BasicUNet``), to check the data and training
pipeline against known figures: the same contract as the ViT backbones, with nothing to prune."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from prato_exp.models.base import PruningTrace, SegOutput


class ReferenceBasicUNet(nn.Module):
    """MONAI ``BasicUNet`` (2-D) behind the backbone contract of :mod:`prato_exp.models.base`.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        img_size: the input side (recorded only; the network is fully convolutional).
        features: MONAI's six feature widths.
        pruner: refused unless None: a CNN has no tokens to prune.
    """

    display_name = "BasicUNet"
    """The backbone's name in tables and figures."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int = 128,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
        pruner: object | None = None,
    ) -> None:
        super().__init__()
        if pruner is not None and getattr(pruner, "func", pruner).__name__ != "NoPruner":
            raise ValueError("the BasicUNet reference has no tokens: use pruning=none with model=basic_unet")
        self.unet = BasicUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            dropout=dropout,
        )
        self.img_size = img_size
        self.pruners = nn.ModuleDict()

    def forward(
        self, image: Tensor, box_xyxy: Tensor | None = None, prune_enabled: Tensor | None = None
    ) -> SegOutput:
        """Segment ``image`` ``(B, C, H, W)``; the box is ignored (nothing is pruned)."""
        return SegOutput(logits=self.unet(image), trace=PruningTrace())

    def pruned_part(self) -> list[str]:
        return []
