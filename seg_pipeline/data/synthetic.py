"""Seeded synthetic scenes: georeferenced multi-class GeoTIFF tiles for the demo and the tests.

Scenes are laid out like a real survey: one large scene on a UTM grid cut into tiles, so
neighbouring tiles share land cover and spatial grouping in the splitter has something to
do. Each class has its own texture and spectral signature (not a flat colour), so a model
has to learn more than a colour lookup.

Run ``python -m seg_pipeline.data.synthetic --out data/raw/demo`` to write the demo dataset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg_pipeline.data.raster_io import write_geotiff

#: Class scheme of the demo target dataset (index = class id).
TARGET_CLASSES: tuple[str, ...] = ("bare_soil", "water", "vegetation", "building", "road", "cropland")

#: An OpenEarthMap-like 8-class scheme used by the auxiliary demo source (class remap demo).
AUX_CLASSES: tuple[str, ...] = (
    "unknown",
    "bareland",
    "rangeland",
    "developed_space",
    "road",
    "tree",
    "water",
    "agriculture_land",
)

#: Where each target class lives in the auxiliary scheme (used to render aux scenes).
TARGET_TO_AUX: dict[int, int] = {0: 1, 1: 6, 2: 5, 3: 3, 4: 4, 5: 7}

# Mean reflectance per class for 7 Sentinel-2-like bands (B2 blue, B3 green, B4 red, B8 NIR,
# B11 SWIR1, B12 SWIR2, B5 red edge), scaled 0..1. Vegetation is bright in NIR, water dark.
_SPECTRA = np.array(
    [
        [0.16, 0.20, 0.26, 0.30, 0.38, 0.32, 0.28],  # bare soil
        [0.08, 0.07, 0.05, 0.03, 0.02, 0.01, 0.04],  # water
        [0.04, 0.09, 0.05, 0.45, 0.22, 0.11, 0.20],  # vegetation
        [0.30, 0.30, 0.32, 0.34, 0.36, 0.33, 0.33],  # building
        [0.20, 0.20, 0.21, 0.23, 0.27, 0.25, 0.22],  # road
        [0.07, 0.12, 0.10, 0.36, 0.28, 0.16, 0.22],  # cropland
    ],
    dtype=np.float32,
)
_RGB_BANDS = [2, 1, 0]  # red, green, blue from the spectra above


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. The defaults make the small CPU demo."""

    grid_rows: int = 6
    grid_cols: int = 8
    tile_size: int = 128
    bands: str = "rgb"  # "rgb" (uint8, 3 bands) or "s2" (uint16, 7 bands)
    labeled_fraction: float = 0.8
    nodata_tile_fraction: float = 0.1
    pixel_size: float = 0.5
    epsg: int = 32633
    origin: tuple[float, float] = (500_000.0, 5_000_000.0)
    class_scheme: str = "target"  # "target" (6 classes) or "aux" (8-class OEM-like)
    item_prefix: str = "tile"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is impossible."""
        if self.bands not in ("rgb", "s2"):
            raise ValueError(f"bands={self.bands!r}: use 'rgb' or 's2'")
        if self.class_scheme not in ("target", "aux"):
            raise ValueError(f"class_scheme={self.class_scheme!r}: use 'target' or 'aux'")
        if not 0.0 <= self.labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction={self.labeled_fraction}: must be within [0, 1]")
        if self.tile_size < 16 or self.grid_rows < 1 or self.grid_cols < 1:
            raise ValueError("tile_size must be >= 16 and grid_rows/grid_cols >= 1")


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1): blobs about ``cell`` pixels wide."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    ys = np.linspace(0, gh - 1.001, height, dtype=np.float32)
    xs = np.linspace(0, gw - 1.001, width, dtype=np.float32)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def scene_classes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plausible land-cover map: soil/vegetation/cropland blobs, a river, roads, buildings."""
    land = _smooth_noise(rng, height, width, cell=96)
    classes = np.where(land < 0.35, 0, np.where(land < 0.7, 2, 5)).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # A meandering river.
    phase, amp, period = rng.uniform(0, 2 * np.pi), rng.uniform(20, 60), rng.uniform(300, 600)
    centre = height * rng.uniform(0.3, 0.7) + amp * np.sin(2 * np.pi * xx / period + phase)
    classes[np.abs(yy - centre) < rng.uniform(6, 14)] = 1
    # A road grid.
    spacing = int(rng.integers(120, 200))
    offset_r, offset_c = int(rng.integers(0, spacing)), int(rng.integers(0, spacing))
    road = ((yy.astype(int) + offset_r) % spacing < 5) | ((xx.astype(int) + offset_c) % spacing < 5)
    classes[road & (classes != 1)] = 4
    # Buildings: rectangles next to roads, not on water or roads.
    n_buildings = int(height * width / 6000)
    for _ in range(n_buildings):
        h, w = int(rng.integers(6, min(18, height))), int(rng.integers(6, min(18, width)))
        r, c = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        block = classes[r : r + h, c : c + w]
        if not np.any((block == 1) | (block == 4)):
            block[...] = 3
    return classes


def render_image(rng: np.random.Generator, classes: np.ndarray, bands: str) -> np.ndarray:
    """Textured reflectance for a class map: per-class spectra times class-specific texture."""
    height, width = classes.shape
    spectra = _SPECTRA[classes]  # (H, W, 7)
    fine = rng.normal(0, 1, size=(height, width)).astype(np.float32)
    mid = _smooth_noise(rng, height, width, cell=8) - 0.5
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.ones((height, width), dtype=np.float32)
    texture += np.where(classes == 2, 0.35 * mid + 0.08 * fine, 0)  # canopy clumps
    texture += np.where(classes == 5, 0.12 * np.sin(xx * 0.6 + yy * 0.2), 0)  # crop rows
    texture += np.where(classes == 1, 0.05 * np.sin(xx * 0.15 + yy * 0.05), 0)  # ripples
    texture += np.where(classes == 3, 0.10 * fine, 0)  # roofs
    texture += np.where(classes == 0, 0.15 * mid + 0.05 * fine, 0)  # soil
    texture += np.where(classes == 4, 0.03 * fine, 0)
    illumination = 0.9 + 0.2 * _smooth_noise(rng, height, width, cell=128)
    reflectance = spectra * (texture * illumination)[..., None]
    reflectance += rng.normal(0, 0.01, size=reflectance.shape).astype(np.float32)
    reflectance = np.clip(reflectance, 0, 1)
    if bands == "rgb":
        rgb = reflectance[..., _RGB_BANDS] * 2.2  # brighten to a typical RGB histogram
        return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)
    return (reflectance * 10_000).round().astype(np.uint16).transpose(2, 0, 1)


def write_synthetic_dataset(
    out_dir: Path | str, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0
) -> Path:
    """Write ``images/``, ``masks/`` and ``classes.txt`` under ``out_dir``; return ``out_dir``.

    Item ids are ``<prefix>_<row>_<col>`` on the scene grid. A ``labeled_fraction`` of the
    tiles get masks; ``nodata_tile_fraction`` of them get a nodata band along one edge.
    """
    spec.validate()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = spec.tile_size
    height, width = spec.grid_rows * size, spec.grid_cols * size
    classes = scene_classes(rng, height, width)
    image = render_image(rng, classes, spec.bands)
    names = TARGET_CLASSES
    if spec.class_scheme == "aux":
        lut = np.zeros(len(TARGET_CLASSES), dtype=np.uint8)
        for target_id, aux_id in TARGET_TO_AUX.items():
            lut[target_id] = aux_id
        # Sparse vegetation is "rangeland" in the aux scheme: two aux classes fold into one target class.
        sparse = (classes == 2) & (_smooth_noise(rng, height, width, cell=48) < 0.3)
        classes = lut[classes]
        classes[sparse] = AUX_CLASSES.index("rangeland")
        names = AUX_CLASSES
    nodata = 0
    x0, y0 = spec.origin
    for row in range(spec.grid_rows):
        for col in range(spec.grid_cols):
            item_id = f"{spec.item_prefix}_{row:03d}_{col:03d}"
            window = np.s_[row * size : (row + 1) * size, col * size : (col + 1) * size]
            tile = image[(slice(None), *window)].copy()
            label = classes[window].copy()
            if rng.random() < spec.nodata_tile_fraction:
                tile[:, :, : size // 4] = nodata  # a swath edge outside the acquisition
                if spec.class_scheme == "aux":
                    label[:, : size // 4] = AUX_CLASSES.index("unknown")  # aux labels it "unknown"
            transform = (
                spec.pixel_size,
                0.0,
                x0 + col * size * spec.pixel_size,
                0.0,
                -spec.pixel_size,
                y0 - row * size * spec.pixel_size,
            )
            crs = f"EPSG:{spec.epsg}"
            write_geotiff(
                out / "images" / f"{item_id}.tif", tile, crs=crs, transform=transform, nodata=nodata
            )
            if rng.random() < spec.labeled_fraction:
                write_geotiff(out / "masks" / f"{item_id}.tif", label, crs=crs, transform=transform)
    (out / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(names)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a synthetic dataset (skips if the folder already holds images)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=SyntheticSpec.grid_rows)
    parser.add_argument("--cols", type=int, default=SyntheticSpec.grid_cols)
    parser.add_argument("--tile-size", type=int, default=SyntheticSpec.tile_size)
    parser.add_argument("--bands", choices=("rgb", "s2"), default="rgb")
    parser.add_argument("--class-scheme", choices=("target", "aux"), default="target")
    parser.add_argument("--prefix", default="tile")
    parser.add_argument("--labeled-fraction", type=float, default=SyntheticSpec.labeled_fraction)
    parser.add_argument("--force", action="store_true", help="write even if images exist")
    args = parser.parse_args(argv)
    if not args.force and any((args.out / "images").glob("*.tif")):
        print(f"synthetic dataset already present at {args.out} (use --force to rewrite)")
        return
    spec = SyntheticSpec(
        grid_rows=args.rows,
        grid_cols=args.cols,
        tile_size=args.tile_size,
        bands=args.bands,
        class_scheme=args.class_scheme,
        item_prefix=args.prefix,
        labeled_fraction=args.labeled_fraction,
    )
    write_synthetic_dataset(args.out, spec, seed=args.seed)
    n = len(list((args.out / "images").glob("*.tif")))
    print(f"wrote {n} synthetic {args.bands} tiles to {args.out}")


if __name__ == "__main__":
    main()
