"""ISIC skin-lesion segmentation (ISIC 2017 Part 1 or ISIC 2018 Task 1) in the official folder layout.

ISIC 2017: ``ISIC-2017_<Split>_Data/ISIC_XXXXXXX.jpg`` with
``ISIC-2017_<Split>_Part1_GroundTruth/ISIC_XXXXXXX_segmentation.png``, splits ``Training``, ``Validation``,
``Test_v2``. ISIC 2018: ``ISIC2018_Task1-2_<Split>_Input/`` with ``ISIC2018_Task1_<Split>_GroundTruth/``,
splits ``Training``, ``Validation``, ``Test``. Other files (superpixels, CSV, text) and the folders of the
other tasks (2017 Part 2/3, 2018 Task 2/3) are ignored. The two years share most images, so a root that
holds both is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from prato_exp.data.base import Case, DataContentError, DataLayoutError, SegSource, SliceRef, require_dir

LAYOUT_2017 = "ISIC 2017 (ISIC-2017_<Split>_Data/ with ISIC-2017_<Split>_Part1_GroundTruth/)"
LAYOUT_2018 = "ISIC 2018 Task 1 (ISIC2018_Task1-2_<Split>_Input/ with ISIC2018_Task1_<Split>_GroundTruth/)"
EXPECTED = f"the official folders of {LAYOUT_2017} or of {LAYOUT_2018}"

KNOWN_SPLITS = {2017: ("Training", "Validation", "Test_v2"), 2018: ("Training", "Validation", "Test")}
_OFFICIAL_TO_SPLIT = {"Training": "train", "Validation": "val", "Test_v2": "test", "Test": "test"}

# (year, regex over a folder name, role): role "image"/"mask" folders are read, None ones are other tasks.
_FOLDERS = (
    (2017, re.compile(r"ISIC-2017_(?P<split>.+?)_Data"), "image"),
    (2017, re.compile(r"ISIC-2017_(?P<split>.+?)_Part1_GroundTruth"), "mask"),
    (2017, re.compile(r"ISIC-2017_(?P<split>.+?)_Part[23]_GroundTruth"), None),
    (2018, re.compile(r"ISIC2018_Task1-2_(?P<split>.+?)_Input"), "image"),
    (2018, re.compile(r"ISIC2018_Task1_(?P<split>.+?)_GroundTruth"), "mask"),
    (2018, re.compile(r"ISIC2018_Task3_(?P<split>.+?)_Input"), None),
    (2018, re.compile(r"ISIC2018_Task[23]_(?P<split>.+?)_GroundTruth"), None),
)
_IMAGE_FILE = re.compile(r"(ISIC_\d+)\.(jpe?g|png)", re.IGNORECASE)
_MASK_FILE = re.compile(r"(ISIC_\d+)_segmentation\.png", re.IGNORECASE)


def _scan_folders(root: Path) -> tuple[int, dict[str, tuple[Path, Path]]]:
    """The year of the layout under ``root`` and ``{official split: (image folder, mask folder)}``."""
    found: dict[int, dict[str, dict[str, Path]]] = {2017: {}, 2018: {}}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        if not (name.startswith("ISIC-2017_") or name.startswith("ISIC2018_")):
            continue
        for year, pattern, role in _FOLDERS:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if match.group("split") not in KNOWN_SPLITS[year]:
                raise DataLayoutError(
                    f"{folder}: unknown split {match.group('split')!r}; ISIC {year} splits are "
                    f"{', '.join(KNOWN_SPLITS[year])}."
                )
            if role is not None:
                found[year].setdefault(match.group("split"), {})[role] = folder
            break
        else:
            raise DataLayoutError(f"{folder}: not a folder of {EXPECTED}.")
    if found[2017] and found[2018]:
        raise DataLayoutError(
            f"{root} mixes the ISIC 2017 and ISIC 2018 layouts; they share most images, so mixing them leaks "
            "test images into training (leakage). Keep one year per root."
        )
    year = 2017 if found[2017] else 2018
    if not found[year]:
        raise DataLayoutError(f"{root} holds no ISIC image or mask folder. Expected {EXPECTED}.")
    splits: dict[str, tuple[Path, Path]] = {}
    for split, roles in found[year].items():
        for role in ("image", "mask"):
            if role not in roles:
                other = roles["mask" if role == "image" else "image"]
                raise DataLayoutError(
                    f"{other} has no matching {role} folder for split {split!r}. Expected "
                    f"{LAYOUT_2017 if year == 2017 else LAYOUT_2018}."
                )
        splits[split] = (roles["image"], roles["mask"])
    if "Training" not in splits:
        raise DataLayoutError(f"{root} has no Training split. Expected {EXPECTED}.")
    return year, splits


def _pair_files(image_dir: Path, mask_dir: Path) -> dict[str, tuple[Path, Path]]:
    """``{image id: (image file, mask file)}``; every image needs its mask and every mask its image."""
    images: dict[str, Path] = {}
    for path in image_dir.iterdir():
        match = _IMAGE_FILE.fullmatch(path.name)
        if match is not None and path.is_file():
            if match.group(1) in images:
                raise DataContentError(
                    f"{path}: second image for {match.group(1)} ({images[match.group(1)]})."
                )
            images[match.group(1)] = path
    masks: dict[str, Path] = {}
    for path in mask_dir.iterdir():
        match = _MASK_FILE.fullmatch(path.name)
        if match is not None and path.is_file():
            masks[match.group(1)] = path
    if not images:
        raise DataContentError(f"{image_dir} holds no ISIC_XXXXXXX.jpg images.")
    for image_id, path in sorted(images.items()):
        if image_id not in masks:
            raise DataContentError(
                f"{path}: image without its mask {mask_dir / (image_id + '_segmentation.png')}."
            )
    for image_id, path in sorted(masks.items()):
        if image_id not in images:
            raise DataContentError(f"{path}: mask without its image {image_id}.jpg in {image_dir}.")
    return {image_id: (images[image_id], masks[image_id]) for image_id in sorted(images)}


def _mask_values(mask: Image.Image, path: Path) -> np.ndarray:
    """Mask as ``(H, W)`` uint8 in {0, 1}: 0/255 masks are thresholded at 127, 0/1 masks kept."""
    if mask.mode == "P":
        mask = mask.convert("RGB")
    elif mask.mode == "LA":
        mask = mask.getchannel("L")
    array = np.asarray(mask)
    if array.ndim == 3:
        color = array[..., :3]
        if not (color == color[..., :1]).all():
            raise DataContentError(f"{path}: mask is not grayscale.")
        array = color[..., 0]
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.uint8:
        values = set(np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist())
    else:
        values = set(np.unique(array).tolist())
    if values <= {0, 1}:
        return array.astype(np.uint8)
    if values <= {0, 255}:
        return (array > 127).astype(np.uint8)
    shown = sorted(values)[:8]
    raise DataContentError(f"{path}: mask values {shown} are not binary (expected {{0, 255}} or {{0, 1}}).")


class ISICSource(SegSource):
    """ISIC 2017 Part 1 or ISIC 2018 Task 1 lesion segmentation from ``root``; every image is a case (D = 1).

    Args:
        root: folder holding the official ``ISIC-2017_*`` or ``ISIC2018_*`` folders.
        split_seed: seed of the image-level split of the Training folder.
        val_fraction: share of Training used for validation when there is no official Validation folder.
        test_fraction: share of Training used for testing when there is no official Test folder.
        max_side: images whose longer side exceeds this are downscaled on load (bilinear; masks nearest).
        cache: keep loaded images in memory (as uint8) after the first read.
    """

    name = "isic"
    num_classes = 2
    in_channels = 3
    class_names = ("lesion",)

    def __init__(
        self,
        root: str | Path,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_side: int = 512,
        cache: bool = True,
    ) -> None:
        for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {fraction}.")
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}.")
        self.root = require_dir(root, EXPECTED)
        self.split_seed = split_seed
        self.max_side = max_side
        self.cache = cache
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        self.year, folders = _scan_folders(self.root)
        self.official_splits = {_OFFICIAL_TO_SPLIT[name] for name in folders}
        self._files: dict[str, tuple[Path, Path]] = {}
        by_split: dict[str, list[str]] = {}
        for official, (image_dir, mask_dir) in folders.items():
            pairs = _pair_files(image_dir, mask_dir)
            for image_id, (path, _) in pairs.items():
                if image_id in self._files:
                    raise DataContentError(
                        f"{path}: {image_id} is also in {self._files[image_id][0].parent} "
                        "(leakage between splits)."
                    )
            self._files.update(pairs)
            by_split[_OFFICIAL_TO_SPLIT[official]] = sorted(pairs)

        training = by_split["train"]
        order = [training[i] for i in np.random.default_rng(split_seed).permutation(len(training))]
        n_val = 0 if "val" in by_split else round(val_fraction * len(training))
        n_test = 0 if "test" in by_split else round(test_fraction * len(training))
        if len(training) - n_val - n_test < 1:
            raise DataContentError(f"{folders['Training'][0]}: {len(training)} images are too few to split.")
        self._splits = {
            "train": sorted(order[n_val + n_test :]),
            "val": by_split.get("val", sorted(order[:n_val])),
            "test": by_split.get("test", sorted(order[n_val : n_val + n_test])),
        }

    @property
    def has_test_split(self) -> bool:
        return bool(self._splits["test"])

    def split_ids(self) -> dict[str, list[str]]:
        return {split: list(ids) for split, ids in self._splits.items()}

    def train_slices(self) -> list[SliceRef]:
        return [SliceRef(image_id, 0) for image_id in self._splits["train"]]

    def load_slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(3, H, W)`` float32 in [0, 1] and label ``(H, W)`` int64 in {0, 1}."""
        if ref.slice_index != 0:
            raise KeyError(f"ISIC images have one slice; got {ref}.")
        image, mask = self._read(ref.case_id)
        return image.transpose(2, 0, 1).astype(np.float32) / 255.0, mask.astype(np.int64)

    def load_case(self, case_id: str) -> Case:
        """Image ``(3, 1, H, W)``, label ``(1, H, W)``; no pixel spacing."""
        image, label = self.load_slice(SliceRef(case_id, 0))
        return Case(case_id=case_id, image=image[:, None], label=label[None])

    def _read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(H, W, 3)`` uint8 and mask ``(H, W)`` uint8 in {0, 1}, downscaled to ``max_side``."""
        if image_id in self._cache:
            return self._cache[image_id]
        if image_id not in self._files:
            raise KeyError(f"Unknown ISIC image id {image_id!r} under {self.root}.")
        image_path, mask_path = self._files[image_id]
        try:
            with Image.open(image_path) as img:
                size = img.size
                target = size
                if max(size) > self.max_side:
                    scale = self.max_side / max(size)
                    target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
                    img.draft("RGB", target)
                rgb = img.convert("RGB")
                if rgb.size != target:
                    rgb = rgb.resize(target, Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as err:
            raise DataContentError(f"{image_path}: unreadable image ({err}).") from err
        try:
            with Image.open(mask_path) as mask_img:
                if mask_img.size != size:
                    raise DataContentError(
                        f"{mask_path}: mask size {mask_img.size} differs from image {image_path} size {size}."
                    )
                mask = _mask_values(mask_img, mask_path)
        except (OSError, UnidentifiedImageError) as err:
            raise DataContentError(f"{mask_path}: unreadable mask ({err}).") from err
        if target != size:
            mask = np.asarray(Image.fromarray(mask).resize(target, Image.Resampling.NEAREST))
        arrays = (np.asarray(rgb, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8))
        if self.cache:
            self._cache[image_id] = arrays
        return arrays
