import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from prato_exp.metrics.segmentation import (
    SegmentationMeter,
    foreground_token_recall,
    hd95_binary,
    hd95_surface,
    image_diagonal,
    slice_stats,
    upsampled_argmax,
)


def labels(h: int, w: int, *regions: tuple[int, slice, slice]) -> torch.Tensor:
    out = torch.zeros(h, w, dtype=torch.long)
    for cls, rows, cols in regions:
        out[rows, cols] = cls
    return out


def points(h: int, w: int, *coords: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(h, w, dtype=torch.long)
    for r, c in coords:
        out[r, c] = 1
    return out


def test_dsc_iou_of_square_against_shifted_square():
    truth = labels(6, 6, (1, slice(1, 3), slice(1, 3)))
    pred = labels(6, 6, (1, slice(1, 3), slice(2, 4)))
    stats = slice_stats(pred, truth, num_classes=2)
    assert (stats.tp[0], stats.fp[0], stats.fn[0]) == (2, 2, 2)
    assert stats.dsc[0] == pytest.approx(0.5)
    assert stats.iou[0] == pytest.approx(1 / 3)


def test_both_empty_is_excluded():
    stats = slice_stats(torch.zeros(6, 8, dtype=torch.long), torch.zeros(6, 8, dtype=torch.long), 2)
    assert math.isnan(stats.dsc[0]) and math.isnan(stats.iou[0]) and math.isnan(stats.hd95[0])


def test_truth_only_scores_zero_and_diagonal():
    truth = labels(6, 8, (1, slice(2, 4), slice(2, 4)))
    stats = slice_stats(torch.zeros(6, 8, dtype=torch.long), truth, 2)
    assert stats.dsc[0] == 0 and stats.iou[0] == 0
    assert stats.hd95[0] == pytest.approx(10.0)


def test_pred_only_scores_zero_and_diagonal_in_mm():
    pred = labels(6, 8, (1, slice(2, 4), slice(2, 4)))
    stats = slice_stats(pred, torch.zeros(6, 8, dtype=torch.long), 2, spacing_hw=(2.0, 1.0))
    assert stats.dsc[0] == 0 and stats.iou[0] == 0
    assert stats.hd95[0] == pytest.approx(math.sqrt(12**2 + 8**2))
    assert image_diagonal(6, 8, (2.0, 1.0)) == pytest.approx(math.sqrt(208))


def test_hd95_two_points_three_pixels_apart():
    assert hd95_binary(points(8, 8, (1, 2)), points(8, 8, (4, 2))) == pytest.approx(3.0)


def test_hd95_row_spacing_scales_row_distance():
    assert hd95_binary(points(8, 8, (1, 2)), points(8, 8, (4, 2)), (2.0, 1.0)) == pytest.approx(6.0)
    assert hd95_binary(points(8, 8, (2, 1)), points(8, 8, (2, 4)), (2.0, 1.0)) == pytest.approx(3.0)


def test_hd95_square_shifted_by_two_columns():
    truth = labels(8, 10, (1, slice(2, 5), slice(2, 5)))
    pred = labels(8, 10, (1, slice(2, 5), slice(4, 7)))
    assert slice_stats(pred, truth, 2).hd95[0] == pytest.approx(2.0)


def _reference_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> float:
    def edges(m: np.ndarray) -> np.ndarray:
        return m ^ ndimage.binary_erosion(m)

    ea, eb = edges(a), edges(b)
    d_ab = ndimage.distance_transform_edt(~eb, sampling=spacing)[ea]
    d_ba = ndimage.distance_transform_edt(~ea, sampling=spacing)[eb]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def test_hd95_matches_independent_scipy_computation_on_blobs():
    rng = np.random.default_rng(0)
    for _ in range(3):
        a = ndimage.binary_opening(rng.random((24, 20)) > 0.5)
        b = ndimage.binary_opening(rng.random((24, 20)) > 0.5)
        got = hd95_binary(torch.from_numpy(a), torch.from_numpy(b), (1.5, 0.7))
        assert got == pytest.approx(_reference_hd95(a, b, (1.5, 0.7)), rel=1e-5)


def _monai_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None) -> float:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            torch.from_numpy(a)[None, None].float(),
            torch.from_numpy(b)[None, None].float(),
            include_background=True,
            percentile=95,
            spacing=None if spacing is None else list(spacing),
        )
    return float(hd.reshape(-1)[0])


@pytest.mark.parametrize("spacing", [None, (1.5, 0.7)])
def test_hd95_surface_equals_monai_on_2d_blobs_touching_the_border(spacing):
    rng = np.random.default_rng(1)
    for _ in range(6):
        a = ndimage.binary_opening(rng.random((30, 26)) > 0.45)
        b = ndimage.binary_opening(rng.random((30, 26)) > 0.45)
        a[0, :4] = b[-1, -3:] = True  # edges on the image border, where the crop margin is outside
        assert hd95_surface(a, b, spacing) == pytest.approx(_monai_hd95(a, b, spacing), rel=1e-6)


def test_hd95_surface_equals_monai_on_anisotropic_3d_volumes():
    rng = np.random.default_rng(2)
    a = ndimage.binary_opening(rng.random((5, 20, 18)) > 0.5)
    b = ndimage.binary_opening(rng.random((5, 20, 18)) > 0.5)
    spacing = (10.0, 1.25, 1.25)
    assert hd95_surface(a, b, spacing) == pytest.approx(_monai_hd95(a, b, spacing), rel=1e-6)


def test_hd95_surface_of_single_pixels_is_their_distance():
    a, b = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    a[1, 1], b[4, 5] = True, True
    assert hd95_surface(a, b, (2.0, 1.0)) == pytest.approx(math.hypot(3 * 2.0, 4 * 1.0))


def test_classes_are_scored_separately():
    truth = labels(6, 6, (1, slice(0, 2), slice(0, 2)), (3, slice(4, 6), slice(4, 6)))
    pred = labels(6, 6, (1, slice(0, 2), slice(0, 2)), (2, slice(4, 6), slice(4, 6)))
    stats = slice_stats(pred, truth, 4)
    np.testing.assert_allclose(stats.dsc, [1.0, 0.0, 0.0])
    assert stats.empty_kind == ["both_present", "pred_only", "truth_only"]


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        slice_stats(torch.full((4, 4), 3), torch.zeros(4, 4, dtype=torch.long), 3)


def test_volume_dsc_uses_stacked_volume_not_mean_of_slices():
    meter = SegmentationMeter(2, ["LV"])
    meter.update("p1", 0, points(4, 4, (1, 1)), points(4, 4, (1, 1)))
    meter.update("p1", 1, torch.zeros(4, 4, dtype=torch.long), labels(4, 4, (1, slice(0, 3), slice(0, 3))))
    out = meter.compute()
    assert out["slice/dsc/LV"] == pytest.approx(0.5)
    assert out["case/dsc/LV"] == pytest.approx(2 / 11)
    assert out["case/iou/LV"] == pytest.approx(1 / 10)


def test_volume_hd95_is_mean_over_slices_with_a_value():
    meter = SegmentationMeter(2, ["LV"])
    meter.update("p1", 0, points(8, 8, (1, 2)), points(8, 8, (4, 2)))
    meter.update("p1", 1, torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long))
    meter.update("p1", 2, torch.zeros(8, 8, dtype=torch.long), points(8, 8, (3, 3)))
    assert meter.compute()["case/hd95/LV"] == pytest.approx((3.0 + 8 * math.sqrt(2)) / 2)


def test_empty_kinds_are_counted_per_slice_and_per_case():
    zero = torch.zeros(4, 4, dtype=torch.long)
    one = points(4, 4, (0, 0))
    meter = SegmentationMeter(2, ["LV"])
    meter.update("a", 0, zero, one)
    meter.update("a", 1, one, zero)
    meter.update("b", 0, zero, zero)
    meter.update("b", 1, zero, zero)
    meter.update("c", 0, one, zero)
    out = meter.compute()
    assert (out["counts/slice/both_empty/LV"], out["counts/slice/truth_only/LV"]) == (2, 1)
    assert out["counts/slice/pred_only/LV"] == 2
    assert (out["counts/case/both_empty/LV"], out["counts/case/truth_only/LV"]) == (1, 0)
    assert out["counts/case/pred_only/LV"] == 1
    assert (out["counts/slices"], out["counts/cases"], out["counts/slice/no_foreground"]) == (5, 3, 4)


def test_empty_table_is_applied_before_averaging_over_cases():
    meter = SegmentationMeter(2, ["LV"])
    meter.update("hit", 0, points(4, 4, (1, 1)), points(4, 4, (1, 1)))
    meter.update("miss", 0, torch.zeros(4, 4, dtype=torch.long), points(4, 4, (1, 1)))
    meter.update("empty", 0, torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    out = meter.compute()
    assert out["case/dsc/LV"] == pytest.approx(0.5)
    assert out["case/hd95/LV"] == pytest.approx(4 * math.sqrt(2) / 2)


def test_size_ratio_tells_over_from_under_segmentation():
    truth = labels(6, 6, (1, slice(1, 3), slice(1, 3)))
    over = slice_stats(labels(6, 6, (1, slice(1, 3), slice(1, 5))), truth, 2)
    under = slice_stats(labels(6, 6, (1, slice(1, 2), slice(1, 3))), truth, 2)
    assert (over.size_ratio[0], under.size_ratio[0]) == (2.0, 0.5)
    assert math.isnan(slice_stats(truth, torch.zeros(6, 6, dtype=torch.long), 2).size_ratio[0])


def test_case_size_ratio_is_over_the_stacked_volume():
    meter = SegmentationMeter(2, ["LV"])
    meter.update("p1", 0, labels(4, 4, (1, slice(0, 2), slice(0, 2))), points(4, 4, (1, 1)))
    meter.update("p1", 1, torch.zeros(4, 4, dtype=torch.long), labels(4, 4, (1, slice(0, 3), slice(0, 1))))
    out = meter.compute()
    assert out["case/size_ratio/LV"] == pytest.approx(4 / 4)
    assert out["slice/size_ratio/LV"] == pytest.approx(np.median([4 / 1, 0 / 3]))
    assert meter.per_case()[0]["size_ratio/LV"] == pytest.approx(1.0)


def test_size_ratio_over_cases_is_the_median_not_pulled_by_one_outlier():
    meter = SegmentationMeter(2, ["LV"])
    truth = labels(8, 8, (1, slice(0, 2), slice(0, 2)))
    for case, cols in (("a", 2), ("b", 3), ("c", 8)):
        meter.update(case, 0, labels(8, 8, (1, slice(0, 2), slice(0, cols))), truth)
    assert meter.compute()["case/size_ratio/LV"] == pytest.approx(1.5)


def test_class_mean_is_mean_of_per_class_values():
    meter = SegmentationMeter(3, ["RV", "LV"])
    rv_lv = labels(4, 4, (1, slice(0, 1), slice(0, 1)), (2, slice(3, 4), slice(3, 4)))
    meter.update("a", 0, rv_lv, rv_lv)
    meter.update("b", 0, torch.zeros(4, 4, dtype=torch.long), labels(4, 4, (1, slice(0, 1), slice(0, 1))))
    out = meter.compute()
    assert (out["case/dsc/RV"], out["case/dsc/LV"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert out["case/dsc_mean"] == pytest.approx(0.75)


def test_per_case_rows_for_csv():
    meter = SegmentationMeter(3, ["background", "RV", "LV"])
    meter.update("a", 1, points(4, 4, (0, 0)), points(4, 4, (0, 0)))
    meter.update("a", 0, torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    (row,) = meter.per_case()
    assert (row["case_id"], row["num_slices"], row["dsc/RV"]) == ("a", 2, 1.0)
    assert math.isnan(row["dsc/LV"]) and row["empty/LV"] == "both_empty"
    assert [r["slice_index"] for r in meter.per_slice()] == [0, 1]


def test_repeated_slice_is_rejected():
    meter = SegmentationMeter(2)
    meter.update("a", 0, points(4, 4, (0, 0)), points(4, 4, (0, 0)))
    with pytest.raises(ValueError, match="already recorded"):
        meter.update("a", 0, points(4, 4, (0, 0)), points(4, 4, (0, 0)))


def test_update_batch_matches_single_updates():
    preds = torch.stack([points(4, 4, (0, 0)), points(4, 4, (1, 1))])
    targets = torch.stack([points(4, 4, (0, 0)), points(4, 4, (2, 2))])
    single, batch = SegmentationMeter(2), SegmentationMeter(2)
    for i in range(2):
        single.update("c", i, preds[i], targets[i], (1.0, 2.0))
    batch.update_batch(["c", "c"], torch.tensor([0, 1]), preds, targets, [(1.0, 2.0)] * 2)
    assert single.compute() == pytest.approx(batch.compute(), nan_ok=True)


def test_foreground_token_recall():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 0, 1] = 2
    target[0, 3, 3] = 1
    keep = torch.tensor([[[True, False], [True, False]], [[True, True], [True, True]]])
    recall = foreground_token_recall(keep, target)
    assert recall[0].item() == pytest.approx(0.5)
    assert math.isnan(recall[1].item())


def test_dsc_only_scoring_leaves_hd95_nan_and_the_rest_equal():
    pred = torch.zeros(16, 16, dtype=torch.long)
    pred[2:8, 2:8] = 1
    target = torch.zeros(16, 16, dtype=torch.long)
    target[3:9, 3:9] = 1
    full = slice_stats(pred, target, 3)
    fast = slice_stats(pred, target, 3, with_hd95=False)
    assert np.isnan(fast.hd95).all() and full.hd95[0] > 0
    assert np.array_equal(full.dsc, fast.dsc, equal_nan=True)


def test_eval_predictions_resized_together_equal_per_image_resizing():
    logits = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sizes = [(40, 30), (24, 24), (40, 30), (17, 50), (24, 24)]
    preds = upsampled_argmax(logits, sizes)
    for i, size in enumerate(sizes):
        expected = F.interpolate(logits[i : i + 1], size=size, mode="bilinear").argmax(1)[0]
        assert torch.equal(preds[i], expected)


def test_eval_predictions_take_the_first_class_on_ties():
    logits = torch.zeros(2, 4, 8, 8)
    logits[:, 2:] = 1.0  # classes 2 and 3 tie for the maximum
    preds = upsampled_argmax(logits, [(8, 8), (8, 8)])
    assert all(bool((p == 2).all()) for p in preds)
