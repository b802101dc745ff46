"""prato_exp: PrATo token pruning for ViT medical image segmentation (Hydra + Lightning).

``from prato_exp import Segmenter`` loads the inference API on first use, so ``import prato_exp``
itself stays cheap (no torch, Lightning or Hydra import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prato_exp.inference import Intensity, Prediction, Segmenter

__all__ = ["Intensity", "Prediction", "Segmenter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from prato_exp import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'prato_exp' has no attribute {name!r}")
