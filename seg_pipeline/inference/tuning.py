"""Ensemble decisions made on a labelled split that is not the one evaluated.

Two choices a practitioner tunes on validation before reporting a test score:

- **members**: an ensemble member that lowers the ensemble's mIoU gets weight 0 (every non-empty
  subset of up to :data:`MAX_SUBSET_MEMBERS` members is scored; more members are chosen greedily);
- **class bias**: per-class offsets added to the log-probabilities before the argmax, i.e. the
  decision thresholds (a rare class often scores several IoU points higher with a lower one).
  Found by coordinate ascent over :data:`BIAS_GRID`, kept only where it raises mIoU.

With ``views`` on, a third choice comes first:

- **views**: the subset of the configured TTA scales x transforms (the same for every member) with
  the highest ensemble mIoU, and of those within :data:`MIN_GAIN` of it the fewest views (a view
  costs a forward pass per model on every window). Every subset of up to
  :data:`MAX_SUBSET_VIEWS_AXIS` scales or transforms is scored; of more transforms (``d4``), the
  chain of greedy removals from all of them.

All are scored on a bounded random sample of labelled pixels (:class:`PixelSample`), so memory
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
#: Scales or transforms up to which every non-empty subset is a view-tuning candidate.
MAX_SUBSET_VIEWS_AXIS = 4
#: Bytes the per-view pixel sample may take (members x views x classes float32 per pixel).
VIEW_SAMPLE_BYTES = 512 * 2**20


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


@dataclass(frozen=True)
class ViewChoice:
    """The chosen scales and transforms (``indices``: their views, scale-major) and the
    tuning-split mIoU of every view set scored.
    """

    scales: tuple[float, ...]
    transforms: tuple[str, ...]
    indices: tuple[int, ...]
    scores: dict[tuple[tuple[float, ...], tuple[str, ...]], float]

    @property
    def key(self) -> tuple[tuple[float, ...], tuple[str, ...]]:
        """The chosen set as a key of :attr:`scores`."""
        return (self.scales, self.transforms)

    @property
    def score(self) -> float:
        """The chosen set's mIoU."""
        return self.scores[self.key]


def _subsets(count: int) -> list[tuple[int, ...]]:
    everyone = tuple(range(count))
    return [c for size in range(1, count + 1) for c in itertools.combinations(everyone, size)]


def view_rows(members: int, views: int, chosen: Sequence[int]) -> list[int]:
    """Rows of a ``(members * views, N, K)`` sample holding the ``chosen`` views of every member."""
    return [member * views + view for member in range(members) for view in chosen]


def choose_views(
    probabilities: np.ndarray,
    truth: np.ndarray,
    members: int,
    scales: Sequence[float],
    transforms: Sequence[str],
    merge: str,
) -> ViewChoice:
    """The view set with the highest ensemble mIoU; the fewest views among those within MIN_GAIN.

    ``probabilities`` is ``(members * V, N, K)``, member-major, views scale-major
    (:meth:`~seg_pipeline.inference.ensemble.EnsemblePredictor.predict_views`).
    """
    scales, transforms = tuple(scales), tuple(transforms)
    per_member, num_classes = len(scales) * len(transforms), probabilities.shape[2]
    if probabilities.shape[0] != members * per_member:
        raise ValueError(f"{probabilities.shape[0]} sampled views for {members} members x {per_member} views")

    def score(scale_ids: tuple[int, ...], transform_ids: tuple[int, ...]) -> float:
        chosen = [s * len(transforms) + t for s in scale_ids for t in transform_ids]
        rows = view_rows(members, per_member, chosen)
        return miou(combine(probabilities[rows], [1.0] * len(rows), merge).argmax(1), truth, num_classes)

    every_scale, every_transform = tuple(range(len(scales))), tuple(range(len(transforms)))
    scale_sets = (
        _subsets(len(scales))
        if len(scales) <= MAX_SUBSET_VIEWS_AXIS
        else [every_scale, *((s,) for s in every_scale)]
    )
    if len(transforms) <= MAX_SUBSET_VIEWS_AXIS:
        transform_sets = _subsets(len(transforms))
    else:  # greedy: drop the transform whose removal helps most, down to one
        transform_sets, current = [every_transform], every_transform
        while len(current) > 1:
            trials = {c: score(every_scale, c) for c in itertools.combinations(current, len(current) - 1)}
            current = max(trials, key=trials.__getitem__)
            transform_sets.append(current)
    by_ids = {(ss, ts): score(ss, ts) for ss in scale_sets for ts in transform_sets}
    best = max(by_ids.values())
    near = [key for key, value in by_ids.items() if value >= best - MIN_GAIN]
    chosen = min(near, key=lambda key: (len(key[0]) * len(key[1]), -by_ids[key], key))
    scores = {
        (tuple(scales[i] for i in ss), tuple(transforms[i] for i in ts)): value
        for (ss, ts), value in by_ids.items()
    }
    return ViewChoice(
        scales=tuple(scales[i] for i in chosen[0]),
        transforms=tuple(transforms[i] for i in chosen[1]),
        indices=tuple(s * len(transforms) + t for s in chosen[0] for t in chosen[1]),
        scores=scores,
    )


def member_probabilities(
    probabilities: np.ndarray, members: int, chosen: Sequence[int], merge: str
) -> np.ndarray:
    """``(members, N, K)``: each member's TTA merge of its ``chosen`` views of the per-view sample.

    Exact for both merge modes: a member's ``mean_logit`` term is the mean of its views'
    log-probabilities up to a per-pixel constant, which the ensemble's softmax removes.
    """
    per_member = probabilities.shape[0] // members
    return np.stack(
        [
            combine(probabilities[[m * per_member + v for v in chosen]], [1.0] * len(chosen), merge)
            for m in range(members)
        ]
    )
