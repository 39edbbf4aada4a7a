"""Training a semantic segmentation model from one labelled raster (QGIS-free).

The training image is small (a scene or a clip of one), so it is read into memory once.
The pipeline mirrors inference exactly:

* value scaling is computed from the data (per band min-max over the 1st..99th percentile of
  valid pixels), stored in the package as MLM ``value_scaling`` and applied with
  :func:`.raster.apply_scaling`, the function :mod:`.segment` uses;
* nodata pixels are 0 after scaling (as :class:`.raster.RasterReader` fills them) and are
  ignored by the loss.

Validation is spatial: a strip of the image (the bottom ``val_fraction`` of its rows by
default) is held back and no training crop ever touches it. Training crops are random
(half of them centred near labelled objects), randomly rescaled, flipped, rotated by
multiples of 90 degrees, with brightness/contrast jitter and mild noise. The loss is
cross-entropy plus soft Dice on the foreground classes. The best network by validation IoU
(mean over the non-background classes) is kept and written as a model package
(:func:`.package.save_package`) together with ``training_report.json``.
"""
import json
import math
import os
import random
import time

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..files import write_atomic
from ..models.package import DEFAULT_COLORS, ModelClass, save_package
from ..progress import Progress
from ..geo.raster import apply_scaling, pixel_size_metres

IGNORE = 255  # label value ignored by the loss (nodata, outside the labelled area)
REPORT_NAME = "training_report.json"
CURVES_NAME = "training_curves.png"

DEFAULT_BUILDER = {
    "library": "smp",
    "architecture": "Unet",
    "encoder": "mobilenet_v2",
    "encoder_weights": None,
    "params": {"decoder_channels": [128, 64, 32, 16, 8]},
}

VAL_SIDES = ("bottom", "top", "left", "right")


# --------------------------------------------------------------------------------------------
# labels


def _crs_from_geojson(obj):
    """The CRS a GeoJSON object declares in its (pre-RFC 7946) ``crs`` member, or None."""
    crs = obj.get("crs") if isinstance(obj, dict) else None
    if not isinstance(crs, dict):
        return None
    props = crs.get("properties") or {}
    name = props.get("name")
    if not isinstance(name, str):
        return None
    # urn:ogc:def:crs:EPSG::32616, urn:ogc:def:crs:OGC:1.3:CRS84, EPSG:4326
    low = name.lower()
    if low.endswith("crs84"):
        return "OGC:CRS84"
    if "epsg" in low:
        code = name.replace("::", ":").split(":")[-1]
        if code.isdigit():
            return f"EPSG:{code}"
    return name


def read_vector_labels(path, class_value=1, class_field=None, dst_crs=None):
    """Polygons of a GeoJSON file as ``[(shapely geometry, class value)]`` for :func:`train_segmentation`.

    Plain ``json`` + shapely (no OGR). Every polygon gets ``class_value``, or the integer in the
    feature property ``class_field`` when given. Non-polygon features are skipped. With
    ``dst_crs`` (the image CRS, anything rasterio's ``CRS.from_user_input`` takes) the
    geometries are reprojected when the file declares another CRS in its ``crs`` member, or has
    none (RFC 7946: WGS 84) and its coordinates are longitudes/latitudes; otherwise they are
    taken to be in the image CRS already.
    """
    from shapely.geometry import shape
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as exc:
        raise InputError(f"Label file not found: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a valid GeoJSON file ({exc})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a GeoJSON object")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        features = obj.get("features") or []
    elif kind == "Feature":
        features = [obj]
    else:
        features = [{"type": "Feature", "geometry": obj, "properties": {}}]
    out = []
    for i, feat in enumerate(features):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        if not geom:
            continue
        try:
            g = shape(geom)
        except Exception as exc:
            raise InputError(f"{path}: feature {i} has an invalid geometry ({exc})") from exc
        if g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue
        if g.geom_type == "GeometryCollection":
            polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
            if not polys:
                continue
            from shapely.ops import unary_union
            g = unary_union(polys)
        if not g.is_valid:
            g = g.buffer(0)
        value = class_value
        if class_field is not None:
            props = feat.get("properties") or {}
            raw = props.get(class_field)
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise InputError(f"{path}: feature {i}: property {class_field!r} is {raw!r}; expected an "
                                 "integer class value") from None
        out.append((g, int(value)))
    if dst_crs is not None and out:
        out = _reproject_labels(out, _crs_from_geojson(obj), dst_crs, path)
    return out


def _reproject_labels(labels, src_crs, dst_crs, where):
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    dst = CRS.from_user_input(dst_crs)
    if src_crs is None:
        minx = min(g.bounds[0] for g, _ in labels)
        miny = min(g.bounds[1] for g, _ in labels)
        maxx = max(g.bounds[2] for g, _ in labels)
        maxy = max(g.bounds[3] for g, _ in labels)
        looks_lonlat = -180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90
        if not looks_lonlat or dst.is_geographic:
            return labels
        src_crs = "EPSG:4326"
    src = CRS.from_user_input(src_crs)
    if src == dst:
        return labels
    try:
        return [(shape(transform_geom(src, dst, mapping(g))), v) for g, v in labels]
    except Exception as exc:
        raise InputError(f"{where}: cannot reproject the labels from {src_crs} to the image CRS ({exc})") from exc


def _labels_from_raster(path, ds, n_classes):
    import rasterio
    try:
        lds = rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the label raster {path}: {exc}") from exc
    with lds:
        if (lds.width, lds.height) != (ds.width, ds.height) or not lds.transform.almost_equals(ds.transform):
            raise InputError(f"The label raster {path} ({lds.width}x{lds.height} px) is not on the image's "
                             f"pixel grid ({ds.width}x{ds.height} px, same transform); rasterize the labels "
                             "onto the image grid (Raster > Conversion > Rasterize with the image's extent "
                             "and resolution) or give polygons instead")
        raw = lds.read(1)
        mask = lds.read_masks(1) == 0
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        mask |= bad
        raw = np.where(bad, 0, raw)
        if np.any(raw[~mask] != np.round(raw[~mask])):
            raise InputError(f"The label raster {path} holds fractional values; it must hold integer class "
                             f"values 0..{n_classes - 1} (0 = background)")
    raw = raw.astype(np.int64)
    lab = np.full(raw.shape, IGNORE, dtype=np.uint8)
    ok = (~mask) & (raw != IGNORE)
    values = raw[ok]
    bad = np.unique(values[(values < 0) | (values >= n_classes)])
    if bad.size:
        raise InputError(f"The label raster {path} holds class values {bad[:10].tolist()} but only "
                         f"{n_classes} classes are named (values 0..{n_classes - 1}; 255 = not labelled)")
    lab[ok] = values.astype(np.uint8)
    return lab


def label_shapes(pairs, n_classes):
    """``[(geometry, class value)]`` checked (pairs, values 0..n_classes-1), without empty geometries."""
    shapes = []
    for i, item in enumerate(pairs or []):
        try:
            geom, value = item
        except (TypeError, ValueError):
            raise InputError(f"labels[{i}]: expected a (geometry, class value) pair, got {item!r}") from None
        value = int(value)
        if not 0 <= value < n_classes:
            raise InputError(f"labels[{i}]: class value {value} is out of range; {n_classes} classes are named "
                             f"(0..{n_classes - 1})")
        if geom is None or getattr(geom, "is_empty", False):
            continue
        shapes.append((geom, value))
    return shapes


def _labels_from_geometries(pairs, ds, n_classes):
    from rasterio.features import rasterize
    shapes = label_shapes(pairs, n_classes)
    if not shapes:
        raise InputError("labels: no geometries given; give polygons of the objects to learn")
    return rasterize(shapes, out_shape=(ds.height, ds.width), transform=ds.transform, fill=0,
                     dtype="uint8")


# --------------------------------------------------------------------------------------------
# data


def compute_value_scaling(data, valid, low=1.0, high=99.0, max_samples=2_000_000, seed=0):
    """Per-band MLM min-max scaling from the ``low``..``high`` percentiles of the valid pixels."""
    out = []
    idx = np.flatnonzero(valid.ravel())
    if idx.size == 0:
        raise InputError("The training image has no valid pixels (all nodata)")
    if idx.size > max_samples:
        idx = np.random.default_rng(seed).choice(idx, max_samples, replace=False)
    for band in data:
        vals = band.ravel()[idx].astype(np.float64)
        lo, hi = np.percentile(vals, [low, high])
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            lo, hi = float(vals.min()), float(vals.max())
        if not hi > lo:
            hi = lo + 1.0
        out.append({"type": "min-max", "minimum": lo, "maximum": hi})
    return out


def _read_image(image_path, bands):
    import rasterio
    try:
        ds = rasterio.open(image_path)
    except Exception as exc:
        raise InputError(f"Cannot open the training image {image_path}: {exc}") from exc
    if bands:
        bands = [int(b) for b in bands]
        bad = [b for b in bands if b < 1 or b > ds.count]
        if bad:
            ds.close()
            raise InputError(f"bands {bad} do not exist: the image has {ds.count} band(s) (1..{ds.count})")
    else:
        alpha = [i + 1 for i, ci in enumerate(ds.colorinterp) if getattr(ci, "name", str(ci)) == "alpha"]
        bands = [b for b in range(1, ds.count + 1) if b not in alpha] or list(range(1, ds.count + 1))
    data = ds.read(bands, out_dtype="float32")
    valid = np.all(ds.read_masks(bands) > 0, axis=0)
    return ds, bands, data, valid


def _band_names(ds, bands, band_names=None):
    """``band_names`` checked against ``bands``, or the bands' descriptions (``b<N>`` where there is none)."""
    if band_names:
        band_names = [str(b) for b in band_names]
        if len(band_names) != len(bands):
            raise InputError(f"band_names: {len(band_names)} names for {len(bands)} bands")
        return band_names
    return [ds.descriptions[b - 1] or f"b{b}" for b in bands]


def _split(height, width, val_fraction, side):
    """(train window, val window or None) as (row0, row1, col0, col1)."""
    full = (0, height, 0, width)
    if not val_fraction or val_fraction <= 0:
        return full, None
    if not 0 < val_fraction < 0.9:
        raise InputError(f"val_fraction must be in [0, 0.9); got {val_fraction}")
    if side not in VAL_SIDES:
        raise InputError(f"val_side must be one of {', '.join(VAL_SIDES)}; got {side!r}")
    along = height if side in ("bottom", "top") else width
    n = max(1, int(round(along * val_fraction)))
    if along - n < 32:
        raise InputError(f"The image is too small to hold back {val_fraction:.0%} of it for validation "
                         f"({along} px); use a larger image or val_fraction=0")
    if side == "bottom":
        return (0, height - n, 0, width), (height - n, height, 0, width)
    if side == "top":
        return (n, height, 0, width), (0, n, 0, width)
    if side == "right":
        return (0, height, 0, width - n), (0, height, width - n, width)
    return (0, height, n, width), (0, height, 0, n)


def _pad_to(img, lab, valid, min_h, min_w):
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


class CropSampler:
    """Random augmented training crops from an in-memory region.

    ``img`` [C, H, W] scaled float32 (0 at nodata), ``lab`` [H, W] uint8 (IGNORE = not used),
    ``valid`` [H, W] bool (False at nodata: those pixels stay 0 after augmentation, as at inference).
    """

    def __init__(self, img, lab, valid, tile, rng, scale_range=(0.8, 1.25), foreground_prob=0.5,
                 brightness=0.1, contrast=0.25, gamma=0.25, noise=0.03, flip=True, rotate=True):
        self.tile = tile
        self.flip, self.rotate = bool(flip), bool(rotate)
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise InputError(f"scale_range must be (low, high) with 0 < low <= high; got {scale_range}")
        self.scale_range = (float(lo), float(hi))
        max_src = int(math.ceil(tile * max(1.0, hi))) + 1
        self.img, self.lab, self.valid = _pad_to(img, lab, valid, max_src, max_src)
        self.rng = rng
        self.foreground_prob = foreground_prob
        self.brightness, self.contrast, self.gamma, self.noise = brightness, contrast, gamma, noise
        self.fg = np.flatnonzero(((self.lab > 0) & (self.lab != IGNORE)).ravel())

    def _crop(self):
        rng, t = self.rng, self.tile
        h, w = self.lab.shape
        lo, hi = self.scale_range
        s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        src = max(8, min(int(round(t * s)), h, w))
        if self.fg.size and rng.random() < self.foreground_prob:
            p = int(self.fg[rng.integers(self.fg.size)])
            r, c = divmod(p, w)
            y0 = min(max(r - int(rng.integers(src)), 0), h - src)
            x0 = min(max(c - int(rng.integers(src)), 0), w - src)
        else:
            y0 = int(rng.integers(h - src + 1))
            x0 = int(rng.integers(w - src + 1))
        img = self.img[:, y0:y0 + src, x0:x0 + src]
        lab = self.lab[y0:y0 + src, x0:x0 + src]
        valid = self.valid[y0:y0 + src, x0:x0 + src]
        if src != t:
            img, lab, valid = _resize(img, lab, valid, t)
        return img, lab, valid

    def sample(self):
        rng = self.rng
        img, lab, valid = self._crop()
        k = int(rng.integers(4)) if self.rotate else 0
        if k:
            img, lab, valid = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k), np.rot90(valid, k)
        if self.flip and rng.random() < 0.5:
            img, lab, valid = img[:, :, ::-1], lab[:, ::-1], valid[:, ::-1]
        img = np.array(img, dtype=np.float32)  # contiguous copies
        lab = np.array(lab, dtype=np.uint8)
        valid = np.array(valid, dtype=bool)
        if not (self.gamma > 0 or self.contrast > 0 or self.brightness > 0 or self.noise > 0):
            return img, lab
        # photometric jitter on the scaled values: gamma, contrast, brightness, noise
        if self.gamma > 0:
            g = math.exp(rng.uniform(-self.gamma, self.gamma))
            pos = img > 0
            img[pos] = img[pos] ** g
        c = math.exp(rng.uniform(-self.contrast, self.contrast))
        b = rng.uniform(-self.brightness, self.brightness)
        mean = float(img[:, valid].mean()) if valid.any() else 0.0
        img -= mean
        img *= c
        img += mean + b
        if img.shape[0] > 1:  # small independent shift per band
            img += rng.uniform(-self.brightness / 3, self.brightness / 3,
                               size=(img.shape[0], 1, 1)).astype(np.float32)
        sigma = rng.uniform(0.0, self.noise)
        if sigma > 0:
            img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        if not valid.all():
            img[:, ~valid] = 0.0
        return img, lab

    def batch(self, n):
        imgs, labs = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(labs)


class MultiCropSampler:
    """Crops from several regions (chips): a region is drawn in proportion to its area, then cropped
    and augmented by its own :class:`CropSampler` (all share ``rng``)."""

    def __init__(self, regions, tile, rng, **kwargs):
        self.samplers = [CropSampler(img, lab, valid, tile, rng, **kwargs) for img, lab, valid in regions]
        area = np.array([lab.size for _, lab, _ in regions], dtype=np.float64)
        self.p = area / area.sum()
        self.rng = rng

    def sample(self):
        return self.samplers[int(self.rng.choice(len(self.samplers), p=self.p))].sample()

    def batch(self, n):
        imgs, labs = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(labs)


AUGMENT_KEYS = ("flip", "rotate", "brightness", "contrast", "gamma", "noise")


def check_augment(augment, keys=AUGMENT_KEYS):
    """``augment`` as a dict, with a clear error for unknown keys."""
    augment = dict(augment or {})
    unknown = set(augment) - set(keys)
    if unknown:
        raise InputError(f"augment: unknown keys {sorted(unknown)}; use {', '.join(keys)}")
    return augment


def _resize(img, lab, valid, size):
    """Bilinear (antialiased when shrinking) image, nearest labels and validity, to size x size."""
    import torch
    import torch.nn.functional as F
    src = lab.shape[0]
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(img))[None]
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=src > size)[0].numpy()
        lv = np.stack([lab, valid]).astype(np.float32)
        lv = F.interpolate(torch.from_numpy(lv)[None], size=(size, size), mode="nearest")[0].numpy()
    return out, lv[0].astype(np.uint8), lv[1] > 0.5


# --------------------------------------------------------------------------------------------
# model, loss, metrics


def resolve_builder(builder, in_channels, n_classes):
    """The builder block for the network: ``builder`` (or the default) with the channels/classes filled in."""
    b = dict(DEFAULT_BUILDER if builder is None else builder)
    b["params"] = dict(b.get("params") or {})
    b.setdefault("library", "smp")
    b["encoder_weights"] = None
    for key, value in (("in_channels", in_channels), ("classes", n_classes)):
        if b.get(key) is None:
            b[key] = value
        elif b[key] != value:
            raise InputError(f"builder.{key} is {b[key]} but the training data need {value}")
    return b


def segmentation_loss(logits, target, n_classes, dice_weight=1.0):
    """Cross-entropy (IGNORE pixels ignored) + soft Dice over the foreground classes (batch Dice)."""
    import torch
    import torch.nn.functional as F
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    if dice_weight <= 0 or n_classes < 2:
        return ce, ce.detach(), torch.zeros(())
    valid = (target != IGNORE)
    probs = torch.softmax(logits, dim=1)
    t = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(t, n_classes).permute(0, 3, 1, 2).to(probs.dtype)
    v = valid[:, None].to(probs.dtype)
    p = probs[:, 1:] * v
    g = onehot[:, 1:] * v
    inter = (p * g).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + g.sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    dice = dice.mean()
    return ce + dice_weight * dice, ce.detach(), dice.detach()


def confusion_matrix(pred, target, n_classes):
    """[K, K] counts (rows: truth, columns: prediction) over pixels whose target is not IGNORE."""
    ok = target != IGNORE
    idx = target[ok].astype(np.int64) * n_classes + pred[ok].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm, class_names=None):
    """Per-class IoU/F1/precision/recall and their means over the non-background classes.

    A class absent from both the truth and the prediction gets IoU/F1 = 1 (nothing to find,
    nothing falsely found).
    """
    k = cm.shape[0]
    per = {}
    for c in range(k):
        tp = float(cm[c, c])
        fp = float(cm[:, c].sum() - tp)
        fn = float(cm[c, :].sum() - tp)
        if tp + fp + fn == 0:
            iou = f1 = precision = recall = 1.0
        else:
            iou = tp / (tp + fp + fn)
            f1 = 2 * tp / (2 * tp + fp + fn)
            precision = tp / (tp + fp) if tp + fp > 0 else 0.0
            recall = tp / (tp + fn) if tp + fn > 0 else 0.0
        name = class_names[c] if class_names else str(c)
        per[name] = {"value": c, "iou": iou, "f1": f1, "precision": precision, "recall": recall,
                     "truth_pixels": int(cm[c, :].sum()), "predicted_pixels": int(cm[:, c].sum())}
    fg = [v for v in per.values() if v["value"] > 0] or list(per.values())
    total = float(cm.sum())
    return {
        "iou": float(np.mean([v["iou"] for v in fg])),
        "f1": float(np.mean([v["f1"] for v in fg])),
        "precision": float(np.mean([v["precision"] for v in fg])),
        "recall": float(np.mean([v["recall"] for v in fg])),
        "pixel_accuracy": float(np.trace(cm) / total) if total else 0.0,
        "pixels": int(total),
        "classes": per,
    }


def _predict_region(model, img, device, chunk=1024, memory_format=None):
    """(class indices [H, W], probabilities [K, H, W]) for an in-memory region [C, H, W].

    Processed in chunks of at most ``chunk`` px, each mirrored-padded to a multiple of 32."""
    import torch
    c, h, w = img.shape
    pred = np.zeros((h, w), dtype=np.uint8)
    probs_out = None
    with torch.no_grad():
        for y0 in range(0, h, chunk):
            for x0 in range(0, w, chunk):
                part = img[:, y0:y0 + chunk, x0:x0 + chunk]
                ph, pw = part.shape[1:]
                th, tw = max(32, -(-ph // 32) * 32), max(32, -(-pw // 32) * 32)
                pad = ((0, 0), (0, th - ph), (0, tw - pw))
                try:
                    padded = np.pad(part, pad, mode="reflect")
                except ValueError:
                    padded = np.pad(part, pad, mode="edge")
                x = torch.from_numpy(np.ascontiguousarray(padded))[None].to(device)
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                logits = model(x)[0, :, :ph, :pw]
                p = torch.softmax(logits.float(), dim=0).cpu().numpy()
                if probs_out is None:
                    probs_out = np.zeros((p.shape[0], h, w), dtype=np.float32)
                probs_out[:, y0:y0 + ph, x0:x0 + pw] = p
                pred[y0:y0 + ph, x0:x0 + pw] = np.argmax(p, axis=0)
    return pred, probs_out


def evaluate(model, img, lab, n_classes, device, memory_format=None):
    """(confusion matrix, mean cross-entropy) of ``model`` on an in-memory region."""
    pred, probs = _predict_region(model, img, device, memory_format=memory_format)
    cm = confusion_matrix(pred, lab, n_classes)
    ok = lab != IGNORE
    if ok.any():
        p = probs[:, ok]
        t = lab[ok].astype(np.int64)
        ce = float(-np.mean(np.log(np.maximum(p[t, np.arange(t.size)], 1e-7))))
    else:
        ce = float("nan")
    return cm, ce


def evaluate_regions(model, regions, n_classes, device, memory_format=None):
    """(summed confusion matrix, pixel-weighted mean cross-entropy) over several regions (chips)."""
    total, loss_sum, n_px = None, 0.0, 0
    for img, lab, _ in regions:
        cm, ce = evaluate(model, img, lab, n_classes, device, memory_format=memory_format)
        total = cm if total is None else total + cm
        n = int((lab != IGNORE).sum())
        if n and math.isfinite(ce):
            loss_sum += ce * n
            n_px += n
    return total, (loss_sum / n_px if n_px else float("nan"))


def _seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _check_tile(value, name):
    if not isinstance(value, int) or value < 32 or value % 32:
        raise InputError(f"{name} must be a multiple of 32, at least 32; got {value!r}")


def write_report(path, report, log=None):
    """Write the training report (JSON) and, next to it, ``training_curves.png`` (when matplotlib is there)."""
    _write_json(path, report)
    from .report import plot_training_curves
    png = os.path.join(os.path.dirname(path), CURVES_NAME)
    try:
        written = plot_training_curves(report, png)
    except Exception as exc:  # a plot must never lose a trained model
        written = None
        if log:
            log(f"Warning: the training curves could not be drawn ({exc})")
    return written


def _write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# training


def _counts(train_labs, val_labs, class_names):
    def px(labs):
        return int(sum(int((lab != IGNORE).sum()) for lab in labs))

    def per_class(labs):
        return {n: int(sum(int((lab == i).sum()) for lab in labs)) for i, n in enumerate(class_names)}

    return {"train_pixels": px(train_labs), "train_class_pixels": per_class(train_labs),
            "val_pixels": px(val_labs), "val_class_pixels": per_class(val_labs) if val_labs else {}}


def _image_data(image_path, labels, class_names, bands, band_names, seed, val_fraction, val_side, log, prog):
    """One labelled image, cut into a training region and a validation strip (see :func:`_split`)."""
    k = len(class_names)
    prog.message(f"Reading {image_path}")
    ds, bands, data, valid = _read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        crs, transform = ds.crs, ds.transform
        band_names = _band_names(ds, bands, band_names)
        if isinstance(labels, (str, os.PathLike)) and str(labels).lower().endswith((".geojson", ".json")):
            labels = read_vector_labels(labels, class_value=1, dst_crs=crs)
        if isinstance(labels, (str, os.PathLike)):
            lab = _labels_from_raster(labels, ds, k)
        else:
            lab = _labels_from_geometries(list(labels), ds, k)
    finally:
        ds.close()
    lab = lab.copy()
    lab[~valid] = IGNORE
    fg_total = int(((lab > 0) & (lab != IGNORE)).sum())
    if fg_total == 0:
        raise InputError("The labels cover no pixel of the image: check that the polygons overlap the image "
                         "and are in the image's CRS")
    scaling = compute_value_scaling(data, valid, seed=seed)
    apply_scaling(data, scaling)
    data[:, ~valid] = 0.0
    gsd = pixel_size_metres(crs, transform, w, h)

    (tr0, tr1, tc0, tc1), val_win = _split(h, w, val_fraction, val_side)
    train = [(data[:, tr0:tr1, tc0:tc1], lab[tr0:tr1, tc0:tc1], valid[tr0:tr1, tc0:tc1])]
    val = []
    if val_win is not None:
        vr0, vr1, vc0, vc1 = val_win
        val = [(np.ascontiguousarray(data[:, vr0:vr1, vc0:vc1]), lab[vr0:vr1, vc0:vc1], valid[vr0:vr1, vc0:vc1])]
    counts = _counts([t[1] for t in train], [v[1] for v in val], class_names)
    if not any(v for c, v in counts["train_class_pixels"].items() if c != class_names[0]):
        raise InputError(f"No labelled objects fall in the training part of the image (the {val_side} "
                         f"{val_fraction:.0%} is held back for validation); label objects elsewhere too, "
                         "or change val_side")
    if val and not any(v for c, v in counts["val_class_pixels"].items() if c != class_names[0]):
        log("Warning: the validation strip holds no labelled objects; validation IoU only counts false alarms")
    validation = {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                  "window": ({"row_off": val_win[0], "col_off": val_win[2], "height": val_win[1] - val_win[0],
                              "width": val_win[3] - val_win[2]} if val_win else None)}
    return train, val, scaling, gsd, bands, band_names, counts, validation, {"width": w, "height": h}


def _chip_data(manifest, class_names, bands, band_names, seed, log):
    """The chips of an export (:mod:`.chips`): training and validation as they were split there."""
    from .chips import segmentation_regions
    if bands:
        raise InputError("bands cannot be chosen when training from chips: the chips hold the bands they were "
                         "exported with")
    train, val = segmentation_regions(manifest)
    if not train:
        raise InputError(f"The chips in {manifest['root']} hold no training chip")
    cols = [img[:, valid].reshape(img.shape[0], 1, -1) for img, _, valid in train]
    pooled = np.concatenate(cols, axis=2)
    scaling = compute_value_scaling(pooled, np.ones(pooled.shape[1:], bool), seed=seed)
    for img, _, valid in train + val:
        apply_scaling(img, scaling)
        img[:, ~valid] = 0.0
    counts = _counts([t[1] for t in train], [v[1] for v in val], class_names)
    if not any(v for c, v in counts["train_class_pixels"].items() if c != class_names[0]):
        raise InputError(f"The training chips in {manifest['root']} hold no labelled object")
    names = band_names or manifest.get("band_names") or [f"b{b}" for b in manifest["bands"]]
    split = manifest.get("split", {})
    validation = {"chips": split.get("val_chips", len(val)), "block_size": split.get("block_size"),
                  "fraction": split.get("val_fraction", 0.0), "method": "spatial blocks (chip export)"}
    log(f"Training from {len(train)} chips, validating on {len(val)} ({manifest['root']})")
    return (train, val, scaling, manifest.get("gsd"), list(manifest["bands"]), [str(n) for n in names], counts,
            validation, {"width": manifest["source"].get("width"), "height": manifest["source"].get("height"),
                         "chips": len(train) + len(val)})


def train_segmentation(image_path, labels, out_dir, *, class_names=None, class_colors=None, bands=None,
                       band_names=None, builder=None, tile_size=256, epochs=30, steps_per_epoch=None,
                       batch_size=8, lr=2e-3, weight_decay=1e-4, seed=0, val_fraction=0.2, val_side="bottom",
                       patience=8, dice_weight=1.0, foreground_prob=0.5, scale_range=(0.8, 1.25), augment=None,
                       device="auto", num_threads=None, progress=None, is_cancelled=None, log=None,
                       name="segmentation-model", description="", package_tile_size=512, package_overlap=64,
                       weights_dtype="float16"):
    """Train a segmentation network on ``image_path`` and write a model package to ``out_dir``.

    ``labels``: a label raster on the image grid (class values, 0 = background, 255 or nodata =
    not labelled), or a list of ``(shapely geometry, class value)`` in the image CRS (rasterized;
    everything outside the polygons is background). ``class_names`` names the classes 0..K-1
    (0 is the background). ``bands``: 1-based band numbers (default: every non-alpha band).
    ``steps_per_epoch`` defaults to enough batches to see the training area about twice.
    ``augment`` overrides the photometric jitter of the crops (scaled values): ``brightness``
    (shift, default 0.1), ``contrast`` (log factor, 0.25), ``gamma`` (log exponent, 0.25) and
    ``noise`` (max Gaussian sigma, 0.03); geometric augmentation is always on (flips, 90 degree
    rotations, rescaling by a factor in ``scale_range``).

    Returns the training report (also written to ``out_dir/training_report.json``). When
    ``is_cancelled()`` turns true, the best network so far (if any epoch finished) is written
    before :class:`Cancelled` is raised.
    """
    t0 = time.time()
    prog = Progress(progress, is_cancelled)
    log = log or (lambda msg: None)
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency(f"PyTorch is not installed ({exc}); run 'make setup'") from exc
    from ..models.architectures import build_model
    from ..models.runners import device_description, select_device

    from . import chips as chipsets
    chipset = chipsets.load_manifest(image_path, "segmentation") if chipsets.is_chip_set(image_path) else None
    if chipset is not None:
        names, cols = chipsets.class_info(chipset)
        if not class_names:
            class_names, class_colors = names, class_colors or cols
        elif [str(n) for n in class_names] != names:
            raise InputError(f"class_names {list(class_names)} differ from the chips' classes {names}; leave "
                             "class_names out to use the chips' classes")
    class_names = [str(n) for n in (class_names or [])]
    if len(class_names) < 2:
        raise InputError("class_names: give at least two classes, the background first "
                         "(e.g. ['background', 'building'])")
    k = len(class_names)
    colors = list(class_colors) if class_colors else [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(k)]
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    classes = [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]
    _check_tile(tile_size, "tile_size")
    _check_tile(package_tile_size, "package_tile_size")
    if not 0 <= package_overlap < package_tile_size // 2:
        raise InputError(f"package_overlap must be in [0, {package_tile_size // 2}); got {package_overlap}")
    augment = check_augment(augment)
    if batch_size < 1 or epochs < 1:
        raise InputError("batch_size and epochs must be at least 1")

    # ---- data ---------------------------------------------------------------------------
    if chipset is not None:
        data_info = _chip_data(chipset, class_names, bands, band_names, seed, log)
    else:
        data_info = _image_data(image_path, labels, class_names, bands, band_names, seed, val_fraction, val_side,
                                log, prog)
    (train_regions, val_regions, scaling, gsd, bands, band_names, counts, validation, image_size) = data_info
    n_train_px = sum(lab.size for _, lab, _ in train_regions)

    # ---- model --------------------------------------------------------------------------
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        _seed_everything(seed)
        rng = np.random.default_rng(seed)
        dev = select_device(device)
        builder = resolve_builder(builder, len(bands), k)
        # channels_last: much faster convolutions on CPU (oneDNN) and on tensor-core GPUs
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        model = build_model(builder).to(dev).to(memory_format=fmt)
        if steps_per_epoch is None:
            area = n_train_px
            steps_per_epoch = max(4, int(math.ceil(2.0 * area / (tile_size * tile_size) / batch_size)))
        steps_per_epoch = int(steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=min(0.3, max(0.05, 2.0 / epochs)),
                                                    div_factor=10.0, final_div_factor=100.0)
        sampler = MultiCropSampler(train_regions, tile_size, rng, scale_range=scale_range,
                                   foreground_prob=foreground_prob, **augment)
        where = (f"validation {len(val_regions)} chips" if chipset is not None
                 else f"validation {val_side} {val_fraction:.0%}" if val_regions else "no validation")
        log(f"Training {builder['architecture']}/{builder['encoder']} on {device_description(dev)}: "
            f"{epochs} epochs x {steps_per_epoch} steps x {batch_size} crops of {tile_size} px; "
            f"{n_train_px} training px, {where}")

        report = {
            "name": name, "image": os.path.basename(os.fspath(image_path)),
            "image_size": image_size,
            "classes": class_names, "bands": band_names, "band_numbers": bands,
            "builder": builder, "value_scaling": scaling, "gsd": gsd,
            "seed": seed, "device": device_description(dev), "threads": torch.get_num_threads(),
            "tile_size": tile_size, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "epochs_planned": epochs, "steps_per_epoch": steps_per_epoch, "patience": patience,
            "validation": validation, "augment": augment,
            "samples": dict(counts, crops_seen=0),
            "train_loss": [], "val_loss": [], "val_iou": [], "lr_curve": [],
            "epochs_run": 0, "best_epoch": None, "best": None,
            "stopped_early": False, "cancelled": False, "seconds": None,
        }
        best = {"key": None, "state": None, "epoch": None, "metrics": None}

        def finish(cancelled):
            if best["state"] is None:
                return None
            model.load_state_dict(best["state"])
            model.eval()
            extra = {"rs_deep:training": {
                "best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": seed,
                "val_iou": best["metrics"]["iou"] if best["metrics"] else None,
                "train_pixels": counts["train_pixels"], "val_pixels": counts["val_pixels"]}}
            save_package(model.cpu(), out_dir, weights_dtype=weights_dtype, name=name, task="segmentation",
                         bands=band_names, classes=classes, builder=builder, tile_size=package_tile_size,
                         overlap=package_overlap, gsd=gsd, value_scaling=scaling, description=description,
                         extra=extra)
            report.update(best_epoch=best["epoch"], best=best["metrics"], cancelled=cancelled,
                          seconds=round(time.time() - t0, 2))
            path = os.path.join(os.path.abspath(os.fspath(out_dir)), REPORT_NAME)
            # no local paths in the file: it may be shipped with the package
            curves = write_report(path, report, log)
            return dict(report, package=os.path.abspath(os.fspath(out_dir)), report_path=path, curves_path=curves)

        train_prog = prog.sub(0.02, 0.97)
        since_best = 0
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                losses = []
                for step in range(steps_per_epoch):
                    train_prog.check()
                    x, y = sampler.batch(batch_size)
                    xt = torch.from_numpy(x).to(dev).contiguous(memory_format=fmt)
                    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
                    logits = model(xt)
                    loss, _, _ = segmentation_loss(logits, yt, k, dice_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise InputError(f"Training diverged at epoch {epoch}, step {step + 1} (loss {value}); "
                                         f"lower lr (now {lr:g}) or check the image values")
                    losses.append(value)
                    report["samples"]["crops_seen"] += batch_size
                    train_prog.update(((epoch - 1) * steps_per_epoch + step + 1) / total_steps)
                train_loss = float(np.mean(losses))
                report["train_loss"].append(round(train_loss, 5))
                report["lr_curve"].append(float(sched.get_last_lr()[0]))
                report["epochs_run"] = epoch
                model.eval()
                if val_regions:
                    cm, val_loss = evaluate_regions(model, val_regions, k, dev, memory_format=fmt)
                    metrics = metrics_from_confusion(cm, class_names)
                    key = (round(metrics["iou"], 6), -val_loss)
                else:
                    metrics, val_loss, key = None, float("nan"), (epoch, 0.0)
                report["val_iou"].append(round(metrics["iou"], 5) if metrics else None)
                report["val_loss"].append(round(val_loss, 5) if math.isfinite(val_loss) else None)
                improved = best["key"] is None or key > best["key"]
                if improved:
                    best.update(key=key, epoch=epoch, metrics=metrics,
                                state={kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()})
                    since_best = 0
                else:
                    since_best += 1
                msg = f"Epoch {epoch}/{epochs}: loss {train_loss:.4f}"
                if metrics:
                    msg += (f", val loss {val_loss:.4f}, val IoU {metrics['iou']:.3f} "
                            f"(best {best['metrics']['iou']:.3f} at epoch {best['epoch']})")
                log(msg)
                train_prog.update(epoch / epochs, msg)
                if val_regions and patience and since_best >= patience and epoch < epochs:
                    report["stopped_early"] = True
                    log(f"Stopping early: no better validation IoU for {patience} epochs")
                    break
        except Cancelled:
            saved = finish(cancelled=True)
            if saved is not None:
                raise Cancelled(f"Training was cancelled after {report['epochs_run']} epoch(s); the best model "
                                f"so far (epoch {best['epoch']}) was written to {out_dir}") from None
            raise Cancelled("Training was cancelled before the first epoch finished; nothing was written.") \
                from None
        prog.message("Writing the model package")
        result = finish(cancelled=False)
        if progress is not None:  # not prog.update: a late cancel must not hide a written package
            progress(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)


def report_summary(report):
    """A few lines describing a training report (for logs and scripts)."""
    lines = [f"{report['name']}: {report['epochs_run']} epochs"
             + (" (stopped early)" if report.get("stopped_early") else "")
             + (" (cancelled)" if report.get("cancelled") else "")
             + f", {report['seconds']:.0f} s on {report['device']}, seed {report['seed']}"]
    s = report["samples"]
    lines.append(f"training pixels {s['train_pixels']}, validation pixels {s['val_pixels']}, "
                 f"crops seen {s['crops_seen']}")
    best = report.get("best")
    if best:
        lines.append(f"best epoch {report['best_epoch']}: validation IoU {best['iou']:.3f}, F1 {best['f1']:.3f}, "
                     f"precision {best['precision']:.3f}, recall {best['recall']:.3f}")
        for cname, m in best["classes"].items():
            if m["value"] > 0:
                lines.append(f"  {cname}: IoU {m['iou']:.3f}, F1 {m['f1']:.3f}, precision {m['precision']:.3f}, "
                             f"recall {m['recall']:.3f} ({m['truth_pixels']} labelled px)")
    lines.append("val IoU by epoch: " + " ".join("-" if v is None else f"{v:.2f}" for v in report["val_iou"]))
    return "\n".join(lines)


__all__ = ["train_segmentation", "read_vector_labels", "compute_value_scaling", "segmentation_loss",
           "confusion_matrix", "metrics_from_confusion", "report_summary", "DEFAULT_BUILDER", "REPORT_NAME"]
