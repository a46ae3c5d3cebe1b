"""Segmentation metrics derived from one accumulated confusion matrix.

A leaf package: it needs numpy only and imports nothing else of seg_pipeline.

Why one matrix: every pixel metric (IoU, Dice/F1, precision, recall, pixel accuracy,
frequency-weighted IoU, Cohen's kappa, pooled positive-class scores) is a function of the
``K x K`` count matrix, so batches are reduced to ``K*K`` integers as they stream in (one
``np.bincount``) and the metrics are computed once at the end. Accumulators merge exactly,
so per-worker or per-rank matrices can be summed.

Conventions (read these before comparing numbers with another tool):

* ``matrix[i, j]`` counts pixels whose ground truth is ``i`` and prediction is ``j``.
* Per class ``c``: ``tp = M[c, c]``, ``fp = column sum - tp``, ``fn = row sum - tp``,
  ``tn = total - tp - fp - fn``.
* A 0/0 ratio is ``NaN``, never 0 or 1. A class absent from both ground truth and
  prediction therefore has NaN IoU, Dice, precision and recall. Precision is also NaN for a
  class present in the ground truth but never predicted, and recall for a class predicted
  but absent from the ground truth (IoU and Dice are then defined and 0).
* Macro means (``miou``, ``mdice``, ``mprecision``, ``mrecall``) are the unweighted mean of
  the per-class values that are not NaN (``np.nanmean``, as mmseg does), never micro
  (pooled-pixel) averages. If every class is NaN the mean is NaN.
* Classes whose ground truth is ignored by construction (class 0 under
  ``ignore_nonpositive``, or ``ignore_index`` when it lies inside ``[0, K)``) are reported as
  NaN and left out of the macro means: pixels predicted as that class on valid ground truth
  still count as misses (``fn``) of the true class, so they lower the other scores.
* ``pixel_accuracy``, ``fwiou`` and ``kappa`` use every non-ignored pixel; they are NaN when
  no pixel was counted (kappa also when chance agreement is 1).

The module needs only numpy; torch tensors are accepted and converted lazily.
"""

from seg_pipeline.metrics.confusion import ConfusionMatrix
from seg_pipeline.metrics.detection import DetectionCounter, DetectionMetrics
from seg_pipeline.metrics.scores import SegmentationMetrics, pooled_metrics

__all__ = [
    "ConfusionMatrix",
    "DetectionCounter",
    "DetectionMetrics",
    "SegmentationMetrics",
    "pooled_metrics",
]
