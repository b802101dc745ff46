"""Shared fixtures: composed Hydra configs and the paths of the real datasets (tests skip without them)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from prato_exp.cli.common import CONFIG_DIR
from prato_exp.pruning.budget import TokenBudget
from prato_exp.pruning.dtop import DToPPruner
from prato_exp.pruning.dynamicvit import DynamicViTPruner
from prato_exp.pruning.evovit import EvoViTPruner
from prato_exp.pruning.random_mask import RandomPruner
from prato_exp.pruning.stp import STPPruner
from prato_exp.pruning.tram import TRAMPruner

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# W&B would otherwise take over the process's stdout to mirror it into the run, swallowing pytest's report
os.environ.setdefault("WANDB_CONSOLE", "off")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ACDC_ROOT = Path(os.environ.get("PRATO_ACDC_ROOT", SHARED_DATA / "acdc_ssl4mis"))
ISIC_ROOT = Path(os.environ.get("PRATO_ISIC_ROOT", SHARED_DATA / "isic2017"))


def group_choices(group: str) -> list[str]:
    """Every config file of a group, so a new file in conf/<group>/ is tested the moment it exists."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str]) -> DictConfig:
    """The train config as ``python train.py <overrides>`` would see it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def compose_eval(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def require_acdc() -> Path:
    if not (ACDC_ROOT / "train_slices.list").is_file():
        pytest.skip(f"ACDC h5 data not found at {ACDC_ROOT} (set PRATO_ACDC_ROOT to run this test)")
    return ACDC_ROOT


def require_isic() -> Path:
    if not ISIC_ROOT.is_dir():
        pytest.skip(f"ISIC data not found at {ISIC_ROOT} (set PRATO_ISIC_ROOT to run this test)")
    return ISIC_ROOT


BASELINES = {
    "random": partial(RandomPruner, budget=TokenBudget(q=25)),
    "dynamicvit": partial(DynamicViTPruner, budget=TokenBudget(q=25)),
    "evovit": partial(EvoViTPruner, budget=TokenBudget(q=25)),
    "dtop": partial(DToPPruner, p0=0.9),
    "stp": partial(STPPruner, budget=TokenBudget(q=25)),
    "tram": partial(TRAMPruner, budget=TokenBudget(q=25)),
}
"""Factories of the six baseline pruners at PrATo's q=25 budget, keyed by their config name."""


def make_dtop_confident(net: torch.nn.Module) -> None:
    """Make every DToP head of a 3-class ``net`` predict class 0 with confidence ~1 for every token."""
    for pruner in net.pruners.values():
        with torch.no_grad():
            pruner.head[1].weight.mul_(0.01)
            pruner.head[1].bias.copy_(torch.tensor([20.0, 0.0, 0.0]))
