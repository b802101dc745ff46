"""Optional pretrained weights from a local file: never a download."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    strict: bool = False,
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> None:
    """Load a state dict saved at ``path`` into ``module`` (``weights_only=True``).

    Accepts a bare state dict or a Lightning/other checkpoint holding one under ``state_dict``.
    ``adapt`` may rename keys or resample tensors first (e.g. a ViT's position embedding to another
    grid). Without ``strict``, keys missing from the file, unknown to the module, or of another shape
    (e.g. a head for another class count) are skipped and listed in the log; with it they are an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found at {path} (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if adapt is not None:
        state = adapt(state, module)
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched and strict:
        raise ValueError(f"pretrained {path}: {len(mismatched)} tensors differ in shape: {mismatched[:3]}")
    state = {k: v for k, v in state.items() if k not in mismatched}
    missing, unexpected = module.load_state_dict(state, strict=strict)
    if missing or unexpected or mismatched:
        log.warning(
            "pretrained %s: %d missing (e.g. %s), %d unexpected (e.g. %s), %d of another shape (e.g. %s)",
            path,
            len(missing),
            missing[:3],
            len(unexpected),
            unexpected[:3],
            len(mismatched),
            mismatched[:3],
        )
    if not set(own) - set(missing):
        raise ValueError(f"no parameter of {type(module).__name__} matched the weights in {path}")
