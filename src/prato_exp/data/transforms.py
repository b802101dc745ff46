"""Resizing and joint image/mask augmentation (MONAI dictionary transforms).

Augmentation acts on the image and its mask together; the box prompt is derived afterwards from the
final mask (spec section 2), so the box itself is never transformed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, Randomizable
from torch import Tensor


def resize_pair(image: np.ndarray, label: np.ndarray, size: int) -> tuple[Tensor, Tensor]:
    """Resize ``image`` ``(C, H, W)`` bilinearly and ``label`` ``(H, W)`` by nearest neighbour to ``size``.

    Returns float32 ``(C, size, size)`` and int64 ``(size, size)`` tensors.
    """
    image_t = torch.as_tensor(image, dtype=torch.float32)
    label_t = torch.as_tensor(label, dtype=torch.int64)
    if image_t.shape[-2:] != (size, size):
        image_t = F.interpolate(image_t[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        label_t = F.interpolate(label_t[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0]
    return image_t, label_t.long()


class JointAugment:
    """Apply a list of MONAI dictionary transforms to ``{"image": (C,H,W), "label": (1,H,W)}``.

    The transforms' random state is re-seeded from a per-call seed, so augmentation follows the
    training seed (Lightning's ``seed_everything(workers=True)``) and is reproducible.
    """

    def __init__(self, transforms: Sequence[object] | None = None) -> None:
        self.transforms = list(transforms or [])
        self.compose = Compose(self.transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def __call__(self, image: Tensor, label: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Augment ``image`` ``(C, H, W)`` and ``label`` ``(H, W)`` jointly."""
        if not self.transforms:
            return image, label
        for transform in self.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=seed)
                seed = (seed * 1_000_003 + 7) % (2**32)
        # plain tensors: MONAI's metadata tracking would cost more than the flips themselves (~3 ms/slice)
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            out = self.compose({"image": image, "label": label[None].float()})
        finally:
            set_track_meta(tracking)
        return torch.as_tensor(out["image"]).float().contiguous(), out["label"][0].round().long()
