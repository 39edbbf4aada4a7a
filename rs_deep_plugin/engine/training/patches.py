"""Training a patch (scene) classifier from one labelled raster (QGIS-free).

Labels are a class per pixel (a label raster on the image grid, or polygons with a class value,
rasterized; pixels outside every polygon get ``background_class``). A training patch is a
random crop of ``patch_size`` px (after the random rescale of :class:`.train.CropSampler`, which
also flips, rotates and jitters it); its label is the majority class of its labelled pixels, and
patches whose majority covers less than ``min_purity`` of them are skipped. Value scaling, the
crop sampler, the validation split and the metrics are those of :mod:`.train`, so training
mirrors what :func:`.patches.classify_patches` feeds the network.

Validation is spatial (:func:`.train._split`): a strip of the image is held back, no training
patch touches it, and it is scored on the regular patch grid :func:`.patches.classify_patches`
uses. The network of the last epoch is kept (the strip only measures), unless ``select_best``.
"""
import math
import os
import sqlite3
import time

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..models.package import DEFAULT_COLORS, ModelClass, save_package
from ..progress import Progress
from ..geo.raster import apply_scaling, pixel_size_metres
from .segmentation import (IGNORE, REPORT_NAME, CropSampler, _band_names, _labels_from_geometries, _labels_from_raster,
                    _read_image, _reproject_labels, _seed_everything, _split, check_augment, compute_value_scaling,
                    resolve_builder, write_report)

DEFAULT_PATCH_BUILDER = {
    "library": "timm",
    "architecture": "resnet18",
    "encoder_weights": None,
    "params": {"output_stride": 8, "drop_rate": 0.2},
}


# --------------------------------------------------------------------------------------------
# labels


def _gpkg_wkb(blob):
    """Standard WKB from a GeoPackage geometry blob (strips the 'GP' header and its envelope)."""
    blob = bytes(blob)
    if blob[:2] != b"GP":
        raise InputError("not a GeoPackage geometry (no 'GP' magic)")
    flags = blob[3]
    envelope = (flags >> 1) & 0x07
    size = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}.get(envelope)
    if size is None:
        raise InputError(f"GeoPackage geometry with an invalid envelope indicator {envelope}")
    return blob[8 + size:]


def read_gpkg_polygons(path, layer=None, field=None, dst_crs=None):
    """Polygons of a GeoPackage layer as ``[(shapely geometry, value of field)]`` (sqlite3 + shapely).

    ``layer`` defaults to the only feature table; ``dst_crs`` reprojects when the layer's CRS differs.
    """
    import shapely
    if not os.path.isfile(path):
        raise InputError(f"Label file not found: {path}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InputError(f"{path}: cannot open as a GeoPackage ({exc})") from exc
    try:
        try:
            tables = [r[0] for r in con.execute("select table_name from gpkg_contents where data_type='features'")]
        except sqlite3.Error as exc:
            raise InputError(f"{path}: not a GeoPackage ({exc})") from exc
        if layer is None:
            if len(tables) != 1:
                raise InputError(f"{path}: holds the layers {tables}; name the one to use")
            layer = tables[0]
        if layer not in tables:
            raise InputError(f"{path}: no layer {layer!r}; layers: {', '.join(tables)}")
        geom_col, srs_id = con.execute("select column_name, srs_id from gpkg_geometry_columns where table_name=?",
                                       (layer,)).fetchone()
        org = con.execute("select organization, organization_coordsys_id from gpkg_spatial_ref_sys "
                          "where srs_id=?", (srs_id,)).fetchone()
        columns = [r[1] for r in con.execute(f'pragma table_info("{layer}")')]
        if field is not None and field not in columns:
            raise InputError(f"{path}: layer {layer!r} has no field {field!r}; fields: "
                             f"{', '.join(c for c in columns if c != geom_col)}")
        sel = f'"{geom_col}"' + (f', "{field}"' if field else "")
        rows = con.execute(f'select {sel} from "{layer}"').fetchall()
    finally:
        con.close()
    out = []
    for row in rows:
        if row[0] is None:
            continue
        g = shapely.from_wkb(_gpkg_wkb(row[0]))
        if g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if not g.is_valid:
            g = g.buffer(0)
        out.append((g, row[1] if field else None))
    src_crs = f"{org[0].upper()}:{org[1]}" if org and org[0] and org[0].lower() == "epsg" else None
    if dst_crs is not None and src_crs is not None and out:
        out = _reproject_labels(out, src_crs, dst_crs, path)
    return out


# --------------------------------------------------------------------------------------------
# patches


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


class PatchSampler:
    """Random augmented patches with their majority label (see :func:`patch_label`)."""

    def __init__(self, img, lab, valid, patch, n_classes, rng, min_purity=0.5, **crop_options):
        self.crops = CropSampler(img, lab, valid, patch, rng, foreground_prob=0.0, **crop_options)
        self.k = n_classes
        self.min_purity = min_purity

    def batch(self, n, max_tries=200):
        imgs, labels = [], []
        while len(imgs) < n:
            for _ in range(max_tries):
                img, lab = self.crops.sample()
                k, purity = patch_label(lab, self.k)
                if k is not None and purity >= self.min_purity:
                    break
            else:
                raise InputError("No training patch is labelled and pure enough: check that the labels cover the "
                                 "image, or lower min_purity")
            imgs.append(img)
            labels.append(k)
        return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def _predict(model, batch, device, memory_format):
    import torch
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).contiguous(memory_format=memory_format)
        return torch.softmax(model(x).float(), dim=1).cpu().numpy()


def evaluate_grid(model, img, lab, patch, stride, n_classes, device, min_purity=0.5, memory_format=None,
                  batch_size=64):
    """Confusion matrix [K, K] (rows truth) of ``model`` on the pure patches of a regular grid."""
    cells = grid_patches(lab, patch, stride, n_classes, min_purity)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for i in range(0, len(cells), batch_size):
        part = cells[i:i + batch_size]
        x = np.stack([img[:, r:r + patch, c:c + patch] for r, c, _, _ in part])
        pred = np.argmax(_predict(model, x, device, memory_format), axis=1)
        for (_, _, k, _), p in zip(part, pred):
            cm[k, p] += 1
    return cm


def classification_metrics(cm, class_names):
    """Overall accuracy, macro F1 and per-class precision/recall/F1 from a patch confusion matrix."""
    total = int(cm.sum())
    per = {}
    for i, name in enumerate(class_names):
        tp = float(cm[i, i])
        fp, fn = float(cm[:, i].sum() - tp), float(cm[i, :].sum() - tp)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        per[name] = {"precision": precision, "recall": recall, "f1": f1, "patches": int(cm[i, :].sum())}
    present = [v["f1"] for v in per.values() if v["patches"]] or [0.0]
    return {"accuracy": float(np.trace(cm) / total) if total else 0.0, "macro_f1": float(np.mean(present)),
            "patches": total, "classes": per, "confusion": cm.tolist()}


# --------------------------------------------------------------------------------------------
# training


def train_patches(image_path, labels, out_dir, *, class_names, class_colors=None, background_class=None, bands=None,
                  band_names=None, builder=None, patch_size=16, epochs=20, steps_per_epoch=None, batch_size=64,
                  lr=2e-3, weight_decay=1e-3, seed=0, val_fraction=0.25, val_side="right", min_purity=0.5,
                  scale_range=(0.8, 1.25), balance_classes=True, select_best=False, device="auto", num_threads=None,
                  progress=None, is_cancelled=None, log=None, name="patch-classifier", description="",
                  weights_dtype="float16", augment=None, patience=0):
    """Train a patch classifier on ``image_path`` and write a ``patch_classification`` package to ``out_dir``.

    ``labels``: a label raster on the image grid (class values; 255 / nodata = not labelled) or
    ``[(shapely geometry, class value)]`` in the image CRS. ``background_class``: the class of
    pixels outside every polygon (None: not labelled). ``patch_size``: px at the image's GSD,
    stored as the package's patch size. ``augment``: flip, rotate, brightness, contrast, gamma,
    noise (see :func:`.train.train_segmentation`). ``patience`` > 0 keeps the best epoch by
    validation accuracy and stops after that many epochs without a better one.
    Returns the training report (also in ``out_dir``).
    """
    t0 = time.time()
    augment = check_augment(augment)
    if patience:
        select_best = True
    prog = Progress(progress, is_cancelled)
    log = log or (lambda msg: None)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency(f"PyTorch is not installed ({exc}); run 'make setup'") from exc
    from ..models.architectures import build_model
    from ..models.runners import device_description, select_device

    class_names = [str(n) for n in (class_names or [])]
    k = len(class_names)
    if k < 2:
        raise InputError("class_names: give at least two classes")
    colors = list(class_colors) if class_colors else [DEFAULT_COLORS[(i + 1) % len(DEFAULT_COLORS)] for i in range(k)]
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    classes = [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]
    if not isinstance(patch_size, int) or patch_size < 8:
        raise InputError(f"patch_size must be at least 8 px; got {patch_size!r}")
    if batch_size < 1 or epochs < 1:
        raise InputError("batch_size and epochs must be at least 1")
    if background_class is not None and not 0 <= int(background_class) < k:
        raise InputError(f"background_class {background_class} is not one of the classes 0..{k - 1}")

    prog.message(f"Reading {image_path}")
    ds, bands, data, valid = _read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        crs, transform = ds.crs, ds.transform
        band_names = _band_names(ds, bands, band_names)
        if isinstance(labels, (str, os.PathLike)):
            lab = _labels_from_raster(labels, ds, k)
        else:
            pairs = list(labels)
            for i, item in enumerate(pairs):
                try:
                    value = int(item[1])
                except (TypeError, ValueError, IndexError):
                    raise InputError(f"labels[{i}]: expected a (geometry, class value) pair, got {item!r}") from None
                if not 0 <= value < k:
                    raise InputError(f"labels[{i}]: class value {value} is out of range; {k} classes are named "
                                     f"(0..{k - 1})")
            # rasterize burns 0 outside the polygons: shift the classes by one, then map 0 to the background
            shifted = [(g, int(v) + 1) for g, v in pairs]
            lab = _labels_from_geometries(shifted, ds, k + 1).astype(np.int16) - 1
            outside = IGNORE if background_class is None else int(background_class)
            lab = np.where(lab < 0, outside, lab).astype(np.uint8)
    finally:
        ds.close()
    lab[~valid] = IGNORE
    scaling = compute_value_scaling(data, valid, seed=seed)
    apply_scaling(data, scaling)
    data[:, ~valid] = 0.0
    gsd = pixel_size_metres(crs, transform, w, h)
    (tr0, tr1, tc0, tc1), val_win = _split(h, w, val_fraction, val_side)
    train_img, train_lab = data[:, tr0:tr1, tc0:tc1], lab[tr0:tr1, tc0:tc1]
    if val_win is not None:
        vr0, vr1, vc0, vc1 = val_win
        val_img, val_lab = np.ascontiguousarray(data[:, vr0:vr1, vc0:vc1]), lab[vr0:vr1, vc0:vc1]
    else:
        val_img = val_lab = None
    train_cells = grid_patches(train_lab, patch_size, max(1, patch_size // 2), k, min_purity)
    if not train_cells:
        raise InputError("No labelled patch falls in the training part of the image; check the labels and "
                         "patch_size")
    freq = np.bincount([c[2] for c in train_cells], minlength=k).astype(np.float64)
    counts = {"train_patches_on_half_grid": int(len(train_cells)),
              "train_class_patches": {n: int(freq[i]) for i, n in enumerate(class_names)},
              "val_class_patches": ({n: int(v) for n, v in zip(class_names, np.bincount(
                  [c[2] for c in grid_patches(val_lab, patch_size, patch_size, k, min_purity)], minlength=k))}
                  if val_lab is not None else {})}
    weights = None
    if balance_classes:
        wts = np.where(freq > 0, freq.sum() / np.maximum(freq, 1) / max(1, (freq > 0).sum()), 0.0)
        weights = np.clip(wts, 0.0, 10.0).astype(np.float32)

    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        _seed_everything(seed)
        rng = np.random.default_rng(seed)
        dev = select_device(device)
        builder = resolve_builder(builder or DEFAULT_PATCH_BUILDER, len(bands), k)
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        model = build_model(builder).to(dev).to(memory_format=fmt)
        if steps_per_epoch is None:
            steps_per_epoch = max(4, int(math.ceil(2.0 * len(train_cells) / batch_size)))
        steps_per_epoch = int(steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=min(0.3, max(0.05, 2.0 / epochs)),
                                                    div_factor=10.0, final_div_factor=100.0)
        sampler = PatchSampler(train_img, train_lab, valid[tr0:tr1, tc0:tc1], patch_size, k, rng,
                               min_purity=min_purity, scale_range=scale_range, **augment)
        wt = torch.from_numpy(weights).to(dev) if weights is not None else None
        log(f"Training {builder['architecture']} on {device_description(dev)}: {epochs} epochs x {steps_per_epoch} "
            f"steps x {batch_size} patches of {patch_size} px; train {tr1 - tr0}x{tc1 - tc0} px, validation "
            f"{val_side} {val_fraction:.0%}")
        report = {
            "name": name, "task": "patch_classification", "image": os.fspath(image_path),
            "out_dir": os.fspath(out_dir), "classes": class_names, "bands": band_names, "band_numbers": bands,
            "builder": builder, "value_scaling": scaling, "gsd": gsd, "seed": seed, "patch_size": patch_size,
            "device": device_description(dev), "threads": torch.get_num_threads(), "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "epochs_planned": epochs, "steps_per_epoch": steps_per_epoch,
            "min_purity": min_purity, "class_weights": weights.tolist() if weights is not None else None,
            "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                           "window": ({"row_off": val_win[0], "col_off": val_win[2],
                                       "height": val_win[1] - val_win[0], "width": val_win[3] - val_win[2]}
                                      if val_win else None)},
            "samples": dict(counts, patches_seen=0), "train_loss": [], "val_accuracy": [],
            "augment": augment, "patience": patience, "stopped_early": False,
            "epochs_run": 0, "best_epoch": None, "best": None, "cancelled": False, "seconds": None,
        }
        best = {"key": None, "state": None, "epoch": None, "metrics": None}

        def finish(cancelled):
            if best["state"] is None:
                return None
            model.load_state_dict(best["state"])
            model.eval()
            out_spec = [{"name": "classes", "tasks": ["scene-classification"],
                         "result": {"shape": [-1, k], "dim_order": ["batch", "class"], "data_type": "float32"},
                         "classification:classes": [{"value": c.value, "name": c.name, "color_hint": c.color}
                                                    for c in classes],
                         "post_processing_function": None}]
            extra = {"mlm:output": out_spec, "rs_deep:training": {
                "best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": seed,
                "val_accuracy": best["metrics"]["accuracy"] if best["metrics"] else None}}
            save_package(model.cpu(), out_dir, weights_dtype=weights_dtype, name=name, task="patch_classification",
                         bands=band_names, classes=classes, builder=builder, tile_size=patch_size, overlap=0, gsd=gsd,
                         value_scaling=scaling, description=description, extra=extra)
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
                losses = []
                for step in range(steps_per_epoch):
                    train_prog.check()
                    x, y = sampler.batch(batch_size)
                    xt = torch.from_numpy(x).to(dev).contiguous(memory_format=fmt)
                    yt = torch.from_numpy(y).to(dev)
                    loss = F.cross_entropy(model(xt), yt, weight=wt, label_smoothing=0.05)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    report["samples"]["patches_seen"] += batch_size
                    train_prog.update(((epoch - 1) * steps_per_epoch + step + 1) / total_steps)
                report["train_loss"].append(round(float(np.mean(losses)), 5))
                report["epochs_run"] = epoch
                model.eval()
                metrics = None
                if val_img is not None:
                    cm = evaluate_grid(model, val_img, val_lab, patch_size, patch_size, k, dev, min_purity, fmt)
                    metrics = classification_metrics(cm, class_names)
                report["val_accuracy"].append(round(metrics["accuracy"], 4) if metrics else None)
                key = (metrics["accuracy"], epoch) if (metrics and select_best) else (epoch,)
                if best["key"] is None or key > best["key"]:
                    best.update(key=key, epoch=epoch, metrics=metrics,
                                state={kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()})
                    since_best = 0
                else:
                    since_best += 1
                msg = f"Epoch {epoch}/{epochs}: loss {report['train_loss'][-1]:.4f}"
                if metrics:
                    msg += f", held-out patch accuracy {metrics['accuracy']:.3f} ({metrics['patches']} patches)"
                log(msg)
                train_prog.update(epoch / epochs, msg)
                if metrics and select_best and patience and since_best >= patience and epoch < epochs:
                    report["stopped_early"] = True
                    log(f"Stopping early: no better validation accuracy for {patience} epochs")
                    break
        except Cancelled:
            saved = finish(cancelled=True)
            if saved is not None:
                raise Cancelled(f"Training was cancelled after {report['epochs_run']} epoch(s); the model so far "
                                f"(epoch {best['epoch']}) was written to {out_dir}") from None
            raise Cancelled("Training was cancelled before the first epoch finished; nothing was written.") \
                from None
        prog.sub(0.97, 1.0).update(0.0, "Writing the model package")
        result = finish(cancelled=False)
        prog.update(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)



# --------------------------------------------------------------------------------------------
# evaluation through the engine


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

__all__ = ["train_patches", "read_gpkg_polygons", "patch_label", "grid_patches", "evaluate_grid", "evaluate_patches",
           "classification_metrics", "DEFAULT_PATCH_BUILDER"]
