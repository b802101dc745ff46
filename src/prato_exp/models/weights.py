"""Optional pretrained weights from a local file: never a download."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_pretrained(module: nn.Module, path: str | Path, strict: bool = False) -> None:
    """Load a state dict saved at ``path`` into ``module`` (``weights_only=True``).

    Accepts a bare state dict or a Lightning/other checkpoint holding one under ``state_dict``.
    Keys that do not fit are listed in the log; with ``strict`` they are an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found at {path} (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=strict)
    if missing or unexpected:
        log.warning(
            "pretrained %s: %d missing keys (e.g. %s), %d unexpected (e.g. %s)",
            path,
            len(missing),
            missing[:3],
            len(unexpected),
            unexpected[:3],
        )
    if not set(module.state_dict()) - set(missing):
        raise ValueError(f"no parameter of {type(module).__name__} matched the weights in {path}")
