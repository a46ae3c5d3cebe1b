"""Raw tile -> finished sample or batch, and the state every dataset shares (epoch, checks).

Every dataset yields ``{"image": float32 (C, H, W), "mask": int64 (H, W), "item_id": str}``:
the image normalised with :class:`~seg_pipeline.data.normalization.BandStats`, nodata pixels
(all bands == nodata, or any NaN) set to 0 and marked ``ignore_index`` in the mask, unlabeled
tiles all ``ignore_index``. With ``two_views=True`` a sample also holds ``image_view1/2`` and
``mask_view1/2`` (``image``/``mask`` are view 1). The default collate makes batches of them.

Repeated augmentation (``augment.views_per_sample: 2``, seed 000's two views per sample): training
reads each patch once and trains on both views as ordinary samples. :func:`split_views` turns a
two-view sample into two samples ``{"image", "mask", "item_id", "view"}``, each view with the mask
of its own geometry; ``RemappedSource(views=2)`` does this for the training stream (and counts
twice the samples), so an epoch has twice the samples of the same patches, a pair sharing its
``item_id``. View 2 is the next draw of the item's augmentation stream, so both are reproducible
by ``(seed, epoch, item)``. Validation never builds views.

Epochs: ``set_epoch(n)`` writes into a shared-memory tensor, so DataLoader workers (persistent
or not) see the new epoch on the next ``iter(loader)``. Call it *before* creating the iterator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seg_pipeline.data.augment import IDENTITY, Augmenter, AugmentParams
from seg_pipeline.data.normalization import BandStats
from seg_pipeline.data.shared_buffers import SHARED_BLOCK, BufferSpec, SharedBufferPool, take_block
from seg_pipeline.data.tiles import CACHE_MODES, RawTile
from seg_pipeline.data.transforms import GeometricResult, geometric_stage, photometric_batch, write_sample
from seg_pipeline.hardware import torch_threads


class _EpochState:
    """An epoch counter in shared memory, visible to DataLoader workers after they start."""

    def __init__(self, epoch: int) -> None:
        self._epoch = torch.full((1,), int(epoch), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch}: must be >= 0")
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())


@dataclass(frozen=True)
class RawView:
    """One view of a raw batch: stacked images and masks after the geometric ops, each sample's
    nodata map (``None``: no nodata), and the photometric draws still to apply.
    """

    image: torch.Tensor
    mask: torch.Tensor
    invalid: list[torch.Tensor | None]
    params: list[AugmentParams]


@dataclass(frozen=True)
class PendingView:
    """One view of a sample: its raw tile and augmentation draws, written on demand into the
    tensors a batch assembler gives it (rows of a batch: no per-sample tensor, no collate copy).
    """

    maker: _SampleMaker
    tile: RawTile
    params: AugmentParams
    shape: tuple[int, int, int]

    def write(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        """Augment, normalise and write into ``image`` (float32 ``shape``) and ``mask`` (int64)."""
        maker = self.maker
        write_sample(image, mask, *self.tile, maker.stats, self.params, maker.augmenter, maker.ignore_index)


def write_views(views: Sequence[PendingView], images: torch.Tensor, masks: torch.Tensor) -> None:
    """Write views drawn by one maker into ``images``/``masks`` (consecutive rows of a batch):
    geometric ops one by one on the raw pixels, photometric ops and normalisation for all at once,
    exactly as :meth:`PendingView.write` would one by one (batch mode's split, without its stack of
    finished samples).
    """
    if len(views) == 1:
        views[0].write(images[0], masks[0])
        return
    maker = views[0].maker
    if any(view.maker is not maker for view in views):
        raise ValueError("write_views takes views of one maker (one source); write the others apart")
    params = [view.params for view in views]
    raw = _raw_view([maker.geometric(view.tile, p) for view, p in zip(views, params, strict=True)], params)
    maker._photometric({"raw_views": [raw]}, [(images, masks)])


class _SampleMaker:
    """Turns raw tiles into samples or batches: augment, normalise, nodata -> 0 / ignore_index."""

    def __init__(
        self, stats: BandStats, augmenter: Augmenter | None, ignore_index: int, two_views: bool, seed: int
    ) -> None:
        if two_views and augmenter is None:
            raise ValueError("two_views=True needs an augmenter (two identical views are useless)")
        self.stats = stats
        self.augmenter = augmenter
        self.ignore_index = ignore_index
        self.two_views = two_views
        self.seed = seed
        self._buffers = SharedBufferPool()

    def _params(self, tile: RawTile) -> tuple[AugmentParams, tuple[int, int, int]]:
        bands, height, width = tile[0].shape
        params: AugmentParams = IDENTITY
        if self.augmenter is not None:
            rare = self.augmenter.holds_rare(tile[1])
            params = self.augmenter.sample_params(bands, height, width, rare=rare)
        out_h, out_w = params.out_size if params.out_size is not None else (height, width)
        return params, (bands, out_h, out_w)

    def draw(self, item_id: str, tile: RawTile, epoch: int) -> list[PendingView]:
        """The sample's views, drawn but not yet written (two with ``two_views``)."""
        n_views = 2 if self.two_views else 1
        return [PendingView(self, tile, p, s) for p, s in self._plans([(item_id, tile)], epoch, n_views)[0]]

    def make(self, item_id: str, tile: RawTile, epoch: int) -> dict[str, Any]:
        """One finished sample (the per-sample path; the default collate batches these)."""
        views = []
        for view in self.draw(item_id, tile, epoch):
            image = torch.empty(view.shape, dtype=torch.float32)
            mask = torch.empty(view.shape[1:], dtype=torch.int64)
            view.write(image, mask)
            views.append((image, mask))
        sample: dict[str, Any] = {"image": views[0][0], "mask": views[0][1], "item_id": item_id}
        if self.two_views:
            sample.update(
                image_view1=views[0][0],
                mask_view1=views[0][1],
                image_view2=views[1][0],
                mask_view2=views[1][1],
            )
        return sample

    def build_raw(self, items: Sequence[tuple[str, RawTile]], epoch: int) -> dict[str, Any]:
        """First half of batch mode: draws and geometric ops only, pixels still raw.

        The raw batch stays in the process that read it: :meth:`finish` turns it into the
        standard batch here, :meth:`finish_shared` in a worker.
        """
        n_views = 2 if self.two_views else 1
        plans = self._plans(items, epoch, n_views)
        views = []
        for v in range(n_views):
            params = [plan[v][0] for plan in plans]
            results = [self.geometric(tile, p) for (_, tile), p in zip(items, params, strict=True)]
            views.append(_raw_view(results, params))
        return {"raw_views": views, "item_id": [item_id for item_id, _ in items]}

    def geometric(self, tile: RawTile, params: AugmentParams) -> GeometricResult:
        """The geometric ops of ``params`` on a raw tile (first half of batch mode)."""
        return geometric_stage(*tile, params, self.stats.bands, self.ignore_index)

    def finish_shared(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Second half of batch mode in a DataLoader worker: the finished float32 images and int64
        masks, written into a shared block the worker refills once :meth:`finish` released it.

        The main process then only copies the batch out. Finishing in the main process instead
        (``uint8`` through shared memory, 4x fewer bytes) left its one core the bottleneck: 902
        against 1015 tiles/s on 2 cores (bench/RESULTS.md, 2026-12-07, "shared buffers").
        """
        specs: list[BufferSpec] = []
        for view in raw["raw_views"]:
            specs += [(tuple(view.image.shape), torch.float32), (tuple(view.mask.shape), torch.int64)]
        finished = self._buffers.acquire(specs)
        outputs = finished.tensors
        self._photometric(raw, [(outputs[i], outputs[i + 1]) for i in range(0, len(outputs), 2)])
        keys = (
            ["image_view1", "mask_view1", "image_view2", "mask_view2"]
            if self.two_views
            else ["image", "mask"]
        )
        return {"item_id": raw["item_id"], SHARED_BLOCK: (finished.block, finished.layout, keys)}

    def finish(self, raw: dict[str, Any], pin_memory: bool = False, threads: int = 1) -> dict[str, Any]:
        """The standard batch from a batch of batch mode, in the main process.

        A raw batch (:meth:`build_raw`) gets its photometric ops and normalisation here; a batch
        finished by a worker (:meth:`finish_shared`) is handed out as views of its block, which
        goes back to the worker once they are all gone (``shared_buffers.lease``). Either runs
        with ``threads`` torch threads (restored afterwards): with workers busy on the other
        cores, torch's default threads spin against them (10x more CPU per tile measured on 2
        cores; a copy-out with 2 threads cost 3.1 CPU ms per tile where 1 thread cost 1.8).
        """
        pin = pin_memory and torch.cuda.is_available()
        with torch_threads(threads):
            if SHARED_BLOCK in raw:
                batch, _ = take_block(dict(raw), pin)  # leased: the block goes back when the batch dies
                if self.two_views:
                    batch.update(image=batch["image_view1"], mask=batch["mask_view1"])
                return batch
            outputs = [
                (
                    torch.empty(view.image.shape, dtype=torch.float32, pin_memory=pin),
                    torch.empty(view.mask.shape, dtype=torch.int64, pin_memory=pin),
                )
                for view in raw["raw_views"]
            ]
            self._photometric(raw, outputs)
        return self._batch(outputs, raw["item_id"])

    def _photometric(self, raw: dict[str, Any], outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write each view's normalised images and int64 masks into ``outputs``."""
        for view, (images, masks) in zip(raw["raw_views"], outputs, strict=True):
            photometric_batch(images, view.image, view.invalid, self.stats, view.params, self.augmenter)
            masks.copy_(view.mask)

    def _batch(self, outputs: list[tuple[torch.Tensor, torch.Tensor]], item_ids: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": outputs[0][0], "mask": outputs[0][1], "item_id": item_ids}
        if self.two_views:
            batch.update(
                image_view1=outputs[0][0],
                mask_view1=outputs[0][1],
                image_view2=outputs[1][0],
                mask_view2=outputs[1][1],
            )
        return batch

    def _plans(
        self, items: Sequence[tuple[str, RawTile]], epoch: int, n_views: int
    ) -> list[list[tuple[AugmentParams, tuple[int, int, int]]]]:
        plans = []
        for item_id, tile in items:
            if self.augmenter is not None:
                self.augmenter.reseed(self.seed, epoch, item_id)
            plans.append([self._params(tile) for _ in range(n_views)])
        shape = plans[0][0][1]
        for (item_id, _), views in zip(items, plans, strict=True):
            for _, view_shape in views:
                if view_shape != shape:
                    raise ValueError(
                        f"tile {item_id} gives a {view_shape} sample but the batch holds {shape}; tiles in "
                        "one batch must share a size: set augment.crop_size or use batch_size=1"
                    )
        return plans


def split_views(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The views of a two-view sample as separate samples (``view`` 0 and 1); others as they are.

    Each keeps the sample's other keys (``item_id``, ...): ``image``/``mask`` become the view's own.
    """
    if "image_view1" not in sample:
        return [sample]
    views = ("image_view1", "mask_view1", "image_view2", "mask_view2")
    rest = {key: value for key, value in sample.items() if key not in views}
    return [
        {**rest, "image": sample[f"image_view{v + 1}"], "mask": sample[f"mask_view{v + 1}"], "view": v}
        for v in range(2)
    ]


def _raw_view(results: Sequence[GeometricResult], params: list[AugmentParams]) -> RawView:
    """Samples after their geometric ops, stacked as one view of a raw batch."""
    return RawView(
        _stack([r.image for r in results]),
        _stack([r.mask for r in results]),
        [r.invalid for r in results],
        params,
    )


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack into one batch tensor of the common (promoted) dtype."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype)
    for i, tensor in enumerate(tensors):
        out[i].copy_(tensor)
    return out


def _check_common(stats: BandStats, ignore_index: int, cache_mode: str, cache_max_items: int) -> None:
    if not isinstance(stats, BandStats):
        raise ValueError(f"stats={stats!r}: pass a BandStats (band_stats_from_catalog or scale_stats)")
    if ignore_index < 0:
        raise ValueError(f"ignore_index={ignore_index}: must be >= 0")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r}: choose one of {', '.join(CACHE_MODES)}")
    if cache_max_items < 0:
        raise ValueError(f"cache_max_items={cache_max_items}: must be >= 0 (0 = unbounded)")
