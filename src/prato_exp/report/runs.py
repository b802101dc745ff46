"""Run folders as the report sees them: discovery, the two ``metrics.json`` shapes, one record per run.

A run folder holds ``config.yaml`` and ``metrics.json``. A training run's metrics hold ``val`` / ``test``
(flat dicts keyed ``<split>/...``), ``per_case`` (``{split: [rows]}``), ``seed`` and ``choices``; an
eval-only run (``eval.py``) holds ``split``, ``prompt_condition``, ``metrics`` (one flat dict) and
``per_case`` (one list). Both carry ``efficiency``, ``environment`` and the ``report`` block that places
the run in a table::

    "report": {"table": "table4_pruners", "row": "PrATo (ours)", "reference_row": "PrATo (ours)",
               "split": "val", "checkpoint": "best", "scale": "cpu", "prompt": "tight"}

:func:`load_run` turns either shape into one :class:`RunRecord` whose metric keys have the split prefix
removed (``case/dsc_mean``, ``sparsity``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prato_exp.report.samples import SAMPLES_FILENAME

RESCORE_DIR = Path(__file__).resolve().parents[1] / "conf" / "rescore"
"""The eval presets that rescore a table's checkpoints (``python eval.py -m rescore=<name> ckpt=...``)."""

REPORT_KEYS = ("table", "row", "reference_row", "split", "checkpoint", "scale", "prompt")

DATASET_OF_SOURCE = {
    "ACDCSource": "acdc",
    "ISICSource": "isic",
    "SyntheticCardiacSource": "synthetic_cardiac",
    "SyntheticLesionSource": "synthetic_lesion",
}
"""Dataset config name of each source class, for runs whose ``metrics.json`` has no ``choices``."""


class ReportError(ValueError):
    """A run folder the report cannot use, with the folder named in the message."""


@dataclass
class RunRecord:
    """One run, normalised for the report.

    Attributes:
        path: the run folder.
        kind: ``train`` or ``eval``.
        table, row, reference_row, split, checkpoint, scale, prompt: from ``metrics.json``'s ``report``.
        dataset: the dataset config name (``acdc``, ``isic``, ``synthetic_cardiac``, ...).
        seed: the training seed of the weights.
        metrics: the flat metrics of ``split`` with the ``<split>/`` prefix removed.
        per_case: the per-case rows of ``split``.
        efficiency: the ``efficiency`` block (may be empty).
        commit: ``environment.commit`` or None.
        model, pruner: the model config name and the pruner's class name (from ``config.yaml``).
        prune_points: the model's ``prune_*`` settings, as text (``prune_after=[3]``), or ``""``.
        experiment: the table preset the run came from, or None: a training run's ``experiment`` choice,
            an eval run's ``rescore`` choice (eval runs from before it was recorded: the ``rescore`` preset
            named after the run's table, where one exists).
        budget: the training budget as text (epochs, samples seen, batch, lr, input size), or ``""``.
        machine: the machine the run trained on (platform, torch, threads, GPU), or ``""``.
        decoder_window: the model's ``decoder_window`` margin (its decoder ran only around the box), or
            None (dense decoder).
        window_per_image: True when, in evaluation, each image decoded its own window
            (``decoder_window_batch: by_size``) rather than the batch's largest.
        prompted: True when the run's network reads the box prompt: ``report.prompted`` where given, else
            a PrATo pruner or a truthy model key naming a box (``box_channel: true``).
        samples: the run's figure samples file, or None.
        shared_from: for a run placed in a table other than its own (a row that is the same
            configuration there, ``shared_rows.yaml``), its own table and row; None otherwise.
    """

    path: Path
    kind: str
    table: str
    row: str
    reference_row: str | None
    split: str
    checkpoint: str | None
    scale: str | None
    prompt: str | None
    dataset: str
    seed: int | None
    metrics: dict[str, Any]
    per_case: list[dict[str, Any]]
    efficiency: dict[str, Any] = field(default_factory=dict)
    commit: str | None = None
    model: str = ""
    pruner: str = ""
    prune_points: str = ""
    experiment: str | None = None
    budget: str = ""
    machine: str = ""
    decoder_window: int | None = None
    window_per_image: bool = False
    prompted: bool = False
    samples: Path | None = None
    shared_from: str | None = None

    @property
    def class_names(self) -> list[str]:
        """Foreground classes, in the order of the metrics (``case/dsc/<class>`` keys)."""
        return [k.split("/", 2)[2] for k in self.metrics if k.startswith("case/dsc/")]


def discover(paths: Sequence[Path]) -> list[Path]:
    """Every folder holding a ``metrics.json`` at or below ``paths``, sorted; a path with none is an error."""
    found: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise ReportError(f"{root}: no such file or folder")
        if root.is_file():
            if root.name != "metrics.json":
                raise ReportError(f"{root}: give run folders (or their metrics.json), not other files")
            runs = [root.parent]
        else:
            runs = [p.parent for p in root.rglob("metrics.json")]
        if not runs:
            raise ReportError(f"{root}: no run folder (no metrics.json) at or below it")
        found.update(runs)
    return sorted(found)


def _strip(flat: dict[str, Any] | None, split: str) -> dict[str, Any]:
    prefix = f"{split}/"
    return {k.removeprefix(prefix): v for k, v in (flat or {}).items() if k.startswith(prefix)}


def _dataset_name(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    report = metrics.get("report") or {}
    if report.get("dataset"):
        return str(report["dataset"])
    choice = (metrics.get("choices") or {}).get("dataset")
    if choice:
        return str(choice)
    target = str((config.get("dataset") or {}).get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    return DATASET_OF_SOURCE.get(cls, cls.lower() or "unknown")


def _name_of(group: dict[str, Any] | None) -> str:
    target = str((group or {}).get("_target_", ""))
    return target.rsplit(".", 1)[-1]


def load_run(run_dir: Path) -> RunRecord:
    """Read one run folder; a folder without a ``report`` block (or with an unknown shape) is an error."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{run_dir}: cannot read metrics.json ({err})") from err
    report = metrics.get("report")
    if not isinstance(report, dict) or not report.get("table") or not report.get("row"):
        raise ReportError(
            f"{run_dir}: metrics.json has no 'report' block naming its table and row (a run from before "
            "the table presets, or a run outside every table); rerun it with a table preset or leave it out"
        )
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    config = config or {}

    if "metrics" in metrics and "split" in metrics:  # eval.py
        kind = "eval"
        split = str(report.get("split") or metrics["split"])
        flat = _strip(metrics["metrics"], split)
        per_case = list(metrics.get("per_case") or [])
        seed = metrics.get("seed", config.get("seed"))
        prompt = report.get("prompt") or metrics.get("prompt_condition")
    elif "val" in metrics:  # train.py
        kind = "train"
        split = str(report.get("split") or ("test" if metrics.get("test") else "val"))
        if not metrics.get(split):
            raise ReportError(
                f"{run_dir}: report.split is {split!r} but metrics.json has no {split!r} figures"
            )
        flat = _strip(metrics[split], split)
        per_case = list((metrics.get("per_case") or {}).get(split) or [])
        seed = metrics.get("seed", config.get("seed"))
        prompt = report.get("prompt") or (config.get("prompt") or {}).get("condition")
    else:
        raise ReportError(f"{run_dir}: metrics.json is neither a training run's nor an eval run's")

    model_cfg = config.get("model") or {}
    pruner = _name_of(config.get("pruning"))
    pruned = pruner not in ("", "NoPruner")
    margin = model_cfg.get("decoder_window")
    window = int(margin) if pruned and margin is not None else None  # the window runs only while pruning
    prune_points = " ".join(
        f"{k}={v}" for k, v in sorted(model_cfg.items()) if k.startswith("prune_") and v is not None
    )
    uses_box = any("box" in str(k) and bool(v) for k, v in model_cfg.items() if not isinstance(v, dict))
    samples = run_dir / SAMPLES_FILENAME
    return RunRecord(
        path=run_dir,
        kind=kind,
        table=str(report["table"]),
        row=str(report["row"]),
        reference_row=report.get("reference_row"),
        split=split,
        checkpoint=report.get("checkpoint"),
        scale=report.get("scale"),
        prompt=prompt,
        dataset=_dataset_name(metrics, config),
        seed=None if seed is None else int(seed),
        metrics=flat,
        per_case=per_case,
        efficiency=metrics.get("efficiency") or {},
        commit=(metrics.get("environment") or {}).get("commit"),
        model=(metrics.get("choices") or {}).get("model") or _name_of(model_cfg),
        pruner=pruner,
        prune_points=prune_points if pruned else "",
        experiment=_preset(kind, str(report["table"]), metrics.get("choices") or {}),
        budget=_budget(config, metrics),
        machine=_machine(metrics.get("environment") or {}),
        decoder_window=window,
        window_per_image=window is not None and model_cfg.get("decoder_window_batch") == "by_size",
        prompted=bool(report["prompted"])
        if report.get("prompted") is not None
        else pruner.lower().startswith("prato") or uses_box or window is not None,
        samples=samples if samples.is_file() else None,
    )


def load_runs(
    paths: Sequence[Path], warn: Any = print, progress: bool = True
) -> tuple[list[RunRecord], list[str]]:
    """Load every run below ``paths``; returns the records and one problem line per folder left out.

    ``warn`` is called with each problem line as it is found.
    """
    folders = discover(paths)
    records, problems = [], []
    for folder in _progress(folders, progress):
        try:
            records.append(load_run(folder))
        except ReportError as err:
            problems.append(str(err))
            warn(f"WARNING: left out {err}")
    return records, problems


def _progress(items: list[Path], enabled: bool) -> Iterable[Path]:
    if not enabled or len(items) < 20:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="reading runs", unit="run")


def _preset(kind: str, table: str, choices: dict[str, Any]) -> str | None:
    """The ``experiment`` (training) or ``rescore`` (eval) preset a run came from, or None."""
    group = "experiment" if kind == "train" else "rescore"
    choice = choices.get(group)
    if choice not in (None, "None"):
        return str(choice)
    if kind == "eval" and (RESCORE_DIR / f"{table}.yaml").is_file():
        return table
    return None


def _budget(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """``15 epochs (19,680 training samples), batch 16, lr 0.0003, 128 px`` from a run's config."""
    trainer, data = config.get("trainer") or {}, config.get("datamodule") or {}
    lr = (config.get("optimizer") or {}).get("lr")
    size = (config.get("model") or {}).get("img_size")
    parts = []
    if trainer.get("max_epochs") is not None:
        seen = metrics.get("train_samples_seen")
        parts.append(f"{trainer['max_epochs']} epochs" + (f" ({seen:,} training samples)" if seen else ""))
    parts += [f"batch {data['batch_size']}"] if data.get("batch_size") is not None else []
    parts += [f"lr {lr:g}"] if isinstance(lr, int | float) else []
    parts += [f"{size} px"] if size is not None else []
    return ", ".join(parts)


def _machine(environment: dict[str, Any]) -> str:
    """``Linux-..., torch 2.x, 2 threads, CPU`` (or the GPU's name) from a run's ``environment``."""
    if not environment:
        return ""
    parts = [
        environment.get("machine"),
        f"torch {environment['torch']}" if environment.get("torch") else None,
    ]
    parts.append(f"{environment['threads']} threads" if environment.get("threads") else None)
    parts.append(environment.get("cuda") or "CPU")
    return ", ".join(str(p) for p in parts if p)
