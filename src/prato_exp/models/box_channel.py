"""The box-channel control: the box prompt as an extra binary input channel, for any network.

PrATo sees an oracle box while the unpruned model and the baselines do not. Feeding the same box to
any backbone as a mask channel separates what the box tells the model from what pruning does
(Tables IV and V, row "+ box channel").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prato_exp.models.base import SegOutput


def box_mask(box_xyxy: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """``(B, 1, H, W)`` float mask, 1 on the pixels whose centres lie inside each ``(B, 4)`` box."""
    h, w = image_hw
    ys = torch.arange(h, device=box_xyxy.device, dtype=box_xyxy.dtype) + 0.5
    xs = torch.arange(w, device=box_xyxy.device, dtype=box_xyxy.dtype) + 0.5
    x0, y0, x1, y1 = (box_xyxy[:, i, None] for i in range(4))
    inside_y = (ys >= y0) & (ys < y1)  # (B, H)
    inside_x = (xs >= x0) & (xs < x1)  # (B, W)
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(box_xyxy.dtype)[:, None]


class BoxChannelInput(nn.Module):
    """Wraps a network built for ``C + 1`` channels: appends the box mask to the image, then calls it.

    Follows the network contract (``forward(image, box_xyxy, prune_enabled) -> SegOutput``,
    ``pruners``, ``pruned_part``), so training, evaluation and benchmarks treat it as any backbone.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.display_name = f"{getattr(net, 'display_name', type(net).__name__)} + box channel"

    @property
    def pruners(self) -> nn.ModuleDict:
        return self.net.pruners

    def pruned_part(self) -> list[str]:
        return [f"net.{name}" for name in self.net.pruned_part()]

    def forward(self, image: Tensor, box_xyxy: Tensor, prune_enabled: Tensor | None = None) -> SegOutput:
        mask = box_mask(box_xyxy.to(image.dtype), tuple(image.shape[-2:]))
        return self.net(torch.cat([image, mask], dim=1), box_xyxy, prune_enabled)
