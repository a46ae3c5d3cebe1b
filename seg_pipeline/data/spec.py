"""Dataset spec and discovery: where the images and masks of one dataset are, and how they pair.

Supported without configuration (case-insensitive folder names):

- ``images/ + masks/`` (also ``labels/``, ``gt/``, ``annotations/``),
- ``images_png/ + masks_png/`` (LoveDA / GeoSeg style),
- ``train|val|test/images`` + ``train|val|test/masks`` and ``images/train`` + ``masks/train``,
  and joined names such as ``val-chips`` + ``val-binarymasks`` (Kampala) or ``train_images``:
  the split folder name is recorded as the tile's *fixed split*,
- explicit globs (``images_glob``/``masks_glob``, relative to the root).

Images and masks pair by file stem; a mask may end in ``_mask``, ``.mask``, ``_label``... (``x.mask.tif``
labels ``x.tif``). Folders are walked following symbolic links (a raw folder of links to the real
data is the usual way to bring data without copying it), each real folder once. Class names come
from ``classes.txt`` in the root (``"<id> <name>"`` or one name per line) or from the spec.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from seg_pipeline.data.raster_io import RASTER_EXTENSIONS
from seg_pipeline.settings.data import DatasetSettings

IMAGE_DIR_NAMES = frozenset(
    {"images", "image", "imgs", "img", "images_png", "inputs", "rgb", "chips", "tiles", "img_dir"}
)
MASK_DIR_NAMES = frozenset(
    {
        "masks",
        "mask",
        "labels",
        "label",
        "masks_png",
        "gt",
        "annotations",
        "targets",
        "ann_dir",
        "binarymasks",
        "binary_masks",
    }
)
#: Folder names that carry a fixed split, normalised to the pipeline's split names.
SPLIT_DIR_NAMES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
#: Name endings of mask files that pair with the image of the bare stem (``x.mask.tif`` -> ``x``).
_MASK_SUFFIXES = ("_mask", "_label", "_labels", "_gt", "-mask", "-label", ".mask", ".label", "_msk")


class DatasetSpecError(ValueError):
    """The dataset folder or spec cannot be used; the message says which field or path."""


class DatasetSpec(DatasetSettings):
    """A dataset's settings with its raw folder resolved: where the tiles are and what labels mean.

    Every field but ``root`` is a :class:`~seg_pipeline.settings.DatasetSettings` field (written once
    there); ``root`` is the folder holding the images and masks.
    """

    root: Path

    @classmethod
    def from_settings(cls, settings: DatasetSettings, root: Path | str) -> DatasetSpec:
        """The spec of ``settings`` with its tiles in ``root``."""
        return cls(**settings.model_dump(), root=Path(root))

    def validate_root(self) -> None:
        """Raise :class:`DatasetSpecError` when the raw folder is missing."""
        if not Path(self.root).is_dir():
            raise DatasetSpecError(f"root={self.root}: folder does not exist; point it at your tiles")


@dataclass(frozen=True)
class TileRecord:
    """One discovered tile: an image, its mask (if any) and a fixed split from folder names."""

    item_id: str
    image_path: Path | None
    mask_path: Path | None
    fixed_split: str | None = None
    problem: str | None = None  # set when discovery itself finds the tile unusable


@dataclass
class Discovery:
    """Result of scanning a dataset folder."""

    records: list[TileRecord] = field(default_factory=list)
    class_names: tuple[str, ...] = ()
    layout: str = ""


def read_classes(path: Path) -> tuple[tuple[str, ...], dict[str, tuple[int, int, int]]]:
    """Parse ``classes.txt``: names by id, and the display colours some lines give.

    Lines are ``"<id> <name>"`` (ids must be 0..N-1) or one name per line; either may end with a
    ``#rrggbb`` colour (``"1 water #0064c8"``) that outputs use for that class.
    """
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    names: dict[int, str] = {}
    colors: dict[str, tuple[int, int, int]] = {}
    for position, line in enumerate(lines):
        body, _, last = line.rpartition(" ")
        color = None
        if body and last.startswith("#"):
            try:
                color = _hex_rgb(last)
            except ValueError as error:
                raise DatasetSpecError(f"{path}: line {line!r}: {error}") from error
            line = body.strip()
        head, _, rest = line.partition(" ")
        if head.isdigit() and rest.strip():
            index, name = int(head), rest.strip()
        else:
            index, name = position, line
        names[index] = name
        if color is not None:
            colors[name] = color
    if sorted(names) != list(range(len(names))):
        raise DatasetSpecError(
            f"{path}: class ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}"
        )
    return tuple(names[i] for i in range(len(names))), colors


def read_class_names(path: Path) -> tuple[str, ...]:
    """The class names of ``classes.txt`` by id (see :func:`read_classes`)."""
    return read_classes(path)[0]


def _hex_rgb(text: str) -> tuple[int, int, int]:
    digits = text.removeprefix("#")
    if len(digits) != 6 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"colour {text!r} is not #rrggbb (six hex digits, e.g. #0064c8 for water blue)")
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def _is_raster(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in RASTER_EXTENSIONS and not path.name.startswith(".")


def _folder_role(name: str) -> tuple[str | None, str | None]:
    """(role, split) of one folder name: ``masks``, ``val``, or joined ``val-chips`` / ``train_images``."""
    low = name.lower()
    if low in IMAGE_DIR_NAMES:
        return "image", None
    if low in MASK_DIR_NAMES:
        return "mask", None
    if low in SPLIT_DIR_NAMES:
        return None, SPLIT_DIR_NAMES[low]
    for sep in ("-", "_"):
        first, _, rest = low.partition(sep)
        for split_word, role_word in ((first, rest), (low.rpartition(sep)[2], low.rpartition(sep)[0])):
            if split_word in SPLIT_DIR_NAMES and role_word:
                role, _ = _folder_role(role_word)
                if role is not None:
                    return role, SPLIT_DIR_NAMES[split_word]
    return None, None


def _role_and_split(rel: Path) -> tuple[str | None, str | None]:
    """Classify a file by its folder names: ('image'|'mask'|None, fixed split or None)."""
    role, split = None, None
    for part in rel.parts[:-1]:
        part_role, part_split = _folder_role(part)
        role = part_role or role
        split = part_split or split
    return role, split


def walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, following symbolic links; a folder reached twice (a link
    loop, or two links to one folder) is walked once.
    """
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        found.extend(Path(folder) / name for name in files)
    return sorted(found)


def _mask_stem(path: Path) -> str:
    stem = path.stem
    for suffix in _MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def discover(spec: DatasetSpec) -> Discovery:
    """Find and pair the tiles of ``spec``; problems are recorded per tile, never raised.

    Raises:
        DatasetSpecError: the folder holds no raster at all, or the spec is invalid.
    """
    spec.validate_root()
    root = Path(spec.root)
    images: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    masks: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    if spec.images_glob:
        layout = "globs"
        for path in sorted(root.glob(spec.images_glob)):
            if _is_raster(path):
                images[path.stem].append((path, _role_and_split(path.relative_to(root))[1]))
        for path in sorted(root.glob(spec.masks_glob or "__no_masks__")):
            if _is_raster(path):
                masks[_mask_stem(path)].append((path, _role_and_split(path.relative_to(root))[1]))
    else:
        layout = "folders"
        for path in walk_files(root):
            if not _is_raster(path):
                continue
            role, split = _role_and_split(path.relative_to(root))
            if role == "image":
                images[path.stem].append((path, split))
            elif role == "mask":
                masks[_mask_stem(path)].append((path, split))
    if not images and not masks:
        hint = (
            f"images_glob={spec.images_glob!r} matched nothing"
            if spec.images_glob
            else "expected images/ + masks/ (or images_png/, train|val|test/images) holding rasters"
        )
        raise DatasetSpecError(f"{root}: no raster tiles found ({hint})")

    records: list[TileRecord] = []
    for item_id in sorted(set(images) | set(masks)):
        found_images, found_masks = images.get(item_id, []), masks.get(item_id, [])
        if len(found_images) > 1 or len(found_masks) > 1:
            paths = ", ".join(str(p) for p, _ in found_images + found_masks)
            records.append(
                TileRecord(
                    item_id,
                    found_images[0][0] if found_images else None,
                    None,
                    problem=f"duplicate item id {item_id!r}: several files share the stem ({paths}); "
                    "rename them",
                )
            )
            continue
        image, image_split = found_images[0] if found_images else (None, None)
        mask, mask_split = found_masks[0] if found_masks else (None, None)
        problem = None
        if image is None:
            problem = f"mask without image: {mask} has no image with stem {item_id!r}"
        elif mask is not None and image_split != mask_split:
            problem = f"image split folder {image_split!r} differs from mask split folder {mask_split!r}"
        records.append(TileRecord(item_id, image, mask, image_split or mask_split, problem))

    class_names = tuple(spec.class_names)
    if not class_names and (root / "classes.txt").exists():
        class_names = read_class_names(root / "classes.txt")
    return Discovery(records=records, class_names=tuple(class_names), layout=layout)
