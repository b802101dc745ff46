"""ISIC loader: ISIC 2017 and 2018 folder layouts written here, their error cases, and the real 2017 copy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prato_exp.data.base import DataContentError, DataLayoutError, SliceRef
from prato_exp.data.isic import ISICSource

ISIC_ROOT = Path(
    os.environ.get("PRATO_ISIC_ROOT", Path(__file__).resolve().parents[2] / "shared/data/isic2017")
)
FOLDERS = {
    2017: ("ISIC-2017_{}_Data", "ISIC-2017_{}_Part1_GroundTruth"),
    2018: ("ISIC2018_Task1-2_{}_Input", "ISIC2018_Task1_{}_GroundTruth"),
}


def _write_split(
    root: Path, year: int, split: str, first: int, count: int, size: tuple[int, int] = (24, 16)
) -> None:
    """``count`` images ``ISIC_<first>..`` with 0/255 masks (a lesion in the left half) and decoy files."""
    image_dir = root / FOLDERS[year][0].format(split)
    mask_dir = root / FOLDERS[year][1].format(split)
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    w, h = size
    for i in range(first, first + count):
        stem = f"ISIC_{i:07d}"
        rgb = np.zeros((h, w, 3), dtype=np.uint8)
        rgb[:, : w // 2] = (60, 40, 30)
        rgb[:, w // 2 :] = (230, 180, 160)
        Image.fromarray(rgb).save(image_dir / f"{stem}.jpg", quality=95)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask).save(mask_dir / f"{stem}_segmentation.png")
        Image.fromarray(np.full((h, w, 3), 7, dtype=np.uint8)).save(image_dir / f"{stem}_superpixels.png")
    (image_dir / f"{FOLDERS[year][0].format(split)}_metadata.csv").write_text("image_id,age\n")
    (mask_dir / "LICENSE.txt").write_text("CC-BY-NC\n")


def test_2017_training_only_is_split_by_seed(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 20)
    (tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("image_id,melanoma\n")
    source = ISICSource(tmp_path, split_seed=1)
    ids = source.split_ids()
    assert source.year == 2017 and source.has_test_split
    assert [len(ids[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert set(ids["train"]) | set(ids["val"]) | set(ids["test"]) == {f"ISIC_{i:07d}" for i in range(20)}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    assert ISICSource(tmp_path, split_seed=1).split_ids() == ids
    assert any(ISICSource(tmp_path, split_seed=s).split_ids()["val"] != ids["val"] for s in range(2, 6))
    assert source.train_slices() == [SliceRef(i, 0) for i in ids["train"]]


def test_arrays_shapes_and_values(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 10)
    source = ISICSource(tmp_path)
    image, label = source.load_slice(SliceRef("ISIC_0000003", 0))
    assert image.shape == (3, 16, 24) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert label.shape == (16, 24) and label.dtype == np.int64
    assert label[:, :12].all() and not label[:, 12:].any()
    assert image[:, :, :12].mean() < image[:, :, 12:].mean()
    case = source.load_case("ISIC_0000003")
    assert case.image.shape == (3, 1, 16, 24) and case.label.shape == (1, 16, 24) and case.spacing_hw is None
    assert (source.num_classes, source.in_channels, source.class_names) == (2, 3, ("lesion",))
    with pytest.raises(KeyError):
        source.load_case("ISIC_0099999")


def test_2018_official_validation_folder_is_used(tmp_path: Path) -> None:
    _write_split(tmp_path, 2018, "Training", 0, 20)
    _write_split(tmp_path, 2018, "Validation", 100, 3)
    ids = ISICSource(tmp_path).split_ids()
    assert ids["val"] == [f"ISIC_{i:07d}" for i in range(100, 103)]
    assert [len(ids["train"]), len(ids["test"])] == [18, 2]


def test_2017_official_validation_and_test(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 8)
    _write_split(tmp_path, 2017, "Validation", 100, 2)
    _write_split(tmp_path, 2017, "Test_v2", 200, 3)
    ids = ISICSource(tmp_path).split_ids()
    assert len(ids["train"]) == 8
    assert ids["val"] == ["ISIC_0000100", "ISIC_0000101"]
    assert ids["test"] == ["ISIC_0000200", "ISIC_0000201", "ISIC_0000202"]


def test_large_images_are_downscaled(tmp_path: Path) -> None:
    _write_split(tmp_path, 2018, "Training", 0, 3, size=(300, 200))
    for cache in (True, False):
        image, label = ISICSource(tmp_path, max_side=120, cache=cache).load_slice(SliceRef("ISIC_0000001", 0))
        assert image.shape == (3, 80, 120) and label.shape == (80, 120)
        assert set(np.unique(label).tolist()) == {0, 1}
        assert label[:, :58].all() and not label[:, 62:].any()


def test_zero_one_masks_are_accepted(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 3)
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[4:8, 4:8] = 1
    Image.fromarray(mask).save(
        tmp_path / "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000001_segmentation.png"
    )
    _, label = ISICSource(tmp_path).load_slice(SliceRef("ISIC_0000001", 0))
    assert label.sum() == 16 and label[4:8, 4:8].all()


def test_image_without_mask_names_the_file(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 4)
    (tmp_path / "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(DataContentError, match=r"ISIC_0000002\.jpg"):
        ISICSource(tmp_path)


def test_non_binary_mask_names_the_file(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 4)
    mask = np.full((16, 24), 128, dtype=np.uint8)
    mask[:, :5] = 255
    Image.fromarray(mask).save(
        tmp_path / "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000001_segmentation.png"
    )
    source = ISICSource(tmp_path)
    with pytest.raises(DataContentError, match=r"ISIC_0000001_segmentation\.png"):
        source.load_slice(SliceRef("ISIC_0000001", 0))


def test_mixed_years_are_refused(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 4)
    _write_split(tmp_path, 2018, "Test", 0, 2)
    with pytest.raises(DataLayoutError, match="leakage"):
        ISICSource(tmp_path)


@pytest.mark.parametrize(("year", "split"), [(2017, "Test"), (2018, "Test_v2"), (2017, "Holdout")])
def test_unknown_split_folder_is_refused(tmp_path: Path, year: int, split: str) -> None:
    _write_split(tmp_path, year, "Training", 0, 4)
    _write_split(tmp_path, year, split, 100, 2)
    with pytest.raises(DataLayoutError, match=FOLDERS[year][0].format(split)):
        ISICSource(tmp_path)


def test_missing_ground_truth_folder_is_refused(tmp_path: Path) -> None:
    _write_split(tmp_path, 2017, "Training", 0, 4)
    (tmp_path / "ISIC-2017_Validation_Data").mkdir()
    with pytest.raises(DataLayoutError, match="ISIC-2017_Validation_Data"):
        ISICSource(tmp_path)


def test_missing_or_unknown_root_names_both_layouts(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataLayoutError, match=r"ISIC-2017_<Split>_Data.*ISIC2018_Task1-2_<Split>_Input"):
            ISICSource(root)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataLayoutError, match=r"ISIC-2017_<Split>_Data.*ISIC2018_Task1-2_<Split>_Input"):
        ISICSource(tmp_path)


def test_real_isic2017() -> None:
    if not (ISIC_ROOT / "ISIC-2017_Training_Data").is_dir():
        pytest.skip(f"ISIC 2017 data not found at {ISIC_ROOT}: set PRATO_ISIC_ROOT to the ISIC folder")
    source = ISICSource(ISIC_ROOT)
    ids = source.split_ids()
    assert source.year == 2017
    assert sum(len(v) for v in ids.values()) == 2000
    assert [len(ids[s]) for s in ("train", "val", "test")] == [1600, 200, 200]
    assert not set(ids["train"]) & (set(ids["val"]) | set(ids["test"]))
    image, label = source.load_slice(source.train_slices()[0])
    assert image.shape == (3, 256, 256) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    assert label.shape == (256, 256) and set(np.unique(label).tolist()) <= {0, 1} and label.any()
