"""Training a change detection model from co-registered before/after pairs with change masks (QGIS-free).

Reuses the segmentation training pieces of :mod:`.train` on the two dates stacked as one
``[2 x C, H, W]`` image (before bands, then after bands: exactly what :class:`.change.PairReader`
feeds the network at inference):

* value scaling from the data (:func:`.train.compute_value_scaling`, per band, pooled over both
  dates of every training pair) stored as MLM ``value_scaling``; one entry per band of one date;
* augmentation with :class:`.train.CropSampler` (random crops, half of them on changes, rescale,
  flips, rotations, brightness/contrast jitter and noise, per band, so the dates get independent
  radiometric shifts) plus a per-date gain/offset and, for binary change, swapping the dates;
* cross-entropy + soft Dice (:func:`.train.segmentation_loss`), metrics from the confusion matrix
  (:func:`.train.metrics_from_confusion`).

Labels: binary masks (0 = no change, anything > 0 = change, e.g. 0/255 masks) when there are two
classes; class values 0..K-1 (0 = no change) for from-to classes. Nodata and 255 in a K > 2
label are not used. Pairs are whole scenes: hold out whole pairs (or give ``val_pairs``) to
measure what the model does on scenes it never saw (:func:`evaluate_pairs`, :func:`cva_baseline`).
"""
import math
import os
import time

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..evaluation.metrics import metrics_from_confusion
from ..geo.labels import IGNORE
from ..geo.raster import pixel_size_metres
from ..models.package import ModelClass, save_package
from ..progress import Progress
from .augment import check_augment
from .data import check_band_names, compute_value_scaling, scale_image, select_bands
from .loop import check_tile, seed_everything
from .report import REPORT_NAME, write_training_report
from .samplers import PairSampler
from .segmentation import evaluate, resolve_builder, segmentation_loss

DEFAULT_CHANGE_BUILDER = {
    "library": "rs_deep",
    "architecture": "SiameseUnet",
    "encoder": "resnet18",
    "encoder_weights": None,
    "params": {"encoder_depth": 4, "decoder_channels": [128, 64, 32, 16], "fusion": "absdiff"},
}
CHANGE_COLORS = ["000000", "E31A1C", "FF7F00", "1F78B4", "33A02C", "6A3D9A", "B15928", "FFFF99"]


# --------------------------------------------------------------------------------------------
# data


def _open(path, what):
    import rasterio
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PNG pairs are not georeferenced; that is expected here
            ds = rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the {what} raster {path}: {exc}") from exc
    return ds


def read_pair(before, after, label, bands=None, n_classes=2):
    """One training pair: ``dict(image [2C, H, W] float32 (raw), mask [H, W] uint8 (class values, IGNORE),
    valid [H, W], before, after, label (the paths), crs, transform, bands, band_names, gsd)``.

    The three rasters must be on the same pixel grid (same size); ``bands`` are 1-based band numbers
    read from both dates (default: every non-alpha band).
    """
    a, b, lab_ds = _open(before, "before"), _open(after, "after"), _open(label, "label")
    try:
        sizes = {(d.width, d.height) for d in (a, b, lab_ds)}
        if len(sizes) != 1:
            raise InputError(f"The pair {before} / {after} / {label} is not on one pixel grid (sizes "
                             f"{a.width}x{a.height}, {b.width}x{b.height}, {lab_ds.width}x{lab_ds.height}); "
                             "resample the three rasters onto one grid for training")
        use = select_bands(a, bands, f"the before raster {a.name}")
        select_bands(b, use, f"the after raster {b.name}")
        da = a.read(use, out_dtype="float32")
        db = b.read(use, out_dtype="float32")
        valid = np.all(a.read_masks(use) > 0, axis=0) & np.all(b.read_masks(use) > 0, axis=0)
        raw = lab_ds.read(1)
        lvalid = lab_ds.read_masks(1) > 0
        if n_classes == 2:
            lab = (raw > 0).astype(np.uint8)
        else:
            bad = np.unique(raw[(raw >= n_classes) & (raw != IGNORE) & lvalid])
            if bad.size:
                raise InputError(f"The label raster {label} holds class values {bad[:10].tolist()} but only "
                                 f"{n_classes} classes are named (0..{n_classes - 1}; 255 = not labelled)")
            lab = raw.astype(np.uint8)
        lab[~(valid & lvalid)] = IGNORE
        info = dict(before=os.fspath(before), after=os.fspath(after), label=os.fspath(label), crs=a.crs,
                    transform=a.transform, width=a.width, height=a.height, bands=use,
                    band_names=[a.descriptions[x - 1] or f"b{x}" for x in use],
                    gsd=pixel_size_metres(a.crs, a.transform, a.width, a.height))
    finally:
        for d in (a, b, lab_ds):
            d.close()
    return dict(info, image=np.concatenate([da, db], axis=0), mask=lab, valid=valid)


def _scaling_for(pairs, seed):
    """One MLM scaling entry per band of a date, pooled over both dates of every pair."""
    c = pairs[0]["image"].shape[0] // 2
    cols, valids = [], []
    for p in pairs:
        img, v = p["image"], p["valid"]
        for d in (0, 1):
            cols.append(img[d * c:(d + 1) * c].reshape(c, 1, -1))
            valids.append(v.reshape(1, -1))
    return compute_value_scaling(np.concatenate(cols, axis=2), np.concatenate(valids, axis=1), seed=seed)


def _scaled(pair, scaling):
    return scale_image(pair["image"].copy(), pair["valid"], scaling + scaling)  # the same scaling for both dates


# --------------------------------------------------------------------------------------------
# training


def train_change(pairs, out_dir, *, val_pairs=None, class_names=("no change", "change"), class_colors=None,
                 bands=None, band_names=None, builder=None, tile_size=128, epochs=20, steps_per_epoch=None,
                 batch_size=8, lr=2e-3, weight_decay=1e-4, seed=0, patience=0, dice_weight=1.0,
                 foreground_prob=0.5, scale_range=(0.8, 1.25), swap_dates=True, date_jitter=0.1, pair_weights=None,
                 device="auto", num_threads=None, progress=None, is_cancelled=None, log=None, name="change-model",
                 description="", gsd="auto", package_tile_size=256, package_overlap=32, weights_dtype="float16",
                 augment=None):
    """Train a change network on ``pairs`` and write a ``change`` model package to ``out_dir``.

    ``pairs`` / ``val_pairs``: ``[(before, after, label)]`` raster paths, each triple on one pixel
    grid. ``class_names``: "no change" first. ``builder``: default :data:`DEFAULT_CHANGE_BUILDER`
    (a Siamese U-Net; ``in_channels`` is the number of bands per date). ``gsd``: "auto" records the
    pairs' GSD when they all have the same one (within 10 %), else None (the model takes any
    resolution); or a number, or None. Without ``val_pairs`` the network of the last epoch is kept;
    with them, the best by validation IoU (``patience`` epochs without improvement stop early).
    ``pairs`` may also be a chip folder of :func:`.chips.export_training_data` (task change): its
    training chips are the pairs and its validation chips the validation pairs. ``augment``: see
    :func:`.train.train_segmentation` (flip, rotate, brightness, contrast, gamma, noise).

    Returns the training report (also ``out_dir/training_report.json``). Cancelling keeps the
    best network so far, if an epoch finished, as :func:`.train.train_segmentation` does.
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
    if chipsets.is_chip_set(pairs):
        manifest = chipsets.load_manifest(pairs, "change")
        pairs, chip_val = chipsets.change_pairs(manifest)
        val_pairs = val_pairs if val_pairs is not None else chip_val
        names, cols = chipsets.class_info(manifest)
        if tuple(class_names) == ("no change", "change"):
            class_names, class_colors = names, class_colors or cols
        log(f"Training from {len(pairs)} chip pairs, validating on {len(val_pairs or [])} ({manifest['root']})")
    augment = check_augment(augment)
    class_names = [str(n) for n in class_names]
    if len(class_names) < 2:
        raise InputError("class_names: give 'no change' first and at least one change class")
    k = len(class_names)
    colors = list(class_colors) if class_colors else [CHANGE_COLORS[i % len(CHANGE_COLORS)] for i in range(k)]
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    classes = [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]
    if not pairs:
        raise InputError("pairs: give at least one (before, after, label) triple to learn from")
    check_tile(tile_size, "tile_size")
    check_tile(package_tile_size, "package_tile_size")
    if not 0 <= package_overlap < package_tile_size // 2:
        raise InputError(f"package_overlap must be in [0, {package_tile_size // 2}); got {package_overlap}")
    if batch_size < 1 or epochs < 1:
        raise InputError("batch_size and epochs must be at least 1")

    prog.message(f"Reading {len(pairs)} training pair(s)")
    train = [read_pair(*p, bands=bands, n_classes=k) for p in pairs]
    val = [read_pair(*p, bands=bands, n_classes=k) for p in (val_pairs or [])]
    n_bands = train[0]["image"].shape[0] // 2
    for p in train[1:] + val:
        if p["image"].shape[0] // 2 != n_bands:
            raise InputError(f"{p['before']}: {p['image'].shape[0] // 2} bands per date, the first pair has "
                             f"{n_bands}; every pair must have the same bands")
    band_names = check_band_names(band_names, n_bands) if band_names else train[0]["band_names"]
    changed = sum(int(((p["mask"] > 0) & (p["mask"] != IGNORE)).sum()) for p in train)
    if changed == 0:
        raise InputError("The training labels mark no change anywhere; give masks with changed pixels > 0")
    if gsd == "auto":
        gs = [p["gsd"] for p in train]
        gsd = gs[0] if all(g is not None for g in gs) and max(gs) <= min(gs) * 1.1 else None
    scaling = _scaling_for(train, seed)
    images = [_scaled(p, scaling) for p in train]
    val_images = [_scaled(p, scaling) for p in val]
    counts = {"train_pairs": len(train), "val_pairs": len(val),
              "train_pixels": int(sum((p["mask"] != IGNORE).sum() for p in train)),
              "train_changed_pixels": changed,
              "val_pixels": int(sum((p["mask"] != IGNORE).sum() for p in val))}

    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        dev = select_device(device)
        builder = resolve_builder(builder or DEFAULT_CHANGE_BUILDER, n_bands, k)
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        model = build_model(builder).to(dev).to(memory_format=fmt)
        if steps_per_epoch is None:
            area = sum(p["mask"].size for p in train)
            steps_per_epoch = max(4, int(math.ceil(1.0 * area / (tile_size * tile_size) / batch_size)))
        steps_per_epoch = int(steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=min(0.3, max(0.05, 2.0 / epochs)),
                                                    div_factor=10.0, final_div_factor=100.0)
        sampler = PairSampler(images, [p["mask"] for p in train], [p["valid"] for p in train], tile_size, rng,
                              weights=pair_weights, swap_dates=swap_dates and k == 2,
                              date_jitter=0.0 if augment.get("brightness", 1) == 0 and augment.get("contrast", 1) == 0
                              else date_jitter,
                              scale_range=scale_range, foreground_prob=foreground_prob, **augment)
        log(f"Training {builder['architecture']}/{builder['encoder']} on {device_description(dev)}: {epochs} epochs "
            f"x {steps_per_epoch} steps x {batch_size} crops of {tile_size} px from {len(train)} pair(s)")
        report = {
            "name": name, "task": "change", "out_dir": os.fspath(out_dir),
            "pairs": [[p["before"], p["after"], p["label"]] for p in train],
            "val_pairs": [[p["before"], p["after"], p["label"]] for p in val],
            "classes": class_names, "bands": band_names, "band_numbers": train[0]["bands"],
            "builder": builder, "value_scaling": scaling, "gsd": gsd, "seed": seed,
            "device": device_description(dev), "threads": torch.get_num_threads(), "tile_size": tile_size,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "epochs_planned": epochs,
            "steps_per_epoch": steps_per_epoch, "patience": patience,
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
            extra = {"rs_deep:dates": 2, "rs_deep:training": {
                "best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": seed,
                "val_iou": best["metrics"]["iou"] if best["metrics"] else None,
                "train_pairs": len(train), "val_pairs": len(val)}}
            save_package(model.cpu(), out_dir, weights_dtype=weights_dtype, name=name, task="change",
                         bands=band_names, classes=classes, builder=builder, tile_size=package_tile_size,
                         overlap=package_overlap, gsd=gsd, value_scaling=scaling, description=description,
                         extra=extra)
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
                    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
                    loss, _, _ = segmentation_loss(model(xt), yt, k, dice_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    report["samples"]["crops_seen"] += batch_size
                    train_prog.update(((epoch - 1) * steps_per_epoch + step + 1) / total_steps)
                train_loss = float(np.mean(losses))
                report["train_loss"].append(round(train_loss, 5))
                report["lr_curve"].append(float(sched.get_last_lr()[0]))
                report["epochs_run"] = epoch
                model.eval()
                if val:
                    cm = np.zeros((k, k), dtype=np.int64)
                    ces = []
                    for img, p in zip(val_images, val):
                        c, ce = evaluate(model, img, p["mask"], k, dev, memory_format=fmt)
                        cm += c
                        ces.append(ce)
                    metrics = metrics_from_confusion(cm, class_names)
                    val_loss = float(np.nanmean(ces))
                    key = (round(metrics["iou"], 6), -val_loss)
                else:
                    metrics, val_loss, key = None, float("nan"), (epoch, 0.0)
                report["val_iou"].append(round(metrics["iou"], 5) if metrics else None)
                report["val_loss"].append(round(val_loss, 5) if math.isfinite(val_loss) else None)
                if best["key"] is None or key > best["key"]:
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
                if val and patience and since_best >= patience and epoch < epochs:
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
        prog.sub(0.97, 1.0).update(0.0, "Writing the model package")
        result = finish(cancelled=False)
        prog.update(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)


__all__ = ["train_change", "read_pair", "DEFAULT_CHANGE_BUILDER"]
