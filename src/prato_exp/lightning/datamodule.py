"""One LightningDataModule for every dataset: a source, a box prompter and augmentation.

Training yields augmented 2-D slices; validation and test yield every slice of every case of the
split, with the original-resolution mask kept so that metrics are computed after resizing the
prediction back. Every batch carries ``box_xyxy`` ``(B, 4)`` in input pixels.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from prato_exp.data.base import SegSource, SliceRef, check_finite
from prato_exp.data.prompts import BoxPrompter, sanitize_boxes
from prato_exp.data.transforms import JointAugment, resize_pair

log = logging.getLogger(__name__)


def _prompt_fields(prompter: BoxPrompter, label: Tensor, image_id: str, slice_index: int, rng) -> dict:
    box, is_empty = prompter(label.numpy(), image_id, slice_index, train_rng=rng)
    box = sanitize_boxes(
        box[None], tuple(label.shape[-2:]), [f"{image_id} slice {slice_index}"], check_normalised=False
    )[0]
    return {
        "box_xyxy": box,
        "empty_prompt": torch.tensor(bool(is_empty)),
        "prune_enabled": torch.tensor(not (is_empty and prompter.skip_pruning_on_empty)),
    }


class TrainSlices(Dataset):
    """Augmented 2-D training slices with their box prompts.

    With ``cache`` every slice is read, checked and resized once and kept in memory (each loader worker
    holds its own copy), so later epochs only augment: at 128 px the 1,312 ACDC training slices take
    86 MB. The cached copy is the same tensor a fresh read gives, so results do not depend on it.
    """

    def __init__(
        self,
        source: SegSource,
        input_size: int,
        prompter: BoxPrompter,
        augment: JointAugment,
        cache: bool = True,
    ):
        self.source = source
        self.refs: list[SliceRef] = source.train_slices()
        self.input_size = input_size
        self.prompter = prompter
        self.augment = augment
        self.cache = cache
        self._resized: dict[int, tuple[Tensor, Tensor]] = {}

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``(C, S, S)`` float32 and label ``(S, S)`` int64 of slice ``index``, resized."""
        if index in self._resized:
            image, label = self._resized[index]
            return image.clone(), label.clone()
        ref = self.refs[index]
        image, label = self.source.load_slice(ref)
        check_finite(image, f"{self.source.name} case {ref.case_id} slice {ref.slice_index}")
        image, label = resize_pair(image, label, self.input_size)
        if self.cache:
            self._resized[index] = (image.clone(), label.clone())
        return image, label

    def __len__(self) -> int:
        return len(self.refs)

    def preload(self) -> float:
        """Decode and resize every slice into the cache now (before training, so that no epoch pays for
        it and throughput counts training alone); return the seconds it took."""
        started = time.perf_counter()
        for index in range(len(self.refs)):
            self._load(index)
        return time.perf_counter() - started

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """One augmented slice; ``item`` is an index, or ``(index, seed)`` from :class:`EpochSampler`
        (the augmentation and box jitter then depend on that seed alone)."""
        index, seed = item if isinstance(item, tuple) else (item, int(torch.randint(0, 2**31 - 1, ())))
        ref = self.refs[index]
        image, label = self.augment(*self._load(index), seed)
        rng = np.random.default_rng(seed)
        sample = {"image": image, "label": label, "case_id": ref.case_id, "slice_index": ref.slice_index}
        sample.update(_prompt_fields(self.prompter, label, ref.case_id, ref.slice_index, rng))
        return sample


class EpochSampler(Sampler):
    """Training order and per-sample augmentation seeds as a pure function of ``(seed, epoch)``.

    Yields ``(index, sample_seed)``: a permutation of ``range(num_items)`` and one seed per position,
    drawn when iteration starts for the epoch that ``epoch_fn`` reports (the trainer's current epoch).
    So a run resumed from a checkpoint sees exactly the order and augmentations of the unbroken run,
    whatever consumed the global random streams before, with or without loader workers.
    """

    def __init__(self, num_items: int, seed: int, epoch_fn: Callable[[], int]) -> None:
        self.num_items = num_items
        self.seed = int(seed)
        self.epoch_fn = epoch_fn

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, int(self.epoch_fn())])
        order = rng.permutation(self.num_items)
        seeds = rng.integers(0, 2**31 - 1, size=self.num_items)
        yield from zip(order.tolist(), seeds.tolist(), strict=True)


class EvalSlices(Dataset):
    """Every slice of every case of an evaluation split, resized, with the original mask kept."""

    def __init__(self, source: SegSource, case_ids: list[str], input_size: int, prompter: BoxPrompter):
        self.source = source
        self.input_size = input_size
        self.prompter = prompter
        self.cases = {case_id: source.load_case(case_id) for case_id in case_ids}
        for case_id, case in self.cases.items():
            check_finite(case.image, f"{source.name} case {case_id}")
        self.index = [(cid, z) for cid, case in self.cases.items() for z in range(case.num_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id, z = self.index[index]
        case = self.cases[case_id]
        image, label = resize_pair(case.image[:, z], case.label[z], self.input_size)
        sample = {
            "image": image,
            "label": label,
            "label_orig": torch.as_tensor(case.label[z], dtype=torch.int64),
            "spacing_hw": case.spacing_hw,
            "case_id": case_id,
            "slice_index": z,
        }
        sample.update(_prompt_fields(self.prompter, label, case_id, z, None))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep per-sample lists for ids, spacings and original masks."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key != "label_orig" and isinstance(values[0], Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class SegDataModule(pl.LightningDataModule):
    """Loaders for one dataset source.

    Args:
        source: the dataset (layout and splits).
        prompter: derives the box prompt of each slice (training jitter, evaluation condition).
        augment: joint image/mask augmentation for training (an empty list for none).
        input_size: square network input side in pixels.
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        num_workers: loader worker processes (0 loads in the main process).
        seed: the run seed; training order and augmentation follow ``(seed, epoch)``.
        cache_train_slices: decode and resize every training slice once, at setup, and keep it in memory.
    """

    def __init__(
        self,
        source: SegSource,
        prompter: BoxPrompter,
        augment: list | None = None,
        input_size: int = 224,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        cache_train_slices: bool = True,
    ) -> None:
        super().__init__()
        self.cache_train_slices = cache_train_slices
        self.source = source
        self.prompter = prompter
        self.augment = JointAugment(augment)
        self.input_size = input_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._splits = source.split_ids()
        self._eval: dict[str, EvalSlices] = {}
        self.train_set: TrainSlices | None = None

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    @property
    def has_test(self) -> bool:
        return bool(self._splits.get("test"))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = TrainSlices(
                self.source, self.input_size, self.prompter, self.augment, self.cache_train_slices
            )
            log.info("%s; %d training slices", self.source.describe(), len(self.train_set))
            if self.cache_train_slices:
                log.info("decoding the training slices into memory ...")
                log.info("decoded in %.1f s", self.train_set.preload())

    def eval_set(self, split: str) -> EvalSlices:
        """The evaluation dataset of ``split`` (``val`` or ``test``), loaded once."""
        if split not in self._eval:
            ids = self._splits.get(split) or []
            if not ids:
                raise ValueError(f"{self.source.name} has no '{split}' split here")
            self._eval[split] = EvalSlices(self.source, ids, self.input_size, self.prompter)
        return self._eval[split]

    def write_split_ids(self, folder: str | Path) -> Path:
        """Write the case ids of every split to ``folder/splits.json`` (the run's record)."""
        path = Path(folder) / "splits.json"
        path.write_text(json.dumps(self._splits, indent=1))
        return path

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(len(dataset), self.seed, self._current_epoch) if shuffle else None,
            # its own stream for the loader's base seed, so creating an iterator leaves the global one alone
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("test"), self.eval_batch_size, shuffle=False)
