"""Tests for seg_pipeline.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from seg_pipeline.metrics import (
    ConfusionMatrix,
    DetectionCounter,
    SegmentationMetrics,
    pooled_metrics,
)

# A 3-class 4x4 example. Reading pixel by pixel:
#   gt 0 (4 px) -> pred 0,1,0,0          row 0 = [3, 1, 0]
#   gt 1 (4 px) -> pred 1,1,1,2          row 1 = [0, 3, 1]
#   gt 2 (8 px) -> pred 2,2,0,2,2,1,2,2  row 2 = [1, 1, 6]
TARGET_4X4 = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, 2],
        [2, 2, 2, 2],
    ]
)
PRED_4X4 = np.array(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 2],
        [2, 2, 0, 2],
        [2, 1, 2, 2],
    ]
)
MATRIX_4X4 = np.array([[3, 1, 0], [0, 3, 1], [1, 1, 6]])


def _hand_example() -> SegmentationMetrics:
    return ConfusionMatrix(3).update(PRED_4X4, TARGET_4X4).compute()


def test_hand_computed_confusion_matrix_and_counts() -> None:
    metrics = _hand_example()
    np.testing.assert_array_equal(metrics.matrix, MATRIX_4X4)
    # tp = diagonal; fp = column sum - tp; fn = row sum - tp; tn = 16 - tp - fp - fn.
    np.testing.assert_array_equal(metrics.tp, [3, 3, 6])
    np.testing.assert_array_equal(metrics.fp, [1, 2, 1])
    np.testing.assert_array_equal(metrics.fn, [1, 1, 2])
    np.testing.assert_array_equal(metrics.tn, [11, 10, 7])
    np.testing.assert_array_equal(metrics.support, [4, 4, 8])


def test_hand_computed_per_class_scores() -> None:
    metrics = _hand_example()
    np.testing.assert_allclose(metrics.iou, [3 / 5, 3 / 6, 6 / 9])
    np.testing.assert_allclose(metrics.dice, [6 / 8, 6 / 9, 12 / 15])
    np.testing.assert_allclose(metrics.precision, [3 / 4, 3 / 5, 6 / 7])
    np.testing.assert_allclose(metrics.recall, [3 / 4, 3 / 4, 6 / 8])


def test_hand_computed_aggregates() -> None:
    metrics = _hand_example()
    assert metrics.miou == pytest.approx((3 / 5 + 3 / 6 + 6 / 9) / 3)
    assert metrics.mdice == pytest.approx((6 / 8 + 6 / 9 + 12 / 15) / 3)
    assert metrics.mprecision == pytest.approx((3 / 4 + 3 / 5 + 6 / 7) / 3)
    assert metrics.mrecall == pytest.approx((3 / 4 + 3 / 4 + 6 / 8) / 3)
    assert metrics.pixel_accuracy == pytest.approx(12 / 16)
    # FWIoU = sum_c (gt pixels of c / total) * IoU_c.
    assert metrics.fwiou == pytest.approx(4 / 16 * 3 / 5 + 4 / 16 * 3 / 6 + 8 / 16 * 6 / 9)
    # kappa: po = 12/16, pe = (4*4 + 4*5 + 8*7) / 16^2 = 92/256 -> (100/256) / (164/256) = 25/41.
    assert metrics.kappa == pytest.approx(25 / 41)


def test_accepts_torch_tensors_batches_and_small_dtypes() -> None:
    batch_target = np.stack([TARGET_4X4, TARGET_4X4])
    batch_pred = np.stack([PRED_4X4, PRED_4X4])
    from_torch = ConfusionMatrix(3).update(torch.from_numpy(batch_pred), torch.from_numpy(batch_target))
    np.testing.assert_array_equal(from_torch.matrix, 2 * MATRIX_4X4)
    for pred_dtype, target_dtype in [(np.uint8, np.uint8), (np.int8, np.uint16), (np.uint64, np.int64)]:
        accumulator = ConfusionMatrix(3).update(PRED_4X4.astype(pred_dtype), TARGET_4X4.astype(target_dtype))
        np.testing.assert_array_equal(accumulator.matrix, MATRIX_4X4)


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("num_classes", [2, 15, 16, 17, 300])
def test_matrix_matches_independent_count_for_many_class_counts(
    num_classes: int, ignore_index: int | None
) -> None:
    # uint8 bins hold K*K <= 255 (K <= 15, or K <= 15 plus a sentinel bin when ignoring);
    # 16 and 17 need uint16, 300 -> K*K > 65535 needs uint32: the index dtype must widen.
    rng = np.random.default_rng(num_classes)
    label_dtype = np.uint8 if num_classes <= 255 else np.uint16
    target = rng.integers(0, num_classes, size=(3, 20, 20)).astype(label_dtype)
    pred = rng.integers(0, num_classes, size=(3, 20, 20)).astype(label_dtype)
    if ignore_index is not None:
        target[rng.random(target.shape) < 0.2] = ignore_index  # for K = 300 that is a real class
        if num_classes <= ignore_index:
            junk = (target == ignore_index) & (rng.random(target.shape) < 0.5)
            pred[junk] = 250  # junk predictions at ignored pixels
    counted = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(expected, (target[counted].astype(np.int64), pred[counted].astype(np.int64)), 1)
    accumulator = ConfusionMatrix(num_classes, ignore_index=ignore_index).update(pred, target)
    np.testing.assert_array_equal(accumulator.matrix, expected)


def test_ignore_index_drops_pixels_even_with_out_of_range_predictions() -> None:
    target = TARGET_4X4.copy()
    pred = PRED_4X4.copy()
    target[0, :] = 255  # drops gt row 0: 0->0, 0->1, 1->1, 1->1
    pred[0, 0] = 99  # a junk prediction at an ignored pixel must not raise
    matrix = ConfusionMatrix(3, ignore_index=255).update(pred, target).matrix
    np.testing.assert_array_equal(matrix, [[2, 0, 0], [0, 1, 1], [1, 1, 6]])
    assert matrix.sum() == 12


def test_ignore_nonpositive_drops_labels_up_to_zero_and_excludes_class_zero() -> None:
    target = np.array([[-1, 0, 1, 1], [2, 2, 0, 1]])
    pred = np.array([[5, 1, 1, 0], [2, 1, 0, 1]])
    accumulator = ConfusionMatrix(3, ignore_nonpositive=True).update(pred, target)
    # Counted pixels (gt -> pred): 1->1, 1->0, 2->2, 2->1, 1->1.
    np.testing.assert_array_equal(accumulator.matrix, [[0, 0, 0], [1, 2, 0], [0, 1, 1]])
    metrics = accumulator.compute()
    assert metrics.excluded_classes == (0,)
    assert math.isnan(metrics.iou[0])  # would be 0/1 = 0 without the exclusion
    np.testing.assert_allclose(metrics.iou[1:], [2 / 4, 1 / 2])
    assert metrics.miou == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert metrics.pixel_accuracy == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_left_out_of_macro_means() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" or divide warnings
        metrics = ConfusionMatrix(4).update(PRED_4X4, TARGET_4X4).compute()
    for per_class in (metrics.iou, metrics.dice, metrics.precision, metrics.recall):
        assert math.isnan(per_class[3])
    assert metrics.support[3] == 0
    assert metrics.miou == pytest.approx((3 / 5 + 3 / 6 + 6 / 9) / 3)
    assert metrics.mdice == pytest.approx((6 / 8 + 6 / 9 + 12 / 15) / 3)
    assert metrics.kappa == pytest.approx(25 / 41)


def test_empty_accumulator_gives_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = ConfusionMatrix(2).compute()
    assert all(math.isnan(v) for v in (metrics.miou, metrics.pixel_accuracy, metrics.fwiou, metrics.kappa))


def test_macro_means_differ_from_micro_on_imbalanced_data() -> None:
    target = np.zeros((10, 10), dtype=np.int64)
    target[0, :2] = 1  # 98 background pixels, 2 rare-class pixels
    pred = np.zeros_like(target)  # the rare class is never predicted
    metrics = ConfusionMatrix(2).update(pred, target).compute()
    micro_iou = 98 / (98 + 2 + 2)  # pooled tp / (tp + fp + fn) over both classes
    assert metrics.miou == pytest.approx((98 / 100 + 0.0) / 2)
    assert metrics.miou != pytest.approx(micro_iou)
    assert metrics.mrecall == pytest.approx((1.0 + 0.0) / 2)
    assert metrics.mrecall != pytest.approx(metrics.pixel_accuracy)  # micro recall = accuracy = 0.98
    # Precision of a never-predicted class is 0/0 = NaN and skipped by the macro mean.
    assert math.isnan(metrics.precision[1])
    assert metrics.mprecision == pytest.approx(98 / 100)


def test_merge_equals_one_big_update_and_reset_clears() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(6, 8, 8))
    pred = rng.integers(0, 4, size=(6, 8, 8))
    target[target == 3] = 255
    whole = ConfusionMatrix(4, ignore_index=255).update(pred, target)
    first = ConfusionMatrix(4, ignore_index=255).update(pred[:2], target[:2])
    second = ConfusionMatrix(4, ignore_index=255)
    for index in range(2, 6):
        second.update(pred[index], target[index])
    np.testing.assert_array_equal(first.merge(second).matrix, whole.matrix)
    from_counts = (
        ConfusionMatrix(4, ignore_index=255).update_matrix(second.matrix).update(pred[:2], target[:2])
    )
    np.testing.assert_array_equal(from_counts.matrix, whole.matrix)
    with pytest.raises(ValueError, match="non-negative"):
        from_counts.update_matrix(-np.ones((4, 4), dtype=np.int64))
    whole.reset()
    assert whole.matrix.sum() == 0
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(4).merge(ConfusionMatrix(4, ignore_index=255))


def test_out_of_range_and_bad_inputs_raise() -> None:
    accumulator = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target holds values \[3, 7\]"):
        accumulator.update(np.zeros(4, dtype=np.int64), np.array([0, 3, 7, 3]))
    with pytest.raises(ValueError, match=r"pred holds values \[-1\]"):
        accumulator.update(np.array([0, -1, 1, 2]), np.array([0, 1, 1, 2]))
    # With some pixels ignored (the masked path), a bad prediction at a counted pixel still raises.
    with pytest.raises(ValueError, match=r"pred holds values \[4\]"):
        ConfusionMatrix(3, ignore_index=255).update(np.array([9, 4, 1, 2]), np.array([255, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"target holds values \[-3\]"):
        ConfusionMatrix(3, ignore_index=255).update(np.array([9, 0, 1, 2]), np.array([255, -3, 1, 2]))
    with pytest.raises(ValueError, match="integer class indices"):
        accumulator.update(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="differs from target shape"):
        accumulator.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    assert accumulator.matrix.sum() == 0  # failed updates add nothing


def test_to_dict_and_per_class_table() -> None:
    metrics = _hand_example()
    flat = metrics.to_dict(["background", "building", "road"])
    assert flat["iou/building"] == pytest.approx(3 / 6)
    assert flat["dice/road"] == pytest.approx(12 / 15)
    assert flat["support/road"] == 8.0
    assert flat["miou"] == pytest.approx(metrics.miou)
    assert all(isinstance(value, float) for value in flat.values())
    assert "iou/0" in metrics.to_dict()
    rows = metrics.per_class_table(["background", "building", "road"])
    assert rows[1]["class_name"] == "building"
    assert (rows[1]["tp"], rows[1]["fp"], rows[1]["fn"], rows[1]["tn"]) == (3, 2, 1, 10)
    assert rows[1]["predicted"] == 5
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        metrics.to_dict(["a", "b"])


def test_pooled_positive_class_metrics() -> None:
    # Positives {1, 2}: tp = M[1:, 1:].sum() = 11, fp = M[0, 1:].sum() = 1, fn = M[1:, 0].sum() = 1, tn = 3.
    pooled = pooled_metrics(MATRIX_4X4, positive_classes=[1, 2])
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (11, 1, 1, 3)
    assert pooled["iou"] == pytest.approx(11 / 13)
    assert pooled["dice"] == pytest.approx(22 / 24)
    assert pooled["precision"] == pytest.approx(11 / 12)
    assert pooled["recall"] == pytest.approx(11 / 12)
    accumulator = ConfusionMatrix(3).update(PRED_4X4, TARGET_4X4)
    assert accumulator.pooled(range(1, 3)) == pooled
    # A single positive class reduces to that class's own scores.
    assert pooled_metrics(accumulator, [2])["iou"] == pytest.approx(6 / 9)
    with pytest.raises(ValueError, match="positive_classes"):
        pooled_metrics(MATRIX_4X4, [3])


def test_detection_counts_and_scores() -> None:
    pred = np.array(
        [
            [[0, 1], [0, 0]],  # A: predicted positive, target positive (different fire class) -> tp
            [[0, 0], [0, 0]],  # B: missed -> fn
            [[2, 2], [0, 0]],  # C: false alarm -> fp
            [[0, 0], [0, 0]],  # D: -> tn
            [[0, 0], [0, 1]],  # E: one positive pixel -> fp at min_pixels=1, tn at min_pixels=2
        ]
    )
    target = np.array(
        [
            [[0, 2], [2, 0]],
            [[1, 0], [0, 0]],
            [[0, 0], [0, 0]],
            [[0, 0], [0, 0]],
            [[0, 0], [0, 0]],
        ]
    )
    result = DetectionCounter(positive_classes=[1, 2]).update(pred, target).compute()
    assert (result.tp, result.fp, result.tn, result.fn) == (1, 2, 1, 1)
    assert result.accuracy == pytest.approx(2 / 5)
    assert result.precision == pytest.approx(1 / 3)
    assert result.recall == pytest.approx(1 / 2)
    assert result.f1 == pytest.approx(2 / 5)  # 2tp / (2tp + fp + fn)

    strict = DetectionCounter(positive_classes=[1, 2], min_pixels=2).update(pred, target).compute()
    # A: pred has 1 positive pixel -> not detected; target 2 -> fn. B: target has 1 -> tn. C: fp. D, E: tn.
    assert (strict.tp, strict.fp, strict.tn, strict.fn) == (0, 1, 3, 1)
    assert strict.precision == 0.0  # 0 tp out of 1 predicted positive, a defined 0, not NaN
    assert strict.recall == 0.0


def test_detection_ignore_index_merge_and_single_patch() -> None:
    target = np.array([[255, 0], [0, 0]])
    pred = np.array([[1, 0], [0, 0]])  # the only positive prediction sits on an ignored pixel
    counter = DetectionCounter(positive_classes=[1], ignore_index=255).update(pred, target)
    other = DetectionCounter(positive_classes=[1], ignore_index=255).update(
        torch.tensor(pred), torch.tensor(pred)
    )
    result = counter.merge(other).compute()
    assert (result.tp, result.fp, result.tn, result.fn) == (1, 0, 1, 0)
    assert result.to_dict()["accuracy"] == 1.0
    empty = DetectionCounter(positive_classes=[1]).compute()
    assert math.isnan(empty.accuracy) and math.isnan(empty.f1)
    with pytest.raises(ValueError, match="min_pixels"):
        DetectionCounter(positive_classes=[1], min_pixels=0)


def test_matches_scikit_learn_on_random_data() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(42)
    num_classes = 5
    target = rng.integers(0, num_classes, size=(4, 32, 32))
    # Correlated predictions so the scores are not all near chance.
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, num_classes, size=target.shape))
    target[rng.random(target.shape) < 0.1] = 255
    metrics = ConfusionMatrix(num_classes, ignore_index=255).update(pred, target).compute()

    keep = target.ravel() != 255
    y_true, y_pred = target.ravel()[keep], pred.ravel()[keep]
    labels = list(range(num_classes))
    np.testing.assert_array_equal(
        metrics.matrix, sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels)
    )
    np.testing.assert_allclose(
        metrics.iou, sklearn_metrics.jaccard_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(
        metrics.dice, sklearn_metrics.f1_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(
        metrics.precision, sklearn_metrics.precision_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(
        metrics.recall, sklearn_metrics.recall_score(y_true, y_pred, labels=labels, average=None)
    )
    assert metrics.miou == pytest.approx(
        sklearn_metrics.jaccard_score(y_true, y_pred, labels=labels, average="macro")
    )
    assert metrics.kappa == pytest.approx(sklearn_metrics.cohen_kappa_score(y_true, y_pred))
    assert metrics.pixel_accuracy == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    # Pooled classes 1..4 vs 0 is the binary problem "label > 0".
    pooled = pooled_metrics(metrics.matrix, range(1, num_classes))
    assert pooled["iou"] == pytest.approx(sklearn_metrics.jaccard_score(y_true > 0, y_pred > 0))
    assert pooled["recall"] == pytest.approx(sklearn_metrics.recall_score(y_true > 0, y_pred > 0))


def test_module_does_not_import_torch() -> None:
    code = "import sys, seg_pipeline.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
