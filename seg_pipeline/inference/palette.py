"""Class colours people of the field expect: water blue, vegetation green, buildings red.

A class map opened in QGIS, a preview PNG and the report all use one palette per dataset:
:func:`class_palette` colours each class by its name (the land-cover conventions of ESA WorldCover
and the usual building/road maps), gives the remaining classes distinct colours that are not
already taken, and lets a dataset override any class (``class_colors`` in the config, or a
``#rrggbb`` after the name in ``classes.txt``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from seg_pipeline.inference.writers import default_palette

__all__ = ["KNOWN_COLORS", "class_palette", "stored_palette"]

RGB = tuple[int, int, int]

#: Colours by class-name keyword, checked in order; a name matches when one of its words (or the
#: word without a plural ``s``) is a keyword, or when it contains a multi-word keyword.
KNOWN_COLORS: tuple[tuple[tuple[str, ...], RGB], ...] = (
    (("background", "other", "unlabeled", "unlabelled", "void", "clutter", "nodata", "unknown"), (0, 0, 0)),
    (("low vegetation", "grass", "grassland", "meadow", "pasture", "lawn"), (150, 220, 80)),
    (("water", "river", "lake", "sea", "ocean", "pond", "reservoir", "waterbody"), (0, 100, 200)),
    (("wetland", "marsh", "swamp", "mangrove"), (0, 150, 160)),
    (("tree", "forest", "woodland", "vegetation", "canopy"), (0, 100, 0)),
    (("shrub", "shrubland", "bush", "scrub", "rangeland"), (255, 187, 34)),
    (("crop", "cropland", "agriculture", "agricultural", "farmland", "field"), (255, 220, 0)),
    (("building", "house", "roof", "rooftop", "built", "urban", "settlement", "developed"), (220, 20, 20)),
    (("road", "street", "highway", "pavement", "impervious", "parking"), (160, 160, 160)),
    (("bare", "bareland", "soil", "barren", "sand", "desert", "dirt", "rock"), (180, 130, 70)),
    (("snow", "ice", "glacier"), (240, 240, 240)),
    (("cloud",), (255, 255, 255)),
    (("shadow",), (60, 60, 60)),
    (("fire", "burn", "burned", "burnt", "flame"), (255, 90, 0)),
    (("car", "vehicle"), (255, 0, 255)),
)


def _known_color(name: str) -> RGB | None:
    lowered = name.lower().replace("_", " ").replace("-", " ")
    words = set(re.findall(r"[a-z]+", lowered))
    words |= {word[:-1] for word in words if word.endswith("s") and len(word) > 3}
    for keywords, rgb in KNOWN_COLORS:
        for keyword in keywords:
            if (" " in keyword and keyword in lowered) or keyword in words:
                return rgb
    return None


def class_palette(
    class_names: Sequence[str], overrides: Mapping[str, Sequence[int]] | None = None
) -> np.ndarray:
    """One RGB colour per class, ``(K, 3)`` uint8: overrides first, then by name, then distinct.

    Args:
        class_names: Class names by id.
        overrides: Class name -> ``[r, g, b]`` that wins over the name rules (names not among the
            classes are an error, so a typo does not pass silently).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(class_names))
    if unknown:
        raise ValueError(f"class colours for {unknown}, which are not classes {list(class_names)}")
    chosen: list[RGB | None] = []
    for name in class_names:
        if name in overrides:
            rgb = tuple(int(c) for c in overrides[name])
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(
                    f"class colour of {name!r} is {list(rgb)}: give [r, g, b] with values 0..255"
                )
            chosen.append((rgb[0], rgb[1], rgb[2]))
            continue
        known = _known_color(name)
        chosen.append(None if known in chosen else known)  # two classes never share a rule's colour
    taken = {rgb for rgb in chosen if rgb is not None}
    candidates = [*default_palette(20), *default_palette(len(class_names) + len(taken) + 21)]
    fill = (rgb for rgb in ((int(r), int(g), int(b)) for r, g, b in candidates) if rgb not in taken)
    palette = [rgb if rgb is not None else next(fill) for rgb in chosen]
    return np.asarray(palette, dtype=np.uint8).reshape(len(class_names), 3)


def stored_palette(class_names: Sequence[str], class_colors: Sequence[Sequence[int]]) -> np.ndarray:
    """The colours a dataset resolved at ingest (one per class), else :func:`class_palette` by name."""
    if len(class_colors) == len(class_names):
        return np.asarray(class_colors, dtype=np.uint8).reshape(-1, 3)
    return class_palette(class_names)
