"""Training data in memory: images, bands, value scaling, spatial splits, counts, detection samples (QGIS-free).

Training images are small (scenes or clips of them), so they are read into memory once.

* :func:`read_image`, :func:`select_bands`, :func:`band_names`: an image and the bands to learn from
  (default: every non-alpha band);
* :func:`compute_value_scaling` and :func:`scale_image`: the MLM ``value_scaling`` computed from the training
  pixels and applied with :func:`.raster.apply_scaling`, the function inference uses; nodata is 0 after it;
* :func:`split_strip`: the spatial validation split, a strip of the image held out (windows are
  ``(col_off, row_off, width, height)``, as rasterio's ``Window``);
* :func:`pad_to`, :func:`class_counts`, :func:`patch_label`, :func:`grid_patches`;
* :class:`DetectionSample`, :func:`split_sample`, :func:`load_sample`, :func:`resample_to_gsd`: detection
  images with their boxes, loaded in pixels at the model's ground sampling distance.
"""
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError, require
from ..geo.labels import IGNORE, clip_boxes, map_to_pixels, read_geojson_boxes, read_geojson_shapes, read_voc_boxes
from ..geo.raster import apply_scaling, percentile_scaling, pixel_size_metres
from ..models.package import ModelClass

VAL_SIDES = ("bottom", "top", "left", "right")
#: ``val_side`` "auto": the edge strip whose classes are closest to the whole labelled image's
#: (:func:`representative_side`)
AUTO_SIDE = "auto"
MIN_TRAIN_PX = 32  # the training part of a split image keeps at least this many rows (or columns)


def _rasterio():
    return require("rasterio")


# --------------------------------------------------------------------------------------------
# images and bands


def select_bands(ds, bands, where):
    """``bands`` (1-based) checked against the open raster ``ds``, or every non-alpha band (all when every band
    is alpha). ``where`` names the raster in the error."""
    if bands:
        use = [int(b) for b in bands]
        bad = [b for b in use if b < 1 or b > ds.count]
        if bad:
            raise InputError(f"bands {bad} do not exist: {where} has {ds.count} band(s) (1..{ds.count})")
        return use
    alpha = [i + 1 for i, ci in enumerate(ds.colorinterp) if getattr(ci, "name", str(ci)) == "alpha"]
    return [b for b in range(1, ds.count + 1) if b not in alpha] or list(range(1, ds.count + 1))


def read_image(image_path, bands):
    """(open dataset, band numbers, data float32 [C, H, W] raw, valid bool [H, W]) of a training image; the
    caller closes the dataset. A pixel is valid when every band is."""
    rasterio = _rasterio()
    try:
        ds = rasterio.open(image_path)
    except Exception as exc:
        raise InputError(f"Cannot open the training image {image_path}: {exc}") from exc
    try:
        bands = select_bands(ds, bands, "the image")
    except InputError:
        ds.close()
        raise
    data = ds.read(bands, out_dtype="float32")
    valid = np.all(ds.read_masks(bands) > 0, axis=0)
    return ds, bands, data, valid


def check_band_names(band_names, n_bands):
    """``band_names`` as strings, one per band."""
    band_names = [str(b) for b in band_names]
    if len(band_names) != n_bands:
        raise InputError(f"band_names: {len(band_names)} names for {n_bands} bands")
    return band_names


def band_names(ds, bands, names=None):
    """``names`` checked against ``bands``, or the bands' descriptions (``b<N>`` where there is none)."""
    if names:
        return check_band_names(names, len(bands))
    return [ds.descriptions[b - 1] or f"b{b}" for b in bands]


def compute_value_scaling(data, valid, low=1.0, high=99.0, max_samples=2_000_000, seed=0):
    """Per-band MLM min-max scaling from the ``low``..``high`` percentiles of the valid pixels (the function a
    package with per-input scaling applies to each input: :func:`.raster.percentile_scaling`)."""
    return percentile_scaling(data, valid, low, high, max_samples, seed)


def scale_image(img, valid, scaling):
    """Apply ``scaling`` to ``img`` [C, H, W] in place and set the invalid pixels to 0 (as inference reads them)."""
    apply_scaling(img, scaling)
    img[:, ~valid] = 0.0
    return img


def model_classes(class_names, class_colors, default_colors):
    """The package's classes (value = index) of ``class_names``, coloured by ``class_colors`` or, when there are
    none, ``default_colors`` (one per class)."""
    k = len(class_names)
    colors = list(class_colors) if class_colors else list(default_colors)
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    return [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]


# --------------------------------------------------------------------------------------------
# spatial split, padding, counts


def split_strip(width, height, fraction, side="bottom", min_train=0):
    """(training window, held-out window), each ``(col_off, row_off, width, height)``: the ``side`` strip
    holding ``fraction`` of the rows (bottom, top) or columns (left, right) of a ``width`` x ``height``
    image is held out. The training part keeps at least ``min_train`` rows (columns)."""
    if side not in VAL_SIDES:
        raise InputError(f"side must be one of {', '.join(VAL_SIDES)}; got {side!r}")
    along = height if side in ("bottom", "top") else width
    n = max(1, int(round(along * fraction)))
    if along - n < min_train:
        raise InputError(f"The image is too small to hold back {fraction:.0%} of it for validation "
                         f"({along} px); use a larger image or val_fraction=0")
    if side == "bottom":
        return (0, 0, width, height - n), (0, height - n, width, n)
    if side == "top":
        return (0, n, width, height - n), (0, 0, width, n)
    if side == "right":
        return (0, 0, width - n, height), (width - n, 0, n, height)
    return (n, 0, width - n, height), (0, 0, n, height)


def representative_side(labels, fraction, n_classes, ignore=None):
    """The side (of :data:`VAL_SIDES`, in that order of preference) whose edge strip of ``fraction`` holds the
    labelled classes most like the whole label image ``labels`` [H, W] (values 0..n_classes-1; ``ignore``: a
    value not counted): the largest share of each foreground class's expected pixels that the strip holds (a
    class as frequent in the strip as in the image, or more, counts in full), then the smallest difference of
    shares. A validation strip without the objects (one building in a strip of forest) scores an epoch by a few
    hundred pixels, so the best epoch is picked by chance."""
    h, w = labels.shape

    def shares(part):
        ok = part[part != ignore] if ignore is not None else part.ravel()
        counts = np.bincount(ok.astype(np.int64), minlength=n_classes)[:n_classes].astype(np.float64)
        return counts[1:] / max(1.0, float(counts.sum()))

    whole = shares(labels)
    expected = float(whole.sum())
    best, best_key = VAL_SIDES[0], None
    for side in VAL_SIDES:
        try:
            held = split_strip(w, h, fraction, side, MIN_TRAIN_PX)[1]
        except InputError:  # too little left to train along this axis
            continue
        rows, cols = window_slices(held)
        strip = shares(labels[rows, cols])
        covered = float(np.minimum(strip, whole).sum()) / expected if expected > 0 else 1.0
        key = (round(covered, 6), -float(np.abs(strip - whole).sum()))
        if best_key is None or key > best_key:
            best, best_key = side, key
    return best


def validation_split(width, height, val_fraction, val_side):
    """(training window, validation window or None) of an image that trains segmentation or patches:
    :func:`split_strip` with ``val_fraction`` in [0, 0.9) (0: no validation) and at least 32 px left to train."""
    if not val_fraction or val_fraction <= 0:
        return (0, 0, width, height), None
    if not 0 < val_fraction < 0.9:
        raise InputError(f"val_fraction must be in [0, 0.9); got {val_fraction}")
    if val_side not in VAL_SIDES:
        raise InputError(f"val_side must be one of {', '.join(VAL_SIDES)}; got {val_side!r}")
    return split_strip(width, height, val_fraction, val_side, MIN_TRAIN_PX)


def window_slices(window):
    """``(rows, cols)`` slices of a ``(col_off, row_off, width, height)`` window."""
    col, row, w, h = window
    return slice(row, row + h), slice(col, col + w)


def window_dict(window):
    """A window as the report writes it: ``{row_off, col_off, height, width}``, or None."""
    if window is None:
        return None
    col, row, w, h = window
    return {"row_off": row, "col_off": col, "height": h, "width": w}


def pad_to(img, lab, valid, min_h, min_w):
    """Pad the training region so that any crop fits; padding is mirrored image, ignored label."""
    h, w = lab.shape
    ph, pw = max(0, min_h - h), max(0, min_w - w)
    if not ph and not pw:
        return img, lab, valid
    pad = ((0, ph), (0, pw))
    try:
        img = np.pad(img, ((0, 0),) + pad, mode="reflect")
        valid = np.pad(valid, pad, mode="reflect")
    except ValueError:
        img = np.pad(img, ((0, 0),) + pad, mode="edge")
        valid = np.pad(valid, pad, mode="edge")
    lab = np.pad(lab, pad, mode="constant", constant_values=IGNORE)
    return img, lab, valid


def class_counts(train_labs, val_labs, class_names):
    """Labelled pixels, in all and per class, of the training and the validation label arrays."""
    def px(labs):
        return int(sum(int((lab != IGNORE).sum()) for lab in labs))

    def per_class(labs):
        return {n: int(sum(int((lab == i).sum()) for lab in labs)) for i, n in enumerate(class_names)}

    return {"train_pixels": px(train_labs), "train_class_pixels": per_class(train_labs),
            "val_pixels": px(val_labs), "val_class_pixels": per_class(val_labs) if val_labs else {}}


def patch_label(lab, n_classes, min_labelled=0.5):
    """(majority class, purity) of a label patch, or (None, 0) when too little of it is labelled."""
    ok = lab != IGNORE
    if ok.sum() < max(1, min_labelled * lab.size):
        return None, 0.0
    counts = np.bincount(lab[ok].ravel(), minlength=n_classes)
    c = int(np.argmax(counts))
    return c, float(counts[c] / ok.sum())


def grid_patches(lab, patch, stride, n_classes, min_purity):
    """Labels of the patches of a regular grid (as :func:`.patches.classify_patches` lays it):
    ``[(row0, col0, class, purity)]`` for patches entirely inside and pure enough."""
    h, w = lab.shape
    out = []
    for r in range(0, h - patch + 1, stride):
        for c in range(0, w - patch + 1, stride):
            k, purity = patch_label(lab[r:r + patch, c:c + patch], n_classes)
            if k is not None and purity >= min_purity:
                out.append((r, c, k, purity))
    return out


# --------------------------------------------------------------------------------------------
# detection samples


@dataclass
class DetectionSample:
    """One training or validation image with its boxes.

    ``image``: a raster path or a float array [C, H, W]; ``boxes``: a GeoJSON path (map
    coordinates), a Pascal VOC .xml path or a list of boxes ``(xmin, ymin, xmax, ymax[, class])``
    (oriented training: a GeoJSON path of polygons or a list of ``(shapely polygon[, class])``):
    pixels (column/row, origin at the top-left corner), or map coordinates of the image's CRS with
    ``coords="map"`` (converted with the image's inverse affine transform, so rotated grids are right too);
    ``gsd``: metres per pixel (default: from the georeferencing; None = unknown, used as it is);
    ``window``: ``(col_off, row_off, width, height)`` to use only part of the image;
    ``boxes_at_window_edge``: ``"clip"`` keeps the visible part of boxes cut by the window (training),
    ``"centre"`` keeps the boxes whose centre lies inside (evaluation)."""

    image: object
    boxes: object
    gsd: float = None
    window: tuple = None
    name: str = None
    boxes_at_window_edge: str = "clip"
    coords: str = "pixel"


def as_sample(item, i):
    """``item`` (a :class:`DetectionSample`, a dict of its fields or an ``(image, boxes[, gsd])`` tuple) as a
    :class:`DetectionSample`; ``i`` is its index for the error."""
    if isinstance(item, DetectionSample):
        return item
    if isinstance(item, dict):
        return DetectionSample(**item)
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return DetectionSample(*item)
    raise InputError(f"samples[{i}]: expected a DetectionSample or an (image, boxes) pair, got {type(item).__name__}")


def split_sample(sample, fraction=0.3, side="bottom", size=None):
    """(training part, held-out part) of one image: a spatial split along ``side`` (:func:`split_strip`).

    Boxes cut by the split line are clipped into the training part (when mostly visible) and
    counted in the held-out part only when their centre lies inside it. ``size`` (width,
    height) avoids opening the image to learn its size."""
    s = as_sample(sample, 0)
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
    train, held = split_strip(w, h, fraction, side)
    name = s.name or (os.path.basename(os.fspath(s.image)) if not isinstance(s.image, np.ndarray) else "image")
    return (replace(s, window=train, name=f"{name} (training part, {side} {fraction:.0%} held out)",
                    boxes_at_window_edge="clip"),
            replace(s, window=held, name=f"{name} ({side} {fraction:.0%} held out)", boxes_at_window_edge="centre"))


def class_indices(names, class_names, where):
    """0-based class numbers of box class names (or numbers); with one class every box is of it."""
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
class LoadedSample:
    """A detection sample in memory (:func:`load_sample`)."""

    name: str
    img: np.ndarray  # float32 [C, H, W] (raw values, later scaled)
    valid: np.ndarray  # bool [H, W]
    boxes: np.ndarray  # float64 [N, 4] pixel boxes in img (an oriented sample: the envelopes of its rboxes)
    labels: np.ndarray  # int64 [N] 0-based object classes
    gsd: float
    band_names: list
    rboxes: np.ndarray = None  # oriented samples: float64 [N, 5] rotated pixel boxes (geo.rotated), else None
    instances: np.ndarray = None  # instance samples: int32 [H, W], 0 no object, k + 1 the pixels of object k


def _box_rows(rows, where):
    boxes, names = [], []
    for k, r in enumerate(rows):
        if len(r) not in (4, 5):
            raise InputError(f"{where}.boxes[{k}]: expected (xmin, ymin, xmax, ymax[, class]), got {r!r}")
        boxes.append([float(v) for v in r[:4]])
        names.append(r[4] if len(r) == 5 else 0)
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), names


ORIENTED_WHY = ("oriented detection trains from polygons, the objects' outlines (their minimum rotated rectangles are "
                "the boxes)")
ORIENTED_OR = "train an axis-aligned detector (architecture CenterNet) from boxes"
INSTANCE_WHY = "instance segmentation trains from polygons, the objects' outlines (each polygon one object)"
INSTANCE_OR = "train a detector (TASK detection) from boxes"


def _shape_rows(rows, where, why=ORIENTED_WHY, alternative=ORIENTED_OR):
    """(shapely geometries, class names) of rows ``(geometry[, class])`` (oriented or instance training)."""
    geoms, names = [], []
    for k, r in enumerate(rows):
        r = r if isinstance(r, (tuple, list)) else (r,)
        if not r or not hasattr(r[0], "geom_type") or len(r) > 2:
            raise InputError(f"{where}.boxes[{k}]: {why}: expected (polygon[, class]), got {r!r}; give the label "
                             f"polygons (a GeoJSON file or shapely polygons), or {alternative}")
        geoms.append(r[0])
        names.append(r[1] if len(r) == 2 else 0)
    return geoms, names


def oriented_pixel_boxes(bx, coords, transform, crs, class_field, where):
    """(rotated pixel boxes [N, 5], class names) of an oriented sample's labels: a GeoJSON file (map
    coordinates) or rows ``(polygon[, class])`` (``coords`` "pixel" or "map"); each polygon's minimum rotated
    rectangle, computed in the labels' own coordinates and brought onto the pixel grid."""
    from ..geo.rotated import polygons_to_rboxes, transform_rboxes
    if isinstance(bx, (str, os.PathLike)):
        if os.fspath(bx).lower().endswith(".xml"):
            raise InputError(f"{where}: {os.fspath(bx)} is a Pascal VOC file of axis-aligned boxes; oriented "
                             "detection trains from polygons, the objects' outlines (a GeoJSON file): their minimum "
                             "rotated rectangles are the boxes. Or train an axis-aligned detector (architecture "
                             "CenterNet)")
        geoms, names = read_geojson_shapes(bx, class_field=class_field, dst_crs=crs)
        coords = "map"
    else:
        geoms, names = _shape_rows(list(bx or []), where)
    try:
        rb = polygons_to_rboxes(geoms, where)
    except ValueError as exc:
        raise InputError(f"{exc}. Oriented detection trains from polygons, the objects' outlines (their minimum "
                         "rotated rectangles are the boxes): digitise the objects as polygons, or train an "
                         "axis-aligned detector (architecture CenterNet)") from None
    if coords == "map" and len(rb):
        inv = ~transform
        rb = transform_rboxes(rb, lambda x, y: (inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f))
    return rb, names


def renumber(instances, kept, count):
    """An instance raster (0: no object, k + 1: object k of ``count``) numbered after the objects ``kept`` (indices,
    in their new order): the others become 0."""
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[np.asarray(kept, dtype=np.int64) + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return lut[instances]


def instance_pixel_masks(bx, coords, transform, crs, class_field, where, shape):
    """(instance raster int32 ``shape``, pixel boxes [N, 4] enclosing each object's pixels, class names) of an instance
    sample's labels: a GeoJSON file (map coordinates) or rows ``(polygon[, class])`` (``coords`` "pixel" or "map").
    Polygon k burns k + 1 (a later polygon wins where two overlap); a polygon that covers no pixel centre is left
    out."""
    from affine import Affine
    from rasterio.features import rasterize
    if isinstance(bx, (str, os.PathLike)):
        if os.fspath(bx).lower().endswith(".xml"):
            raise InputError(f"{where}: {os.fspath(bx)} is a Pascal VOC file of boxes; {INSTANCE_WHY}: give a "
                             f"GeoJSON file of polygons, or {INSTANCE_OR}")
        geoms, names = read_geojson_shapes(bx, class_field=class_field, dst_crs=crs)
        coords = "map"
    else:
        geoms, names = _shape_rows(list(bx or []), where, INSTANCE_WHY, INSTANCE_OR)
    polys = [(g, k + 1) for k, g in enumerate(geoms) if g is not None and not g.is_empty and g.area > 0]
    if len(geoms) and not polys:
        raise InputError(f"{where}: no label is a polygon; {INSTANCE_WHY}: digitise the objects as polygons, or "
                         f"{INSTANCE_OR}")
    inst = np.zeros(shape, dtype=np.int32)
    if polys:
        inst = rasterize(polys, out_shape=shape, transform=transform if coords == "map" else Affine.identity(),
                         fill=0, dtype="int32")
    boxes = np.zeros((len(geoms), 4))
    r, c = np.nonzero(inst)
    ids = inst[r, c] - 1
    present = np.zeros(len(geoms), dtype=bool)
    present[ids] = True
    for col, values, fn, init in ((0, c, np.minimum, np.inf), (1, r, np.minimum, np.inf),
                                  (2, c + 1, np.maximum, -np.inf), (3, r + 1, np.maximum, -np.inf)):
        acc = np.full(len(geoms), init)
        fn.at(acc, ids, values)
        boxes[:, col] = acc
    keep = np.flatnonzero(present)
    return renumber(inst, keep, len(geoms)), boxes[keep], [names[k] for k in keep]


def load_sample(s, class_names, bands, class_field, where, oriented=False, instances=False):
    """A :class:`DetectionSample` read into a :class:`LoadedSample`: the image (``bands``), its valid pixels
    (nodata where every band is, as the engine reads), its boxes in pixels (GeoJSON class property
    ``class_field``), cut to its window and clipped to the image. ``oriented``: the labels are polygons whose
    minimum rotated rectangles become the sample's ``rboxes`` (:func:`oriented_pixel_boxes`); its ``boxes`` are
    their envelopes. ``instances``: the labels are polygons, each an object whose pixels make the sample's
    ``instances`` raster (:func:`instance_pixel_masks`); its ``boxes`` enclose them."""
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
            use = select_bands(ds, bands, path)
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
    if s.coords not in ("pixel", "map"):
        raise InputError(f"{where}.coords: expected 'pixel' or 'map', got {s.coords!r}")
    map_boxes = isinstance(bx, (str, os.PathLike)) and not os.fspath(bx).lower().endswith(".xml") \
        or s.coords == "map"
    if map_boxes and (transform is None or crs is None):
        what = os.fspath(bx) if isinstance(bx, (str, os.PathLike)) else "boxes"
        raise InputError(f"{where}: {what} holds map coordinates but the image {name} is not georeferenced; "
                         "give pixel boxes (Pascal VOC .xml or a list) for it")
    rboxes = inst = None
    if instances:
        inst, boxes, names = instance_pixel_masks(bx, s.coords, transform, crs, class_field, where, valid.shape)
    elif oriented:
        from ..geo.rotated import rbox_envelopes
        rboxes, names = oriented_pixel_boxes(bx, s.coords, transform, crs, class_field, where)
        boxes = rbox_envelopes(rboxes)
    elif isinstance(bx, (str, os.PathLike)):
        p = os.fspath(bx)
        if p.lower().endswith(".xml"):
            boxes, names = read_voc_boxes(p)
        else:
            mboxes, names = read_geojson_boxes(p, class_field=class_field, dst_crs=crs)
            boxes = map_to_pixels(mboxes, transform)
    else:
        boxes, names = _box_rows(list(bx or []), where)
        if s.coords == "map":
            boxes = map_to_pixels(boxes, transform)
    labels = labels_all = class_indices(names, class_names, f"{where} ({name})")
    x0 = np.minimum(boxes[:, 0], boxes[:, 2])
    x1 = np.maximum(boxes[:, 0], boxes[:, 2])
    y0 = np.minimum(boxes[:, 1], boxes[:, 3])
    y1 = np.maximum(boxes[:, 1], boxes[:, 3])
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    kept = np.arange(len(boxes))  # which objects remain (their labels and rotated boxes follow)
    if s.window is not None:
        img, valid, boxes, kept = apply_window(img, valid, boxes, kept, s.window, s.boxes_at_window_edge, where)
    h, w = valid.shape
    boxes, kept = clip_boxes(boxes, kept, w, h, min_visible=0.5)
    labels = labels[kept]
    if rboxes is not None:
        rboxes = rboxes[kept].copy()
        if s.window is not None:
            rboxes[:, 0] -= s.window[0]
            rboxes[:, 1] -= s.window[1]
    if inst is not None:  # the objects' pixels in the window, numbered as the boxes kept
        if s.window is not None:
            col, row = int(s.window[0]), int(s.window[1])
            inst = inst[row:row + h, col:col + w]
        inst = renumber(inst, kept, len(labels_all))
    band_names = [d if d else f"b{i + 1}" for i, d in enumerate(descriptions or [None] * img.shape[0])]
    return LoadedSample(name, img, valid, boxes, labels, gsd, band_names, rboxes, inst)


def apply_window(img, valid, boxes, labels, window, policy, where):
    """Image, validity and boxes cut to ``window`` (col_off, row_off, width, height); boxes cut by its edge are
    clipped (``policy`` "clip") or kept when their centre is inside ("centre")."""
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
    b, labels = clip_boxes(b, labels, w, h, min_visible=0.5)
    return img, valid, b, labels


def resample_to_gsd(item, gsd):
    """A :class:`LoadedSample` (image, validity and boxes) brought from its own GSD to ``gsd`` metres per pixel."""
    import torch
    import torch.nn.functional as F
    factor = item.gsd / gsd  # new pixels per old pixel
    c, h, w = item.img.shape
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(item.img))[None]
        img = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)[0].numpy()
        v = torch.from_numpy(item.valid.astype(np.float32))[None, None]
        valid = F.interpolate(v, size=(nh, nw), mode="nearest")[0, 0].numpy() > 0.5
    sx, sy = nw / w, nh / h
    boxes = item.boxes * np.array([sx, sy, sx, sy])
    rboxes, inst = item.rboxes, item.instances
    if rboxes is not None:
        from ..geo.rotated import transform_rboxes
        rboxes = transform_rboxes(rboxes, lambda x, y: (x * sx, y * sy))
    if inst is not None:
        with torch.no_grad():
            inst = F.interpolate(torch.from_numpy(inst.astype(np.float32))[None, None], size=(nh, nw),
                                 mode="nearest")[0, 0].numpy().round().astype(np.int32)
    return replace(item, img=np.ascontiguousarray(img), valid=valid, boxes=boxes, rboxes=rboxes, instances=inst)


__all__ = ["VAL_SIDES", "AUTO_SIDE", "representative_side", "select_bands", "read_image", "check_band_names",
           "band_names", "compute_value_scaling",
           "scale_image", "model_classes", "split_strip", "validation_split", "window_slices", "window_dict", "pad_to",
           "class_counts", "patch_label", "grid_patches", "DetectionSample", "as_sample", "split_sample",
           "class_indices", "LoadedSample", "load_sample", "oriented_pixel_boxes", "instance_pixel_masks", "renumber", "apply_window", "resample_to_gsd"]
