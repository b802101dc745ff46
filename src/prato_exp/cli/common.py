"""Pieces shared by ``train.py`` and ``eval.py``: building a run from its config and writing results."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prato_exp.lightning.checkpoint import build_net, source_class
from prato_exp.lightning.datamodule import EvalSlices, SegDataModule
from prato_exp.metrics.efficiency import count_flops, measure_latency
from prato_exp.metrics.volume import summarise_volume_hd95, volume_hd95_rows
from prato_exp.pruning.base import pruning_disabled
from prato_exp.pruning.budget import TokenBudget

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"

ROW_SUFFIXES = {"unpruned": "", "prato": " + PrATo", "box_channel": " + box channel"}


def backbone_row(model_target: str, row_key: str) -> str:
    """Table V row label: the backbone's display name and what the row adds (``UNETR + PrATo``)."""
    name = getattr(get_class(model_target), "display_name", model_target.rsplit(".", 1)[-1])
    if name == "BasicUNet":
        return "BasicUNet (CNN reference)"
    if row_key not in ROW_SUFFIXES:
        raise ValueError(f"report.row_key must be one of {sorted(ROW_SUFFIXES)} in Table V, got {row_key!r}")
    return name + ROW_SUFFIXES[row_key]


def threshold_row(rule: str, q: float | None, tau: float | None) -> str:
    """Table II row label of a token budget (``pruning.budget``): ``q=25`` or ``tau=0.3``."""
    return TokenBudget(rule, q, tau).label


def run_tag(*choices: str | None) -> str:
    """A run folder's name tag: the given config groups' choices, in order, each once, unset ones left out.

    Called with the ``pruning``, ``threshold`` and ``row`` choices, so a swept threshold or table row shows
    in the folder name (``percentile25_fixed0.1``, ``none_box_channel``) instead of the preset it overrides.
    """
    made = [str(c) for c in choices if c is not None]
    return "_".join(dict.fromkeys(made)) or "default"


for _name, _resolver in (
    ("backbone_row", backbone_row),
    ("threshold_row", threshold_row),
    ("run_tag", run_tag),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def build_datamodule(cfg: DictConfig) -> SegDataModule:
    """The datamodule of ``cfg``: its dataset source, box prompter and augmentation."""
    make_datamodule = instantiate(cfg.datamodule, _partial_=True)
    return make_datamodule(
        source=instantiate(cfg.dataset),
        prompter=instantiate(cfg.prompt),
        augment=list(instantiate(cfg.augment.transforms)),
    )


def check_run_config(cfg: DictConfig) -> nn.Module:
    """Validate every value of a run before any data is read; return the network it builds.

    Checks that every ``pruning`` key is a setting of the chosen pruner, builds the network (which
    checks the model and pruning values: unknown ``mode``, ``fill`` or ``query``, a budget's ``q``/``tau``
    out of range or unused by its rule, ``min_keep < 1``) and the box prompter, so a typo fails in a
    second, not after the data has loaded.
    """
    if not isinstance(cfg.get("box_channel", False), bool):
        raise ValueError(f"box_channel must be true or false, got {cfg.box_channel!r}")
    limit_val = OmegaConf.select(cfg, "trainer.limit_val_batches", default=None)
    if limit_val is not None and float(limit_val) == 0:
        raise ValueError(
            "trainer.limit_val_batches=0 is not supported: every run keeps its validation curve and is "
            "scored on the validation split; give a fraction or a batch count above 0"
        )
    check_pruning_keys(cfg.get("pruning"))
    net = build_net(cfg.model, source_class(cfg.dataset), cfg.get("box_channel", False))
    instantiate(cfg.prompt)
    return net


def check_pruning_keys(pruning_cfg: DictConfig | None) -> None:
    """Raise a ValueError naming every ``pruning`` key the chosen pruner does not take, with those it does.

    A ``threshold=`` choice writes ``pruning.budget``; a pruner whose count is not a token budget (DToP's
    confidence exits, ``none``) gets an error saying so instead of Hydra's bare ``TypeError``.
    """
    if not pruning_cfg or pruning_cfg.get("_target_") is None:
        if pruning_cfg and set(pruning_cfg.keys()) - {"_target_", "_partial_"}:
            raise ValueError(f"pruning has settings {sorted(pruning_cfg)} but no _target_ (pruning=none)")
        return
    target = pruning_cfg._target_
    params = inspect.signature(get_class(target)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    taken = set(params) - {"self", "dim", "context"}
    unknown = sorted(k for k in pruning_cfg if not str(k).startswith("_") and k not in taken)
    if unknown:
        hint = (
            " (pruning.budget comes from a threshold= choice; this pruner's count is not a token budget)"
            if "budget" in unknown
            else ""
        )
        raise ValueError(
            f"pruning.{', pruning.'.join(unknown)} is not a setting of {target}{hint}; its settings: "
            f"{sorted(taken)}"
        )


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create the run folder; refuse one that already holds results, so no run overwrites another."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"{run_dir} already holds a finished run (metrics.json); choose a new folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_labels(cfg: DictConfig, run_dir: Path, job: str) -> dict[str, Any]:
    """How an experiment tracker files a run: a unique name, its table's group, its row and tags.

    The name joins the sweep folder and the job folder (``2026-12-01_10-00-00/3_unetr_small_acdc_prato``),
    so names never repeat across sweeps. Runs of one table preset share the group
    ``<table>-<dataset>-<scale>``, each row is a job type, and the tags carry model, dataset, pruner and
    seed (the chosen config files under Hydra, else the classes).
    """
    choices = hydra_choices()
    report = OmegaConf.to_container(cfg.get("report") or {}, resolve=True)

    def choice(group: str) -> str:
        if group in choices and choices[group] not in (None, "None"):
            return str(choices[group])
        target = OmegaConf.select(cfg, f"{group}._target_", default=None)
        return target.rsplit(".", 1)[-1] if target else "none"

    in_sweep = run_dir.parent.name if run_dir.parent.name not in ("runs", "") else None
    name = f"{in_sweep}/{run_dir.name}" if in_sweep else run_dir.name
    dataset = choice("dataset")
    table = report.get("table")
    scale = report.get("scale")
    group = "-".join(str(p) for p in (table, dataset, scale) if p) if table else choice("experiment")
    tags = [f"model:{choice('model')}", f"dataset:{dataset}", f"pruning:{choice('pruning')}"]
    tags.append(f"seed:{cfg.seed}")
    tags += [f"{key}:{value}" for key, value in (("table", table), ("scale", scale)) if value]
    tags += [f"job:{job}"] + ([f"sweep:{in_sweep}"] if in_sweep else [])
    return {
        "name": name,
        "group": None if group == "none" else group,
        "job_type": report.get("row") or job,
        "tags": tags,
    }


def hydra_choices() -> dict[str, str]:
    """Which file of each config group this run used (from Hydra when it ran the job, else empty)."""
    if HydraConfig.initialized():
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    return {}


def build_logger(cfg: DictConfig, run_dir: Path, job: str = "train") -> Any:
    """The experiment logger of ``cfg.logger`` writing under ``run_dir``, or None for ``logger=none``.

    W&B runs get :func:`run_labels` (unique name, group per table, job type per row, tags) and the
    composed config.
    """
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return None
    target = cfg.logger._target_
    kwargs: dict[str, Any] = {"save_dir": str(run_dir)}
    if target.endswith("WandbLogger"):
        labels = run_labels(cfg, run_dir, job)
        kwargs.update({k: v for k, v in labels.items() if k not in cfg.logger})
        kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)
    return instantiate(cfg.logger, _partial_=True)(**kwargs)


def log_case_tables(logger: Any, per_case: dict[str, list[dict[str, Any]]]) -> None:
    """Send each split's per-case metrics as a table to loggers that take tables (W&B)."""
    if not hasattr(logger, "log_table"):
        return
    for split, rows in per_case.items():
        if not rows:
            continue
        columns = list(dict.fromkeys(key for row in rows for key in row))
        data = [[row.get(c) for c in columns] for row in rows]
        logger.log_table(key=f"{split}/per_case", columns=columns, data=data)


def add_volume_hd95(
    metrics: dict[str, Any],
    per_case: list[dict[str, Any]],
    net: nn.Module,
    datamodule: SegDataModule,
    split: str,
    device: torch.device,
) -> None:
    """Add the 3-D HD95 per volume (:mod:`prato_exp.metrics.volume`) to a split's metrics and per-case rows.

    Only where a case has more than one slice (ACDC volumes; a 2-D image's 3-D HD95 is its 2-D HD95).
    Keys: ``<split>/case/hd95_3d/<class>``, ``<split>/case/hd95_3d_mean``, ``<split>/hd95_3d_unit``;
    per case ``hd95_3d/<class>`` and ``hd95_3d_mean``.
    """
    eval_set = datamodule.eval_set(split)
    if all(case.num_slices <= 1 for case in eval_set.cases.values()):
        return
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    names = datamodule.source.class_names
    log.info("3-D HD95 per volume on %d %s cases", len(eval_set.cases), split)
    rows = volume_hd95_rows(
        net, loader, datamodule.num_classes, names, lambda cid: eval_set.cases[cid].spacing_dhw, device
    )
    metrics.update({f"{split}/{k}": v for k, v in summarise_volume_hd95(rows, names).items()})
    with_spacing = {eval_set.cases[cid].spacing_dhw is not None for cid in rows}
    metrics[f"{split}/hd95_3d_unit"] = "mm" if with_spacing == {True} else "voxels"
    for row in per_case:
        row.update(rows.get(row["case_id"], {}))


@torch.no_grad()
def efficiency_report(
    net: nn.Module, eval_set: EvalSlices, flop_images: int, warmup: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """FLOPs (executed graph, batch 1, averaged over up to ``flop_images`` images) and latency.

    Latency is the median over ``repeats`` batch-1 forward passes of the first image, after ``warmup``.
    For a pruned model the same weights are also measured with pruning off, and the ratios of the
    whole model and of the part pruning touches (the blocks after the first pruning point) are given.
    """
    was_training = net.training
    net.eval().to(device)
    count = min(flop_images, len(eval_set))
    step = max(1, len(eval_set) // max(count, 1))
    samples = [eval_set[i * step] for i in range(count)]
    inputs = [tuple(s[k][None].to(device) for k in ("image", "box_xyxy", "prune_enabled")) for s in samples]
    part = net.pruned_part()

    def flops_of(model: nn.Module) -> tuple[float, float]:
        reports = [count_flops(model, *args) for args in inputs]
        total = sum(r.total_flops for r in reports) / len(reports)
        return total, sum(r.flops_under(part) for r in reports) / len(reports)

    def latency_of(model: nn.Module) -> dict[str, Any]:
        return measure_latency(
            lambda: model(*inputs[0]), warmup=warmup, repeats=repeats, device=device
        ).to_dict()

    flops, part_flops = flops_of(net)
    report = {
        "gflops_per_image": flops / 1e9,
        "gmacs_per_image": flops / 2e9,
        "pruned_part_gflops": part_flops / 1e9,
        "flop_convention": "FlopCounterMode, executed graph, eval mode, batch 1; multiply-add = 2 FLOPs",
        "flop_images": count,
        "latency": latency_of(net),
        "device": str(device),
        "params_million": sum(p.numel() for p in net.parameters()) / 1e6,
    }
    if any(p.active for p in net.pruners.values()):
        with pruning_disabled(net) as unpruned:
            base_flops, base_part = flops_of(unpruned)
            report["unpruned"] = {
                "gflops_per_image": base_flops / 1e9,
                "pruned_part_gflops": base_part / 1e9,
                "latency": latency_of(unpruned),
            }
        report["flop_ratio"] = flops / base_flops
        report["pruned_part_flop_ratio"] = part_flops / base_part if base_part else None
        report["latency_ratio"] = report["latency"]["median_ms"] / report["unpruned"]["latency"]["median_ms"]
    report["machine_load"] = machine_load()
    net.train(was_training)
    return report


def machine_load() -> dict[str, Any]:
    """The 1-minute load average against the cores this process may use, read right after a timing: a
    load well above what this process runs means the timing shared the machine (the report flags it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
    }


def report_block(cfg: DictConfig, split: str, scored_checkpoint: str) -> dict[str, Any]:
    """What ``prato-report`` groups and captions a run by: table, row, split, weights, scale, prompt."""
    report = OmegaConf.to_container(cfg.get("report") or {}, resolve=True)
    return {
        "table": report.get("table"),
        "row": report.get("row"),
        "reference_row": report.get("reference_row"),
        "split": split,
        "checkpoint": scored_checkpoint,
        "scale": report.get("scale"),
        "prompt": cfg.prompt.condition,
        "oracle_boxes": "box prompts are oracle boxes from the ground truth",
    }


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), if any."""
    try:
        root = Path(__file__).resolve().parents[3]
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    """Machine facts that a timing needs beside it."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.platform(),
        "commit": git_commit(),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON (NaN/inf as null, since JSON has neither)."""
    path.write_text(json.dumps(_clean(payload), indent=2, default=str))
    log.info("wrote %s", path)
    return path
