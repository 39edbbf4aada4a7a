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
import time

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..evaluation.metrics import classification_metrics
from ..geo.labels import IGNORE, labels_from_geometries, labels_from_raster
from ..geo.raster import pixel_size_metres
from ..models.package import DEFAULT_COLORS, ModelClass, save_package
from ..progress import Progress
from .augment import check_augment
from .data import (band_names as image_band_names, compute_value_scaling, grid_patches, read_image, scale_image,
                   validation_split, window_dict, window_slices)
from .loop import seed_everything
from .report import REPORT_NAME, write_training_report
from .samplers import PatchSampler
from .segmentation import resolve_builder

DEFAULT_PATCH_BUILDER = {
    "library": "timm",
    "architecture": "resnet18",
    "encoder_weights": None,
    "params": {"output_stride": 8, "drop_rate": 0.2},
}


# --------------------------------------------------------------------------------------------
# validation


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
    ds, bands, data, valid = read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        crs, transform = ds.crs, ds.transform
        band_names = image_band_names(ds, bands, band_names)
        if isinstance(labels, (str, os.PathLike)):
            lab = labels_from_raster(labels, ds, k)
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
            lab = labels_from_geometries(shifted, ds, k + 1).astype(np.int16) - 1
            outside = IGNORE if background_class is None else int(background_class)
            lab = np.where(lab < 0, outside, lab).astype(np.uint8)
    finally:
        ds.close()
    lab[~valid] = IGNORE
    scaling = compute_value_scaling(data, valid, seed=seed)
    scale_image(data, valid, scaling)
    gsd = pixel_size_metres(crs, transform, w, h)
    train_win, val_win = validation_split(w, h, val_fraction, val_side)
    rows, cols = window_slices(train_win)
    train_img, train_lab, train_valid = data[:, rows, cols], lab[rows, cols], valid[rows, cols]
    if val_win is not None:
        vrows, vcols = window_slices(val_win)
        val_img, val_lab = np.ascontiguousarray(data[:, vrows, vcols]), lab[vrows, vcols]
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
        seed_everything(seed)
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
        sampler = PatchSampler(train_img, train_lab, train_valid, patch_size, k, rng,
                               min_purity=min_purity, scale_range=scale_range, **augment)
        wt = torch.from_numpy(weights).to(dev) if weights is not None else None
        log(f"Training {builder['architecture']} on {device_description(dev)}: {epochs} epochs x {steps_per_epoch} "
            f"steps x {batch_size} patches of {patch_size} px; train {train_win[3]}x{train_win[2]} px, validation "
            f"{val_side} {val_fraction:.0%}")
        report = {
            "name": name, "task": "patch_classification", "image": os.fspath(image_path),
            "out_dir": os.fspath(out_dir), "classes": class_names, "bands": band_names, "band_numbers": bands,
            "builder": builder, "value_scaling": scaling, "gsd": gsd, "seed": seed, "patch_size": patch_size,
            "device": device_description(dev), "threads": torch.get_num_threads(), "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "epochs_planned": epochs, "steps_per_epoch": steps_per_epoch,
            "min_purity": min_purity, "class_weights": weights.tolist() if weights is not None else None,
            "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                           "window": window_dict(val_win)},
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
            report["curves_path"] = write_training_report(report["report_path"], report, log)
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



__all__ = ["train_patches", "evaluate_grid", "DEFAULT_PATCH_BUILDER"]
