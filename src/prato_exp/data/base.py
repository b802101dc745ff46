"""What every dataset source provides: 2-D training slices and whole evaluation cases.

A *source* knows a dataset's layout on disk (or how to generate it) and its patient/image-level
splits. It returns raw arrays at their original resolution; resizing, augmentation and prompts are
applied later by the datamodule, so every source behaves the same downstream.

A *case* is the unit that is scored: an ACDC volume (``D`` slices) or one 2-D image (``D = 1``).
Training always draws single 2-D slices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class DataLayoutError(FileNotFoundError):
    """A data folder is missing, empty, or not in a layout this loader knows."""


class DataContentError(ValueError):
    """A file was found but its content is unusable (unreadable, unexpected labels, missing mask)."""


@dataclass(frozen=True)
class SliceRef:
    """Address of one 2-D training slice: ``case_id`` and the slice index inside that case."""

    case_id: str
    slice_index: int


@dataclass
class Case:
    """One scored unit at its original resolution.

    Attributes:
        case_id: stable identifier (patient+frame for ACDC, image id for ISIC).
        image: ``(C, D, H, W)`` float32, intensities scaled to [0, 1].
        label: ``(D, H, W)`` int64 class indices.
        spacing_hw: in-plane pixel spacing in mm, or None where the data has none (distances in pixels).
        slice_spacing: distance between slices in mm, or None where the data has none.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing_hw: tuple[float, float] | None = None
    slice_spacing: float | None = None

    @property
    def spacing_dhw(self) -> tuple[float, float, float] | None:
        """Voxel spacing ``(z, y, x)`` in mm when both the in-plane and the slice spacing are known."""
        if self.spacing_hw is None or self.slice_spacing is None:
            return None
        return (self.slice_spacing, *self.spacing_hw)

    @property
    def num_slices(self) -> int:
        return int(self.label.shape[0])


class SegSource(ABC):
    """A dataset on disk (or generated) with fixed, seed-determined splits.

    Subclasses set ``num_classes`` (background included), ``in_channels`` and ``class_names``
    (foreground classes only, in label order 1..num_classes-1).
    """

    name: str = "source"
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]

    @abstractmethod
    def split_ids(self) -> dict[str, list[str]]:
        """Case ids of each split (``train``, ``val``, ``test``), disjoint by patient or image."""

    @abstractmethod
    def train_slices(self) -> list[SliceRef]:
        """Every 2-D slice that training draws from."""

    @abstractmethod
    def load_slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        """One training slice: image ``(C, H, W)`` float32 in [0, 1] and label ``(H, W)`` int64."""

    @abstractmethod
    def load_case(self, case_id: str) -> Case:
        """A whole evaluation case at its original resolution."""

    def describe(self) -> str:
        """A one-line summary for logs: name and split sizes."""
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.split_ids().items())
        return f"{self.name}: {sizes}"


def check_finite(image: np.ndarray, where: str) -> np.ndarray:
    """Return ``image`` unchanged, or raise a DataContentError naming ``where`` and the first bad slice.

    ``image`` is ``(H, W)``, ``(C, H, W)``, ``(D, H, W)`` or ``(C, D, H, W)``; for 3-D and 4-D arrays the
    axis before ``(H, W)`` is taken as the slice axis. NaN or inf in an image would otherwise make every
    loss NaN from the first step and every metric 0, silently.
    """
    finite = np.isfinite(image)
    if finite.all():
        return image
    bad = int((~finite).sum())
    detail = f"{bad} NaN/inf value(s)"
    if image.ndim >= 3:
        per_slice = (~finite).reshape(-1, *image.shape[-3:]).any(axis=(0, 2, 3))
        detail += f", first in slice {int(np.flatnonzero(per_slice)[0])}"
    raise DataContentError(f"{where}: image has {detail}; fix or remove the file.")


def require_dir(root: str | Path, expected: str) -> Path:
    """Return ``root`` as a Path, or raise a DataLayoutError saying which layout was expected there."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataLayoutError(f"Data folder {path} does not exist. Expected {expected}.")
    if not any(path.iterdir()):
        raise DataLayoutError(f"Data folder {path} is empty. Expected {expected}.")
    return path
