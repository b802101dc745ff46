"""PrATo's token scores ``s = sigmoid(r)`` at the first pruning point, at initialisation and trained.

A fixed threshold (Table II's tau) keeps the tokens with ``s > tau``, so what such a run keeps depends on
the scores' absolute level, which a percentile threshold never sees. For a finished run this prints the
quantiles of ``s`` over its validation tokens and the fraction of tokens above each of Table II's tau,
for the network freshly initialised with the run's seed and for its trained weights (``last.ckpt``),
plus the run's sparsity per epoch from its ``train.log``.

    python scripts/score_distribution.py outputs/multirun/<sweep>/<run> [--batches 2]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from prato_exp.cli.common import build_datamodule, check_run_config, git_commit
from prato_exp.lightning.checkpoint import load_checkpoint, load_net_weights

TAUS = (0.1, 0.2, 0.3, 0.5)
"""Table II's fixed thresholds."""
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SPARSITY_LINE = re.compile(r"epoch (\d+) val: .*sparsity ([\d.]+)")


@dataclass(frozen=True)
class ScoreSummary:
    """Quantiles of the scores (``QUANTILES``) and the fraction of tokens above each tau (``TAUS``)."""

    quantiles: tuple[float, ...]
    above: tuple[float, ...]


def summarise_scores(scores: Tensor) -> ScoreSummary:
    """Summarise ``(B, N)`` scores in ``[0, 1]`` over all their tokens."""
    flat = scores.float().flatten()
    if flat.numel() == 0:
        raise ValueError("no token to summarise")
    quantiles = torch.quantile(flat, torch.tensor(QUANTILES, dtype=flat.dtype))
    return ScoreSummary(
        tuple(round(q, 4) for q in quantiles.tolist()),
        tuple(round((flat > tau).float().mean().item(), 4) for tau in TAUS),
    )


@torch.no_grad()
def first_point_scores(net: nn.Module, batches: Iterable[dict[str, Tensor]]) -> Tensor:
    """``(B_total, N)`` scores the first pruning point gave every token of ``batches`` (eval mode)."""
    net.eval()
    scores = []
    for batch in batches:
        out = net(batch["image"], batch["box_xyxy"], batch["prune_enabled"])
        if not out.trace.results:
            raise ValueError("the network pruned nothing: no pruning point scored these tokens")
        scores.append(out.trace.results[0].scores.detach().float().cpu())
    return torch.cat(scores)


def epoch_sparsity(train_log: Path) -> list[tuple[int, float]]:
    """``(epoch, validation sparsity)`` pairs logged in a run's ``train.log``."""
    if not train_log.is_file():
        return []
    return [(int(m[1]), float(m[2])) for m in SPARSITY_LINE.finditer(train_log.read_text())]


def report(run: Path, batch_count: int = 1) -> str:
    """The Markdown summary of ``run``'s scores at initialisation and trained."""
    cfg = OmegaConf.load(run / "config.yaml")
    checkpoint = run / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: the run folder must hold its checkpoints/last.ckpt")
    pl.seed_everything(int(cfg.seed), verbose=False)
    net = check_run_config(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    batches = [b for _, b in zip(range(batch_count), datamodule.val_dataloader(), strict=False)]
    rows = {f"initialised (seed {cfg.seed})": summarise_scores(first_point_scores(net, batches))}
    load_net_weights(net, load_checkpoint(checkpoint), checkpoint)
    rows["trained (last.ckpt)"] = summarise_scores(first_point_scores(net, batches))
    slices = sum(b["image"].shape[0] for b in batches)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    described = metrics.get("report", {})
    lines = [
        f"## PrATo scores of {described.get('table', 'a run')} {described.get('row', '')}, seed {cfg.seed}",
        "",
        f"Scores s = sigmoid(r) at the first pruning point, on the first {slices} validation slices "
        "(box prompts: oracle boxes from the ground truth, as the run was validated with).",
        f"Command: `python scripts/score_distribution.py <run> --batches {batch_count}` at commit "
        f"{git_commit()}; the run `{run.name}` trained at commit "
        f"{metrics.get('environment', {}).get('commit', 'not recorded')}.",
        "",
        "| weights | "
        + " | ".join(f"q{int(q * 100)}" for q in QUANTILES)
        + " | "
        + " | ".join(f"s > {t}" for t in TAUS)
        + " |",
        "|---" * (1 + len(QUANTILES) + len(TAUS)) + "|",
    ]
    for name, summary in rows.items():
        cells = [f"{v:.4f}" for v in (*summary.quantiles, *summary.above)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sparsity = epoch_sparsity(run / "train.log")
    if sparsity:
        lines += [
            "",
            "Validation sparsity per epoch: "
            + ", ".join(f"{epoch}: {value:.3f}" for epoch, value in sparsity)
            + ".",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished training run folder (config.yaml, checkpoints/)")
    parser.add_argument("--batches", type=int, default=1, help="validation batches to score (default 1)")
    args = parser.parse_args(argv)
    print(report(args.run, args.batches))


if __name__ == "__main__":
    sys.exit(main())
