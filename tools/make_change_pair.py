#!/usr/bin/env python3
"""Make the simulated change pairs of ``tests/data/change_atlanta`` from the Atlanta sample (real imagery).

    .venv/bin/python tools/make_change_pair.py [--image resources/sample/atlanta_pan.tif]
                                               [--footprints tests/data/buildings_atlanta/buildings.geojson]
                                               [--out tests/data/change_atlanta]

The research-only change sets (LEVIR-CD, DSIFN) may not ship, so the tests of ``make test`` check
change detection on a pair derived from imagery that may: the SpaceNet Atlanta sample
(``resources/sample/atlanta_pan.tif``, CC BY-SA 4.0). For each of two areas that do not overlap:

* ``<area>_A.tif``, the "before" date: a crop of the sample, pixels unchanged;
* ``<area>_B.tif``, the "after" date: the same crop where some buildings were "demolished": the pixels of
  their footprint and of their roof as seen (the footprint moved by up to ``MAX_LEAN`` px to where its outline
  best follows the image's edges: the off-nadir lean), grown by ``GROW`` m, are replaced by ground texture
  copied from a building-free place nearby, of similar brightness, with a 1 px feathered seam;
* ``<area>_label.tif``: the change mask on the crop's grid, 0 = no change, 255 = change (as LEVIR-CD's),
  the removed footprints rasterized (pixel centres);
* ``<area>_change.geojson``: the removed footprints as polygons in WGS 84 (OGC:CRS84, as LEVIR-CD's
  polygons); here another CRS than the rasters' (EPSG:32616), so the tests reproject the labels.

Deterministic: the same inputs give the same files.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: (name, (col_off, row_off, width, height) in the sample, footprints removed (indices in buildings.geojson))
AREAS = [
    # 256 x 768 px: three 256 px chips, each with removed buildings (and buildings that stay); two 512 px blocks
    # (rs_deep:train's change validation split) with a whole chip in each
    ("east", (344, 0, 256, 768), [26, 19, 21, 14, 10, 8]),
    # a second area, west of it (for running a model trained on "east")
    ("west", (0, 64, 320, 384), [20, 13, 1]),
]
GROW = 1.5  # m around a footprint (and its roof) that is replaced as well
MAX_LEAN = 14  # px: how far a roof may lean off its footprint
MAX_SHIFT = 120  # px: how far the replacement ground may come from


def _footprints(path):
    from shapely.geometry import shape
    feats = json.loads(Path(path).read_text())["features"]
    return [shape(f["geometry"]) for f in feats], [f["properties"].get("osm_id") for f in feats]


def _lean(grad, geom, transform, shape):
    """The footprint swept to where (moved by whole pixels, up to ``MAX_LEAN``) its outline best follows the
    image's edges: the roof as seen from the satellite, and the walls between."""
    from rasterio.features import rasterize
    from shapely.affinity import translate
    from shapely.ops import unary_union
    best = None
    for dy in range(-MAX_LEAN, MAX_LEAN + 1):
        for dx in range(-MAX_LEAN, MAX_LEAN + 1):
            moved = translate(geom, dx * transform.a, dy * transform.e)
            edge = rasterize([moved.boundary], out_shape=shape, transform=transform) > 0
            score = float(grad[edge].mean()) - 0.2 * np.hypot(dy, dx)
            if best is None or score > best[0]:
                best = (score, dx, dy)
    _, dx, dy = best
    # the walls too: the footprint swept from where it stands to where its roof is seen
    steps = max(abs(dx), abs(dy), 1)
    return unary_union([translate(geom, dx * k / steps * transform.a, dy * k / steps * transform.e)
                        for k in range(steps + 1)])


def _ground_source(image, region, forbidden, ring, rng_shifts):
    """The shift (dy, dx) of the building-free place whose pixels replace ``region``: inside the image, off
    every (grown) building, with a mean close to the ring around the region; nearer places win ties."""
    h, w = image.shape
    rows, cols = np.nonzero(region)
    target = float(image[ring].mean())
    best = None
    for dy, dx in rng_shifts:
        r, c = rows + dy, cols + dx
        if r.min() < 0 or c.min() < 0 or r.max() >= h or c.max() >= w:
            continue
        if forbidden[r, c].any():
            continue
        cost = abs(float(image[r, c].mean()) - target) / target + 0.002 * np.hypot(dy, dx)
        if best is None or cost < best[0]:
            best = (cost, dy, dx)
    if best is None:
        raise SystemExit("no building-free ground found near a footprint; raise MAX_SHIFT")
    return best[1], best[2]


def make_pairs(image_path, footprints_path, out_dir):
    import rasterio
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom
    from rasterio.windows import Window
    from scipy import ndimage
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geoms, ids = _footprints(footprints_path)
    with rasterio.open(image_path) as src:
        image = src.read(1)
        transform, crs = src.transform, src.crs
        profile = src.profile.copy()
    shape = image.shape
    image_grad = np.hypot(ndimage.sobel(image.astype(np.float32), 0), ndimage.sobel(image.astype(np.float32), 1))
    grown_all = rasterize([g.buffer(GROW + 1.0) for g in geoms], out_shape=shape, transform=transform) > 0
    shifts = sorted(((dy, dx) for dy in range(-MAX_SHIFT, MAX_SHIFT + 1, 2)
                     for dx in range(-MAX_SHIFT, MAX_SHIFT + 1, 2) if 12 <= np.hypot(dy, dx) <= MAX_SHIFT),
                    key=lambda s: (np.hypot(*s), s))
    after_full = image.copy()
    weight = np.zeros(shape, np.float32)
    taken = np.zeros(shape, bool)
    written = []
    for name, (col, row, width, height), removed in AREAS:
        win = Window(col, row, width, height)
        wt = rasterio.windows.transform(win, transform)
        area = box(*rasterio.windows.bounds(win, transform))
        for i in removed:
            # the roof seen in the image leans off its footprint (off-nadir view): replace both
            lean = _lean(image_grad, geoms[i], transform, shape)
            replaced = unary_union([geoms[i], lean]).buffer(GROW)
            if not area.contains(replaced):
                raise SystemExit(f"footprint {i} is not inside area {name}")
            region = rasterize([replaced], out_shape=shape, transform=transform) > 0
            ring = ndimage.binary_dilation(region, iterations=4) & ~region & ~grown_all
            dy, dx = _ground_source(image, region, grown_all | taken, ring, shifts)
            # feathered seam: full replacement inside the region, half on its 1 px rim
            soft = region.astype(np.float32)
            rim = ndimage.binary_dilation(region) & ~region
            soft[rim] = 0.5
            rr, cc = np.nonzero(soft)
            src_vals = image[rr + dy, cc + dx].astype(np.float32)
            a = soft[rr, cc]
            after_full[rr, cc] = np.round(a * src_vals + (1 - a) * image[rr, cc]).astype(image.dtype)
            weight[rr, cc] = np.maximum(weight[rr, cc], a)
            taken |= region
        rows, cols = slice(row, row + height), slice(col, col + width)
        before, after = image[rows, cols], after_full[rows, cols]
        label = rasterize([geoms[i] for i in removed], out_shape=(height, width), transform=wt,
                          fill=0, default_value=255, dtype="uint8")
        prof = dict(profile, width=width, height=height, transform=wt, tiled=True, blockxsize=256, blockysize=256,
                    compress="deflate", predictor=2, zlevel=9)
        for suffix, arr in (("A", before), ("B", after)):
            path = out_dir / f"{name}_{suffix}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(arr, 1)
            written.append(path)
        lab_prof = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint8", crs=crs,
                        transform=wt, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        path = out_dir / f"{name}_label.tif"
        with rasterio.open(path, "w", **lab_prof) as dst:
            dst.write(label, 1)
        written.append(path)
        feats = [{"type": "Feature", "properties": {"change": 1, "osm_id": ids[i]},
                  "geometry": transform_geom(crs, "OGC:CRS84", mapping(geoms[i]), precision=9)} for i in removed]
        path = out_dir / f"{name}_change.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "name": f"{name}_change",
                                    "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
                                    "features": feats}, indent=None) + "\n")
        written.append(path)
        changed = int((after != before).sum())
        print(f"{name}: {width}x{height} px at col {col}, row {row}; {len(removed)} buildings removed, "
              f"{int((label > 0).sum())} label px, {changed} px changed")
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default=str(REPO / "resources" / "sample" / "atlanta_pan.tif"))
    ap.add_argument("--footprints", default=str(REPO / "tests" / "data" / "buildings_atlanta" / "buildings.geojson"))
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "change_atlanta"))
    args = ap.parse_args()
    for p in make_pairs(args.image, args.footprints, args.out):
        print(f"  {os.path.relpath(p, REPO)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
