"""Models scored through the engine on held-out data, and the classical baseline they are compared with.

* :func:`evaluate_pairs`: a change package run by :func:`.change.detect_change` on held-out pairs;
  :func:`cva_baseline`: change vector analysis + Otsu on the same pairs, scored alike;
* :func:`evaluate_patches`: a patch classifier run by :func:`.patches.classify_patches` on held-out fields.

Change vector analysis (CVA) with an Otsu threshold is the classical unsupervised baseline (numpy only). The
change magnitude of a pixel is the length of the difference between its band vectors at the two dates,
``|after - before|``; with ``normalize`` (default) each band of each date is first standardised over the valid
pixels (mean 0, standard deviation 1), a simple relative radiometric normalisation. The magnitude histogram is
split into no change / change by Otsu's threshold (the one maximising the between-class variance).
"""
import os
import tempfile

import numpy as np

from ..errors import InputError
from ..geo.labels import IGNORE
from ..progress import Progress
from ..training.change import read_pair
from ..training.data import patch_label
from .metrics import classification_metrics, confusion_matrix, metrics_from_confusion


def change_magnitude(before, after, valid=None, normalize=True):
    """CVA magnitude [H, W] (float32) of two co-registered images [C, H, W]; 0 where not ``valid``."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[None], b[None]
    if a.shape != b.shape:
        raise ValueError(f"before {a.shape} and after {b.shape} differ in shape; co-register them first")
    if valid is None:
        valid = np.ones(a.shape[1:], dtype=bool)
    valid = np.asarray(valid, dtype=bool) & np.all(np.isfinite(a), axis=0) & np.all(np.isfinite(b), axis=0)
    if normalize and valid.any():
        a = _standardise(a, valid)
        b = _standardise(b, valid)
    diff = b - a
    mag = np.sqrt(np.sum(np.where(valid[None], diff, 0.0) ** 2, axis=0))
    return mag.astype(np.float32)


def _standardise(x, valid):
    out = np.empty_like(x)
    for i, band in enumerate(x):
        v = band[valid]
        sd = v.std()
        out[i] = (band - v.mean()) / (sd if sd > 0 else 1.0)
    return out


def otsu_threshold(values, bins=256):
    """Otsu's threshold of a 1-D sample (finite values): the cut maximising between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no values to threshold")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between = between[:-1]  # the cut lies after bin k
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    k = int(best[len(best) // 2])  # the middle of a plateau of equally good cuts (e.g. empty bins between modes)
    return float(edges[k + 1])


def cva_otsu(before, after, valid=None, normalize=True, bins=256):
    """Binary change map by CVA + Otsu: returns (change bool [H, W], magnitude [H, W], threshold).

    Pixels that are not ``valid`` are never change.
    """
    a = np.asarray(before)
    if valid is None:
        valid = np.ones(a.shape[-2:], dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    mag = change_magnitude(before, after, valid, normalize=normalize)
    if not valid.any():
        return np.zeros(valid.shape, dtype=bool), mag, float("nan")
    t = otsu_threshold(mag[valid], bins=bins)
    return (mag > t) & valid, mag, t


# --------------------------------------------------------------------------------------------
# change: held-out pairs


def _label_array(label, n_classes):
    import rasterio
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(label) as ds:
            raw = ds.read(1)
            ok = ds.read_masks(1) > 0
    lab = (raw > 0).astype(np.uint8) if n_classes == 2 else raw.astype(np.uint8)
    lab[~ok] = IGNORE
    return lab


def evaluate_pairs(package, pairs, *, bands=None, device="auto", batch_size=None, tile_size=None, overlap=None,
                   progress=None, is_cancelled=None):
    """Run :func:`.change.detect_change` (the engine, on the files) on held-out ``pairs`` and score it.

    Returns ``{"pairs": [{before, after, label, metrics}], "overall": metrics}`` (metrics as
    :func:`.metrics.metrics_from_confusion`, pixels pooled over the pairs; nodata not counted).
    """
    import rasterio
    from ..inference.change import detect_change
    from ..models.loading import load_package
    from ..models.package import ModelPackage
    pkg = package if isinstance(package, ModelPackage) else load_package(package, task="change")
    k = len(pkg.classes)
    names = [c.name for c in pkg.classes]
    total = np.zeros((k, k), dtype=np.int64)
    out = []
    prog = Progress(progress, is_cancelled)
    with tempfile.TemporaryDirectory(prefix="rs_deep_eval_") as tmp:
        for i, (before, after, label) in enumerate(pairs):
            path = os.path.join(tmp, f"change_{i}.tif")
            detect_change(before, after, pkg, path, bands=bands, device=device, batch_size=batch_size,
                          tile_size=tile_size, overlap=overlap, is_cancelled=is_cancelled)
            with rasterio.open(path) as ds:
                pred = ds.read(1)
            lab = _label_array(label, k)
            if pred.shape != lab.shape:
                raise InputError(f"{label}: {lab.shape} labels for a {pred.shape} change raster; the label must be "
                                 "on BEFORE's grid")
            lab = np.where(pred == 255, IGNORE, lab)
            cm = confusion_matrix(np.minimum(pred, k - 1), lab, k)
            total += cm
            out.append({"before": os.fspath(before), "after": os.fspath(after), "label": os.fspath(label),
                        "metrics": _short(metrics_from_confusion(cm, names))})
            prog.update((i + 1) / len(pairs))
    return {"pairs": out, "overall": _short(metrics_from_confusion(total, names))}


def cva_baseline(pairs, *, bands=None, normalize=True):
    """Change vector analysis + Otsu (:func:`cva_otsu`) on ``pairs``, scored like :func:`evaluate_pairs`
    (binary: any change class counts as change). The threshold is chosen per pair, unsupervised."""
    total = np.zeros((2, 2), dtype=np.int64)
    out = []
    for before, after, label in pairs:
        p = read_pair(before, after, label, bands=bands, n_classes=2)
        c = p["image"].shape[0] // 2
        change, _, t = cva_otsu(p["image"][:c], p["image"][c:], p["valid"], normalize=normalize)
        cm = confusion_matrix(change.astype(np.uint8), p["mask"], 2)
        total += cm
        out.append({"before": os.fspath(before), "after": os.fspath(after), "label": os.fspath(label),
                    "threshold": float(t), "metrics": _short(metrics_from_confusion(cm, ["no change", "change"]))})
    return {"pairs": out, "overall": _short(metrics_from_confusion(total, ["no change", "change"]))}


def _short(m):
    """The summary of a pair or of all pairs: F1, IoU, precision, recall (foreground means), pixel accuracy."""
    return {key: round(m[key], 4) for key in ("f1", "iou", "precision", "recall")} | \
        {"pixel_accuracy": round(m["overall_accuracy"], 4), "pixels": m["pixels"]}


# --------------------------------------------------------------------------------------------
# patches: held-out fields


def evaluate_patches(package, image_path, labels, class_names=None, *, bounds=None, background_class=None,
                     stride=None, field_stride=None, min_purity=0.5, bands=None, device="auto", batch_size=None):
    """Score a patch classifier on ``image_path`` through :func:`.patches.classify_patches` (the engine).

    ``labels``: ``[(shapely geometry, class value)]`` in the image CRS (e.g. held-out fields);
    pixels outside them are ``background_class`` (None: not labelled). ``bounds`` limits the area.
    Returns ``{"grid": metrics of the pure patches of the regular grid (stride = patch size unless
    ``stride``), "fields": accuracy per field: the majority class of the patches whose centre lies in
    the field (grid stride ``field_stride``, default a quarter patch), fields no centre falls in are
    counted in ``fields_skipped``}``.
    """
    import rasterio
    from rasterio.features import rasterize
    from shapely import STRtree, points
    from ..models.loading import load_package
    from ..models.package import ModelPackage
    from ..inference.patches import classify_patches
    pkg = package if isinstance(package, ModelPackage) else load_package(package, task="patch_classification")
    if pkg.multi_label:
        raise InputError(f"'{pkg.name}' is a multi-label classifier (several classes per patch); this scores the one "
                         "best class of each patch. Assess its label sets with "
                         "evaluation.accuracy.assess_multilabel_patches (rs_deep:assess_accuracy, TASK "
                         "patch_classification)")
    names = class_names or [c.name for c in pkg.classes]
    k = len(pkg.classes)
    with rasterio.open(image_path) as ds:
        shape, transform = (ds.height, ds.width), ds.transform
    labels = [(g, int(v)) for g, v in labels]
    lab = rasterize([(g, v + 1) for g, v in labels], out_shape=shape, transform=transform, fill=0,
                    dtype="int16") - 1
    lab = np.where(lab < 0, IGNORE if background_class is None else int(background_class), lab).astype(np.uint8)
    res = classify_patches(image_path, pkg, stride=stride, bands=bands, bounds=bounds, device=device,
                           batch_size=batch_size)
    cm = np.zeros((k, k), dtype=np.int64)
    for f in res.features:
        x, y, w, h = f["window"]
        truth, purity = patch_label(lab[y:y + h, x:x + w], k)
        if truth is not None and purity >= min_purity:
            cm[truth, f["class_id"]] += 1
    out = {"grid": classification_metrics(cm, names)}
    dense = classify_patches(image_path, pkg, stride=field_stride or max(1, pkg.tile_size // 4), bands=bands,
                             bounds=bounds, device=device, batch_size=batch_size)
    if dense.features:
        centres = points([f["geometry"].centroid.coords[0] for f in dense.features])
        tree = STRtree(centres)
        region = None
        if bounds is not None:
            from shapely.geometry import box
            region = box(*bounds)
        fcm = np.zeros((k, k), dtype=np.int64)
        skipped = 0
        for g, v in labels:
            if region is not None and not region.contains(g.representative_point()):
                continue
            hits = [int(i) for i in tree.query(g, predicate="contains")]
            if not hits:
                skipped += 1
                continue
            votes = np.bincount([dense.features[i]["class_id"] for i in hits], minlength=k)
            fcm[v, int(np.argmax(votes))] += 1
        out["fields"] = classification_metrics(fcm, names)
        out["fields_skipped"] = skipped
    return out


__all__ = ["change_magnitude", "otsu_threshold", "cva_otsu", "evaluate_pairs", "cva_baseline",
           "evaluate_patches"]
