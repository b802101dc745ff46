"""``python eval.py ckpt=PATH [dataset=...] [prompt=...]``: score a checkpoint, write metrics and overlays."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from prato_exp.cli.common import (
    CONFIG_DIR,
    add_volume_hd95,
    build_datamodule,
    build_logger,
    check_run_config,
    efficiency_report,
    environment,
    hydra_choices,
    log_case_tables,
    prepare_run_dir,
    report_block,
    write_json,
)
from prato_exp.lightning.checkpoint import load_checkpoint, load_net_weights
from prato_exp.lightning.module import SegmentationModule
from prato_exp.lightning.progress import progress_bar
from prato_exp.models.decoder_window import check_window_batch
from prato_exp.report.samples import save_report_samples
from prato_exp.visualize import save_overlays

log = logging.getLogger(__name__)


EVAL_KEYS = frozenset(
    {
        "task_name",
        "ckpt",
        "split",
        "num_overlays",
        "dataset",
        "prompt",
        "pruning",
        "trainer",
        "logger",
        "report",
        "decoder_window",
        "decoder_window_batch",
    }
)
"""Top-level keys of ``eval.yaml``; anything else on the command line (``+model.x=...``) is refused."""


def rescoring_config(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The checkpoint's run config with eval's ``dataset``, ``prompt`` and ``pruning`` overrides applied.

    A pruning override may change only the keys the trained pruner lists in ``rescorable`` (those no
    learned part depends on, e.g. PrATo's ``budget`` or ``k``); another pruner, or a key its weights
    depend on, is refused with the keys that may change. Keys eval does not use are errors, not silence.
    """
    unused = sorted(set(cfg.keys()) - EVAL_KEYS)
    if unused:
        raise ValueError(
            f"eval.py does not use {unused}: the model and training come from the checkpoint. It takes "
            f"{sorted(EVAL_KEYS)}, e.g. dataset=isic, prompt=misleading, threshold=percentile50, +pruning.k=7"
        )
    run_cfg = run_cfg.copy()
    for group in ("dataset", "prompt"):
        if cfg.get(group):
            run_cfg[group] = cfg[group]
    if cfg.get("pruning"):
        changes = _pruning_changes(run_cfg.pruning, cfg.pruning)
        for key, value in changes.items():
            run_cfg.pruning[key] = value
            run_cfg.model.pruner[key] = value
        if changes:
            log.info("re-scoring with pruning changes %s", changes)
    window = decoder_window_choice(cfg.get("decoder_window", "checkpoint"))
    if window != "checkpoint":
        if "decoder_window" not in run_cfg.model:
            raise ValueError(
                f"decoder_window={cfg.decoder_window}: the checkpoint's model ({run_cfg.model._target_}) has "
                "no decoder window; use decoder_window=checkpoint"
            )
        run_cfg.model.decoder_window = window
        log.info("decoder window: %s", "dense decoder" if window is None else f"margin {window}")
    window_batch = cfg.get("decoder_window_batch", "checkpoint")
    if window_batch != "checkpoint":
        check_window_batch(window_batch)
        if "decoder_window" not in run_cfg.model:
            raise ValueError(
                f"decoder_window_batch={window_batch}: the checkpoint's model ({run_cfg.model._target_}) has "
                "no decoder window; use decoder_window_batch=checkpoint"
            )
        run_cfg.model.decoder_window_batch = window_batch
        log.info("decoder window batching in evaluation: %s", window_batch)
    return run_cfg


def decoder_window_choice(value: Any) -> int | str | None:
    """``eval.yaml``'s ``decoder_window`` as the model's value: ``"checkpoint"`` (keep the trained
    model's), None for ``dense`` (the full decoder) or a margin ``>= 0``.

    The window changes no learned parameter, only where the decoder runs, so a checkpoint can be scored
    with and without it (conf/rescore/decoder_window.yaml: under each prompt condition).
    """
    if value in ("checkpoint", "dense"):
        return None if value == "dense" else value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"decoder_window must be checkpoint, dense or a margin >= 0 (tokens), got {value!r}")


def _pruning_changes(trained: DictConfig, requested: DictConfig) -> dict[str, Any]:
    target = trained.get("_target_")
    if requested.get("_target_", target) != target:
        raise ValueError(
            f"the checkpoint was trained with pruning._target_={target}; eval can re-score it under other "
            f"values of that pruner's re-scorable keys, not under another pruner ({requested._target_})"
        )
    changes = {}
    for key, value in requested.items():
        if key in ("_target_", "_partial_"):
            continue
        old = trained.get(key)
        if isinstance(old, DictConfig) and isinstance(value, DictConfig):
            value = OmegaConf.merge(old, value)  # +pruning.budget.q=50 changes q, keeps the rule
        if key not in trained or old != value:
            changes[key] = value
    if not changes:
        return {}
    pruner_cls = get_class(target)
    allowed = sorted(getattr(pruner_cls, "rescorable", frozenset()))
    refused = sorted(k for k in changes if k not in allowed)
    if refused:
        what = ", ".join(f"pruning.{k}={changes[k]!r}" for k in refused)
        reason = (
            f"re-scorable keys of {pruner_cls.__name__}: {allowed}"
            if allowed
            else (f"{pruner_cls.__name__} has no re-scorable key (a learned part depends on its settings)")
        )
        raise ValueError(f"cannot re-score this checkpoint with {what}: {reason}; retrain instead")
    return changes


def _checkpoint_kind(path: str | Path) -> str:
    name = Path(path).name
    if name.startswith("best"):
        return "best on validation"
    return "final epoch" if name.startswith("last") else f"checkpoint {name}"


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Score ``cfg.ckpt`` on the chosen split; write ``metrics.json`` and overlay PNGs into ``run_dir``.

    Every value is checked, and the network built, before any data is read.
    """
    env = environment()
    checkpoint = load_checkpoint(cfg.ckpt)
    run_cfg = rescoring_config(cfg, OmegaConf.create(checkpoint["prato_run_config"]))
    net = check_run_config(run_cfg)
    load_net_weights(net, checkpoint, cfg.ckpt)
    run_dir = prepare_run_dir(run_dir)
    log.info("run folder: %s", run_dir.resolve())
    OmegaConf.save(run_cfg, run_dir / "config.yaml")
    pl.seed_everything(run_cfg.seed, workers=True)

    datamodule = build_datamodule(run_cfg)
    module = SegmentationModule(
        net=net,
        loss=instantiate(run_cfg.loss),
        optimizer=torch.optim.AdamW,
        class_names=datamodule.source.class_names,
        run_config=checkpoint["prato_run_config"],
    )
    split = cfg.split if cfg.split != "auto" else ("test" if datamodule.has_test else "val")
    datamodule.write_split_ids(run_dir)
    # the tracker files the run under the checkpoint's model, data and table, with this command's logger
    labelled = OmegaConf.merge(
        run_cfg, {"report": {k: v for k, v in (cfg.get("report") or {}).items() if v is not None}}
    )
    labelled.logger = cfg.logger
    logger = build_logger(labelled, run_dir, job="eval")
    callbacks = [progress_bar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer: pl.Trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=logger or False, callbacks=callbacks
    )
    if split == "test":
        trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)
    else:
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    eval_set = datamodule.eval_set(split)
    log.info("efficiency pass: FLOPs on %d images and latency", run_cfg.efficiency.flop_images)
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
        "environment": env,
    }
    if trainer.is_global_zero:
        add_volume_hd95(results["metrics"], results["per_case"], net, datamodule, split, device)
    if split == "val":
        results["note"] = "scored on the validation split: these are validation figures"
    results["seed"] = run_cfg.seed
    results["choices"] = hydra_choices()
    results["train_samples_seen"] = checkpoint.get("prato_train_samples_seen")
    results["report"] = report_block(run_cfg, split, _checkpoint_kind(cfg.ckpt))
    results["report"].update({k: v for k, v in (cfg.get("report") or {}).items() if v is not None})
    if trainer.is_global_zero:
        log.info("saving %d overlays and the report's figure samples", cfg.num_overlays)
        if logger is not None:
            log_case_tables(logger, {split: results["per_case"]})
            logger.finalize("success")
        results["figures"] = [
            str(p) for p in save_overlays(net, eval_set, run_dir / "overlays", cfg.num_overlays)
        ]
        save_report_samples(net, eval_set, run_dir)
        write_json(run_dir / "metrics.json", results)
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Console entry point ``prato-eval``."""
    evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
