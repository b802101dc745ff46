"""Checkpoints and networks from a run's configuration: what training, evaluation and inference share.

``train.py`` builds its network with :func:`build_net`; a checkpoint carries its run's composed config
(``prato_run_config``, written by :class:`~prato_exp.lightning.module.SegmentationModule`), from which
``eval.py``, ``prato-predict`` and the app rebuild the same network (:func:`load_checkpoint`,
:func:`load_net_weights`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from prato_exp.data.base import SegSource
from prato_exp.models.box_channel import BoxChannelInput
from prato_exp.pruning.budget import TokenBudget


def source_class(dataset_cfg: DictConfig) -> type[SegSource]:
    """The dataset source class of ``dataset_cfg`` without building it (channels and classes are class
    attributes), so a run can build its network, and so check its model and pruning values, first."""
    cls = get_class(dataset_cfg._target_)
    if not (isinstance(cls, type) and issubclass(cls, SegSource)):
        raise ValueError(f"dataset._target_={dataset_cfg._target_!r} is not a SegSource subclass")
    return cls


def build_net(
    model_cfg: DictConfig, source: SegSource | type[SegSource], box_channel: bool = False
) -> nn.Module:
    """The network of ``model_cfg`` sized for ``source``'s channels and classes (an instance or class).

    With ``box_channel`` the network takes one more input channel, the box prompt as a binary mask
    (:class:`~prato_exp.models.box_channel.BoxChannelInput`), the control row of Tables IV and V.
    """
    net = instantiate(
        model_cfg, in_channels=source.in_channels + int(box_channel), out_channels=source.num_classes
    )
    return BoxChannelInput(net) if box_channel else net


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a prato_exp Lightning checkpoint with ``weights_only=True`` semantics."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "prato_run_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a prato_exp training checkpoint (no run config or state_dict in it)")
    upgrade_run_config(checkpoint["prato_run_config"])
    return checkpoint


FLAT_BUDGET_KEYS = ("threshold", "q", "tau", "min_keep")
"""Pruning keys of checkpoints written before the token budget object (now ``pruning.budget``)."""


def upgrade_run_config(run_config: dict[str, Any]) -> None:
    """Move an older checkpoint's flat ``pruning.threshold/q/tau/min_keep`` into ``pruning.budget``, in place.

    Applies to ``pruning`` and to the resolved ``model.pruner``; a pruner without a budget (DToP, which
    stored them as null to refuse them) just loses the null keys.
    """
    model = run_config.get("model")
    for node in (run_config.get("pruning"), model.get("pruner") if isinstance(model, dict) else None):
        if not isinstance(node, dict) or "budget" in node or not any(k in node for k in FLAT_BUDGET_KEYS):
            continue
        flat = {k: node.pop(k) for k in FLAT_BUDGET_KEYS if k in node}
        target = node.get("_target_")
        if target is None or "budget" not in inspect.signature(get_class(target)).parameters:
            continue
        budget = {"_target_": f"{TokenBudget.__module__}.TokenBudget"}
        budget["rule"] = flat.get("threshold", "percentile")
        budget |= {k: flat[k] for k in ("q", "tau", "min_keep") if k in flat}
        node["budget"] = budget


def load_net_weights(net: nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Put the checkpoint's ``net.*`` weights into ``net``; a checkpoint of another model is an error."""
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit the model {type(net).__name__} built from its run config "
            f"for this dataset (a checkpoint of another model, size or class count?): {err}"
        ) from err
