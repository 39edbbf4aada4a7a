"""Object detection on a raster of any size with a detection model package.

The same tile loop as segmentation (:mod:`..geo.raster`, :mod:`.tiling`, :mod:`.pipeline`,
:mod:`..models.runners`), with another consume step:

* every tile (model resolution) goes through the network, which returns boxes in tile
  pixels after its own score cut, class-wise NMS and per-tile cap;
* boxes are mapped to raster pixels through the tile's window (and the GSD resampling
  factor), boxes centred on padding or nodata are dropped, and each box remembers whether it
  touches an *interior* tile edge (an edge with a neighbouring tile beyond it);
* :func:`merge_detections` removes the boxes that a tile edge cut when another tile holds the
  whole object, then runs class-wise NMS across tiles (numpy: the boxes ``torchvision.ops.batched_nms`` keeps);
* boxes are mapped to map coordinates with the raster's geotransform.

An oriented detector (``CenterNetOBB``, :attr:`.package.ModelPackage.oriented`) gives rotated boxes (cx, cy, length,
width, theta; :mod:`..geo.rotated`): the same steps with the rotated rectangles (centre on a valid pixel, cut flags of
their envelopes, rotated IoU for the merge and NMS); each :class:`Detection` then carries its map polygon (the rotated
rectangle), ``angle`` (the long side's direction in degrees clockwise from grid north, 0..180), ``width`` (short side)
and ``length`` (long side) in map units.

Only the detections are kept in memory (never the images), so memory is bounded by tile size
x batch size plus the number of objects. Nothing is written to disk: a cancelled run leaves
nothing (:func:`write_geojson` writes a result atomically when asked).
"""
import json
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..geo import rotated as rotated_geo
from ..geo.raster import RasterReader, apply_affine, input_warnings
from ..models.detection_options import IOU_THRESHOLD, MAX_DETECTIONS, SCORE_THRESHOLD, resolve_detection_options
from ..models.postprocess import nms_over_pairs
from .pipeline import Estimate, batched, open_device, open_region, prefetch, read_tiles, resolve_options, start_run
from .tiling import TileGrid, tiles_by_block

#: a box within this many model pixels of an interior tile edge may have been cut by it
EDGE_MARGIN = 3.0
#: a cut box is dropped when this share of it lies inside a whole box of another tile
EDGE_IOA = 0.6

@dataclass
class Detection:
    """One object: its box in map coordinates of the raster's CRS (pixels when it has none)."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    class_id: int
    class_name: str
    score: float
    pixel_box: tuple = None  # (col_min, row_min, col_max, row_max) in raster pixels (fractional)
    # an oriented detector's rotated box: its four map corners, the direction of its long side in degrees clockwise
    # from grid north (0..180), its short and long sides in map units; None for axis-aligned boxes
    polygon: tuple = None
    angle: float = None
    width: float = None
    length: float = None
    pixel_rbox: tuple = None  # (cx, cy, length, width, theta radians) in raster pixels

    @property
    def box(self):
        return (self.xmin, self.ymin, self.xmax, self.ymax)

    @property
    def centroid(self):
        if self.polygon is not None:
            return (sum(p[0] for p in self.polygon) / 4.0, sum(p[1] for p in self.polygon) / 4.0)
        return ((self.xmin + self.xmax) / 2.0, (self.ymin + self.ymax) / 2.0)

    @property
    def ring(self):
        """The closed outline in map coordinates: the rotated rectangle, or the box."""
        if self.polygon is not None:
            return [list(p) for p in self.polygon] + [list(self.polygon[0])]
        return [[self.xmin, self.ymin], [self.xmax, self.ymin], [self.xmax, self.ymax], [self.xmin, self.ymax],
                [self.xmin, self.ymin]]



@dataclass
class ObjectsResult:
    """What a run that finds objects returns besides them (:class:`DetectionResult`, and
    :class:`.instances.InstanceResult`): a sequence of its ``objects``, each with a ``class_name``."""

    crs: object = None
    transform: object = None  # the raster's geotransform
    region: tuple = None  # (col0, row0, col1, row1) processed, in raster pixels
    tiles: int = 0
    tiles_run: int = 0
    device: str = ""
    seconds: float = 0.0
    gsd_scale: float = 1.0
    score_threshold: float = SCORE_THRESHOLD
    iou_threshold: float = IOU_THRESHOLD
    max_detections: int = MAX_DETECTIONS
    warnings: list = field(default_factory=list)

    @property
    def objects(self):
        raise NotImplementedError

    def finish(self, reader, log, t_start):
        """At the end of the run: the warnings on the input (logged, and kept) and the seconds since ``t_start``."""
        said = input_warnings(reader, self.tiles_run == 0)
        for w in said:
            log(w)
        self.warnings += said
        self.seconds = time.time() - t_start

    def __len__(self):
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)

    def class_counts(self):
        counts = {}
        for d in self.objects:
            counts[d.class_name] = counts.get(d.class_name, 0) + 1
        return counts


@dataclass
class DetectionResult(ObjectsResult):
    detections: list = field(default_factory=list)  # list[Detection], highest score first
    raw_detections: int = 0  # boxes from all tiles before merging

    @property
    def objects(self):
        return self.detections

    def to_geojson(self):
        """A GeoJSON FeatureCollection of the boxes (polygons) with class_id, class_name, score (rotated boxes:
        also angle, width, length)."""
        feats = []
        for d in self.detections:
            props = {"class_id": d.class_id, "class_name": d.class_name, "score": d.score}
            if d.polygon is not None:
                props.update(angle=d.angle, width=d.width, length=d.length)
            feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [d.ring]},
                          "properties": props})
        fc = {"type": "FeatureCollection", "features": feats}
        if self.crs is not None:
            fc["crs"] = {"type": "name", "properties": {"name": self.crs.to_string()}}
        return fc


def edge_cut_flags(boxes, size, interior, margin=EDGE_MARGIN):
    """Which boxes (tile pixels) touch an interior edge of a ``size`` x ``size`` tile.

    ``interior``: (left, top, right, bottom) booleans: True where a neighbouring tile lies beyond."""
    left, top, right, bottom = interior
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cut = np.zeros(len(b), dtype=bool)
    if left:
        cut |= b[:, 0] <= margin
    if top:
        cut |= b[:, 1] <= margin
    if right:
        cut |= b[:, 2] >= size - margin
    if bottom:
        cut |= b[:, 3] >= size - margin
    return cut


def _pair_overlaps(boxes, i, j):
    """Intersection, IoU, and intersection / area of the first box, for index pairs (i, j)."""
    a, b = boxes[i], boxes[j]
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    ioa = np.where(area_a > 0, inter / np.where(area_a > 0, area_a, 1), 0.0)
    return inter, iou, ioa


def _intersecting_pairs(boxes):
    """Index pairs (i < j) of boxes whose interiors intersect (an STRtree query, not all pairs)."""
    import shapely
    n = len(boxes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = i < j
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


def merge_detections(boxes, scores, labels, tiles, cut, iou_threshold, edge_ioa=EDGE_IOA):
    """Merge boxes of overlapping tiles (one pixel frame): indices of the boxes to keep, best first.

    ``boxes``: [N, 4] axis-aligned boxes, or [N, 5] rotated boxes (cx, cy, length, width, theta;
    :mod:`..geo.rotated`), whose overlaps are those of their rectangles (shapely, on the pairs whose envelopes
    meet: the work is bounded by the objects of overlapping tiles, not the square of all boxes). A cut rotated
    box is also covered by a whole one of another tile that contains its centre (a tile's partial view of an
    oblique object is shifted, so its overlap with the whole rectangle may be small).

    1. a box that touches an interior edge of its tile (``cut``) is dropped when a box of the
       same class from another tile covers it (IoU > ``iou_threshold`` or intersection / area
       of the cut box >= ``edge_ioa``) and that box is whole: not touching an interior edge of
       its own tile, or larger than the cut box;
    2. class-wise NMS across tiles (IoU > ``iou_threshold`` suppresses the lower score): greedy NMS over
       the pairs of intersecting boxes found for step 1 (:func:`..models.postprocess.nms_over_pairs`), which
       keeps exactly the boxes a global ``torchvision.ops.batched_nms`` keeps, without torch.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    rotated = boxes.ndim == 2 and boxes.shape[1] == 5
    boxes = boxes.reshape(-1, 5 if rotated else 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1)
    cut = np.asarray(cut, dtype=bool).reshape(-1)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    if rotated:
        polys = rotated_geo.rbox_polygons(boxes)
        i, j = rotated_geo.intersecting_pairs(polys)
    else:
        i, j = _intersecting_pairs(boxes)
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    if len(i):
        if rotated:
            iou, ioa_i, ioa_j = rotated_geo.pair_overlaps(polys, i, j)
            area = boxes[:, 2] * boxes[:, 3]
        else:
            _, iou, ioa_i = _pair_overlaps(boxes, i, j)
            _, _, ioa_j = _pair_overlaps(boxes, j, i)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        other = tiles[i] != tiles[j]
        # the covering box is whole, or larger (an object that touches an edge without being cut by it)
        j_whole = ~cut[j] | (area[j] > area[i])
        i_whole = ~cut[i] | (area[i] > area[j])
        cover_i = (iou > iou_threshold) | (ioa_i >= edge_ioa)
        cover_j = (iou > iou_threshold) | (ioa_j >= edge_ioa)
        if rotated:  # a tile's partial view of a rotated object: its centre falls inside the whole rectangle
            import shapely
            cover_i |= shapely.contains_xy(polys[j], boxes[i, 0], boxes[i, 1])
            cover_j |= shapely.contains_xy(polys[i], boxes[j, 0], boxes[j, 1])
        drop_i = other & cut[i] & j_whole & cover_i
        drop_j = other & cut[j] & i_whole & cover_j
        alive[i[drop_i]] = False
        alive[j[drop_j]] = False
        # the pairs in which NMS suppresses the box of lower score
        link = alive[i] & alive[j] & (iou > iou_threshold)
        i, j = i[link], j[link]
    return nms_over_pairs(scores, np.flatnonzero(alive), i, j)


# --------------------------------------------------------------------------------------------
# entry point


def box_centres(boxes):
    """Centres (x [N], y [N]) of boxes [N, 4] or rotated boxes [N, 5]."""
    if boxes.shape[1] == 5:
        return boxes[:, 0], boxes[:, 1]
    return (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2


def shift_boxes(boxes, factor, dx, dy):
    """Boxes [N, 4] or rotated boxes [N, 5] scaled by ``factor`` (about the origin) and shifted by (dx, dy)."""
    out = boxes * factor
    if boxes.shape[1] == 5:
        out[:, 4] = boxes[:, 4]
        out[:, 0] += dx
        out[:, 1] += dy
    else:
        out[:, [0, 2]] += dx
        out[:, [1, 3]] += dy
    return out


def tile_boxes(boxes, labels, scores, valid, tile, interior):
    """One tile's boxes (tile pixels; [N, 4], or rotated [N, 5]) that are objects: those centred on a valid pixel
    (not padding or nodata), with their :func:`edge_cut_flags` (``interior``: whether each edge has a neighbouring
    tile; a rotated box's envelope is tested). Returns (boxes, labels, scores, cut)."""
    if len(boxes):
        mx, my = box_centres(boxes)
        cx = np.clip(mx.astype(np.int64), 0, tile - 1)
        cy = np.clip(my.astype(np.int64), 0, tile - 1)
        ok = valid[cy, cx]
        boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
    env = rotated_geo.rbox_envelopes(boxes) if boxes.shape[1] == 5 else boxes
    return boxes, labels, scores, edge_cut_flags(env, tile, interior)


class BoxMerger:
    """Collects the boxes of every tile (in one pixel grid) and merges them across tile edges
    (:func:`merge_detections`): the one box pipeline of inference (:func:`detect`) and of detection training's
    validation."""

    def __init__(self, columns=4):
        self.parts = []
        self.count = 0
        self.columns = columns  # 4: boxes; 5: rotated boxes

    def add(self, boxes, scores, labels, tile_no, cut):
        if len(boxes):
            self.parts.append((boxes, scores, labels, np.full(len(boxes), tile_no, dtype=np.int64), cut))
            self.count += len(boxes)

    def merge(self, iou_threshold, width, height):
        """(boxes [N, 4], scores [N], labels [N]) after the merge, clipped to ``width`` x ``height`` px; boxes
        left empty by the clip are dropped. Rotated boxes [N, 5] are not clipped (their centres are inside)."""
        if not self.parts:
            return np.zeros((0, self.columns)), np.zeros(0), np.zeros(0, dtype=np.int64)
        boxes, scores, labels, tiles, cut = (np.concatenate(k) for k in zip(*self.parts))
        keep = merge_detections(boxes, scores, labels, tiles, cut, iou_threshold)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if boxes.shape[1] == 5:
            return boxes, scores, labels
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[ok], scores[ok], labels[ok]


def _map_boxes(transform, cols0, rows0, cols1, rows1):
    """Axis-aligned map boxes of pixel boxes (all four corners through the affine transform)."""
    xs, ys = [], []
    for c, r in ((cols0, rows0), (cols1, rows0), (cols1, rows1), (cols0, rows1)):
        x, y = apply_affine(transform, c, r)
        xs.append(np.asarray(x, dtype=np.float64))
        ys.append(np.asarray(y, dtype=np.float64))
    xs, ys = np.stack(xs), np.stack(ys)
    return xs.min(axis=0), ys.min(axis=0), xs.max(axis=0), ys.max(axis=0)


def tile_detections(reader, runner, tiles, region, bs, check=lambda: None, on_batch=lambda done: None):
    """The boxes of the tiles ``[(tile_no, x, y)]`` of a run over ``region`` (x0, y0, x1, y1): ``([(boxes in
    region pixels, scores, labels, tile numbers, cut)], tiles run)``, the parts of a :class:`BoxMerger`, for the
    tiles with objects. ``check()`` runs before each batch, ``on_batch(tiles done)`` after it."""
    x0, y0, x1, y1 = region
    n, t = reader.native_tile, reader.tile
    f = n / t  # native pixels per model pixel
    parts, run = [], 0
    for tile_no, x, y, valid, (boxes, labels, scores) in tile_outputs(reader, runner, tiles, bs, check, on_batch):
        run += 1
        boxes, labels, scores, cut = tile_boxes(boxes, labels, scores, valid, t,
                                                (x > x0, y > y0, x + n < x1, y + n < y1))
        if not len(boxes):
            continue
        native = shift_boxes(boxes, f, x - x0, y - y0)
        # a tile larger than the region (a small EXTENT) sees objects beyond it: keep those centred inside
        mx, my = box_centres(native)
        inside = (mx >= 0) & (mx < x1 - x0) & (my >= 0) & (my < y1 - y0)
        if inside.any():
            parts.append((native[inside], scores[inside], labels[inside],
                          np.full(int(inside.sum()), tile_no, dtype=np.int64), cut[inside]))
    return parts, run


def open_tile_run(device, batch_size, pkg, prog, log, reader, tiles, thresholds, merged="NMS IoU"):
    """A run of ``tiles`` tiles on this machine: ``(runner, device description, batch size, on_batch)``, the
    package's runner on the device chosen (logged with the tiling and the ``thresholds`` (score, IoU, objects per
    tile); ``merged``: how objects are merged) and the ``on_batch`` progress callback of :func:`tile_outputs`."""
    score, iou, maxd = thresholds
    dev, name, bs = open_device(device, batch_size, pkg, prog, log)
    runner = pkg.make_detection_runner(dev, score, iou, maxd)
    prog.message(f"{tiles} tiles of {reader.native_tile} px ({reader.tile} px at the model's GSD), overlap "
                 f"{reader.native_overlap} px, batch {bs}; score >= {score:g}, {merged} {iou:g}, at most {maxd} "
                 "objects per tile")
    estimate = Estimate(tiles, "tiles", prog.message)

    def on_batch(done):
        prog.update(0.97 * done / tiles)
        estimate.after(done)

    return runner, name, bs, on_batch


def tile_outputs(reader, runner, tiles, bs, check=lambda: None, on_batch=lambda done: None):
    """The network's output for each tile ``(tile_no, x, y)`` that has valid pixels, read and run batch by batch
    (the next batch read meanwhile): yields ``(tile_no, x, y, valid [T, T], output)``. ``check()`` runs before each
    batch, ``on_batch(tiles done)`` after it."""
    done = 0
    for batch, (data, metas) in prefetch(lambda b: read_tiles(reader, [(x, y) for _, x, y in b], None),
                                         batched(tiles, bs)):
        check()
        outs = iter(runner(data) if data is not None else [])
        for (tile_no, _, _), (x, y, valid) in zip(batch, metas):
            if valid.any():
                yield tile_no, x, y, valid, next(outs)
        done += len(batch)
        on_batch(done)


def _oriented_detections(transform, rboxes, scores, labels, names):
    """:class:`Detection` of rotated pixel boxes [N, 5] (raster pixels): map corners, angle, width, length."""
    corners, mrb = rotated_geo.map_rboxes(transform, rboxes)
    angles = rotated_geo.azimuth_degrees(mrb[:, 4])
    out = []
    for k in range(len(rboxes)):
        c = corners[k]
        out.append(Detection(float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max()),
                             int(labels[k]), names.get(int(labels[k]), str(int(labels[k]))), float(scores[k]),
                             tuple(float(v) for v in rotated_geo.rbox_envelopes(rboxes[k:k + 1])[0]),
                             polygon=tuple((float(px), float(py)) for px, py in c), angle=float(angles[k]),
                             width=float(mrb[k, 3]), length=float(mrb[k, 2]),
                             pixel_rbox=tuple(float(v) for v in rboxes[k])))
    return out


def numbered_tiles(grid):
    """``[(tile_no, x, y)]``: the tiles of ``grid`` row by row, numbered from 1 (the order a run merges in)."""
    return [(i + 1, x, y) for i, (y, x) in enumerate((y, x) for y in grid.ys for x in grid.xs)]


def run_object_blocks(cluster, pkg, pkg_opts, open_reader, reader, grid, seq, region, options, device, batch_size,
                      block_size, run, iou_name, prog, log):
    """The tiles ``seq`` of an object run (detection, instances) on a Dask cluster: each tile in one block of about
    ``block_size`` px (:func:`.tiling.tiles_by_block`), ``run(reader, runner, job, i, bs)`` on the workers.
    Returns (the blocks' parts in tile order, as one process gives them; tiles run)."""
    from .distributed import run_blocks
    windows = grid.blocks(block_size)
    score, iou, maxd = options
    prog.message(f"{len(seq)} tiles of {reader.native_tile} px ({reader.tile} px at the model's GSD), overlap "
                 f"{reader.native_overlap} px, in {len(windows)} blocks of up to {block_size} px on {cluster}; "
                 f"score >= {score:g}, {iou_name} {iou:g}, at most {maxd} objects per tile")
    job = dict(open_reader=open_reader, gsd=pkg.gsd, tiling=(pkg_opts.tile_size, pkg_opts.overlap), device=device,
               batch_size=batch_size, detection=options, grid=grid, region=region,
               tiles=tiles_by_block(windows, seq), windows=windows, run=run, kind="detection")
    parts, tiles_run = [], 0
    for block_parts, n in run_blocks(cluster, pkg, job, prog, log, share=0.97):
        parts += block_parts
        tiles_run += n
    return sorted(parts, key=lambda part: part[3][0]), tiles_run


def detect_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): :func:`tile_detections`."""
    return tile_detections(reader, runner, job["tiles"][i], job["region"], bs)


def detect(input_path, package, *, bands=None, bounds=None, tile_size=None, overlap=None, batch_size=None,
           device="auto", score_threshold=None, iou_threshold=None, max_detections=None, progress=None,
           is_cancelled=None, log=None, match_gsd=True, max_pixels=None, gsd=None, cluster=None, block_size=4096):
    """Detect objects in ``input_path`` (any size) with a detection ``package`` (path or ModelPackage).

    ``bounds``: (xmin, ymin, xmax, ymax) in the raster's CRS to process only that area (objects
    are clipped to it). ``tile_size``/``overlap`` are model pixels (None = the package's);
    ``score_threshold``, ``iou_threshold`` and ``max_detections`` (per tile) default to the
    package's values; ``gsd``: processing resolution in metres per pixel (None: the package's). ``cluster``: run
    the tiles on a Dask cluster (:mod:`.distributed`), in blocks of about ``block_size`` px, and merge their boxes
    here: the same boxes. Returns a :class:`DetectionResult` (no detections is a valid result).
    """
    t_start, prog, log, pkg = start_run(package, "detection", progress, is_cancelled, log, gsd)
    score, iou, maxd = resolve_detection_options(pkg, score_threshold, iou_threshold, max_detections)
    pkg_opts = pkg.with_tiling(*resolve_options(pkg, tile_size, overlap, batch_size, device))
    # zeros beyond the raster, as the training crops have (a mirror doubles the objects cut by the edge)
    open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd, pad="zeros")
    reader = open_reader(pkg_opts)
    result = DetectionResult(score_threshold=score, iou_threshold=iou, max_detections=maxd)
    try:
        result.warnings, (x0, y0, x1, y1) = open_region(
            reader, pkg, bounds, max_pixels, log, georef="boxes are in its pixel/georeferencing units",
            resampled="the boxes")
        result.gsd_scale = reader.scale
        result.crs, result.transform, result.region = reader.crs, reader.transform, (x0, y0, x1, y1)
        grid = TileGrid(x0, y0, x1, y1, reader.native_tile, reader.native_overlap)
        seq = numbered_tiles(grid)
        result.tiles = len(seq)
        region = (x0, y0, x1, y1)
        if cluster:
            result.device = f"Dask cluster {cluster}"
            parts, result.tiles_run = run_object_blocks(cluster, pkg, pkg_opts, open_reader, reader, grid, seq, region,
                                                        (score, iou, maxd), device, batch_size, block_size,
                                                        detect_block_task, "NMS IoU", prog, log)
        else:
            runner, result.device, bs, on_batch = open_tile_run(device, batch_size, pkg, prog, log, reader, len(seq),
                                                                (score, iou, maxd))
            parts, result.tiles_run = tile_detections(reader, runner, seq, region, bs, prog.check, on_batch)
        oriented = bool(getattr(pkg, "oriented", False))
        merger = BoxMerger(5 if oriented else 4)
        for boxes, scores, labels, tile_nos, cut in sorted(parts, key=lambda part: part[3][0]):  # in tile order
            merger.add(boxes, scores, labels, tile_nos[0], cut)
        prog.check()
        if merger.count:
            result.raw_detections = merger.count
            # clipped to the processed region, back to raster pixels
            boxes, scores, labels = merger.merge(iou, x1 - x0, y1 - y0)
            boxes = shift_boxes(boxes, 1.0, x0, y0)
            names = pkg.class_names()
            if oriented:
                result.detections = _oriented_detections(reader.transform, boxes, scores, labels, names)
            else:
                mx0, my0, mx1, my1 = _map_boxes(reader.transform, boxes[:, 0], boxes[:, 1], boxes[:, 2],
                                                boxes[:, 3])
                result.detections = [
                    Detection(float(mx0[k]), float(my0[k]), float(mx1[k]), float(my1[k]), int(labels[k]),
                              names.get(int(labels[k]), str(int(labels[k]))), float(scores[k]),
                              tuple(float(v) for v in boxes[k]))
                    for k in range(len(boxes))]
        result.finish(reader, log, t_start)
        prog.update(1.0, f"{len(result.detections)} objects ({result.raw_detections} boxes from the tiles before "
                         f"merging), {result.tiles_run}/{result.tiles} tiles on {result.device} in "
                         f"{result.seconds:.1f} s")
        return result
    finally:
        reader.close()


def write_geojson(result, path):
    """Write ``result.to_geojson()`` to ``path`` atomically (temp file, synced, renamed; a full disk raises
    InputError and leaves no temp file and the earlier file untouched)."""
    from ..files import write_atomic
    from ..geo.writer import check_writable
    return write_atomic(check_writable(path, "OUTPUT"), json.dumps(result.to_geojson()))


__all__ = ["detect", "Detection", "DetectionResult", "ObjectsResult", "numbered_tiles", "run_object_blocks",
           "merge_detections", "edge_cut_flags", "tile_boxes",
           "tile_detections", "tile_outputs", "open_tile_run", "detect_block_task", "box_centres", "shift_boxes", "BoxMerger", "write_geojson"]
