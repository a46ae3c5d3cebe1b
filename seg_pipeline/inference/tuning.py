"""Ensemble decisions made on a labelled split that is not the one evaluated.

Two choices a practitioner tunes on validation before reporting a test score:

- **members**: an ensemble member that lowers the ensemble's mIoU gets weight 0 (every non-empty
  subset of up to :data:`MAX_SUBSET_MEMBERS` members is scored; more members are chosen greedily);
- **class bias**: per-class offsets added to the log-probabilities before the argmax, i.e. the
  decision thresholds (a rare class often scores several IoU points higher with a lower one).
  Found by coordinate ascent over :data:`BIAS_GRID`, kept only where it raises mIoU.

Both are scored on a bounded random sample of labelled pixels (:class:`PixelSample`), so memory
and time do not grow with the tuning split. Combining members from their probabilities is exact
for both merge modes: the mean of log-probabilities has the softmax of the mean of logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from seg_pipeline.data.patching import PatchWindow
from seg_pipeline.data.shards import ShardRow
from seg_pipeline.data.tiles import read_raw_tile, read_raw_window
from seg_pipeline.inference.sliding import predict_tiles
from seg_pipeline.metrics import ConfusionMatrix
from seg_pipeline.settings import TuningSettings, WindowSettings

#: Members up to which every subset is scored (15 subsets for 4); beyond it, greedy forward selection.
MAX_SUBSET_MEMBERS = 4
#: Log-probability offsets tried per class (exp(3) = 20x the prior odds either way).
BIAS_GRID = tuple(float(v) for v in np.round(np.linspace(-3.0, 3.0, 25), 3))
#: Rounds of coordinate ascent over the classes.
BIAS_ROUNDS = 2
#: Tuning tiles decoded and predicted together (memory: this many tiles of at most ``max_side``).
TILES_PER_PASS = 16
#: The smallest mIoU gain a tuned choice must bring to replace the default (guards against noise).
MIN_GAIN = 1e-4


@dataclass
class PixelSample:
    """Probabilities of every member at sampled labelled pixels: ``(M, N, K)`` and truth ``(N,)``."""

    num_classes: int
    members: int
    max_pixels: int
    seed: int = 0
    _probabilities: list[np.ndarray] = field(default_factory=list)
    _truth: list[np.ndarray] = field(default_factory=list)
    _seen: int = 0

    def add(self, probabilities: np.ndarray, truth: np.ndarray, ignore_index: int) -> None:
        """Sample pixels of one tile: ``probabilities`` ``(M, K, H, W)``, ``truth`` ``(H, W)``.

        A tile gives at most ``max_pixels`` of its labelled pixels; whenever the sample passes twice
        that it is thinned uniformly, and :meth:`arrays` thins it to ``max_pixels``.
        """
        labelled = (truth != ignore_index) & (truth >= 0) & (truth < self.num_classes)
        flat = np.flatnonzero(labelled.reshape(-1))
        if flat.size == 0:
            return
        rng = np.random.default_rng((self.seed, self._seen))
        self._seen += 1
        if flat.size > self.max_pixels:
            flat = np.sort(rng.choice(flat, self.max_pixels, replace=False))
        members = probabilities.reshape(self.members, self.num_classes, -1)[:, :, flat]
        self._probabilities.append(np.ascontiguousarray(members.transpose(0, 2, 1), dtype=np.float32))
        self._truth.append(truth.reshape(-1)[flat].astype(np.int64))
        if sum(t.size for t in self._truth) > 2 * self.max_pixels:
            self._thin(rng)

    def _thin(self, rng: np.random.Generator) -> None:
        probabilities = np.concatenate(self._probabilities, axis=1)
        truth = np.concatenate(self._truth)
        keep = np.sort(rng.choice(truth.size, self.max_pixels, replace=False))
        self._probabilities, self._truth = [probabilities[:, keep]], [truth[keep]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(M, N, K)`` float32 probabilities and ``(N,)`` int64 truth, ``N <= max_pixels``."""
        if not self._truth:
            return np.zeros((self.members, 0, self.num_classes), np.float32), np.zeros(0, np.int64)
        if self.pixels > self.max_pixels:
            self._thin(np.random.default_rng((self.seed, self._seen, 1)))
        return np.concatenate(self._probabilities, axis=1), np.concatenate(self._truth)

    @property
    def pixels(self) -> int:
        """Sampled pixels so far."""
        return int(sum(t.size for t in self._truth))


def combine(probabilities: np.ndarray, weights: Sequence[float], merge: str) -> np.ndarray:
    """``(N, K)`` ensemble probabilities of members' ``(M, N, K)``, as ``merge_terms`` merges them."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if merge == "mean_prob":
        return np.tensordot(w, probabilities, axes=1).astype(np.float32)
    logits = np.tensordot(w, np.log(np.clip(probabilities, 1e-12, None)), axes=1)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def miou(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean IoU as the report computes it (classes absent from both sides are skipped)."""
    matrix = ConfusionMatrix(num_classes)
    matrix.update(predicted, truth)
    return float(matrix.compute().miou)


@dataclass(frozen=True)
class MemberChoice:
    """Ensemble weights (1 kept, 0 dropped) and the tuning-split mIoU of every subset scored."""

    weights: tuple[float, ...]
    scores: dict[tuple[int, ...], float]


def choose_members(probabilities: np.ndarray, truth: np.ndarray, merge: str) -> MemberChoice:
    """The member subset with the highest mIoU; all members unless a subset beats them by MIN_GAIN."""
    count, num_classes = probabilities.shape[0], probabilities.shape[2]

    def score(subset: tuple[int, ...]) -> float:
        return miou(
            combine(probabilities[list(subset)], [1.0] * len(subset), merge).argmax(1), truth, num_classes
        )

    everyone = tuple(range(count))
    scores = {everyone: score(everyone)}
    if count <= MAX_SUBSET_MEMBERS:
        for size in range(1, count):
            for subset in itertools.combinations(everyone, size):
                scores[subset] = score(subset)
    else:
        chosen: tuple[int, ...] = ()
        while len(chosen) < count - 1:  # the last step would add everyone, scored above
            trials = {t: score(t) for t in (tuple(sorted((*chosen, m))) for m in everyone if m not in chosen)}
            chosen = max(trials, key=trials.__getitem__)
            scores[chosen] = trials[chosen]
    best = max(scores, key=lambda s: (scores[s], len(s)))
    if scores[best] < scores[everyone] + MIN_GAIN:
        best = everyone
    return MemberChoice(tuple(1.0 if m in best else 0.0 for m in everyone), scores)


@dataclass(frozen=True)
class BiasChoice:
    """Per-class log-probability offsets and the tuning-split mIoU without and with them."""

    bias: tuple[float, ...]
    before: float
    after: float


def tune_class_bias(probabilities: np.ndarray, truth: np.ndarray) -> BiasChoice:
    """Coordinate ascent on per-class offsets (class 0 stays at 0: only differences matter)."""
    num_classes = probabilities.shape[1]
    log = np.log(np.clip(probabilities, 1e-12, None))
    bias = np.zeros(num_classes)
    before = best = miou(log.argmax(1), truth, num_classes)
    for _ in range(BIAS_ROUNDS):
        improved = False
        for k in range(1, num_classes):
            for value in BIAS_GRID:
                trial = bias.copy()
                trial[k] = value
                score = miou(np.argmax(log + trial, axis=1), truth, num_classes)
                if score > best + MIN_GAIN:
                    best, bias, improved = score, trial, True
        if not improved:
            break
    return BiasChoice(tuple(float(v) for v in bias), before, best)


def collect_sample(
    predict_members: Callable[[Tensor], Tensor],
    rows: Sequence[ShardRow],
    normalize_image: Callable[[np.ndarray], np.ndarray],
    windows: WindowSettings,
    settings: TuningSettings,
    num_classes: int,
    members: int,
    ignore_index: int,
) -> PixelSample:
    """Every member's probabilities at sampled labelled pixels of ``rows`` (through the sliding windows).

    ``predict_members`` maps a window batch to the members' probabilities stacked on the channel
    axis, ``(B, M * K, h, w)``; tiles above ``settings.max_side`` are scored on one seeded window.
    """
    sample = PixelSample(num_classes, members, settings.max_pixels)
    rng = np.random.default_rng(0)
    for start in range(0, len(rows), TILES_PER_PASS):
        images, truths = [], []
        for row in rows[start : start + TILES_PER_PASS]:
            height, width = int(row.extra["height"]), int(row.extra["width"])
            if max(height, width) > settings.max_side:
                side_h, side_w = min(height, settings.max_side), min(width, settings.max_side)
                top = int(rng.integers(0, height - side_h + 1))
                left = int(rng.integers(0, width - side_w + 1))
                tile = read_raw_window(row, PatchWindow(top, left, side_h, side_w), ignore_index)
            else:
                tile = read_raw_tile(row)
            image, mask, invalid = tile
            if mask is None:
                continue
            truth = mask.astype(np.int64)
            truths.append(truth if invalid is None else np.where(invalid, ignore_index, truth))
            images.append(torch.from_numpy(np.ascontiguousarray(normalize_image(image), dtype=np.float32)))
        # tiles that fit one window go through in batches, larger ones through the sliding windows
        for probabilities, truth in zip(predict_tiles(predict_members, images, windows), truths, strict=True):
            sample.add(probabilities.numpy().reshape(members, num_classes, *truth.shape), truth, ignore_index)
    return sample
