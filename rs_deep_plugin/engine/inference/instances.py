"""Instance segmentation on a raster of any size: one polygon per object, with its class and score.

The tile loop of detection (:mod:`.detect`, :mod:`.pipeline`) with a Mask R-CNN package
(:class:`..models.runners.InstanceRunner`: boxes, labels, scores and a mask per object):

* an object belongs to the one tile whose *core* holds its box centre (:meth:`.tiling.TileGrid.core`: the tile cut
  in the middle of each overlap), so an object cut by a tile border is taken from the tile that sees it whole
  (objects smaller than the overlap); objects centred on padding or nodata are dropped;
* each kept mask becomes a polygon in map coordinates as the tile finishes (:func:`..geo.vectorize.mask_polygon`);
  only the polygons stay in memory, never the masks or the images (memory bounded by tile x batch size);
* :func:`merge_instances` removes what remains doubled across tiles (an object whose centres in two tiles fall on
  either side of the cut): class-wise NMS by polygon IoU, and a polygon mostly inside a larger one of another tile;
* polygons are clipped to the processed region.

On a Dask cluster (``cluster``, :mod:`.distributed`) the tiles are shared among blocks of the tile grid (each tile in
one block); each worker runs :func:`tile_instances` on its block's tiles and returns their polygons; the merge and
the clip run here on them in tile order, as in one process: the same objects.

Nothing is written to disk: a cancelled run leaves nothing.
"""
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..geo.raster import RasterReader, apply_affine, area_factor_m2
from ..geo.rotated import intersecting_pairs, pair_overlaps
from ..geo.vectorize import mask_polygon
from ..models.detection_options import resolve_detection_options
from ..models.postprocess import nms_over_pairs
from .detect import (EDGE_IOA, ObjectsResult, box_centres, numbered_tiles, open_tile_run, run_object_blocks,
                     tile_outputs)
from .pipeline import open_region, resolve_options, start_run
from .tiling import TileGrid


@dataclass
class Instance:
    """One object: its outline (a shapely polygon in map coordinates of the raster's CRS; pixels without one)."""

    polygon: object
    class_id: int
    class_name: str
    score: float
    area_m2: float = 0.0

    @property
    def ring(self):
        """The exterior ring [[x, y], ...] (closed)."""
        return [list(p) for p in self.polygon.exterior.coords]


@dataclass
class InstanceResult(ObjectsResult):
    instances: list = field(default_factory=list)  # list[Instance], highest score first
    raw_instances: int = 0  # objects kept by the tiles (centred in their cores) before the merge

    @property
    def objects(self):
        return self.instances

    def to_geojson(self):
        """A GeoJSON FeatureCollection of the polygons with class, class_id, score and area_m2."""
        from shapely.geometry import mapping
        feats = [{"type": "Feature", "geometry": mapping(d.polygon),
                  "properties": {"class": d.class_name, "class_id": d.class_id, "score": d.score,
                                 "area_m2": d.area_m2}} for d in self.instances]
        fc = {"type": "FeatureCollection", "features": feats}
        if self.crs is not None:
            fc["crs"] = {"type": "name", "properties": {"name": self.crs.to_string()}}
        return fc


def merge_instances(polygons, scores, labels, tiles, iou_threshold, edge_ioa=EDGE_IOA):
    """Indices of the objects to keep, highest score first: of two objects of one class from different tiles, the
    smaller goes when ``edge_ioa`` of it lies inside the other (a part of an object a tile border cut); then
    class-wise NMS (:func:`..models.postprocess.nms_over_pairs`) over the pairs of polygon IoU above
    ``iou_threshold`` or of which one lies ``edge_ioa`` inside the other (a part of an object given beside it)."""
    polys = np.asarray(polygons, dtype=object).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1)
    if not len(polys):
        return np.zeros(0, dtype=np.int64)
    alive = np.ones(len(polys), dtype=bool)
    i, j = intersecting_pairs(polys)
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    iou, ioa_i, ioa_j = pair_overlaps(polys, i, j)
    area = np.array([p.area for p in polys])
    other = tiles[i] != tiles[j]
    alive[i[other & (ioa_i >= edge_ioa) & (area[i] < area[j])]] = False
    alive[j[other & (ioa_j >= edge_ioa) & (area[j] < area[i])]] = False
    # NMS: the same object twice (IoU), or a part of it (mostly inside the other) the network also gave
    link = alive[i] & alive[j] & ((iou > iou_threshold) | (np.maximum(ioa_i, ioa_j) >= edge_ioa))
    return nms_over_pairs(scores, np.flatnonzero(alive), i[link], j[link])


def tile_instances(reader, runner, grid, tiles, region, bs, check=lambda: None, on_batch=lambda done: None):
    """The objects of the tiles ``[(tile_no, x, y)]`` of a run over ``region`` (x0, y0, x1, y1, raster pixels):
    ``([(polygons, scores, labels, tile numbers)], tiles run)``. An object is kept by a tile when its box centre lies
    on a valid pixel, in the tile's core (``grid``: :meth:`.tiling.TileGrid.core`) and in the region; its mask is
    polygonised at once, in map coordinates."""
    x0, y0, x1, y1 = region
    t = reader.tile
    f = reader.native_tile / t  # native pixels per model pixel
    parts, run = [], 0
    for tile_no, x, y, valid, (boxes, labels, scores, masks) in tile_outputs(reader, runner, tiles, bs, check,
                                                                             on_batch):
        run += 1
        if not len(boxes):
            continue
        mx, my = box_centres(boxes)
        ok = valid[np.clip(my.astype(np.int64), 0, t - 1), np.clip(mx.astype(np.int64), 0, t - 1)]
        nx, ny = x + f * mx, y + f * my  # raster pixels
        cx0, cy0, cx1, cy1 = grid.core(x, y)
        ok &= (nx >= max(cx0, x0)) & (nx < min(cx1, x1)) & (ny >= max(cy0, y0)) & (ny < min(cy1, y1))
        wt = reader.window_transform(x, y)
        transform = wt * wt.scale(f)  # the mask's grid: model pixels of the tile
        polys, keep = [], []
        for k in np.flatnonzero(ok):
            poly = mask_polygon(masks[k], transform)
            if poly is not None:
                polys.append(poly)
                keep.append(k)
        if keep:
            parts.append((polys, scores[keep], labels[keep], np.full(len(keep), tile_no, dtype=np.int64)))
    return parts, run


def region_polygon(transform, region):
    """The map polygon of a pixel region (x0, y0, x1, y1)."""
    from shapely.geometry import Polygon
    x0, y0, x1, y1 = region
    return Polygon([apply_affine(transform, c, r) for c, r in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])


def instances_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): :func:`tile_instances` on the
    block's tiles."""
    return tile_instances(reader, runner, job["grid"], job["tiles"][i], job["region"], bs)


def segment_instances(input_path, package, *, bands=None, bounds=None, tile_size=None, overlap=None,
                      batch_size=None, device="auto", score_threshold=None, iou_threshold=None, max_detections=None,
                      progress=None, is_cancelled=None, log=None, match_gsd=True, max_pixels=None, gsd=None,
                      cluster=None, block_size=4096):
    """Find every object in ``input_path`` (any size) with an instance segmentation ``package`` (path or
    ModelPackage) and return an :class:`InstanceResult`: one polygon per object with its class and score (none is a
    valid result). The options are those of :func:`.detect.detect` (``max_detections`` per tile). The overlap should
    exceed the largest objects: those are taken whole from the tile whose core holds their centre. ``cluster``: run the
    tiles on a Dask cluster (:mod:`.distributed`: a scheduler address or "local:N"), in blocks of about
    ``block_size`` px, and merge their polygons here: the same objects."""
    t_start, prog, log, pkg = start_run(package, "instance_segmentation", progress, is_cancelled, log, gsd)
    score, iou, maxd = resolve_detection_options(pkg, score_threshold, iou_threshold, max_detections)
    pkg_opts = pkg.with_tiling(*resolve_options(pkg, tile_size, overlap, batch_size, device))
    open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd, pad="zeros")
    reader = open_reader(pkg_opts)
    result = InstanceResult(score_threshold=score, iou_threshold=iou, max_detections=maxd)
    try:
        result.warnings, region = open_region(reader, pkg, bounds, max_pixels, log,
                                              georef="polygons are in its pixel/georeferencing units",
                                              resampled="the polygons")
        x0, y0, x1, y1 = region
        result.gsd_scale = reader.scale
        result.crs, result.transform, result.region = reader.crs, reader.transform, region
        grid = TileGrid(x0, y0, x1, y1, reader.native_tile, reader.native_overlap)
        seq = numbered_tiles(grid)
        result.tiles = len(seq)
        if cluster:
            result.device = f"Dask cluster {cluster}"
            parts, result.tiles_run = run_object_blocks(cluster, pkg, pkg_opts, open_reader, reader, grid, seq, region,
                                                        (score, iou, maxd), device, batch_size, block_size,
                                                        instances_block_task, "polygon IoU", prog, log)
        else:
            runner, result.device, bs, on_batch = open_tile_run(device, batch_size, pkg, prog, log, reader, len(seq),
                                                                (score, iou, maxd), "polygon IoU")
            parts, result.tiles_run = tile_instances(reader, runner, grid, seq, region, bs, prog.check, on_batch)
        prog.check()
        if parts:
            polys = [p for part in parts for p in part[0]]
            scores, labels, tiles = (np.concatenate([part[k] for part in parts]) for k in (1, 2, 3))
            result.raw_instances = len(polys)
            keep = merge_instances(polys, scores, labels, tiles, iou)
            names = pkg.class_names()
            clip = region_polygon(reader.transform, region)
            factor = area_factor_m2(reader.crs, reader.transform, reader.width, reader.height)
            for k in keep.tolist():
                poly = polys[k]
                if not clip.contains(poly):  # a small EXTENT: objects are clipped to it
                    poly = poly.intersection(clip)
                    if poly.is_empty or poly.geom_type != "Polygon":
                        poly = max(getattr(poly, "geoms", [poly]), key=lambda g: g.area)
                    if poly.is_empty or poly.geom_type != "Polygon":
                        continue
                c = int(labels[k])
                result.instances.append(Instance(poly, c, names.get(c, str(c)), float(scores[k]),
                                                 float(poly.area * factor)))
        result.finish(reader, log, t_start)
        prog.update(1.0, f"{len(result)} objects ({result.raw_instances} from the tiles before merging), "
                         f"{result.tiles_run}/{result.tiles} tiles on {result.device} in {result.seconds:.1f} s")
        return result
    finally:
        reader.close()


__all__ = ["segment_instances", "Instance", "InstanceResult", "merge_instances", "tile_instances",
           "instances_block_task", "region_polygon"]
