import zlib

import numpy as np
import pytest
import torch

from prato_exp.data.prompts import (
    BoxPrompter,
    box_for_condition,
    jitter_box,
    prompt_rng,
    sanitize_boxes,
    tight_box,
    whole_image_box,
)

H, W = 100, 120


def _mask(rows: slice, cols: slice, hw: tuple[int, int] = (H, W), label: int = 1) -> np.ndarray:
    m = np.zeros(hw, dtype=np.int64)
    m[rows, cols] = label
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


OBJECT = _mask(slice(40, 60), slice(30, 70))
OBJECT_TIGHT = np.array([30, 40, 70, 60], dtype=np.float32)


def test_tight_box_edges_are_min_and_max_plus_one():
    box = tight_box(_mask(slice(2, 5), slice(3, 7), hw=(10, 10)))
    assert box.dtype == np.float32
    np.testing.assert_array_equal(box, [3, 2, 7, 5])


def test_tight_box_covers_all_classes_and_accepts_tensors():
    m = np.zeros((10, 10), dtype=np.int64)
    m[1, 2] = 1
    m[6, 8] = 3
    np.testing.assert_array_equal(tight_box(torch.from_numpy(m)), [2, 1, 9, 7])


def test_tight_box_of_empty_mask_is_none():
    assert tight_box(np.zeros((8, 9), dtype=np.int64)) is None
    for condition in ("tight", "oversized", "partial", "misleading"):
        assert box_for_condition(np.zeros((8, 9)), condition, np.random.default_rng(0)) is None


@pytest.mark.parametrize("empty", ["whole_image", "no_pruning"])
def test_empty_slice_falls_back_to_whole_image_with_flag(empty):
    prompter = BoxPrompter(condition="partial", empty=empty)
    for train_rng in (None, np.random.default_rng(0)):
        box, is_empty = prompter(np.zeros((H, W), dtype=np.int64), "case", 3, train_rng)
        assert is_empty
        np.testing.assert_array_equal(box, [0, 0, W, H])
    np.testing.assert_array_equal(whole_image_box((H, W)), [0, 0, W, H])
    assert prompter.skip_pruning_on_empty == (empty == "no_pruning")


def test_non_empty_slice_is_not_flagged():
    box, is_empty = BoxPrompter()(OBJECT, "case", 0, None)
    assert not is_empty
    np.testing.assert_array_equal(box, OBJECT_TIGHT)


def test_oversized_grows_each_side_by_10_to_30_percent():
    x0, y0, x1, y1 = OBJECT_TIGHT
    bw, bh = x1 - x0, y1 - y0
    for seed in range(50):
        box = box_for_condition(OBJECT, "oversized", np.random.default_rng(seed))
        grown = np.array([(x0 - box[0]) / bw, (y0 - box[1]) / bh, (box[2] - x1) / bw, (box[3] - y1) / bh])
        assert np.all(grown >= 0.1 - 1e-5) and np.all(grown <= 0.3 + 1e-5), grown


def test_oversized_is_clipped_to_image_and_contains_tight():
    m = _mask(slice(0, 30), slice(100, 120))
    tight = tight_box(m)
    for seed in range(50):
        box = box_for_condition(m, "oversized", np.random.default_rng(seed))
        assert box[1] == 0 and box[2] == W
        assert box[0] <= tight[0] and box[3] >= tight[3]
        assert box[3] <= H and box[0] >= 0


def test_partial_is_inside_tight_with_40_to_70_percent_area_and_same_aspect():
    x0, y0, x1, y1 = OBJECT_TIGHT
    aspect, area = (x1 - x0) / (y1 - y0), (x1 - x0) * (y1 - y0)
    ratios = []
    for seed in range(100):
        box = box_for_condition(OBJECT, "partial", np.random.default_rng(seed))
        assert box[0] >= x0 - 1e-4 and box[1] >= y0 - 1e-4 and box[2] <= x1 + 1e-4 and box[3] <= y1 + 1e-4
        pw, ph = box[2] - box[0], box[3] - box[1]
        assert pw / ph == pytest.approx(aspect, rel=1e-4)
        ratios.append(pw * ph / area)
    assert min(ratios) >= 0.4 - 1e-4 and max(ratios) <= 0.7 + 1e-4
    assert max(ratios) - min(ratios) > 0.2


def test_misleading_has_tight_size_and_iou_below_0_1():
    for seed in range(50):
        box = box_for_condition(OBJECT, "misleading", np.random.default_rng(seed))
        np.testing.assert_array_equal(box[2:] - box[:2], [40, 20])
        assert np.all(box[:2] >= 0) and box[2] <= W and box[3] <= H
        assert _iou(box, OBJECT_TIGHT) < 0.1


def test_misleading_is_uniform_over_valid_integer_positions():
    m = np.zeros((1, 4), dtype=np.int64)
    m[0, 0] = 1
    starts = [box_for_condition(m, "misleading", np.random.default_rng(s))[0] for s in range(300)]
    values, counts = np.unique(starts, return_counts=True)
    np.testing.assert_array_equal(values, [1, 2, 3])
    assert counts.min() > 70


def test_misleading_falls_back_to_farthest_position():
    m = _mask(slice(1, 9), slice(1, 9), hw=(10, 10))
    corners = {(0, 0), (2, 0), (0, 2), (2, 2)}
    for seed in range(20):
        box = box_for_condition(m, "misleading", np.random.default_rng(seed))
        assert (int(box[0]), int(box[1])) in corners
        np.testing.assert_array_equal(box[2:] - box[:2], [8, 8])


def test_misleading_of_object_filling_image_is_whole_image():
    box = box_for_condition(np.ones((6, 7), dtype=np.int64), "misleading", np.random.default_rng(0))
    np.testing.assert_array_equal(box, [0, 0, 7, 6])


def test_prompt_rng_is_seeded_from_crc32_of_id_and_slice():
    expected = np.random.default_rng([5, zlib.crc32(b"patient001_frame01:7")]).random(3)
    np.testing.assert_array_equal(prompt_rng(5, "patient001_frame01", 7).random(3), expected)


@pytest.mark.parametrize("condition", ["oversized", "partial", "misleading"])
def test_same_seed_and_id_give_same_box(condition):
    a, _ = BoxPrompter(condition=condition, prompt_seed=3)(OBJECT, "img_1", 2, None)
    b, _ = BoxPrompter(condition=condition, prompt_seed=3)(OBJECT, "img_1", 2, None)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("condition", ["oversized", "partial", "misleading"])
def test_different_id_or_slice_gives_different_box(condition):
    prompter = BoxPrompter(condition=condition)
    a, _ = prompter(OBJECT, "img_1", 0, None)
    assert not np.array_equal(a, prompter(OBJECT, "img_2", 0, None)[0])
    assert not np.array_equal(a, prompter(OBJECT, "img_1", 1, None)[0])


@pytest.mark.parametrize("condition", ["oversized", "partial", "misleading"])
def test_prompt_seed_changes_boxes(condition):
    a, _ = BoxPrompter(condition=condition, prompt_seed=0)(OBJECT, "img_1", 0, None)
    b, _ = BoxPrompter(condition=condition, prompt_seed=1)(OBJECT, "img_1", 0, None)
    assert not np.array_equal(a, b)


def test_training_without_jitter_gives_tight_box_whatever_the_condition():
    box, _ = BoxPrompter(condition="misleading")(OBJECT, "img", 0, np.random.default_rng(0))
    np.testing.assert_array_equal(box, OBJECT_TIGHT)


def test_training_jitter_draws_from_train_rng():
    prompter = BoxPrompter(jitter=True)
    a, _ = prompter(OBJECT, "img", 0, np.random.default_rng(0))
    b, _ = prompter(OBJECT, "img", 0, np.random.default_rng(1))
    assert not np.array_equal(a, OBJECT_TIGHT) and not np.array_equal(a, b)


def test_jitter_stays_in_image_and_within_fractions():
    corner = np.array([0, 0, 10, 20], dtype=np.float32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        box = jitter_box(corner, (H, W), rng)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= W and box[3] <= H
        assert box[2] - box[0] >= 1 and box[3] - box[1] >= 1
        assert box[2] <= 10 * (1 + 0.1 + 0.05) + 1e-4 and box[3] <= 20 * (1 + 0.1 + 0.05) + 1e-4
    for _ in range(200):
        box = jitter_box(corner, (H, W), rng, max_shift_frac=3.0, max_scale_frac=0.9)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= W and box[3] <= H
        assert box[2] > box[0] and box[3] > box[1]


def test_sanitize_clips_to_image():
    out = sanitize_boxes(torch.tensor([[-5.0, -3.0, 130.0, 50.0]]), (H, W))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 120.0, 50.0]]))


def test_sanitize_grows_degenerate_box_to_one_pixel_inside_image():
    boxes = torch.tensor([[10.0, 20.0, 10.0, 30.0], [5.0, 100.0, 9.0, 100.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[9.5, 20.0, 10.5, 30.0], [5.0, 99.0, 9.0, 100.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(sanitize_boxes(boxes, (H, W)), expected)


def test_sanitize_keeps_dtype_and_leaves_input_unchanged():
    boxes = torch.tensor([[-1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    out = sanitize_boxes(boxes, (H, W))
    assert out.dtype == torch.float64
    assert boxes[0, 0] == -1.0


def test_sanitize_rejects_box_wholly_outside_naming_image_and_box():
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [130.0, 10.0, 140.0, 20.0]])
    with pytest.raises(
        ValueError, match=r"'isic_0042'.*\(130, 10, 140, 20\)|\(130, 10, 140, 20\).*'isic_0042'"
    ):
        sanitize_boxes(boxes, (H, W), ["isic_0001", "isic_0042"])


def test_sanitize_rejects_box_touching_image_only_at_its_edge():
    with pytest.raises(ValueError, match="wholly outside"):
        sanitize_boxes(torch.tensor([[-10.0, 0.0, 0.0, 5.0]]), (H, W), ["a"])


def test_sanitize_rejects_inverted_box():
    with pytest.raises(ValueError, match=r"\(10, 5, 4, 8\)"):
        sanitize_boxes(torch.tensor([[10.0, 5.0, 4.0, 8.0]]), (H, W), ["a"])


def test_sanitize_rejects_nan_box():
    with pytest.raises(ValueError, match=r"'a'.*not finite"):
        sanitize_boxes(torch.tensor([[float("nan"), 5.0, 4.0, 8.0]]), (H, W), ["a"])


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"condition": "loose"}, "loose"),
        ({"empty": "skip"}, "skip"),
        ({"prompt_seed": -1}, "-1"),
        ({"jitter_scale": 1.5}, "1.5"),
    ],
)
def test_box_prompter_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        BoxPrompter(**kwargs)
