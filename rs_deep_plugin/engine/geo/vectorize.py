"""Class raster -> polygons, with rasterio (GDAL's polygonizer, streamed from the file) and shapely."""
import math

import numpy as np

from ..errors import InputError
from ..progress import Progress
from .raster import apply_affine


def vectorize(class_path, confidence_path, classes, *, min_area_m2=0.0, simplify=0.0, progress=None,
              is_cancelled=None, area_factor=1.0, block_rows=512):
    """Polygons of every class not masked out in ``confidence_path``.

    ``confidence_path`` is the Byte raster written by :func:`segment.segment` (winning-class
    probability x 255; 0 = nodata or a skipped class). Returns a list of dicts with
    ``geometry`` (shapely, in the raster's CRS), ``class_id``, ``class_name``, ``area_m2`` and
    ``mean_probability``. ``simplify`` is a tolerance in map units (0 = none).
    """
    import rasterio
    from rasterio.features import rasterize, shapes
    from shapely import STRtree
    from shapely.geometry import box, shape
    from rasterio.windows import Window

    prog = Progress(progress, is_cancelled)
    names = {c.value: c.name for c in classes}
    polys, ids = [], []
    with rasterio.open(class_path) as cds, rasterio.open(confidence_path) as kds:
        if (cds.width, cds.height) != (kds.width, kds.height):
            raise InputError("class and confidence rasters differ in size")
        transform = cds.transform
        prog.message("Polygonising")
        for geom, value in shapes(rasterio.band(cds, 1), mask=rasterio.band(kds, 1), connectivity=4,
                                  transform=transform):
            polys.append(shape(geom))
            ids.append(int(value))
            if len(polys) % 5000 == 0:
                prog.check()
        prog.update(0.5)
        area_px = abs(transform.a * transform.e - transform.b * transform.d)
        min_area_units = (min_area_m2 / area_factor) if area_factor > 0 else 0.0
        keep = [i for i, p in enumerate(polys) if p.area >= max(min_area_units, area_px * 0.5)]
        polys = [polys[i] for i in keep]
        ids = [ids[i] for i in keep]
        # mean probability per polygon: burn polygon numbers block by block, average the confidence
        sums = np.zeros(len(polys) + 1, dtype=np.float64)
        cnts = np.zeros(len(polys) + 1, dtype=np.int64)
        if polys:
            tree = STRtree(polys)
            nblocks = max(1, math.ceil(cds.height / block_rows))
            for bi, r0 in enumerate(range(0, cds.height, block_rows)):
                prog.check()
                h = min(block_rows, cds.height - r0)
                win = Window(0, r0, cds.width, h)
                wt = cds.window_transform(win)
                xa, ya = apply_affine(wt, 0, 0)
                xb, yb = apply_affine(wt, cds.width, h)
                hits = tree.query(box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
                if len(hits) == 0:
                    continue
                burn = rasterize(((polys[i], int(i) + 1) for i in hits), out_shape=(h, cds.width),
                                 transform=wt, fill=0, dtype="int32")
                conf = kds.read(1, window=win)
                sel = burn > 0
                sums += np.bincount(burn[sel], weights=conf[sel], minlength=len(sums))
                cnts += np.bincount(burn[sel], minlength=len(cnts))
                prog.update(0.5 + 0.45 * (bi + 1) / nblocks)
    out = []
    for i, (poly, cid) in enumerate(zip(polys, ids)):
        area = poly.area * area_factor
        geom = poly.simplify(simplify, preserve_topology=True) if simplify > 0 else poly
        if geom.is_empty:
            continue
        mean_p = float(sums[i + 1] / cnts[i + 1] / 255.0) if cnts[i + 1] else None
        out.append({"geometry": geom, "class_id": cid, "class_name": names.get(cid, str(cid)),
                    "area_m2": float(area), "mean_probability": mean_p})
    prog.update(1.0)
    return out


def mask_polygon(mask, transform):
    """The outline of one object's mask (bool [H, W]) in map coordinates through ``transform`` (the mask's pixel
    grid): a shapely polygon, its largest 4-connected part with its holes; None for an empty mask. Only the mask's
    bounding rectangle is polygonised."""
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape

    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sub = np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=np.uint8)
    parts = [shape(g) for g, _ in shapes(sub, mask=sub > 0, connectivity=4,
                                         transform=transform * Affine.translation(c0, r0))]
    return max(parts, key=lambda p: p.area) if parts else None
