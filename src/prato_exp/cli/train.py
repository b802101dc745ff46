"""``python train.py [overrides]``: train, select the best checkpoint, evaluate, write ``metrics.json``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from prato_exp.cli.allocator import retain_freed_memory
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
from prato_exp.lightning.callbacks import EpochSeed, NonFiniteLossGuard
from prato_exp.lightning.media import ValidationImages
from prato_exp.lightning.module import SegmentationModule
from prato_exp.lightning.progress import progress_bar
from prato_exp.report.samples import save_report_samples

log = logging.getLogger(__name__)

CHECKPOINT_POLICIES = ("auto", "best", "last")


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` into ``run_dir``; return what ``metrics.json`` holds.

    Every config value is checked (the network is built) before any data is read. The scored weights
    follow ``eval_checkpoint``: ``auto`` scores the best-on-validation checkpoint where a test split is
    scored and the final-epoch weights where only validation is (never select on the split reported).
    """
    pl.seed_everything(cfg.seed, workers=True)
    env = environment()  # the commit is read before any work, so a later checkout cannot change it
    env["retain_freed_memory"] = bool(cfg.get("retain_freed_memory", False)) and retain_freed_memory()
    net = check_run_config(cfg)
    policy = _checkpoint_policy(cfg.eval_checkpoint)
    run_dir = prepare_run_dir(run_dir)
    log.info("run folder: %s", run_dir.resolve())
    OmegaConf.save(cfg, run_dir / "config.yaml")

    datamodule = build_datamodule(cfg)
    source = datamodule.source
    datamodule.write_split_ids(run_dir)
    module = SegmentationModule(
        net=net,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        class_names=source.class_names,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        hd95_every_n_epochs=cfg.get("hd95_every_n_epochs", 1),
    )
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-{epoch:03d}",
        monitor=cfg.checkpoint.monitor,
        mode=cfg.checkpoint.mode,
        auto_insert_metric_name=False,
    )
    # its own callback: Lightning 2.6's save_last writes last.ckpt only when the monitored metric improved,
    # so after a final epoch that did not improve, "last" held an earlier epoch's weights
    latest = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
    )
    callbacks = [checkpoint, latest, NonFiniteLossGuard(), EpochSeed(cfg.seed)]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(progress_bar(cfg.get("progress_every_percent", 10)))
    logger = build_logger(cfg, run_dir, job="train")
    if logger is not None and hasattr(logger, "log_image") and cfg.get("val_images"):
        callbacks.append(ValidationImages(**cfg.val_images))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=logger or False, callbacks=callbacks
    )

    # read before the clock starts, as any training script does, so throughput counts training and validation
    log.info("reading the data ...")
    started = time.perf_counter()
    datamodule.setup("fit")
    datamodule.eval_set("val")
    data_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_seconds = time.perf_counter() - started
    samples_seen = trainer.global_step * cfg.datamodule.batch_size * trainer.world_size
    best = checkpoint.best_model_path or None
    score_test = bool(cfg.run_test and datamodule.has_test)
    if policy == "auto":
        policy = "best" if score_test else "last"
    if policy == "best" and best is None:
        log.warning("no best checkpoint was saved (fast_dev_run?): scoring the final weights")
        policy = "last"
    scored = best if policy == "best" else None

    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "choices": hydra_choices(),
        "seed": cfg.seed,
        "best_checkpoint": best,
        "last_checkpoint": latest.best_model_path or None,
        "scored_checkpoint": "best on validation" if policy == "best" else "final epoch",
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "train_samples_seen": samples_seen,
        # validation inside fit included, so it compares with any script's end-to-end throughput; a resumed
        # run's seconds cover only its last part, so it has none
        "train_samples_per_second": (
            samples_seen / train_seconds if train_seconds > 0 and not cfg.get("ckpt_path") else None
        ),
        "epochs_run": trainer.current_epoch,
        "val_history": module.val_history,
        "splits": {k: len(v) for k, v in source.split_ids().items()},
        "environment": env,
    }
    eval_kwargs = {"datamodule": datamodule, "ckpt_path": scored, "verbose": False}
    log.info("scoring the %s weights on the validation split", results["scored_checkpoint"])
    trainer.validate(module, **eval_kwargs)
    results["val"] = module.last_metrics["val"]
    results["per_case"] = {"val": module.last_per_case["val"]}
    if score_test:
        log.info("scoring the %s weights on the test split", results["scored_checkpoint"])
        trainer.test(module, **eval_kwargs)
        results["test"] = module.last_metrics["test"]
        results["per_case"]["test"] = module.last_per_case["test"]
    else:
        results["test"] = None
        results["note"] = "no test split here (or run_test=false): the reported figures are validation"

    split = "test" if results["test"] is not None else "val"
    results["report"] = report_block(cfg, split, results["scored_checkpoint"])
    device = module.device if trainer.strategy.root_device.type != "cpu" else torch.device("cpu")
    if trainer.is_global_zero:
        for scored in ("val", "test") if score_test else ("val",):
            add_volume_hd95(
                results[scored], results["per_case"][scored], module.net, datamodule, scored, device
            )
    log.info(
        "efficiency pass: FLOPs on %d images and latency, pruned and unpruned", cfg.efficiency.flop_images
    )
    phase_started = time.perf_counter()
    results["efficiency"] = efficiency_report(
        module.net,
        datamodule.eval_set(split),
        cfg.efficiency.flop_images,
        cfg.efficiency.latency_warmup,
        cfg.efficiency.latency_repeats,
        device,
    )
    log.info("efficiency pass done in %.0f s", time.perf_counter() - phase_started)
    if logger is not None:
        eff = results["efficiency"]
        logger.log_metrics(
            {"eff/gflops": eff["gflops_per_image"], "eff/latency_ms": eff["latency"]["median_ms"]}
        )
        log_case_tables(logger, results["per_case"])
        logger.finalize("success")
    if trainer.is_global_zero:
        log.info("saving the report's figure samples")
        save_report_samples(module.net, datamodule.eval_set(split), run_dir)
        write_json(run_dir / "metrics.json", results)
    return results


def _checkpoint_policy(value: str) -> str:
    if value not in CHECKPOINT_POLICIES:
        raise ValueError(f"eval_checkpoint must be one of {CHECKPOINT_POLICIES}, got {value!r}")
    return value


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    """Console entry point ``prato-train``."""
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
