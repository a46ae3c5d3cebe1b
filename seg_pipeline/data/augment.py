"""Seeded augmentation for segmentation tiles, fused with normalisation (DESIGN F8).

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

The loader's batch mode runs the first stage in DataLoader workers and the second in the main
process on whole batches (see ``ShardIterableDataset(batch_size=...)``); both stages are the
same code either way, so results are identical.

Photometric semantics (raw pixel values ``x``, per-band dataset mean ``m``):
brightness ``x * f``; saturation (exactly 3 bands, taken as RGB) ``gray + s * (x - gray)`` with
torchvision's luma weights; contrast ``m + c * (x - m)`` (around the dataset mean, not the image's,
which keeps it foldable into normalisation); noise ``+ sigma * N(0, 1)`` in normalised units.
RGB draws one ``f``, ``c``, ``sigma`` for all bands; other band counts draw them per band and
skip saturation. Photometric ops never touch the mask.

Reproducibility: an :class:`Augmenter` owns a ``torch.Generator``. Datasets call
:meth:`Augmenter.reseed` with ``(seed, epoch, item_id)`` before each sample, so an item's
augmentation depends only on those keys, not on which DataLoader worker or rank drew it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seg_pipeline.data.normalization import BandStats
from seg_pipeline.settings.training import AugmentSettings

#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601, red as 0.2989), for saturation.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
#: Side of the square blocks of the cache-friendly transpose (3 x 64 x 64 uint8 fits in L1).
_TRANSPOSE_BLOCK = 64
#: Uniform draws per sample, fixed so the stream does not shift when options change.
_N_DRAWS = 12


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed that depends only on ``keys`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class AugmentParams:
    """The random draws for one sample (all identity values when augmentation is off).

    ``window`` is ``(top, left, height, width)`` of the source region resized to ``out_size`` (it
    may extend past the tile; that part is padded with nodata/ignore).
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


IDENTITY = AugmentParams()


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
    """

    def __init__(self, config: AugmentSettings | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else AugmentSettings()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(derive_seed("augmenter", self.seed))
        self._bank: torch.Tensor | None = None

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
    def sample_params(self, bands: int, height: int, width: int) -> AugmentParams:
        """Draw the parameters of one sample of ``bands x height x width`` pixels."""
        cfg = self.config
        if not cfg.enabled:
            return IDENTITY
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
        if cfg.brightness > 0 and u[6] < apply_p:
            brightness = 1.0 - cfg.brightness + 2.0 * cfg.brightness * v[:n_band_draws]
        if cfg.contrast > 0 and u[7] < apply_p:
            contrast = 1.0 - cfg.contrast + 2.0 * cfg.contrast * v[n_band_draws : 2 * n_band_draws]
        saturation = 1.0 if per_band else _factor(u[8], u[9], apply_p, cfg.saturation)
        noise_offset = 0
        if cfg.noise_std > 0 and u[10] < cfg.noise_p:
            sigma = cfg.noise_std * v[2 * n_band_draws : 3 * n_band_draws]
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
            size = max(bank_size, 2 * numel)
            bank_generator = torch.Generator().manual_seed(derive_seed("noise-bank", self.seed))
            self._bank = torch.randn(size, generator=bank_generator)
        start = offset % (self._bank.numel() - numel + 1)
        return self._bank[start : start + numel]

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
        params = self.sample_params(bands, height, width)
        out_h, out_w = params.out_size if params.out_size is not None else (height, width)
        out_image = torch.empty((bands, out_h, out_w), dtype=torch.float32)
        out_mask = torch.empty((out_h, out_w), dtype=torch.int64)
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


def swap_hw(array: np.ndarray) -> np.ndarray:
    """Transpose the last two axes into a new C-contiguous array, block by block.

    A plain ``ascontiguousarray(a.swapaxes(-1, -2))`` walks memory with a large stride and is
    about 3x slower for ``uint8`` tiles; 64 x 64 blocks stay in L1 cache.
    """
    height, width = array.shape[-2:]
    out = np.empty((*array.shape[:-2], width, height), dtype=array.dtype)
    b = _TRANSPOSE_BLOCK
    for r in range(0, height, b):
        for c in range(0, width, b):
            out[..., c : c + b, r : r + b] = array[..., r : r + b, c : c + b].swapaxes(-1, -2)
    return out


def d4(array: np.ndarray, rot_k: int, hflip: bool, vflip: bool) -> torch.Tensor:
    """``np.rot90(k)`` in the last two axes, then horizontal and vertical flips, as one tensor.

    Identical to ``np.flip(np.flip(np.rot90(a, k, (-2, -1)), -1), -2)`` (with the flips
    applied only when asked) but with at most one transpose and one flip copy.
    """
    k = rot_k % 4
    flip_w = {0: False, 1: False, 2: True, 3: True}[k] ^ hflip
    flip_h = {0: False, 1: True, 2: True, 3: False}[k] ^ vflip
    if k % 2:
        array = swap_hw(array)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch has no arithmetic on uint16/32
        array = array.astype(np.int32 if array.dtype.itemsize == 2 else np.int64)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    dims = [d for d, on in ((-2, flip_h), (-1, flip_w)) if on]
    return tensor.flip(dims) if dims else tensor


def crop_with_padding(
    array: np.ndarray, top: int, left: int, win_h: int, win_w: int, fill: float | int | bool
) -> np.ndarray:
    """The ``win_h x win_w`` window at ``(top, left)`` of the last two axes; outside is ``fill``."""
    height, width = array.shape[-2:]
    if top >= 0 and left >= 0 and top + win_h <= height and left + win_w <= width:
        return array[..., top : top + win_h, left : left + win_w]
    out = np.full((*array.shape[:-2], win_h, win_w), fill, dtype=array.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + win_h, height), min(left + win_w, width)
    if r1 > r0 and c1 > c0:
        out[..., r0 - top : r1 - top, c0 - left : c1 - left] = array[..., r0:r1, c0:c1]
    return out


def _nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (pixel-centre sampling, like torch 'nearest-exact')."""
    height, width = array.shape[-2:]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return array[..., rows[:, None], cols[None, :]]


def _scale_crop(
    image: np.ndarray, mask: np.ndarray, invalid: np.ndarray, params: AugmentParams, ignore_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop the parameter window (padding outside) and resize it: image bilinear, mask nearest."""
    assert params.window is not None and params.out_size is not None
    top, left, win_h, win_w = params.window
    window_image = crop_with_padding(image, top, left, win_h, win_w, 0)
    window_mask = crop_with_padding(mask, top, left, win_h, win_w, ignore_index)
    window_invalid = crop_with_padding(invalid, top, left, win_h, win_w, True)
    if (win_h, win_w) != params.out_size:
        source = torch.from_numpy(np.ascontiguousarray(window_image, dtype=np.float32))[None]
        window_image = F.interpolate(source, size=params.out_size, mode="bilinear", align_corners=False)[
            0
        ].numpy()
        window_mask = _nearest(window_mask, params.out_size)
        window_invalid = _nearest(window_invalid, params.out_size)
    return window_image, window_mask, window_invalid


@functools.lru_cache(maxsize=64)
def _stats_arrays(stats: BandStats) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(stats.mean, dtype=np.float64), np.asarray(stats.std, dtype=np.float64)


def photometric_affine(params: AugmentParams, stats: BandStats) -> tuple[list[float], list[float], float]:
    """Per-band ``scale``, ``offset`` and the saturation factor ``s`` of one sample.

    ``normalised_c = scale_c * (s * x_c + (1 - s) * gray(x)) + offset_c`` reproduces brightness
    ``f``, saturation ``s``, contrast ``c`` and normalisation: ``scale = c * f / std`` and
    ``offset = -c * mean / std``. Saturation only happens for 3 bands, where ``f`` and ``c``
    are shared by all bands, so brightness commutes with the grey mix.
    """
    mean, std = _stats_arrays(stats)
    f = params.brightness if params.brightness is not None else 1.0
    c = params.contrast if params.contrast is not None else 1.0
    scale = np.broadcast_to(c * f / std, mean.shape)
    offset = np.broadcast_to(-c * mean / std, mean.shape)
    saturation = params.saturation if stats.bands == 3 else 1.0
    return scale.tolist(), offset.tolist(), float(saturation)


def color_transform(params: AugmentParams, stats: BandStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``C x C`` matrix ``M`` and bias ``b`` with ``normalised = M @ raw + b`` (a reference
    form of :func:`photometric_affine`, handy for tests and for applying the same colour change
    to other arrays)."""
    scale, offset, s = photometric_affine(params, stats)
    bands = stats.bands
    mix = np.eye(bands)
    if s != 1.0:
        mix = s * np.eye(3) + (1.0 - s) * np.outer(np.ones(3), LUMA_WEIGHTS)
    matrix = np.diag(scale) @ mix
    return torch.from_numpy(matrix.astype(np.float32)), torch.tensor(offset, dtype=torch.float32)


@dataclass(frozen=True)
class GeometricResult:
    """A sample after the geometric stage, still in raw pixel values.

    Attributes:
        image: ``(C, H, W)`` raw values (``uint8`` stays ``uint8``; float after a resize).
        mask: ``(H, W)`` class ids with nodata and padding already set to ``ignore_index``.
        invalid: ``(H, W)`` bool nodata/padding map, or ``None`` when every pixel is valid.
    """

    image: torch.Tensor
    mask: torch.Tensor
    invalid: torch.Tensor | None


def geometric_stage(
    image: np.ndarray,
    mask: np.ndarray | None,
    invalid: np.ndarray | None,
    params: AugmentParams,
    bands: int,
    ignore_index: int,
) -> GeometricResult:
    """Crop/resize and D4-transform image, mask and nodata map together (raw dtype kept)."""
    if image.ndim != 3 or image.shape[0] != bands:
        raise ValueError(
            f"image has shape {image.shape} but the band statistics describe {bands} bands; "
            "expected (bands, H, W) with matching band count"
        )
    if mask is not None and mask.shape != image.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} differs from image size {image.shape[1:]}")
    if mask is None:
        mask = np.full(image.shape[1:], ignore_index, dtype=np.uint8 if ignore_index < 256 else np.int64)
    if params.window is not None:
        invalid_map = invalid if invalid is not None else np.zeros(image.shape[1:], dtype=bool)
        image, mask, invalid = _scale_crop(image, mask, invalid_map, params, ignore_index)
        if not invalid.any():
            invalid = None
    if invalid is not None:
        if mask.dtype.itemsize == 1 and ignore_index > 255:
            mask = mask.astype(np.int64)
        mask = np.where(invalid, np.asarray(ignore_index, dtype=mask.dtype), mask)
    image_t = d4(image, params.rot_k, params.hflip, params.vflip)
    mask_t = d4(mask, params.rot_k, params.hflip, params.vflip)
    invalid_t = None if invalid is None else d4(invalid, params.rot_k, params.hflip, params.vflip)
    return GeometricResult(image_t, mask_t, invalid_t)


def photometric_batch(
    out: torch.Tensor,
    raw: torch.Tensor,
    invalid: Sequence[torch.Tensor | None],
    stats: BandStats,
    params: Sequence[AugmentParams],
    augmenter: Augmenter | None,
) -> None:
    """Write ``normalise(photometric(raw))`` for a batch into ``out`` (float32 ``(B, C, H, W)``).

    One dtype-converting copy and one broadcast scale/offset for the whole batch; saturation
    and noise per sample where drawn; nodata pixels (``invalid[i]``, ``None`` = all valid) end
    at 0. A single sample goes through the same ops, so batch and sample paths agree exactly.
    """
    if tuple(out.shape) != tuple(raw.shape):
        raise ValueError(
            f"augmented images have shape {tuple(raw.shape)} but the output is {tuple(out.shape)}; "
            "tiles in one batch must share a size (set augment.crop_size)"
        )
    batch, bands = out.shape[:2]
    affines = [photometric_affine(p, stats) for p in params]
    out.copy_(raw)
    # scale_c * (s * x_c + (1 - s) * gray) + offset_c: s folds into the batch-wide scale, and the
    # grey term is added per band after scaling, so saturation costs one extra pass, not three.
    grays = {}
    for i, (image, (_, _, saturation)) in enumerate(zip(out, affines, strict=True)):
        if saturation != 1.0:
            grays[i] = torch.mm(_luma(), image.view(3, -1)).view(image.shape[1:])
    scale = torch.tensor([[v * a[2] for v in a[0]] for a in affines], dtype=torch.float32)
    offset = torch.tensor([a[1] for a in affines], dtype=torch.float32)
    out.mul_(scale.view(batch, bands, 1, 1)).add_(offset.view(batch, bands, 1, 1))
    for i, gray in grays.items():
        band_scale, _, saturation = affines[i]
        for band in range(bands):
            out[i, band].add_(gray, alpha=band_scale[band] * (1.0 - saturation))
    if augmenter is not None:
        for image, sample_params in zip(out, params, strict=True):
            sigma = sample_params.noise_sigma
            if sigma is None:
                continue
            noise = augmenter.noise(image.numel(), sample_params.noise_offset).view(image.shape)
            if bands == 3:  # RGB shares one sigma
                image.add_(noise, alpha=float(sigma[0]))
                continue
            for band in range(bands):
                image[band].add_(noise[band], alpha=float(sigma[band]))
    for image, invalid_map in zip(out, invalid, strict=True):
        if invalid_map is not None:
            image.masked_fill_(invalid_map, 0.0)


def photometric_stage(
    out_image: torch.Tensor,
    raw_image: torch.Tensor,
    invalid: torch.Tensor | None,
    stats: BandStats,
    params: AugmentParams,
    augmenter: Augmenter | None,
) -> None:
    """:func:`photometric_batch` for one ``(C, H, W)`` sample."""
    photometric_batch(out_image[None], raw_image[None], [invalid], stats, [params], augmenter)


def write_sample(
    out_image: torch.Tensor,
    out_mask: torch.Tensor,
    image: np.ndarray,
    mask: np.ndarray | None,
    invalid: np.ndarray | None,
    stats: BandStats,
    params: AugmentParams,
    augmenter: Augmenter | None,
    ignore_index: int,
) -> None:
    """Augment, normalise and write one sample into preallocated tensors.

    ``out_image`` (float32 ``(C, H', W')``) and ``out_mask`` (int64 ``(H', W')``) may be views
    into a batch, so a batch is assembled without a second copy. Nodata pixels (``invalid``)
    become 0 in the image and ``ignore_index`` in the mask, as do pixels padded by a crop.
    """
    geometric = geometric_stage(image, mask, invalid, params, stats.bands, ignore_index)
    photometric_stage(out_image, geometric.image, geometric.invalid, stats, params, augmenter)
    out_mask.copy_(geometric.mask)


@functools.lru_cache(maxsize=1)
def _luma() -> torch.Tensor:
    return torch.tensor([LUMA_WEIGHTS], dtype=torch.float32)
