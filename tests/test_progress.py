"""Progress output readable in files, and how experiment trackers file a run (name, group, job type, tags)."""

import io
from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import compose_train
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prato_exp.cli.common import run_labels
from prato_exp.lightning.media import spread_indices, validation_panel
from prato_exp.lightning.progress import LineProgressBar, progress_bar


class _Images(Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": torch.full((3,), float(index))}


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch["image"]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch["image"]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit_with(bar: LineProgressBar, capsys) -> str:
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    loader = DataLoader(_Images(), batch_size=2)
    trainer.fit(_Tiny(), train_dataloaders=loader, val_dataloaders=loader)
    return capsys.readouterr().out


def test_line_progress_prints_plain_lines_with_loss_throughput_and_eta(capsys):
    out = _fit_with(LineProgressBar(every_percent=50), capsys)
    steps = [line for line in out.splitlines() if " step " in line]
    assert "\r" not in out
    assert len(steps) == 4  # 10 batches per epoch, a line at 50 % and 100 %, two epochs
    assert steps[0].startswith("epoch 1/2  step 5/10 (50%)")
    assert "train/loss=" in steps[0] and "samples/s" in steps[0] and "epoch ETA" in steps[0]
    assert "run ETA" in steps[2]  # from the second epoch on, the run's remaining time is known


def test_line_progress_announces_validation_and_its_duration(capsys):
    out = _fit_with(LineProgressBar(every_percent=100), capsys)
    assert "validating (epoch 1) (10 batches) ..." in out
    assert out.count("validation done in") == 2


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_in_a_file():
    class _Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(stream=_Terminal()), TQDMProgressBar)
    assert isinstance(progress_bar(stream=io.StringIO()), LineProgressBar)


def test_table_runs_share_a_group_and_a_row_is_the_job_type():
    cfg = compose_train(["experiment=table4_pruners", "row=random", "seed=2"])
    labels = run_labels(cfg, Path("outputs/multirun/2026-12-01_10-00-00/3_unetr_small_acdc_random"), "train")
    assert labels["group"] == "table4_pruners-ACDCSource-cpu"  # without Hydra's choices: the class
    assert labels["job_type"] == cfg.report.row
    assert "seed:2" in labels["tags"] and "pruning:RandomPruner" in labels["tags"]


def test_run_names_differ_across_sweeps_with_the_same_job_folder():
    cfg = compose_train([])
    first = run_labels(cfg, Path("outputs/multirun/2026-12-01_10-00-00/0_unetr_small_acdc_none"), "train")
    second = run_labels(cfg, Path("outputs/multirun/2026-12-02_09-00-00/0_unetr_small_acdc_none"), "train")
    assert first["name"] != second["name"]
    assert run_labels(cfg, Path("outputs/runs/2026-12-01_x"), "train")["name"] == "2026-12-01_x"


def test_validation_slices_are_fixed_and_spread_over_the_set():
    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert spread_indices(2, 4) == [0, 1]
    assert spread_indices(0, 4) == []


def test_validation_panel_shows_kept_tokens_only_for_a_pruned_model():
    image = torch.rand(1, 32, 32).numpy()
    mask = torch.zeros(32, 32, dtype=torch.long).numpy()
    box = torch.tensor([4.0, 4.0, 20.0, 20.0]).numpy()
    unpruned = validation_panel(image, mask, mask, box, None)
    pruned = validation_panel(image, mask, mask, box, torch.rand(2, 2).numpy() > 0.5)
    assert pruned.width > unpruned.width and pruned.height == unpruned.height
