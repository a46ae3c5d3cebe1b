"""Augmentation: geometric ops keep image and mask aligned, photometric ops leave masks alone, seeding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from seg_pipeline.data.augment import Augmenter, TwoViews, derive_seed
from seg_pipeline.data.normalization import BandStats, normalize
from seg_pipeline.data.transforms import color_transform, d4, swap_hw
from seg_pipeline.settings import AugmentSettings

IGNORE = 255


def _plain(**fields: object) -> AugmentSettings:
    """Augmentation with only the ops named (the settings' defaults are a light colour recipe)."""
    return AugmentSettings(**{**dict(brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0), **fields})


GEOMETRIC_ONLY = dict(brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0)
NO_GEOMETRY = dict(hflip_p=0.0, vflip_p=0.0, rot90=False)


def _image_like_mask(
    rng: np.random.Generator, size: int = 24, bands: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A mask and an image whose band 0 equals the mask (other bands random)."""
    mask = rng.integers(0, 6, size=(size, size), dtype=np.uint8)
    image = rng.integers(0, 255, size=(bands, size, size), dtype=np.uint8)
    image[0] = mask
    return image, mask


def _identity_stats(bands: int = 3) -> BandStats:
    return BandStats((0.0,) * bands, (1.0,) * bands)


@pytest.mark.parametrize(
    ("k", "hflip", "vflip"), list(itertools.product(range(4), [False, True], [False, True]))
)
def test_d4_matches_numpy(k: int, hflip: bool, vflip: bool) -> None:
    array = np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7)
    expected = np.rot90(array, k, axes=(-2, -1))
    if hflip:
        expected = np.flip(expected, -1)
    if vflip:
        expected = np.flip(expected, -2)
    np.testing.assert_array_equal(d4(array, k, hflip, vflip).numpy(), expected)


def test_swap_hw_on_odd_sizes() -> None:
    array = np.random.default_rng(0).integers(0, 9, size=(3, 70, 131), dtype=np.uint16)
    np.testing.assert_array_equal(swap_hw(array), array.transpose(0, 2, 1))


@pytest.mark.parametrize(
    "config",
    [
        _plain(hflip_p=0.5, vflip_p=0.5, rot90=True, **GEOMETRIC_ONLY),
        _plain(crop_size=16, **GEOMETRIC_ONLY),
    ],
    ids=["d4", "crop"],
)
def test_geometric_ops_keep_image_and_mask_aligned(config: AugmentSettings) -> None:
    rng = np.random.default_rng(1)
    image, mask = _image_like_mask(rng)
    augmenter = Augmenter(config, seed=0)
    changed = 0
    for _ in range(12):
        out_image, out_mask = augmenter(image, mask, stats=_identity_stats())
        assert out_mask.dtype == torch.int64 and out_image.dtype == torch.float32
        assert torch.equal(out_image[0].to(torch.int64), out_mask)
        changed += not torch.equal(out_mask[:16, :16], torch.from_numpy(mask[:16, :16]).long())
    assert changed > 0


def test_scale_crop_resamples_mask_nearest_and_stays_aligned() -> None:
    blocks = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) % 6, np.ones((8, 8), dtype=np.uint8))
    image = np.stack([blocks, blocks, blocks]).astype(np.uint8)
    config = _plain(scale_range=(0.6, 1.6), crop_size=24, **GEOMETRIC_ONLY)
    augmenter = Augmenter(config, seed=3)
    for _ in range(10):
        out_image, out_mask = augmenter(image, blocks, stats=_identity_stats())
        mask = out_mask.numpy()
        assert mask.shape == (24, 24)
        assert set(np.unique(mask)) <= set(range(6)) | {IGNORE}  # nearest: no new labels
        valid = mask != IGNORE
        # pixels deep inside a uniform block: bilinear image value equals the nearest mask value
        interior = valid.copy()
        padded = np.pad(mask, 1, mode="edge")
        for dr, dc in itertools.product((-1, 0, 1), repeat=2):
            interior &= padded[1 + dr : 25 + dr, 1 + dc : 25 + dc] == mask
        assert interior.sum() > 100
        np.testing.assert_allclose(out_image[0].numpy()[interior], mask[interior], atol=1e-4)
        assert (out_image[:, ~valid] == 0).all()  # padding is nodata: 0 after normalisation


def test_photometric_ops_never_touch_the_mask() -> None:
    rng = np.random.default_rng(2)
    image, mask = _image_like_mask(rng)
    config = _plain(brightness=0.5, contrast=0.5, saturation=0.5, noise_std=0.5, noise_p=1.0, **NO_GEOMETRY)
    augmenter = Augmenter(config, seed=0)
    stats = BandStats((100.0, 90.0, 80.0), (50.0, 40.0, 30.0))
    plain = normalize(image, stats)
    for _ in range(5):
        out_image, out_mask = augmenter(image, mask, stats=stats)
        np.testing.assert_array_equal(out_mask.numpy(), mask)
        assert not np.allclose(out_image.numpy(), plain)


def test_disabled_is_identity() -> None:
    rng = np.random.default_rng(3)
    image, mask = _image_like_mask(rng)
    stats = BandStats((100.0, 90.0, 80.0), (50.0, 40.0, 30.0))
    out_image, out_mask = Augmenter(AugmentSettings.off(), seed=4)(image, mask, stats=stats)
    expected = (image - np.array(stats.mean)[:, None, None]) / np.array(stats.std)[:, None, None]
    np.testing.assert_allclose(out_image.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out_mask.numpy(), mask)


def test_same_seed_same_output_different_seed_differs() -> None:
    rng = np.random.default_rng(4)
    image, mask = _image_like_mask(rng)
    config = AugmentSettings(noise_p=1.0)

    def run(seed: int) -> list[torch.Tensor]:
        augmenter = Augmenter(config, seed=seed)
        return [augmenter(image, mask)[0] for _ in range(4)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    augmenter = Augmenter(config, seed=0)
    augmenter.reseed(5, "tile_1")
    first = augmenter(image, mask)[0]
    augmenter(image, mask)
    augmenter.reseed(5, "tile_1")
    assert torch.equal(augmenter(image, mask)[0], first)


def test_augmenter_survives_pickling_with_its_stream() -> None:
    import pickle

    augmenter = Augmenter(AugmentSettings(noise_p=1.0), seed=7)
    image, mask = _image_like_mask(np.random.default_rng(5))
    augmenter(image, mask)
    clone = pickle.loads(pickle.dumps(augmenter))
    assert torch.equal(clone(image, mask)[0], augmenter(image, mask)[0])


def test_saturation_matches_torchvision() -> None:
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    augmenter = Augmenter(_plain(saturation=0.4, **NO_GEOMETRY), seed=0)
    for key in range(6):
        augmenter.reseed(key)
        factor = augmenter.sample_params(3, 16, 16).saturation
        augmenter.reseed(key)
        out, _ = augmenter(image, None)
        expected = TF.adjust_saturation(torch.from_numpy(image).float() / 255.0, factor) * 255.0
        if factor <= 1.0:  # torchvision clamps to [0, 1]; a desaturation never leaves the range
            np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-3)


def test_colour_matrix_equals_fused_path() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    stats = BandStats((100.0, 90.0, 80.0), (50.0, 40.0, 30.0))
    augmenter = Augmenter(_plain(brightness=0.3, contrast=0.3, saturation=0.3, **NO_GEOMETRY), seed=1)
    augmenter.reseed(0)
    params = augmenter.sample_params(3, 8, 8)
    augmenter.reseed(0)
    out, _ = augmenter(image, None, stats=stats)
    matrix, bias = color_transform(params, stats)
    reference = (matrix @ torch.from_numpy(image).float().reshape(3, -1) + bias[:, None]).reshape(3, 8, 8)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-5)
    # independent check of the semantics: brightness f and contrast c around the dataset mean
    f, c, s = params.brightness[0], params.contrast[0], params.saturation
    x = image.astype(np.float64)
    gray = np.tensordot(np.array([0.2989, 0.587, 0.114]), f * x, axes=1)
    mixed = gray + s * (f * x - gray)
    mean, std = np.array(stats.mean)[:, None, None], np.array(stats.std)[:, None, None]
    expected = (mean + c * (mixed - mean) - mean) / std
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


def test_multiband_photometric_is_per_band_without_saturation() -> None:
    image = np.full((7, 8, 8), 100, dtype=np.uint16)
    augmenter = Augmenter(_plain(brightness=0.5, **NO_GEOMETRY), seed=0)
    out, _ = augmenter(image, None, stats=_identity_stats(7))
    per_band = out[:, 0, 0]
    assert len(set(per_band.tolist())) == 7  # one brightness factor per band
    assert torch.equal(out, per_band[:, None, None].expand(7, 8, 8))
    rgb, _ = Augmenter(_plain(brightness=0.5, **NO_GEOMETRY), seed=0)(
        np.full((3, 8, 8), 100, np.uint8), None, stats=_identity_stats(3)
    )
    assert len(set(rgb[:, 0, 0].tolist())) == 1  # RGB shares one factor
    saturation_only = Augmenter(_plain(saturation=0.9, **NO_GEOMETRY), seed=0)
    varied = np.random.default_rng(0).integers(0, 1000, size=(7, 8, 8)).astype(np.uint16)
    out, _ = saturation_only(varied, None, stats=_identity_stats(7))
    np.testing.assert_allclose(out.numpy(), varied.astype(np.float32))


@pytest.mark.parametrize("bank", [1 << 16, 0], ids=["bank", "fresh"])
def test_noise_is_zero_mean_with_drawn_sigma(bank: int) -> None:
    image = np.full((3, 64, 64), 10, dtype=np.uint8)
    augmenter = Augmenter(_plain(noise_std=0.5, noise_p=1.0, noise_bank_size=bank, **NO_GEOMETRY), seed=0)
    augmenter.reseed(1)
    sigma = augmenter.sample_params(3, 64, 64).noise_sigma[0]
    augmenter.reseed(1)
    out, _ = augmenter(image, None, stats=_identity_stats())
    noise = out.numpy() - 10.0
    assert abs(noise.mean()) < 0.05 * sigma + 1e-3
    assert noise.std() == pytest.approx(sigma, rel=0.05)


def test_the_noise_bank_is_made_with_the_augmenter_and_equals_a_lazy_one() -> None:
    """Made up front (not inside the first batch's data wait), with the values a first draw made."""
    config = _plain(noise_std=0.5, noise_p=1.0, noise_bank_size=1 << 16, **NO_GEOMETRY)
    eager = Augmenter(config, seed=3)
    assert eager._bank is not None and eager._bank.numel() == 1 << 16
    lazy = Augmenter(config, seed=3)
    lazy._bank = None
    assert torch.equal(lazy.noise(3 * 64 * 64, 1234), eager.noise(3 * 64 * 64, 1234))
    assert Augmenter(_plain(noise_p=0.0), seed=3)._bank is None  # no noise drawn: no bank


def test_nodata_follows_the_geometry() -> None:
    rng = np.random.default_rng(8)
    image, mask = _image_like_mask(rng)
    invalid = np.zeros(mask.shape, dtype=bool)
    invalid[:, :5] = True
    augmenter = Augmenter(_plain(**GEOMETRIC_ONLY), seed=2)
    for _ in range(8):
        out_image, out_mask = augmenter(image, mask, stats=_identity_stats(), invalid=invalid)
        ignored = out_mask == IGNORE
        assert int(ignored.sum()) == invalid.sum()
        assert (out_image[:, ignored] == 0).all()
        assert torch.equal(out_image[0][~ignored].long(), out_mask[~ignored])


def test_two_views_differ_and_each_is_aligned() -> None:
    rng = np.random.default_rng(9)
    image, mask = _image_like_mask(rng)
    views = TwoViews(Augmenter(_plain(**GEOMETRIC_ONLY), seed=1))
    differ = False
    for _ in range(4):
        out = views(image, mask, stats=_identity_stats())
        for v in ("1", "2"):
            assert torch.equal(out[f"image_view{v}"][0].long(), out[f"mask_view{v}"])
        differ |= not torch.equal(out["mask_view1"], out["mask_view2"])
        assert out["image"] is out["image_view1"]
    assert differ


# -- augment.rare_boost: stronger colour jitter for samples holding a rare class ----------------------

COLOUR = dict(brightness=0.2, contrast=0.2, saturation=0.2, noise_std=0.1, noise_p=1.0, **NO_GEOMETRY)


def _rare_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image and two masks of it: one with a patch of class 5 (the rare one), one without."""
    image = rng.integers(40, 200, size=(3, 24, 24), dtype=np.uint8)
    without = rng.integers(0, 4, size=(24, 24), dtype=np.uint8)
    with_rare = without.copy()
    with_rare[3:6, 3:6] = 5
    return image, with_rare, without


def test_rare_boost_widens_the_jitter_of_samples_with_a_rare_class() -> None:
    image, with_rare, without = _rare_pair(np.random.default_rng(11))
    stats = BandStats((100.0, 90.0, 80.0), (50.0, 40.0, 30.0))
    plain = torch.from_numpy(normalize(image, stats)).float()
    boosted = Augmenter(_plain(**COLOUR, rare_boost=3.0), seed=2, rare_values=[5])
    base = Augmenter(_plain(**COLOUR), seed=2, rare_values=[5])
    assert boosted.holds_rare(with_rare) and not boosted.holds_rare(without)
    assert not base.holds_rare(with_rare)  # rare_boost=1: nothing is boosted
    strong, weak = [], []
    for item in range(20):
        for augmenter in (boosted, base):
            augmenter.reseed(0, item)
        params_boosted = boosted.sample_params(3, 24, 24, rare=True)
        params_base = base.sample_params(3, 24, 24, rare=True)
        assert params_boosted.boost == 3.0 and params_base.boost == 1.0
        # the same draws, the deviations from "no change" three times as large
        np.testing.assert_allclose(params_boosted.brightness - 1, 3 * (params_base.brightness - 1))
        np.testing.assert_allclose(params_boosted.contrast - 1, 3 * (params_base.contrast - 1))
        assert params_boosted.saturation - 1 == pytest.approx(3 * (params_base.saturation - 1))
        if params_base.noise_sigma is not None:
            np.testing.assert_allclose(params_boosted.noise_sigma, 3 * params_base.noise_sigma)
        # on pixels: the rare sample moves further from the plain image than without the boost
        for augmenter in (boosted, base):
            augmenter.reseed(1, item)
        strong.append(float((boosted(image, with_rare, stats=stats)[0] - plain).abs().mean()))
        weak.append(float((base(image, with_rare, stats=stats)[0] - plain).abs().mean()))
    assert np.mean(strong) > 2.0 * np.mean(weak)


def test_rare_boost_leaves_samples_without_a_rare_class_and_the_off_case_alone() -> None:
    image, with_rare, without = _rare_pair(np.random.default_rng(12))
    stats = BandStats((100.0, 90.0, 80.0), (50.0, 40.0, 30.0))
    boosted = Augmenter(_plain(**COLOUR, rare_boost=3.0), seed=2, rare_values=[5])
    plain_rare = Augmenter(_plain(**COLOUR), seed=2, rare_values=[5])  # rare_boost=1 (off)
    no_rare = Augmenter(_plain(**COLOUR), seed=2)  # the augmenter as it was before the knob
    for item in range(10):
        outputs = []
        for augmenter, mask in ((boosted, without), (plain_rare, with_rare), (no_rare, with_rare)):
            augmenter.reseed(item)
            outputs.append(augmenter(image, mask, stats=stats))
        for out_image, _ in outputs[1:]:  # the same pixels (the masks are the inputs: no geometry)
            assert torch.equal(out_image, outputs[0][0])


def test_a_boosted_colour_spread_stays_below_one() -> None:
    augmenter = Augmenter(_plain(brightness=0.5, contrast=0.95, rare_boost=4.0), seed=0, rare_values=[1])
    for item in range(50):
        augmenter.reseed(item)
        params = augmenter.sample_params(3, 8, 8, rare=True)
        assert ((params.brightness >= 0.1 - 1e-9) & (params.brightness <= 1.9 + 1e-9)).all()
        assert (params.contrast > 0.0).all()  # 0.95 already above the cap: kept, not grown


def test_rare_boost_in_the_training_stream(tmp_path) -> None:
    """Through build_training_data: fire patches get stronger jitter, the others exactly the same."""
    from seg_pipeline_tests.data.test_sampling import FIRE, fire_data, ingest_fire_dataset

    shards = ingest_fire_dataset(tmp_path)
    colour = {"brightness": 0.15, "contrast": 0.15, "saturation": 0.15, "noise_std": 0.0, **NO_GEOMETRY}
    runs = {
        name: {s["item_id"]: s for s in fire_data(shards, augment=augment)}
        for name, augment in {
            "plain": {"enabled": False},
            "off": colour,
            "on": {**colour, "rare_boost": 3.0},
        }.items()
    }
    assert runs["on"].keys() == runs["off"].keys() == runs["plain"].keys()
    strong, weak = [], []
    for item_id, sample in runs["on"].items():
        plain = runs["plain"][item_id]["image"]
        if (sample["mask"] == FIRE).any():
            strong.append(float((sample["image"] - plain).abs().mean()))
            weak.append(float((runs["off"][item_id]["image"] - plain).abs().mean()))
        else:
            assert torch.equal(sample["image"], runs["off"][item_id]["image"]), item_id
    assert len(strong) >= 3 and np.mean(strong) > 2.0 * np.mean(weak)
    rare_named = fire_data(shards, augment={**colour, "rare_boost": 3.0}, loader={"rare_classes": ["fire"]})
    assert {s["item_id"]: s["image"].sum().item() for s in rare_named} == {
        k: s["image"].sum().item() for k, s in runs["on"].items()
    }  # auto finds fire, as naming it does


def test_derive_seed_is_stable() -> None:
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")
    assert 0 <= derive_seed("x") < 2**63


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hflip_p": 1.5}, "hflip_p"),
        ({"brightness": -0.1}, "brightness"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"scale_range": (1.2, 0.8)}, "scale_range"),
        ({"crop_size": 0}, "crop_size"),
        ({"rare_boost": 0.5}, "rare_boost"),
        ({"views_per_sample": 3}, "views_per_sample"),
        ({"views_per_sample": 2, "enabled": False}, "views_per_sample"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _plain(**kwargs)


def test_band_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="bands"):
        Augmenter()(np.zeros((4, 8, 8), np.uint8), None, stats=_identity_stats(3))
