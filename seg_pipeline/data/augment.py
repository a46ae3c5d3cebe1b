"""Seeded augmentation for segmentation tiles, fused with normalisation (F8 in docs/architecture.md).

Plain numpy/torch ops, no kornia or albumentations: the ops are 90-degree rotations, flips, one
crop/resize and per-band affine colour changes. Measured for the same ops on one 256x256 RGB tile
(one thread), ``kornia.augmentation`` 0.9 took about 11.5 ms of CPU and this module 0.7 ms: on
CPU the cost is memory passes over float32 pixels, so the work is arranged to touch each pixel
as few times as possible, in two stages:

- :func:`geometric_stage`: D4 rotations/flips and optional scale+crop on the *raw* tile
  (``uint8`` for RGB: 4x fewer bytes than float32), identically on image, mask and nodata map;
- :func:`photometric_batch`: brightness, contrast and saturation are linear in the raw values,
  so with ``(x - mean) / std`` they become one per-band scale and offset (plus one grey term for
  saturation), applied while converting to float32; gaussian noise is read at a random offset
  from a per-process bank of standard-normal values (``noise_bank_size``; 0 draws fresh values
  from a per-sample seed), several times cheaper than ``randn`` per tile.

The stages live in :mod:`seg_pipeline.data.transforms`. The loader's batch mode runs the first
stage in DataLoader workers and the second in the main process on whole batches (see
``ShardIterableDataset(batch_size=...)``); both stages are the same code either way, so results
are identical.

Photometric semantics (raw pixel values ``x``, per-band dataset mean ``m``):
brightness ``x * f``; saturation (exactly 3 bands, taken as RGB) ``gray + s * (x - gray)`` with
torchvision's luma weights; contrast ``m + c * (x - m)`` (around the dataset mean, not the image's,
which keeps it foldable into normalisation); noise ``+ sigma * N(0, 1)`` in normalised units.
RGB draws one ``f``, ``c``, ``sigma`` for all bands; other band counts draw them per band and
skip saturation. Photometric ops never touch the mask.

Rare-class boost (seed 003's ``fire_augment``, ``augment.rare_boost``): an augmenter built with
``rare_values`` (the mask values of the rare classes, in the scheme of the masks it sees) draws
stronger colour changes for samples whose mask holds one of them: the brightness, contrast and
saturation spreads and the noise sigma are multiplied by ``rare_boost`` (a colour spread grows to at
most :data:`MAX_BOOSTED_SPREAD`, so factors stay positive). The random draws are the same numbers
either way, only scaled, so with ``rare_boost=1`` (the default) or no rare values nothing changes,
and samples without a rare class are augmented exactly as before. Which classes are rare is
``loader.rare_classes`` (or its auto rule), resolved by ``seg_pipeline.training.sources``.

Reproducibility: an :class:`Augmenter` owns a ``torch.Generator``. Datasets call
:meth:`Augmenter.reseed` with ``(seed, epoch, item_id)`` before each sample, so an item's
augmentation depends only on those keys, not on which DataLoader worker or rank drew it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.settings.batches import AugmentSettings

#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601, red as 0.2989), for saturation.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
#: Uniform draws per sample, fixed so the stream does not shift when options change.
_N_DRAWS = 12
#: ``rare_boost`` widens a colour spread (brightness, contrast, saturation) to at most this.
MAX_BOOSTED_SPREAD = 0.9


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed that depends only on ``keys`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class AugmentParams:
    """The random draws for one sample (all identity values when augmentation is off).

    ``window`` is ``(top, left, height, width)`` of the source region resized to ``out_size`` (it
    may extend past the tile; that part is padded with nodata/ignore). ``boost`` is the factor the
    photometric ranges were drawn with (``rare_boost`` for a sample with a rare class, else 1).
    """

    rot_k: int = 0
    hflip: bool = False
    vflip: bool = False
    window: tuple[int, int, int, int] | None = None
    out_size: tuple[int, int] | None = None
    brightness: np.ndarray | None = None
    contrast: np.ndarray | None = None
    saturation: float = 1.0
    noise_sigma: np.ndarray | None = None
    noise_offset: int = 0
    boost: float = 1.0


IDENTITY = AugmentParams()


def _boosted(spread: float, boost: float) -> float:
    """A colour spread times ``boost``, grown to at most :data:`MAX_BOOSTED_SPREAD` (never shrunk)."""
    if boost == 1.0:
        return spread
    return min(spread * boost, max(spread, MAX_BOOSTED_SPREAD))


def _factor(u_apply: float, u_value: float, p: float, spread: float) -> float:
    if spread <= 0 or u_apply >= p:
        return 1.0
    return 1.0 - spread + 2.0 * spread * u_value


class Augmenter:
    """Draws and applies augmentation; call it on a sample or let a dataset use it.

    Args:
        config: What to randomise.
        seed: Base seed; mixed into every :meth:`reseed`, so two augmenters with different
            seeds give different streams for the same sample keys.
        rare_values: Mask values of the rare classes: samples holding one get ``config.rare_boost``
            (see :meth:`holds_rare`); empty = no sample is boosted.
    """

    def __init__(
        self, config: AugmentSettings | None = None, seed: int = 0, rare_values: Sequence[int] = ()
    ) -> None:
        self.config = config if config is not None else AugmentSettings()
        self.seed = int(seed)
        self.rare_values = tuple(sorted({int(v) for v in rare_values}))
        self.generator = torch.Generator().manual_seed(derive_seed("augmenter", self.seed))
        self._bank: torch.Tensor | None = None
        cfg = self.config
        if cfg.enabled and cfg.noise_bank_size > 0 and cfg.noise_std > 0 and cfg.noise_p > 0:
            # made now, not in the first batch: 4 M values take ~50 ms, 1.5 % of the demo's first
            # epoch; forked workers inherit it (bench/RESULTS.md, 2026-12-07 "leases")
            self._bank = self._make_bank(cfg.noise_bank_size)

    def __getstate__(self) -> dict[str, Any]:
        """Workers rebuild the noise bank themselves instead of receiving 16 MB through a pipe."""
        state = self.__dict__.copy()
        state["_bank"] = None
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("generator")
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(generator_state)

    def reseed(self, *keys: Any) -> None:
        """Restart the random stream from ``(seed, *keys)``, e.g. ``(epoch, item_id)``."""
        self.generator.manual_seed(derive_seed("augmenter", self.seed, *keys))

    # -- drawing ------------------------------------------------------------------------------
    def holds_rare(self, mask: np.ndarray | torch.Tensor | None) -> bool:
        """Whether ``mask`` holds a rare class, i.e. the sample gets ``rare_boost`` (False when off)."""
        if mask is None or not self.rare_values or self.config.rare_boost == 1.0 or not self.config.enabled:
            return False
        values = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        return bool(np.isin(values, self.rare_values).any())

    def sample_params(self, bands: int, height: int, width: int, *, rare: bool = False) -> AugmentParams:
        """Draw the parameters of one sample of ``bands x height x width`` pixels.

        ``rare`` (the sample holds a rare class, :meth:`holds_rare`) scales the photometric ranges by
        ``rare_boost``; the draws themselves are the same.
        """
        cfg = self.config
        if not cfg.enabled:
            return IDENTITY
        boost = cfg.rare_boost if rare else 1.0
        spread_b, spread_c = _boosted(cfg.brightness, boost), _boosted(cfg.contrast, boost)
        spread_s, noise_std = _boosted(cfg.saturation, boost), cfg.noise_std * boost
        u = torch.rand(_N_DRAWS, generator=self.generator, dtype=torch.float64).tolist()
        per_band = bands != 3
        n_band_draws = bands if per_band else 1
        v = torch.rand(3 * n_band_draws, generator=self.generator, dtype=torch.float64).numpy()
        window = out_size = None
        out_h, out_w = height, width
        if cfg.scale_range is not None or cfg.crop_size is not None:
            if cfg.crop_size is not None:
                out_h = out_w = cfg.crop_size
            low, high = cfg.scale_range if cfg.scale_range is not None else (1.0, 1.0)
            scale = low + (high - low) * u[3]
            win_h, win_w = max(1, round(out_h / scale)), max(1, round(out_w / scale))
            window = (_start(height, win_h, u[4]), _start(width, win_w, u[5]), win_h, win_w)
            out_size = (out_h, out_w)
        rot_k = 0
        if cfg.rot90:  # a non-square output only turns by 180 degrees, so its shape stays put
            rot_k = int(u[0] * 4) % 4 if out_h == out_w else 2 * (int(u[0] * 2) % 2)
        brightness = contrast = sigma = None
        apply_p = cfg.photometric_p
        if spread_b > 0 and u[6] < apply_p:
            brightness = 1.0 - spread_b + 2.0 * spread_b * v[:n_band_draws]
        if spread_c > 0 and u[7] < apply_p:
            contrast = 1.0 - spread_c + 2.0 * spread_c * v[n_band_draws : 2 * n_band_draws]
        saturation = 1.0 if per_band else _factor(u[8], u[9], apply_p, spread_s)
        noise_offset = 0
        if noise_std > 0 and u[10] < cfg.noise_p:
            sigma = noise_std * v[2 * n_band_draws : 3 * n_band_draws]
            noise_offset = int(u[11] * (1 << 40))
        if not per_band:
            brightness = None if brightness is None else np.repeat(brightness, bands)
            contrast = None if contrast is None else np.repeat(contrast, bands)
            sigma = None if sigma is None else np.repeat(sigma, bands)
        return AugmentParams(
            rot_k=rot_k,
            hflip=u[1] < cfg.hflip_p,
            vflip=u[2] < cfg.vflip_p,
            window=window,
            out_size=out_size,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            noise_sigma=sigma,
            noise_offset=noise_offset,
            boost=boost,
        )

    def noise(self, numel: int, offset: int) -> torch.Tensor:
        """``numel`` standard-normal values for the sample whose noise draw is ``offset``.

        A slice of the bank at ``offset``, or (``noise_bank_size=0``) fresh values from a
        generator seeded by ``offset``: either way a function of the sample's own draws, so a
        batch finished in another process gets the same noise.
        """
        bank_size = self.config.noise_bank_size
        if bank_size == 0:
            generator = torch.Generator().manual_seed(derive_seed("noise", self.seed, offset))
            return torch.randn(numel, generator=generator)
        if self._bank is None or self._bank.numel() < 2 * numel:
            self._bank = self._make_bank(max(bank_size, 2 * numel))
        start = offset % (self._bank.numel() - numel + 1)
        return self._bank[start : start + numel]

    def _make_bank(self, size: int) -> torch.Tensor:
        """``size`` standard-normal values, a function of the augmenter's seed only."""
        generator = torch.Generator().manual_seed(derive_seed("noise-bank", self.seed))
        return torch.randn(size, generator=generator)

    # -- applying -----------------------------------------------------------------------------
    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        *,
        stats: BandStats | None = None,
        invalid: np.ndarray | None = None,
        ignore_index: int = 255,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one ``(C, H, W)`` image and its ``(H, W)`` mask with fresh draws.

        Args:
            image: Raw pixels (normalised with ``stats``) or, with ``stats=None``, values that are
                already normalised.
            mask: Class ids; ``None`` means unlabeled (all ``ignore_index``).
            stats: Band statistics for normalisation; ``None`` = identity.
            invalid: ``(H, W)`` bool map of nodata pixels (set to 0 and ``ignore_index``).
            ignore_index: Mask value for unlabeled, nodata and padded pixels.

        Returns:
            ``(image float32 (C, H', W'), mask int64 (H', W'))``.
        """
        image_np = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        mask_np = mask.numpy() if isinstance(mask, torch.Tensor) else mask
        bands, height, width = image_np.shape
        stats = stats if stats is not None else BandStats((0.0,) * bands, (1.0,) * bands)
        params = self.sample_params(bands, height, width, rare=self.holds_rare(mask_np))
        out_h, out_w = params.out_size if params.out_size is not None else (height, width)
        out_image = torch.empty((bands, out_h, out_w), dtype=torch.float32)
        out_mask = torch.empty((out_h, out_w), dtype=torch.int64)
        from seg_pipeline.data.transforms import write_sample  # the stages need this module's types

        write_sample(out_image, out_mask, image_np, mask_np, invalid, stats, params, self, ignore_index)
        return out_image, out_mask


class TwoViews:
    """Two independently augmented views of the same sample (seed 000's two-view loader).

    ``image``/``mask`` in the result are view 1, so code written for single-view samples works.
    """

    def __init__(self, augmenter: Augmenter) -> None:
        self.augmenter = augmenter

    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Return ``image_view1``, ``mask_view1``, ``image_view2``, ``mask_view2`` (+ image/mask)."""
        image1, mask1 = self.augmenter(image, mask, **kwargs)
        image2, mask2 = self.augmenter(image, mask, **kwargs)
        return {
            "image": image1,
            "mask": mask1,
            "image_view1": image1,
            "mask_view1": mask1,
            "image_view2": image2,
            "mask_view2": mask2,
        }


def _start(size: int, side: int, u: float) -> int:
    """Top/left of a ``side`` window: inside the tile when it fits, else covering it with padding."""
    if side <= size:
        return min(int(u * (size - side + 1)), size - side)
    return -min(int(u * (side - size + 1)), side - size)
