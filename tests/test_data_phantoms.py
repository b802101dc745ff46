"""Synthetic cardiac and lesion phantoms: determinism, shapes, labels, empty slices, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from prato_exp.data.base import SliceRef
from prato_exp.data.phantoms import SyntheticCardiacSource, SyntheticLesionSource

SOURCES = {"cardiac": SyntheticCardiacSource, "lesion": SyntheticLesionSource}


def _small(kind: str, **kwargs) -> SyntheticCardiacSource | SyntheticLesionSource:
    return SOURCES[kind](num_train=20, num_val=4, num_test=3, size=64, **kwargs)


@pytest.mark.parametrize("kind", SOURCES)
def test_same_seed_same_pixels_other_seed_differs(kind: str) -> None:
    a, b, c = _small(kind, seed=3), _small(kind, seed=3), _small(kind, seed=4)
    ref = a.train_slices()[5]
    image_a, label_a = a.load_slice(ref)
    image_b, label_b = b.load_slice(ref)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    assert not np.array_equal(image_a, c.load_slice(ref)[0])
    case_id = a.split_ids()["val"][1]
    np.testing.assert_array_equal(a.load_case(case_id).image, b.load_case(case_id).image)


@pytest.mark.parametrize("kind", SOURCES)
def test_shapes_dtypes_ranges_and_labels(kind: str) -> None:
    source = _small(kind)
    seen: set[int] = set()
    for ref in source.train_slices()[:12]:
        image, label = source.load_slice(ref)
        assert image.shape == (source.in_channels, 64, 64) and image.dtype == np.float32
        assert label.shape == (64, 64) and label.dtype == np.int64
        assert image.min() >= 0.0 and image.max() <= 1.0
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(source.num_classes))
    assert len(source.class_names) == source.num_classes - 1
    case = source.load_case(source.split_ids()["test"][0])
    assert case.image.shape == (source.in_channels, 1, 64, 64) and case.label.shape == (1, 64, 64)
    assert case.num_slices == 1 and case.spacing_hw is None


@pytest.mark.parametrize("kind", SOURCES)
def test_split_ids(kind: str) -> None:
    source = _small(kind)
    ids = source.split_ids()
    assert [len(ids[s]) for s in ("train", "val", "test")] == [20, 4, 3]
    assert ids["val"][3] == f"phantom_{kind}_val_0003"
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 27
    assert {ref.case_id for ref in source.train_slices()} == set(ids["train"])
    with pytest.raises(KeyError):
        source.load_case(f"phantom_{kind}_val_0004")
    with pytest.raises(KeyError):
        source.load_case("patient001_frame01")


def test_cardiac_anatomy_and_contrast() -> None:
    source = _small("cardiac")
    image, label = source.load_slice(next(r for r in source.train_slices() if r not in source.empty_slices))
    means = {k: image[0][label == k].mean() for k in range(4)}
    assert means[3] > means[2] + 0.2 and means[1] > means[2] + 0.2
    lv_rows, lv_cols = np.nonzero(label == 3)
    centre = int(lv_rows.mean()), int(lv_cols.mean())
    assert label[centre] == 3
    assert (label == 2).sum() > 0 and (label == 1).sum() > 0


def test_cardiac_empty_training_slices() -> None:
    source = SyntheticCardiacSource(num_train=64, size=64)
    assert len(source.empty_slices) == round(0.05 * 64)
    for ref in source.empty_slices:
        image, label = source.load_slice(ref)
        assert label.max() == 0 and image.std() > 0
    assert len(SyntheticCardiacSource(num_train=4, size=64).empty_slices) == 1
    assert not SyntheticCardiacSource(num_train=4, size=64, empty_fraction=0.0).empty_slices


def test_cardiac_multi_slice_cases() -> None:
    source = SyntheticCardiacSource(num_train=3, num_val=2, num_test=0, size=64, slices_per_case=4)
    assert len(source.train_slices()) == 12
    assert not source.has_test_split
    case = source.load_case(source.split_ids()["val"][0])
    assert case.image.shape == (1, 4, 64, 64) and case.label.shape == (4, 64, 64)
    image, label = source.load_slice(SliceRef(case.case_id, 2))
    np.testing.assert_array_equal(case.image[:, 2], image)
    np.testing.assert_array_equal(case.label[2], label)
    lv_area = [(case.label[k] == 3).sum() for k in range(4)]
    assert lv_area[0] > lv_area[-1] > 0
    with pytest.raises(KeyError):
        source.load_slice(SliceRef(case.case_id, 4))


def test_lesion_is_darker_than_skin() -> None:
    source = _small("lesion")
    for ref in source.train_slices()[:8]:
        image, label = source.load_slice(ref)
        assert 0.02 < label.mean() < 0.7
        assert image[:, label == 1].mean() < image[:, label == 0].mean()


@pytest.mark.parametrize("kind", SOURCES)
def test_generation_is_cheap(kind: str) -> None:
    source = SOURCES[kind](num_train=20, size=128)
    start = time.perf_counter()
    for ref in source.train_slices():
        source.load_slice(ref)
    assert (time.perf_counter() - start) / 20 < 0.05


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="slices_per_case"):
        SyntheticCardiacSource(slices_per_case=0)
    with pytest.raises(ValueError, match="num_val"):
        SyntheticLesionSource(num_val=-1)
