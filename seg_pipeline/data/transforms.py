"""The two stages every augmented sample goes through, written to touch each pixel as few times as possible.

- :func:`geometric_stage`: D4 rotations/flips and optional scale+crop on the *raw* tile (``uint8`` for
  RGB: 4x fewer bytes than float32), identically on image, mask and nodata map;
- :func:`photometric_batch`: brightness, contrast and saturation folded into normalisation as one
  per-band scale and offset (plus one grey term for saturation), applied while converting to float32.

:mod:`seg_pipeline.data.augment` draws the parameters; this module applies them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from seg_pipeline.data.augment import LUMA_WEIGHTS, AugmentParams
from seg_pipeline.data.normalization import BandStats

if TYPE_CHECKING:
    from seg_pipeline.data.augment import Augmenter

#: Side of the square blocks of the cache-friendly transpose (3 x 64 x 64 uint8 fits in L1).
_TRANSPOSE_BLOCK = 64


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
    to other arrays).
    """
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
