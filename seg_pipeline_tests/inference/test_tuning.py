"""Ensemble choices tuned on validation: member subsets, class offsets, a bounded pixel sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from seg_pipeline.inference.ensemble import ENSEMBLE, EnsemblePredictor
from seg_pipeline.inference.tta import TTAConfig, member_term, merge_terms, view_probabilities
from seg_pipeline.inference.tuning import (
    PixelSample,
    choose_members,
    choose_views,
    combine,
    member_probabilities,
    miou,
    tune_class_bias,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


@pytest.mark.parametrize("merge", ["mean_prob", "mean_logit"])
def test_combining_member_probabilities_matches_the_predictor_merge(merge: str) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50, 4)).astype(np.float32)  # members x pixels x classes
    probabilities = _softmax(logits)
    terms = logits if merge == "mean_logit" else probabilities
    as_maps = [torch.from_numpy(t.T.reshape(1, 4, 5, 10).copy()) for t in terms]  # (1, K, 5, 10)
    expected = merge_terms(as_maps, TTAConfig(merge=merge), [1.0, 0.0, 2.0])
    combined = combine(probabilities, [1.0, 0.0, 2.0], merge)
    np.testing.assert_allclose(combined, expected[0].reshape(4, 50).T.numpy(), atol=1e-5)


def test_a_member_that_hurts_the_ensemble_is_dropped_and_equal_ones_are_kept() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 4000)
    good = np.stack([1 - truth, truth], axis=1) * 0.8 + 0.1  # right everywhere, 0.9 confident
    noise = _softmax(rng.normal(scale=8.0, size=(4000, 2)))  # confident and random
    choice = choose_members(np.stack([good, noise]).astype(np.float32), truth, "mean_prob")
    assert choice.weights == (1.0, 0.0)
    assert choice.scores[(0,)] == pytest.approx(1.0) and choice.scores[(0, 1)] < 0.9
    twins = choose_members(np.stack([good, good]).astype(np.float32), truth, "mean_prob")
    assert twins.weights == (1.0, 1.0)  # a subset must beat everyone by MIN_GAIN to win


def test_more_than_four_members_are_chosen_greedily() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 4000)
    good = np.stack([1 - truth, truth], axis=1) * 0.8 + 0.1
    noise = [_softmax(rng.normal(scale=8.0, size=(4000, 2))) for _ in range(5)]
    choice = choose_members(np.stack([*noise[:2], good, *noise[2:]]).astype(np.float32), truth, "mean_prob")
    assert choice.weights == (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    assert choice.scores[(2,)] == pytest.approx(1.0) and len(choice.scores) == 6  # everyone + 5 steps


def test_class_offsets_recover_an_under_confident_rare_class() -> None:
    rng = np.random.default_rng(2)
    truth = (rng.random(20000) < 0.1).astype(np.int64)  # 10 % foreground
    p_fg = np.where(truth == 1, rng.uniform(0.3, 0.5, truth.size), rng.uniform(0.0, 0.25, truth.size))
    probabilities = np.stack([1 - p_fg, p_fg], axis=1).astype(np.float32)
    tuned = tune_class_bias(probabilities, truth)
    assert tuned.before < 0.6 and tuned.after == pytest.approx(1.0)
    assert tuned.bias[0] == 0.0 and tuned.bias[1] > 0  # only relative offsets matter
    log = np.log(probabilities) + np.asarray(tuned.bias)
    assert miou(log.argmax(1), truth, 2) == pytest.approx(tuned.after)


def test_a_calibrated_model_gets_no_offset() -> None:
    truth = np.array([0, 0, 1, 1] * 500)
    probabilities = np.where(truth[:, None] == np.arange(2), 0.9, 0.1).astype(np.float32)
    assert tune_class_bias(probabilities, truth).bias == (0.0, 0.0)


def test_the_pixel_sample_is_bounded_and_never_takes_ignored_pixels() -> None:
    sample = PixelSample(num_classes=3, members=2, max_pixels=5000)
    rng = np.random.default_rng(3)
    for _ in range(10):
        truth = rng.integers(0, 3, (100, 100))
        truth[:, :10] = 255
        probabilities = rng.random((2, 3, 100, 100)).astype(np.float32)
        sample.add(probabilities, truth, ignore_index=255)
    probabilities, truth = sample.arrays()
    assert sample.pixels == 5000 and probabilities.shape == (2, 5000, 3) and truth.shape == (5000,)
    assert set(np.unique(truth)) <= {0, 1, 2}


def test_the_predictor_applies_offsets_to_the_ensemble_only() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[:, 0], x[:, 0] * 0 + 0.5], dim=1)  # class 1 wins where x < 0.5

    x = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8).expand(1, 3, 8, 8).contiguous()
    plain = EnsemblePredictor([Fixed()], TTAConfig(scales=(1.0,), flips=("none",)), names=["m"])
    biased = EnsemblePredictor(
        [Fixed()], TTAConfig(scales=(1.0,), flips=("none",)), names=["m"], class_bias=[0.0, 0.3]
    )
    before, after = plain.predict_sets(x), biased.predict_sets(x)
    torch.testing.assert_close(after["m"], before["m"])
    assert (after[ENSEMBLE].argmax(1) == 1).sum() > (before[ENSEMBLE].argmax(1) == 1).sum()
    expected = (before[ENSEMBLE].log() + torch.tensor([0.0, 0.3]).view(1, 2, 1, 1)).argmax(1)
    torch.testing.assert_close(after[ENSEMBLE].argmax(1), expected)


def _views(truth: np.ndarray, harmful: set[int], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` views of one member: right and 0.7 confident, or certain and wrong where ``harmful``."""
    onehot = np.stack([1 - truth, truth], axis=1).astype(np.float64)
    right = onehot * 0.4 + 0.3
    return [1.0 - onehot if v in harmful else right + rng.uniform(0, 1e-3, right.shape) for v in range(count)]


def test_a_view_that_hurts_is_left_out_and_equal_views_shrink_to_the_cheapest() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 3000)
    scales, transforms = (0.75, 1.0, 1.25), ("none", "h", "v")
    # 2 members x 9 views (scale-major); flip "v" (views 2, 5, 8) is certain and wrong for both
    views = [*_views(truth, {2, 5, 8}, 9, rng), *_views(truth, {2, 5, 8}, 9, rng)]
    choice = choose_views(np.stack(views).astype(np.float32), truth, 2, scales, transforms, "mean_prob")
    assert "v" not in choice.transforms
    assert choice.score == pytest.approx(1.0) and choice.scores[(scales, transforms)] < 0.5
    assert len(choice.indices) == 1  # every correct set scores 1.0: one view per model is enough
    assert choice.indices[0] == scales.index(choice.scales[0]) * 3 + transforms.index(choice.transforms[0])
    assert len(choice.scores) == 7 * 7  # every non-empty subset of 3 scales x 3 transforms


def test_eight_transforms_are_dropped_greedily() -> None:
    rng = np.random.default_rng(6)
    truth = rng.integers(0, 2, 2000)
    d4 = ("none", "h", "v", "rot90", "rot180", "rot270", "transpose", "antitranspose")
    probabilities = np.stack(_views(truth, {5, 6}, 8, rng)).astype(np.float32)  # 1 member, 1 scale
    choice = choose_views(probabilities, truth, 1, (1.0,), d4, "mean_logit")
    assert choice.score == pytest.approx(1.0) and not {"rot270", "transpose"} & set(choice.transforms)
    assert len(choice.scores) == 8  # all 8, then one set per removal down to a single transform


@pytest.mark.parametrize("merge", ["mean_prob", "mean_logit"])
def test_per_view_probabilities_merge_to_what_the_predictor_predicts(merge: str) -> None:
    torch.manual_seed(0)
    models = [nn.Conv2d(3, 4, 3, padding=1).eval() for _ in range(2)]
    config = TTAConfig(scales=(0.5, 1.0), flips=("none", "rot90"), merge=merge)
    x = torch.randn(1, 3, 12, 16)
    predictor = EnsemblePredictor(models, config, names=["a", "b"])
    per_view = predictor.predict_views(x)  # (1, 2 models x 4 views x 4 classes, 12, 16)
    assert per_view.shape == (1, 2 * 4 * 4, 12, 16)
    sample = per_view[0].reshape(8, 4, -1).permute(0, 2, 1).numpy()  # (members x views, N, K)
    members = member_probabilities(sample, 2, [0, 1, 2, 3], merge)
    with torch.inference_mode():
        first = merge_terms([member_term(models[0], x, config)], config)[0].reshape(4, -1).T.numpy()
    np.testing.assert_allclose(members[0], first, atol=1e-5)  # a member's own TTA merge
    ensemble = combine(members, [1.0, 1.0], merge)
    expected = predictor.predict_probabilities(x)[0].reshape(4, -1).T.numpy()
    np.testing.assert_allclose(ensemble, expected, atol=1e-5)  # and the ensemble's
    assert torch.equal(view_probabilities(models[1], x, config).flatten(1, 2), per_view[:, 16:])
