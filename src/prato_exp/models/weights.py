"""Optional pretrained weights from a local file: never a download."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    ignore: Sequence[str] = (),
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> None:
    """Load a state dict saved at ``path`` into ``module`` (``weights_only=True``), strictly.

    Accepts a bare state dict or a Lightning/other checkpoint holding one under ``state_dict``.
    ``adapt`` may rename keys or resample tensors first (e.g. a ViT's position embedding to another
    grid). Every tensor must match: a key missing from the file, unknown to the module or of another
    shape is a ValueError listing them all, unless it matches one of the ``ignore`` glob patterns
    (e.g. ``["out.*"]`` for a head of another class count), which the user names for a partial load;
    ignored keys keep their fresh initialisation and are logged.
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

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)

    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = {
        "missing from the file": [k for k in missing if not ignored(k)],
        "unknown to the model": [k for k in unexpected if not ignored(k)],
        "of another shape": [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if not ignored(k)
        ],
    }
    if any(problems.values()):
        listing = "; ".join(f"{len(v)} {what}: {v}" for what, v in problems.items() if v)
        raise ValueError(
            f"pretrained weights {path} do not fit {type(module).__name__}: {listing}. For a partial load, "
            "name the keys that may differ with the model's `pretrained_ignore` glob patterns "
            "(e.g. model.pretrained_ignore=['out.*'])"
        )
    skipped = [k for k in (*missing, *unexpected, *mismatched) if ignored(k)]
    if len(skipped) == len(own) + len(unexpected):
        raise ValueError(f"no parameter of {type(module).__name__} matched the weights in {path}")
    module.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    if skipped:
        log.warning("pretrained %s: %d keys ignored as asked (e.g. %s)", path, len(skipped), skipped[:3])
