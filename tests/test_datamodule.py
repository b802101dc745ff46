"""Batches from the datamodule: shapes, prompts derived after augmentation, evaluation at full size."""

import torch
from conftest import compose_train

from prato_exp.cli.common import build_datamodule
from prato_exp.data.prompts import tight_box


def _datamodule(*overrides: str):
    cfg = compose_train(["model.img_size=64", "datamodule.batch_size=4", *overrides])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm


def test_train_batch_carries_boxes_in_input_pixels():
    batch = next(iter(_datamodule().train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64)
    assert batch["label"].shape == (4, 64, 64)
    assert batch["box_xyxy"].shape == (4, 4)
    assert batch["box_xyxy"].dtype == torch.float32


def test_train_box_is_the_tight_box_of_the_augmented_mask():
    batch = next(iter(_datamodule().train_dataloader()))
    for label, box, empty in zip(batch["label"], batch["box_xyxy"], batch["empty_prompt"], strict=True):
        expected = tight_box(label.numpy())
        if empty:
            assert expected is None and box.tolist() == [0, 0, 64, 64]
        else:
            assert box.tolist() == expected.tolist()


def test_eval_batch_keeps_original_resolution_masks():
    dm = _datamodule("dataset.size=96")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[-2:] == (64, 64)
    assert all(t.shape == (96, 96) for t in batch["label_orig"])


def test_eval_prompts_are_identical_across_runs():
    first = next(iter(_datamodule("prompt=misleading").val_dataloader()))["box_xyxy"]
    second = next(iter(_datamodule("prompt=misleading").val_dataloader()))["box_xyxy"]
    assert torch.equal(first, second)


def test_split_ids_are_written(tmp_path):
    path = _datamodule().write_split_ids(tmp_path)
    assert path.exists() and "val" in path.read_text()


def test_cached_training_slices_equal_fresh_reads():
    cached = _datamodule("datamodule.cache_train_slices=true")
    fresh = _datamodule("datamodule.cache_train_slices=false")
    for _ in range(2):
        a, b = cached.train_set[(3, 11)], fresh.train_set[(3, 11)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["box_xyxy"], b["box_xyxy"])


def test_cached_training_slices_are_decoded_at_setup_and_never_read_again():
    dm = _datamodule("datamodule.cache_train_slices=true")
    reads = []
    dm.train_set.source.load_slice = lambda ref: reads.append(ref)
    for index in range(len(dm.train_set)):
        dm.train_set[(index, 0)]
    assert reads == []


def test_changing_a_served_sample_leaves_the_cache_untouched():
    dm = _datamodule("datamodule.cache_train_slices=true")
    first = dm.train_set[(0, 1)]
    first["image"].add_(100.0)
    expected = _datamodule("datamodule.cache_train_slices=false").train_set[(0, 1)]["image"]
    assert torch.equal(dm.train_set[(0, 1)]["image"], expected)


def test_joint_augment_flips_image_and_mask_together_as_plain_tensors():
    from monai.data import get_track_meta
    from monai.transforms import RandFlipd

    from prato_exp.data.transforms import JointAugment

    image = torch.arange(12.0).view(1, 3, 4)
    label = (torch.arange(12) % 3).view(3, 4)
    augment = JointAugment([RandFlipd(keys=["image", "label"], prob=1.0, spatial_axis=1)])
    out_image, out_label = augment(image, label, seed=0)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_label, label.flip(-1))
    assert type(out_image) is torch.Tensor and type(out_label) is torch.Tensor
    assert out_label.dtype == torch.int64
    assert get_track_meta()
