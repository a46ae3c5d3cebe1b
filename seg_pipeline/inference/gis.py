"""Outputs a GIS opens as they are meant: Cloud-Optimized GeoTIFFs, colour tables, QGIS styles, mosaics.

A class map is streamed into a tiled GeoTIFF while windows are predicted, then copied with GDAL's
COG driver (tiled, DEFLATE, overviews: ``MODE`` for classes, ``AVERAGE`` for probabilities), so
large outputs stream from object storage and zoom out fast. The class band carries its colour
table, the description ``class`` and the class names (``class_names`` tag, and one tag per value);
a ``.qml`` style beside it gives QGIS the legend labels, and :func:`write_mosaic_vrt` joins a
prediction set into one VRT so a single drag shows the whole area.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import rasterio
import rasterio.shutil

from seg_pipeline.io import atomic_write

__all__ = ["ClassStyle", "describe_class_band", "to_cog", "write_mosaic_vrt", "write_qml"]

#: COG tiles: GDAL's default, and what web viewers and QGIS read efficiently.
COG_BLOCKSIZE = 512


@dataclass(frozen=True)
class ClassStyle:
    """How class values look: names by id, an RGB colour each, and the nodata value."""

    names: tuple[str, ...]
    palette: np.ndarray  # (K, 3) uint8
    nodata: int

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: each class opaque, nodata transparent."""
        table = {i: (int(r), int(g), int(b), 255) for i, (r, g, b) in enumerate(self.palette)}
        table[self.nodata] = (0, 0, 0, 0)
        return table


def describe_class_band(dst: rasterio.io.DatasetWriter, style: ClassStyle) -> None:
    """Colour table, band description and class names on band 1 of an open class map."""
    if dst.dtypes[0] == "uint8":  # GDAL colour tables exist for Byte and UInt16; QGIS reads Byte best
        dst.write_colormap(1, style.colormap())
    dst.set_band_description(1, "class")
    dst.update_tags(1, class_names=json.dumps(list(style.names)), **{
        f"CLASS_{index}": name for index, name in enumerate(style.names)
    })  # fmt: skip


def to_cog(staging: Path, destination: Path, kind: str) -> None:
    """Copy a finished GeoTIFF to ``destination`` as a COG (``kind``: ``classes`` or ``probabilities``)."""
    options = {"COMPRESS": "DEFLATE", "BLOCKSIZE": COG_BLOCKSIZE, "BIGTIFF": "IF_SAFER"}
    if kind == "classes":
        options |= {"OVERVIEW_RESAMPLING": "MODE", "RESAMPLING": "NEAREST"}
    else:
        options |= {"OVERVIEW_RESAMPLING": "AVERAGE", "PREDICTOR": "YES"}
    rasterio.shutil.copy(staging, destination, driver="COG", **options)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def write_qml(path: str | os.PathLike[str], style: ClassStyle) -> Path:
    """A QGIS paletted-renderer style with the class names as legend labels (nodata transparent).

    QGIS applies ``<raster stem>.qml`` by itself when the raster is opened.
    """
    entries = "\n".join(
        f'        <paletteEntry value="{index}" color="{_hex(rgb)}" alpha="255" label={quoteattr(name)}/>'
        for index, (name, rgb) in enumerate(zip(style.names, style.palette, strict=True))
    )
    text = f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28" styleCategories="Symbology">
  <pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour"
        zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency>
        <singleValuePixelList>
          <pixelListEntry min="{style.nodata}" max="{style.nodata}" percentTransparent="100"/>
        </singleValuePixelList>
      </rasterTransparency>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_mosaic_vrt(paths: Sequence[Path], vrt_path: Path, style: ClassStyle) -> tuple[Path | None, str]:
    """One VRT over georeferenced class maps of one CRS (north-up); ``(None, reason)`` when impossible.

    The VRT has the union of the maps' bounds at the finest pixel size among them; each map is a
    ``ComplexSource`` whose nodata is transparent, so overlapping tiles do not blank each other.
    """
    if not paths:
        return None, "no class maps"
    infos = []
    for path in paths:
        with rasterio.open(path) as src:
            if src.crs is None:
                return None, f"{path.name} has no CRS (not georeferenced)"
            transform = src.transform
            if transform.b != 0 or transform.d != 0 or transform.e >= 0:
                return None, f"{path.name} is rotated or not north-up"
            infos.append(
                (path, src.crs, transform, src.width, src.height, src.dtypes[0], src.block_shapes[0])
            )
    crs = infos[0][1]
    if any(info[1] != crs for info in infos):
        return None, "class maps are in more than one CRS"
    res_x = min(info[2].a for info in infos)
    res_y = min(-info[2].e for info in infos)
    left = min(info[2].c for info in infos)
    top = max(info[2].f for info in infos)
    right = max(info[2].c + info[3] * info[2].a for info in infos)
    bottom = min(info[2].f + info[4] * info[2].e for info in infos)
    width, height = round((right - left) / res_x), round((top - bottom) / res_y)
    dtype = {"uint8": "Byte", "uint16": "UInt16"}[infos[0][5]]
    sources = []
    for path, _, transform, src_w, src_h, _, (block_h, block_w) in infos:
        x_off, y_off = (transform.c - left) / res_x, (top - transform.f) / res_y
        x_size, y_size = src_w * transform.a / res_x, src_h * -transform.e / res_y
        relative = os.path.relpath(path, vrt_path.parent)
        sources.append(f"""    <ComplexSource>
      <SourceFilename relativeToVRT="1">{relative}</SourceFilename>
      <SourceBand>1</SourceBand>
      <SourceProperties RasterXSize="{src_w}" RasterYSize="{src_h}" DataType="{dtype}"
        BlockXSize="{block_w}" BlockYSize="{block_h}"/>
      <SrcRect xOff="0" yOff="0" xSize="{src_w}" ySize="{src_h}"/>
      <DstRect xOff="{x_off:.10g}" yOff="{y_off:.10g}" xSize="{x_size:.10g}" ySize="{y_size:.10g}"/>
      <NODATA>{style.nodata}</NODATA>
    </ComplexSource>""")
    colors = "\n".join(
        f'      <Entry c1="{c1}" c2="{c2}" c3="{c3}" c4="{c4}"/>'
        for _, (c1, c2, c3, c4) in sorted(_full_colormap(style).items())
    )
    wkt = crs.to_wkt().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = f"""<VRTDataset rasterXSize="{width}" rasterYSize="{height}">
  <SRS>{wkt}</SRS>
  <GeoTransform>{left!r}, {res_x!r}, 0.0, {top!r}, 0.0, {-res_y!r}</GeoTransform>
  <VRTRasterBand dataType="{dtype}" band="1">
    <Description>class</Description>
    <NoDataValue>{style.nodata}</NoDataValue>
    <ColorInterp>Palette</ColorInterp>
    <ColorTable>
{colors}
    </ColorTable>
{chr(10).join(sources)}
  </VRTRasterBand>
</VRTDataset>
"""
    with atomic_write(vrt_path) as temporary:
        temporary.write_text(text)
    return vrt_path, f"{len(infos)} class maps"


def _full_colormap(style: ClassStyle) -> dict[int, tuple[int, int, int, int]]:
    """Colour table entries 0..nodata (VRT tables are positional: the gaps are transparent black)."""
    table = style.colormap()
    return {index: table.get(index, (0, 0, 0, 0)) for index in range(max(table) + 1)}
