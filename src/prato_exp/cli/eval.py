"""``python eval.py ckpt=PATH [dataset=...] [prompt=...]``: score a checkpoint, write metrics and overlays."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prato_exp.cli.common import (
    CONFIG_DIR,
    build_datamodule,
    build_logger,
    build_net,
    efficiency_report,
    environment,
    prepare_run_dir,
    write_json,
)
from prato_exp.lightning.module import SegmentationModule
from prato_exp.visualize import save_overlays

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a prato_exp Lightning checkpoint with ``weights_only=True`` semantics."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "prato_run_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a prato_exp training checkpoint (no run config or state_dict in it)")
    return checkpoint


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


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Score ``cfg.ckpt`` on the chosen split; write ``metrics.json`` and overlay PNGs into ``run_dir``."""
    run_dir = prepare_run_dir(run_dir)
    checkpoint = load_checkpoint(cfg.ckpt)
    run_cfg = OmegaConf.create(checkpoint["prato_run_config"])
    for group in ("dataset", "prompt"):
        if cfg.get(group):
            run_cfg[group] = cfg[group]
    OmegaConf.save(run_cfg, run_dir / "config.yaml")
    pl.seed_everything(run_cfg.seed, workers=True)

    datamodule = build_datamodule(run_cfg)
    net = build_net(run_cfg.model, datamodule.source)
    load_net_weights(net, checkpoint, cfg.ckpt)
    module = SegmentationModule(
        net=net,
        loss=instantiate(run_cfg.loss),
        optimizer=torch.optim.AdamW,
        class_names=datamodule.source.class_names,
        run_config=checkpoint["prato_run_config"],
    )
    split = cfg.split if cfg.split != "auto" else ("test" if datamodule.has_test else "val")
    datamodule.write_split_ids(run_dir)
    logger = build_logger(cfg, run_dir, name=run_dir.name)
    trainer: pl.Trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=logger or False)
    if split == "test":
        trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)
    else:
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    eval_set = datamodule.eval_set(split)
    device = torch.device("cuda" if trainer.strategy.root_device.type == "cuda" else "cpu")
    results: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "split": split,
        "prompt_condition": run_cfg.prompt.condition,
        "oracle_boxes": "box prompts are derived from the ground truth (oracle boxes)",
        "metrics": module.last_metrics[split],
        "per_case": module.last_per_case[split],
        "efficiency": efficiency_report(
            net,
            eval_set,
            run_cfg.efficiency.flop_images,
            run_cfg.efficiency.latency_warmup,
            run_cfg.efficiency.latency_repeats,
            device,
        ),
        "environment": environment(),
    }
    if split == "val":
        results["note"] = "scored on the validation split: these are validation figures"
    results["figures"] = [
        str(p) for p in save_overlays(net, eval_set, run_dir / "overlays", cfg.num_overlays)
    ]
    write_json(run_dir / "metrics.json", results)
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Console entry point ``prato-eval``."""
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
