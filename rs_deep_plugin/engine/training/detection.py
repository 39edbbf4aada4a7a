"""Training an object detector from boxes (QGIS-free).

Training images are small (scenes or clips of them), so they are read into memory once.
The pipeline mirrors inference (:mod:`.detect`):

* images are brought to the model's ground sampling distance (``gsd``) once, as the engine
  does tile by tile when a raster's GSD differs from the package's;
* value scaling is computed from the training pixels (:func:`.train.compute_value_scaling`),
  stored in the package and applied with :func:`.raster.apply_scaling`; nodata is 0;
* the network is an allow-listed torchvision detector (:mod:`.arch_torchvision`) that never
  resizes its input, trained on random square crops of ``tile_size`` px (scaled, flipped,
  rotated by multiples of 90 degrees, with brightness/contrast jitter and mild noise);
* validation images, when given, are run tile by tile with overlap and merged with
  :func:`.detect.merge_detections`, the function the engine uses, and scored by precision,
  recall, F1 and average precision at IoU 0.5.

Samples are :class:`DetectionSample` (or ``(image, boxes)`` pairs): an image file (GeoTIFF,
PNG, JPEG... anything GDAL reads) or array, and its boxes as a GeoJSON file (map coordinates
of the image's CRS), a Pascal VOC ``.xml`` (pixel coordinates) or a list of pixel boxes
``(xmin, ymin, xmax, ymax[, class])`` (column/row, origin at the image's top-left corner).
:func:`split_sample` holds back a strip of an image for a spatial validation split.
"""
import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..models.package import DEFAULT_COLORS, ModelClass, TASKS, save_package
from ..progress import Progress
from ..geo.raster import GSD_TOLERANCE, apply_affine, apply_scaling, pixel_size_metres
from .segmentation import (REPORT_NAME, _check_tile, _seed_everything, check_augment, compute_value_scaling,
                    write_report)

DEFAULT_BUILDER = {
    "library": "torchvision",
    "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
    "encoder_weights": None,
    "params": {"fpn_channels": 128, "representation_size": 256, "returned_layers": [3, 4],
               "anchor_sizes": [16, 32, 64, 128]},
}
MAX_XML_BYTES = 32 << 20


@dataclass
class DetectionSample:
    """One training or validation image with its boxes.

    ``image``: a raster path or a float array [C, H, W]; ``boxes``: a GeoJSON path (map
    coordinates), a Pascal VOC .xml path or a list of pixel boxes ``(xmin, ymin, xmax, ymax[,
    class])``; ``gsd``: metres per pixel (default: from the georeferencing; None = unknown,
    used as it is); ``window``: ``(col_off, row_off, width, height)`` to use only part of the
    image; ``boxes_at_window_edge``: ``"clip"`` keeps the visible part of boxes cut by the
    window (training), ``"centre"`` keeps the boxes whose centre lies inside (evaluation)."""

    image: object
    boxes: object
    gsd: float = None
    window: tuple = None
    name: str = None
    boxes_at_window_edge: str = "clip"


def _as_sample(item, i):
    if isinstance(item, DetectionSample):
        return item
    if isinstance(item, dict):
        return DetectionSample(**item)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return DetectionSample(*item)
    raise InputError(f"samples[{i}]: expected a DetectionSample or an (image, boxes) pair, got {type(item).__name__}")


def split_sample(sample, fraction=0.3, side="bottom", size=None):
    """(training part, held-out part) of one image: a spatial split along ``side``.

    Boxes cut by the split line are clipped into the training part (when mostly visible) and
    counted in the held-out part only when their centre lies inside it. ``size`` (width,
    height) avoids opening the image to learn its size."""
    s = _as_sample(sample, 0)
    if size is None:
        if isinstance(s.image, np.ndarray):
            size = (s.image.shape[2], s.image.shape[1])
        else:
            rasterio = _rasterio()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(s.image) as ds:
                    size = (ds.width, ds.height)
    w, h = size
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be between 0 and 1; got {fraction}")
    along = h if side in ("bottom", "top") else w
    n = max(1, int(round(along * fraction)))
    if side == "bottom":
        train, held = (0, 0, w, h - n), (0, h - n, w, n)
    elif side == "top":
        train, held = (0, n, w, h - n), (0, 0, w, n)
    elif side == "right":
        train, held = (0, 0, w - n, h), (w - n, 0, n, h)
    elif side == "left":
        train, held = (n, 0, w - n, h), (0, 0, n, h)
    else:
        raise InputError(f"side must be one of bottom, top, left, right; got {side!r}")
    name = s.name or (os.path.basename(os.fspath(s.image)) if not isinstance(s.image, np.ndarray) else "image")
    return (replace(s, window=train, name=f"{name} (training part, {side} {fraction:.0%} held out)",
                    boxes_at_window_edge="clip"),
            replace(s, window=held, name=f"{name} ({side} {fraction:.0%} held out)", boxes_at_window_edge="centre"))


# --------------------------------------------------------------------------------------------
# reading boxes


def _rasterio():
    try:
        import rasterio
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency(f"rasterio is not installed ({exc}); run 'make setup'") from exc
    return rasterio


def read_voc_boxes(path):
    """Pascal VOC annotation -> (boxes [N, 4] pixel xmin, ymin, xmax, ymax; class names [N])."""
    import xml.etree.ElementTree as ET
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"Box file not found: {path}")
    if os.path.getsize(path) > MAX_XML_BYTES:
        raise InputError(f"{path}: larger than 32 MiB; this is not a Pascal VOC annotation")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not a valid Pascal VOC XML file ({exc})") from exc
    boxes, names = [], []
    for i, obj in enumerate(root.iter("object")):
        bb = obj.find("bndbox")
        try:
            vals = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{path}: object {i} has no valid <bndbox> with xmin, ymin, xmax, ymax") from None
        boxes.append(vals)
        names.append((obj.findtext("name") or "").strip())
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), names


def read_geojson_boxes(path, class_field="label", dst_crs=None):
    """GeoJSON features -> (map boxes [N, 4] xmin, ymin, xmax, ymax in ``dst_crs``; class names [N]).

    Each feature's box is its geometry's envelope (points get no box and are refused). The
    class is the property ``class_field`` (name or 0-based number; absent = the first class).
    Reprojected like :func:`.train.read_vector_labels` when the file declares another CRS."""
    from shapely.geometry import shape
    from .segmentation import _crs_from_geojson, _reproject_labels
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as exc:
        raise InputError(f"Box file not found: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a valid GeoJSON file ({exc})") from exc
    feats = obj.get("features") if isinstance(obj, dict) and obj.get("type") == "FeatureCollection" else None
    if feats is None:
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection of box polygons")
    geoms, names = [], []
    for i, feat in enumerate(feats):
        g = (feat or {}).get("geometry")
        if not g:
            continue
        try:
            geom = shape(g)
        except Exception as exc:
            raise InputError(f"{path}: feature {i} has an invalid geometry ({exc})") from exc
        if geom.is_empty:
            continue
        if geom.geom_type in ("Point", "MultiPoint"):
            raise InputError(f"{path}: feature {i} is a point; detection needs boxes (polygons or lines around "
                             "each object)")
        props = feat.get("properties") or {}
        geoms.append((geom, 0))
        names.append(props.get(class_field))
    if dst_crs is not None and geoms:
        geoms = _reproject_labels(geoms, _crs_from_geojson(obj), dst_crs, path)
    boxes = np.array([g.bounds for g, _ in geoms], dtype=np.float64).reshape(-1, 4)
    return boxes, names


def _class_indices(names, class_names, where):
    if len(class_names) == 1:
        return np.zeros(len(names), dtype=np.int64)
    lookup = {n.lower(): i for i, n in enumerate(class_names)}
    out = []
    for n in names:
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 0 <= n < len(class_names):
            out.append(int(n))
        elif isinstance(n, str) and n.strip().lower() in lookup:
            out.append(lookup[n.strip().lower()])
        else:
            raise InputError(f"{where}: class {n!r} is not one of the classes given ({', '.join(class_names)}); "
                             "name each box's class, or give class_names that include it")
    return np.array(out, dtype=np.int64)


@dataclass
class _Loaded:
    name: str
    img: np.ndarray  # float32 [C, H, W] (raw values, later scaled)
    valid: np.ndarray  # bool [H, W]
    boxes: np.ndarray  # float64 [N, 4] pixel boxes in img
    labels: np.ndarray  # int64 [N] 0-based object classes
    gsd: float
    band_names: list


def _load_sample(s, class_names, bands, class_field, where):
    rasterio = _rasterio()
    transform = crs = None
    descriptions = None
    if isinstance(s.image, np.ndarray):
        img = np.asarray(s.image, dtype=np.float32)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3:
            raise InputError(f"{where}.image: expected an array [bands, height, width], got shape {img.shape}")
        if bands:
            img = img[[b - 1 for b in bands]]
        valid = np.isfinite(img).all(axis=0)
        img = np.where(np.isfinite(img), img, 0).astype(np.float32)
        gsd = s.gsd
        name = s.name or "array"
    else:
        path = os.fspath(s.image)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PNG/JPEG without georeferencing
                ds = rasterio.open(path)
        except Exception as exc:
            raise InputError(f"Cannot open the training image {path}: {exc}") from exc
        with ds:
            if bands:
                use = [int(b) for b in bands]
                bad = [b for b in use if b < 1 or b > ds.count]
                if bad:
                    raise InputError(f"bands {bad} do not exist: {path} has {ds.count} band(s) (1..{ds.count})")
            else:
                alpha = [i + 1 for i, ci in enumerate(ds.colorinterp) if getattr(ci, "name", str(ci)) == "alpha"]
                use = [b for b in range(1, ds.count + 1) if b not in alpha] or list(range(1, ds.count + 1))
            img = ds.read(use, out_dtype="float32")
            valid = np.any(ds.read_masks(use) > 0, axis=0)  # as the engine: nodata where every band is
            georef = ds.crs is not None
            transform, crs = ds.transform, ds.crs
            gsd = s.gsd if s.gsd is not None else (pixel_size_metres(crs, transform, ds.width, ds.height)
                                                   if georef else None)
            descriptions = [ds.descriptions[b - 1] for b in use]
        name = s.name or os.path.basename(path)
    # boxes in pixels of the full image
    bx = s.boxes
    if isinstance(bx, (str, os.PathLike)):
        p = os.fspath(bx)
        if p.lower().endswith(".xml"):
            boxes, names = read_voc_boxes(p)
        else:
            if transform is None or crs is None:
                raise InputError(f"{where}: {p} holds map coordinates but the image {name} is not georeferenced; "
                                 "give pixel boxes (Pascal VOC .xml or a list) for it")
            mboxes, names = read_geojson_boxes(p, class_field=class_field, dst_crs=crs)
            boxes = _map_to_pixels(mboxes, transform)
    else:
        rows = list(bx or [])
        boxes, names = [], []
        for k, r in enumerate(rows):
            if len(r) not in (4, 5):
                raise InputError(f"{where}.boxes[{k}]: expected (xmin, ymin, xmax, ymax[, class]), got {r!r}")
            boxes.append([float(v) for v in r[:4]])
            names.append(r[4] if len(r) == 5 else 0)
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    labels = _class_indices(names, class_names, f"{where} ({name})")
    x0 = np.minimum(boxes[:, 0], boxes[:, 2])
    x1 = np.maximum(boxes[:, 0], boxes[:, 2])
    y0 = np.minimum(boxes[:, 1], boxes[:, 3])
    y1 = np.maximum(boxes[:, 1], boxes[:, 3])
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    if s.window is not None:
        img, valid, boxes, labels = _apply_window(img, valid, boxes, labels, s.window, s.boxes_at_window_edge,
                                                  where)
    h, w = valid.shape
    boxes, labels = _clip_boxes(boxes, labels, w, h, min_visible=0.5)
    band_names = [d if d else f"b{i + 1}" for i, d in enumerate(descriptions or [None] * img.shape[0])]
    return _Loaded(name, img, valid, boxes, labels, gsd, band_names)


def _map_to_pixels(mboxes, transform):
    inv = ~transform
    xs, ys = [], []
    for cx, cy in ((0, 1), (2, 1), (2, 3), (0, 3)):
        c, r = apply_affine(inv, mboxes[:, cx], mboxes[:, cy])
        xs.append(np.asarray(c, dtype=np.float64))
        ys.append(np.asarray(r, dtype=np.float64))
    xs, ys = np.stack(xs), np.stack(ys)
    return np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1).reshape(-1, 4)


def _clip_boxes(boxes, labels, w, h, min_visible=0.4, min_size=2.0):
    """Clip boxes to [0, w] x [0, h]; keep those with at least ``min_visible`` of their area visible."""
    if not len(boxes):
        return boxes.reshape(0, 4), labels.reshape(0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    c = boxes.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]], 0, w)
    c[:, [1, 3]] = np.clip(c[:, [1, 3]], 0, h)
    vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    ok = (vis >= min_visible * np.maximum(area, 1e-9)) & (c[:, 2] - c[:, 0] >= min_size) & \
         (c[:, 3] - c[:, 1] >= min_size)
    return c[ok], labels[ok]


def _apply_window(img, valid, boxes, labels, window, policy, where):
    try:
        col, row, w, h = (int(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"{where}.window: expected (col_off, row_off, width, height), got {window!r}") from None
    H, W = valid.shape
    if w < 1 or h < 1 or col < 0 or row < 0 or col + w > W or row + h > H:
        raise InputError(f"{where}.window {window} is not inside the image ({W} x {H} px)")
    img = img[:, row:row + h, col:col + w]
    valid = valid[row:row + h, col:col + w]
    b = boxes - np.array([col, row, col, row], dtype=np.float64)
    if policy == "centre":
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        b, labels = b[ok], labels[ok]
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h)
        return img, valid, b, labels
    if policy != "clip":
        raise InputError(f"{where}.boxes_at_window_edge: expected 'clip' or 'centre', got {policy!r}")
    b, labels = _clip_boxes(b, labels, w, h, min_visible=0.5)
    return img, valid, b, labels


def _resample(item, factor):
    """Bring an image and its boxes to the model's GSD (``factor`` = new pixels per old pixel)."""
    import torch
    import torch.nn.functional as F
    c, h, w = item.img.shape
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(item.img))[None]
        img = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)[0].numpy()
        v = torch.from_numpy(item.valid.astype(np.float32))[None, None]
        valid = F.interpolate(v, size=(nh, nw), mode="nearest")[0, 0].numpy() > 0.5
    sx, sy = nw / w, nh / h
    boxes = item.boxes * np.array([sx, sy, sx, sy])
    return replace(item, img=np.ascontiguousarray(img), valid=valid, boxes=boxes)


# --------------------------------------------------------------------------------------------
# augmentation


def _rot90_boxes(boxes, size, k):
    """Boxes after ``np.rot90(image, k, axes=(1, 2))`` of a ``size`` x ``size`` image."""
    b = boxes.copy()
    for _ in range(k % 4):
        b = np.stack([b[:, 1], size - b[:, 2], b[:, 3], size - b[:, 0]], axis=1)
    return b


def _flip_boxes(boxes, size):
    """Boxes after ``image[:, :, ::-1]`` (left-right flip)."""
    return np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], axis=1)


class BoxCropSampler:
    """Random augmented square crops with their boxes from in-memory images at the model's GSD.

    Images are picked in proportion to their area, or to ``weights`` (one per image) when given."""

    def __init__(self, items, tile, rng, scale_range=(0.8, 1.25), object_prob=0.7, min_visible=0.4,
                 brightness=0.1, contrast=0.25, noise=0.03, weights=None, flip=True, rotate=True, gamma=None):
        self.items = items
        self.flip, self.rotate = bool(flip), bool(rotate)  # gamma: accepted for one augment dict, not used
        self.tile = tile
        self.rng = rng
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise InputError(f"scale_range must be (low, high) with 0 < low <= high; got {scale_range}")
        self.scale_range = (float(lo), float(hi))
        self.object_prob = object_prob
        self.min_visible = min_visible
        self.brightness, self.contrast, self.noise = brightness, contrast, noise
        area = np.array([it.valid.size for it in items], dtype=np.float64)
        if weights is not None:
            area = np.asarray(weights, dtype=np.float64).reshape(-1)
            if len(area) != len(items) or not np.all(np.isfinite(area)) or np.any(area < 0) or not area.sum() > 0:
                raise InputError(f"sample_weights: expected {len(items)} non-negative numbers (one per training "
                                 f"image), not all 0; got {list(weights)}")
        self.p = area / area.sum()

    def _crop(self):
        rng, t = self.rng, self.tile
        it = self.items[int(rng.choice(len(self.items), p=self.p))]
        c, h, w = it.img.shape
        lo, hi = self.scale_range
        s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        src = max(8, int(round(t * s)))
        if len(it.boxes) and rng.random() < self.object_prob:
            b = it.boxes[int(rng.integers(len(it.boxes)))]
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            x0 = int(round(cx - rng.uniform(0.1, 0.9) * src))
            y0 = int(round(cy - rng.uniform(0.1, 0.9) * src))
        else:
            x0 = int(rng.integers(min(0, w - src), max(0, w - src) + 1))
            y0 = int(rng.integers(min(0, h - src), max(0, h - src) + 1))
        x0 = min(max(x0, min(0, w - src)), max(0, w - src))
        y0 = min(max(y0, min(0, h - src)), max(0, h - src))
        img = np.zeros((c, src, src), dtype=np.float32)
        valid = np.zeros((src, src), dtype=bool)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + src, w), min(y0 + src, h)
        img[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = it.img[:, iy0:iy1, ix0:ix1]
        valid[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = it.valid[iy0:iy1, ix0:ix1]
        boxes = it.boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
        boxes, labels = _clip_boxes(boxes, it.labels, src, src, self.min_visible)
        if src != t:
            import torch
            import torch.nn.functional as F
            with torch.no_grad():
                img = F.interpolate(torch.from_numpy(img)[None], size=(t, t), mode="bilinear", align_corners=False,
                                    antialias=src > t)[0].numpy()
                valid = F.interpolate(torch.from_numpy(valid.astype(np.float32))[None, None], size=(t, t),
                                      mode="nearest")[0, 0].numpy() > 0.5
            boxes = boxes * (t / src)
        return img, valid, boxes, labels

    def sample(self):
        rng, t = self.rng, self.tile
        img, valid, boxes, labels = self._crop()
        k = int(rng.integers(4)) if self.rotate else 0
        if k:
            img, valid = np.rot90(img, k, axes=(1, 2)), np.rot90(valid, k)
            boxes = _rot90_boxes(boxes, t, k)
        if self.flip and rng.random() < 0.5:
            img, valid = img[:, :, ::-1], valid[:, ::-1]
            boxes = _flip_boxes(boxes, t)
        img = np.array(img, dtype=np.float32)
        valid = np.array(valid, dtype=bool)
        c = math.exp(rng.uniform(-self.contrast, self.contrast))
        b = rng.uniform(-self.brightness, self.brightness)
        mean = float(img[:, valid].mean()) if valid.any() else 0.0
        img -= mean
        img *= c
        img += mean + b
        if img.shape[0] > 1:
            img += rng.uniform(-self.brightness / 3, self.brightness / 3,
                               size=(img.shape[0], 1, 1)).astype(np.float32)
        sigma = rng.uniform(0.0, self.noise)
        if sigma > 0:
            img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        if not valid.all():
            img[:, ~valid] = 0.0
        return img, boxes.astype(np.float32), labels

    def batch(self, n):
        return [self.sample() for _ in range(n)]


# --------------------------------------------------------------------------------------------
# prediction and metrics on in-memory images


def predict_image(model, img, valid, tile, overlap, score_threshold, iou_threshold, max_detections, device,
                  batch_size=4):
    """Boxes of an in-memory scaled image [C, H, W], tiled and merged exactly as :func:`.detect.detect` does.

    Returns (boxes [N, 4] pixels, scores [N], labels [N])."""
    from ..inference.detect import edge_cut_flags, merge_detections
    from ..models.runners import DetectionRunner
    from ..inference.tiling import TileGrid
    c, h, w = img.shape
    grid = TileGrid(0, 0, w, h, tile, overlap)
    runner = DetectionRunner(model, device, score_threshold, iou_threshold, max_detections)
    out_b, out_s, out_l, out_t, out_c = [], [], [], [], []
    seq = [(x, y) for y in grid.ys for x in grid.xs]
    for k0 in range(0, len(seq), batch_size):
        part = seq[k0:k0 + batch_size]
        data = np.zeros((len(part), c, tile, tile), dtype=np.float32)
        vals = np.zeros((len(part), tile, tile), dtype=bool)
        for k, (x, y) in enumerate(part):
            ww, hh = min(tile, w - x), min(tile, h - y)
            data[k, :, :hh, :ww] = img[:, y:y + hh, x:x + ww]
            vals[k, :hh, :ww] = valid[y:y + hh, x:x + ww]
        for k, ((x, y), (boxes, labels, scores)) in enumerate(zip(part, runner(data))):
            if not len(boxes):
                continue
            cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, tile - 1)
            cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, tile - 1)
            ok = vals[k][cy, cx]
            boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
            cut = edge_cut_flags(boxes, tile, (x > 0, y > 0, x + tile < w, y + tile < h))
            out_b.append(boxes + np.array([x, y, x, y], dtype=np.float64))
            out_s.append(scores)
            out_l.append(labels)
            out_t.append(np.full(len(boxes), k0 + k))
            out_c.append(cut)
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes, scores, labels = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)
    keep = merge_detections(boxes, scores, labels, np.concatenate(out_t), np.concatenate(out_c), iou_threshold)
    boxes = boxes[keep]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes, scores[keep], labels[keep]


def box_iou(a, b):
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detection_metrics(predictions, truths, iou=0.5, score_threshold=0.0):
    """Precision, recall, F1 (predictions scoring >= ``score_threshold``) and average precision at ``iou``.

    ``predictions``: per image (boxes [N, 4], scores [N], labels [N]); ``truths``: per image
    (boxes [M, 4], labels [M]), in the same coordinates. A prediction is a true positive when
    it overlaps a not yet matched true box of its class with IoU >= ``iou`` (greedy, highest
    score first, as in Pascal VOC). AP is the mean over the classes present in the truth."""
    records = {}  # class -> list of (score, is_tp)
    n_truth = {}
    for (pb, ps, pl), (tb, tl) in zip(predictions, truths):
        pb, ps, pl = np.asarray(pb).reshape(-1, 4), np.asarray(ps).reshape(-1), np.asarray(pl).reshape(-1)
        tb, tl = np.asarray(tb).reshape(-1, 4), np.asarray(tl).reshape(-1)
        for c in set(pl.tolist()) | set(tl.tolist()):
            p_idx = np.flatnonzero(pl == c)
            t_idx = np.flatnonzero(tl == c)
            n_truth[c] = n_truth.get(c, 0) + len(t_idx)
            order = p_idx[np.argsort(-ps[p_idx], kind="stable")]
            ious = box_iou(pb[order], tb[t_idx]) if len(t_idx) else np.zeros((len(order), 0))
            matched = np.zeros(len(t_idx), dtype=bool)
            recs = records.setdefault(c, [])
            for r, k in enumerate(order):
                hit = False
                if len(t_idx):
                    cand = np.where(matched, -1.0, ious[r])
                    best = int(np.argmax(cand))
                    if cand[best] >= iou:
                        matched[best] = True
                        hit = True
                recs.append((float(ps[k]), hit))
    tp = fp = 0
    aps = []
    for c, recs in records.items():
        sel = [h for s, h in recs if s >= score_threshold]
        tp += sum(sel)
        fp += len(sel) - sum(sel)
        if n_truth.get(c, 0) > 0:
            aps.append(_average_precision(recs, n_truth[c]))
    total = sum(n_truth.values())
    fn = total - tp
    precision = tp / (tp + fp) if tp + fp else (1.0 if total == 0 else 0.0)
    recall = tp / total if total else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "ap": float(np.mean(aps)) if aps else 0.0,
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "truth": int(total), "iou": iou,
            "score_threshold": score_threshold}


def _average_precision(recs, n_truth):
    """All-point interpolated AP (Pascal VOC 2010+)."""
    if not recs:
        return 0.0
    recs = sorted(recs, key=lambda r: -r[0])
    hits = np.array([h for _, h in recs], dtype=np.float64)
    tp = np.cumsum(hits)
    fp = np.cumsum(1 - hits)
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, 1e-9)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


# --------------------------------------------------------------------------------------------
# training


def resolve_detection_builder(builder, in_channels, n_classes):
    from ..models.architectures import validate_builder
    b = copy.deepcopy(DEFAULT_BUILDER if builder is None else builder)
    b.setdefault("library", "torchvision")
    b["encoder_weights"] = None
    for key, value in (("in_channels", in_channels), ("classes", n_classes)):
        if b.get(key) is None:
            b[key] = value
        elif b[key] != value:
            raise InputError(f"builder.{key} is {b[key]} but the training data need {value}")
    return validate_builder(b, "builder")


def detection_output_metadata(classes, builder):
    """The MLM ``mlm:output`` of a detection package: boxes with a class and a score per object."""
    return [{
        "name": "detections",
        "tasks": [TASKS["detection"]],
        "result": {"shape": [-1, 6], "dim_order": ["box", "xmin_ymin_xmax_ymax_class_score"],
                   "data_type": "float32"},
        "classification:classes": [{"value": c.value, "name": c.name, "color_hint": c.color} for c in classes],
        "post_processing_function": None,
    }]


def _set_training_sizes(model, proposals=256, roi_batch=64):
    """Lighter Faster R-CNN sampling for small tiles (these settings are not part of the weights)."""
    rpn = getattr(model, "rpn", None)
    if rpn is not None:
        rpn._pre_nms_top_n["training"] = proposals * 2
        rpn._post_nms_top_n["training"] = proposals
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        heads.fg_bg_sampler.batch_size_per_image = roi_batch


def train_detection(samples, out_dir, *, boxes=None, class_names=("object",), class_colors=None, val_samples=None,
                    bands=None, band_names=None, builder=None, gsd="auto", value_scaling=None, tile_size=256,
                    epochs=20, steps_per_epoch=None, batch_size=4, lr=2e-3, weight_decay=1e-4, seed=0,
                    scale_range=(0.8, 1.25), object_prob=0.7, min_visible=0.4, sample_weights=None, keep="best",
                    device="auto", num_threads=None, progress=None, is_cancelled=None, log=None, name="detection-model",
                    description="", package_tile_size=512, package_overlap=64, score_threshold=None,
                    iou_threshold=None, max_detections=None, weights_dtype="float16", class_field="label",
                    proposals=256, roi_batch=64, augment=None, patience=0):
    """Train a detection network and write a model package (+ ``training_report.json``) to ``out_dir``.

    ``samples``: an image path (with ``boxes``: GeoJSON, VOC .xml or pixel boxes) or a list of
    :class:`DetectionSample` / ``(image, boxes)`` pairs. ``class_names``: the object classes
    (no background). ``val_samples``: images scored after every epoch (precision/recall/AP at
    IoU 0.5); with ``keep="best"`` the epoch of best validation AP is packaged, with
    ``keep="last"`` (or without validation samples) the last epoch. ``gsd``: the model's
    metres per pixel ("auto": the first georeferenced sample's; None: every image as it is);
    images of another known GSD are resampled to it. ``score_threshold``, ``iou_threshold``,
    ``max_detections`` are stored in the package as its defaults. ``sample_weights``: the share
    of training crops taken from each sample (relative numbers, one per sample; default: in
    proportion to the images' areas). ``samples`` may also be a chip folder of
    :func:`.chips.export_training_data` (task detection): its training chips are the samples and
    its validation chips the validation samples. ``augment``: flip, rotate, brightness, contrast,
    noise (see :func:`.train.train_segmentation`). ``patience``: with validation samples, stop
    after that many epochs without a better validation AP (0: never).

    Returns the training report. When ``is_cancelled()`` turns true after an epoch finished,
    that network is written before :class:`Cancelled` is raised.
    """
    t0 = time.time()
    prog = Progress(progress, is_cancelled)
    log = log or (lambda msg: None)
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency(f"PyTorch is not installed ({exc}); run 'make setup'") from exc
    from ..models.architectures import build_model
    from ..models.detection_options import IOU_THRESHOLD, MAX_DETECTIONS, SCORE_THRESHOLD, check_thresholds
    from ..models.runners import device_description, select_device

    from . import chips as chipsets
    if chipsets.is_chip_set(samples):
        manifest = chipsets.load_manifest(samples, "detection")
        samples, chip_val = chipsets.detection_samples(manifest)
        val_samples = val_samples if val_samples is not None else chip_val
        names, cols = chipsets.class_info(manifest)
        if not class_names or tuple(class_names) == ("object",):
            class_names, class_colors = names, class_colors or cols
        log(f"Training from {len(samples)} chips, validating on {len(val_samples or [])} ({manifest['root']})")
    augment = check_augment(augment, ("flip", "rotate", "brightness", "contrast", "gamma", "noise"))
    class_names = [str(n) for n in (class_names or [])]
    if not class_names:
        raise InputError("class_names: give the object classes to detect, e.g. ['tree']")
    k = len(class_names)
    colors = list(class_colors) if class_colors else [DEFAULT_COLORS[1 + i % (len(DEFAULT_COLORS) - 1)]
                                                      for i in range(k)]
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    classes = [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]
    _check_tile(tile_size, "tile_size")
    _check_tile(package_tile_size, "package_tile_size")
    if not 0 <= package_overlap < package_tile_size // 2:
        raise InputError(f"package_overlap must be in [0, {package_tile_size // 2}); got {package_overlap}")
    if batch_size < 1 or epochs < 1:
        raise InputError("batch_size and epochs must be at least 1")
    if keep not in ("best", "last"):
        raise InputError(f"keep must be 'best' or 'last'; got {keep!r}")
    score_t, iou_t, max_d = check_thresholds(SCORE_THRESHOLD if score_threshold is None else score_threshold,
                                             IOU_THRESHOLD if iou_threshold is None else iou_threshold,
                                             MAX_DETECTIONS if max_detections is None else max_detections)

    # ---- data ---------------------------------------------------------------------------
    if isinstance(samples, (str, os.PathLike, np.ndarray)):
        if boxes is None:
            raise InputError("boxes: give the boxes of the training image (GeoJSON, Pascal VOC .xml or a list)")
        samples = [DetectionSample(samples, boxes)]
    samples = [_as_sample(s, i) for i, s in enumerate(samples or [])]
    if not samples:
        raise InputError("samples: give at least one training image with boxes")
    val_samples = [_as_sample(s, i) for i, s in enumerate(val_samples or [])]
    prog.message(f"Reading {len(samples)} training and {len(val_samples)} validation image(s)")
    train_items = [_load_sample(s, class_names, bands, class_field, f"samples[{i}]") for i, s in enumerate(samples)]
    val_items = [_load_sample(s, class_names, bands, class_field, f"val_samples[{i}]")
                 for i, s in enumerate(val_samples)]
    n_bands = train_items[0].img.shape[0]
    for it in train_items + val_items:
        if it.img.shape[0] != n_bands:
            raise InputError(f"{it.name} has {it.img.shape[0]} bands but {train_items[0].name} has {n_bands}; "
                             "every image needs the same bands (choose them with bands=)")
    if band_names:
        band_names = [str(b) for b in band_names]
        if len(band_names) != n_bands:
            raise InputError(f"band_names: {len(band_names)} names for {n_bands} bands")
    else:
        band_names = train_items[0].band_names
    if gsd == "auto":
        gsd = next((it.gsd for it in train_items if it.gsd), None)
    if gsd is not None and (isinstance(gsd, bool) or not isinstance(gsd, (int, float)) or not gsd > 0):
        raise InputError(f"gsd: expected metres per pixel (> 0), 'auto' or None; got {gsd!r}")

    def to_model_gsd(it):
        if gsd and it.gsd and abs(it.gsd / gsd - 1.0) > GSD_TOLERANCE:
            log(f"{it.name}: {it.gsd:.3g} m pixels resampled to the model's {gsd:.3g} m")
            return _resample(it, it.gsd / gsd)
        return it

    train_items = [to_model_gsd(it) for it in train_items]
    val_items = [to_model_gsd(it) for it in val_items]
    n_train_boxes = int(sum(len(it.boxes) for it in train_items))
    if n_train_boxes == 0:
        raise InputError("No boxes fall in the training images: check that the boxes overlap the images and are "
                         "in the image's CRS (GeoJSON) or pixels (VOC, lists)")
    if value_scaling is None:
        pix = np.concatenate([it.img[:, it.valid] for it in train_items], axis=1)
        value_scaling = compute_value_scaling(pix[:, None, :], np.ones((1, pix.shape[1]), dtype=bool), seed=seed)
        del pix
    for it in train_items + val_items:
        apply_scaling(it.img, value_scaling)
        it.img[:, ~it.valid] = 0.0

    # ---- model --------------------------------------------------------------------------
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        _seed_everything(seed)
        rng = np.random.default_rng(seed)
        dev = select_device(device)
        builder = resolve_detection_builder(builder, n_bands, k)
        # channels_last: much faster (depthwise) convolutions on CPU (oneDNN) and on tensor-core GPUs
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        model = build_model(builder).to(dev).to(memory_format=fmt)
        _set_training_sizes(model, proposals, roi_batch)
        if steps_per_epoch is None:
            area = sum(it.valid.size for it in train_items)
            steps_per_epoch = max(4, int(math.ceil(area / (tile_size * tile_size) / batch_size)))
        steps_per_epoch = int(steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=min(0.3, max(0.05, 2.0 / epochs)),
                                                    div_factor=10.0, final_div_factor=100.0)
        sampler = BoxCropSampler(train_items, tile_size, rng, scale_range=scale_range, object_prob=object_prob,
                                 min_visible=min_visible, weights=sample_weights, **augment)
        log(f"Training {builder['architecture']} on {device_description(dev)}: {epochs} epochs x {steps_per_epoch} "
            f"steps x {batch_size} crops of {tile_size} px; {n_train_boxes} training boxes in {len(train_items)} "
            f"image(s), {sum(len(it.boxes) for it in val_items)} validation boxes")
        report = {
            "name": name, "task": "detection", "out_dir": os.fspath(out_dir), "classes": class_names,
            "bands": band_names, "builder": builder, "value_scaling": value_scaling, "gsd": gsd, "seed": seed,
            "device": device_description(dev), "threads": torch.get_num_threads(), "tile_size": tile_size,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "epochs_planned": epochs,
            "steps_per_epoch": steps_per_epoch, "keep": keep if val_items else "last",
            "sample_shares": [round(float(v), 4) for v in sampler.p],
            "thresholds": {"score_threshold": score_t, "iou_threshold": iou_t, "max_detections": max_d},
            "train_images": [{"name": it.name, "width": it.img.shape[2], "height": it.img.shape[1],
                              "boxes": int(len(it.boxes))} for it in train_items],
            "val_images": [{"name": it.name, "width": it.img.shape[2], "height": it.img.shape[1],
                            "boxes": int(len(it.boxes))} for it in val_items],
            "crops_seen": 0, "train_loss": [], "loss_parts": [], "val": [], "epochs_run": 0, "best_epoch": None,
            "best": None, "cancelled": False, "seconds": None, "augment": augment, "patience": patience,
            "stopped_early": False,
        }
        best = {"key": None, "state": None, "epoch": None, "metrics": None}

        def validate_now():
            preds, truths = [], []
            for it in val_items:
                b, s, lab = predict_image(model, it.img, it.valid, tile_size, tile_size // 8, min(0.05, score_t),
                                          iou_t, max_d, dev)
                preds.append((b, s, lab))
                truths.append((it.boxes, it.labels))
            model.train()
            return detection_metrics(preds, truths, iou=0.5, score_threshold=score_t)

        def finish(cancelled):
            if best["state"] is None:
                return None
            model.load_state_dict(best["state"])
            model.eval()
            extra = {
                "rs_deep:score_threshold": score_t, "rs_deep:iou_threshold": iou_t, "rs_deep:max_detections": max_d,
                "mlm:output": detection_output_metadata(classes, builder),
                "rs_deep:training": {"best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": seed,
                                     "val": best["metrics"], "train_boxes": n_train_boxes}}
            save_package(model.cpu(), out_dir, weights_dtype=weights_dtype, name=name, task="detection",
                         bands=band_names, classes=classes, builder=builder, tile_size=package_tile_size,
                         overlap=package_overlap, gsd=gsd, value_scaling=value_scaling, description=description,
                         extra=extra)
            report.update(best_epoch=best["epoch"], best=best["metrics"], cancelled=cancelled,
                          seconds=round(time.time() - t0, 2), package=os.path.abspath(os.fspath(out_dir)))
            report["report_path"] = os.path.join(os.path.abspath(os.fspath(out_dir)), REPORT_NAME)
            report["curves_path"] = write_report(report["report_path"], report, log)
            return report

        train_prog = prog.sub(0.02, 0.97)
        since_best = 0
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                losses, parts = [], {}
                for step in range(steps_per_epoch):
                    train_prog.check()
                    crops = sampler.batch(batch_size)
                    images = [torch.from_numpy(img).to(dev) for img, _, _ in crops]
                    targets = [{"boxes": torch.from_numpy(b).reshape(-1, 4).to(dev),
                                "labels": torch.from_numpy(lab.astype(np.int64) + 1).to(dev)} for _, b, lab in crops]
                    loss_dict = model(images, targets)
                    loss = sum(loss_dict.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 10.0)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    for kk, v in loss_dict.items():
                        parts.setdefault(kk, []).append(float(v.detach()))
                    report["crops_seen"] += batch_size
                    train_prog.update(((epoch - 1) * steps_per_epoch + step + 1) / total_steps)
                train_loss = float(np.mean(losses))
                report["train_loss"].append(round(train_loss, 5))
                report["loss_parts"].append({kk: round(float(np.mean(v)), 5) for kk, v in parts.items()})
                report["epochs_run"] = epoch
                msg = f"Epoch {epoch}/{epochs}: loss {train_loss:.4f}"
                if val_items:
                    metrics = validate_now()
                    report["val"].append({kk: (round(v, 5) if isinstance(v, float) else v)
                                          for kk, v in metrics.items()})
                    key = (metrics["ap"], metrics["f1"]) if keep == "best" else (epoch,)
                    msg += (f", validation AP50 {metrics['ap']:.3f}, precision {metrics['precision']:.3f}, recall "
                            f"{metrics['recall']:.3f} (score >= {score_t:g})")
                else:
                    metrics, key = None, (epoch,)
                if best["key"] is None or key > best["key"]:
                    best.update(key=key, epoch=epoch, metrics=metrics,
                                state={kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()})
                    since_best = 0
                else:
                    since_best += 1
                log(msg)
                train_prog.update(epoch / epochs, msg)
                if val_items and keep == "best" and patience and since_best >= patience and epoch < epochs:
                    report["stopped_early"] = True
                    log(f"Stopping early: no better validation AP for {patience} epochs")
                    break
        except Cancelled:
            saved = finish(cancelled=True)
            if saved is not None:
                raise Cancelled(f"Training was cancelled after {report['epochs_run']} epoch(s); the network of "
                                f"epoch {best['epoch']} was written to {out_dir}") from None
            raise Cancelled("Training was cancelled before the first epoch finished; nothing was written.") from None
        prog.sub(0.97, 1.0).update(0.0, "Writing the model package")
        result = finish(cancelled=False)
        prog.update(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)


__all__ = ["train_detection", "DetectionSample", "split_sample", "read_voc_boxes", "read_geojson_boxes",
           "detection_metrics", "predict_image", "box_iou", "BoxCropSampler", "DEFAULT_BUILDER",
           "detection_output_metadata"]
