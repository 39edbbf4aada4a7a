"""Training a change detection model from co-registered before/after pairs with change masks (QGIS-free).

Trains like segmentation (:class:`.segmentation.DenseTask` on :func:`.loop.fit`) on the two dates stacked
as one ``[2 x C, H, W]`` image (before bands, then after bands: exactly what :class:`.change.PairReader`
feeds the network at inference):

* value scaling from the data (:func:`.data.compute_value_scaling`, per band, pooled over both
  dates of every training pair) stored as MLM ``value_scaling``; one entry per band of one date;
* augmentation with :class:`.samplers.PairSampler` (random crops, half of them on changes, rescale,
  flips, rotations, brightness/contrast jitter and noise, per band, so the dates get independent
  radiometric shifts) plus a per-date gain/offset and, for binary change, swapping the dates;
* cross-entropy + soft Dice (:func:`.segmentation.segmentation_loss`), metrics from the confusion matrix
  (:func:`.metrics.metrics_from_confusion`).

Labels: binary masks (0 = no change, anything > 0 = change, e.g. 0/255 masks) when there are two
classes; class values 0..K-1 (0 = no change) for from-to classes. Nodata and 255 in a K > 2
label are not used. Pairs are whole scenes: hold out whole pairs (or give ``val_pairs``) to
measure what the model does on scenes it never saw (:func:`.baselines.evaluate_pairs`,
:func:`.baselines.cva_baseline`). :func:`train_change_from_rasters` trains from two rasters and change
polygons (the chips cut on the way).
"""
import math
import os
import shutil
import tempfile

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import metrics_from_confusion
from ..geo.labels import IGNORE
from ..geo.raster import pixel_size_metres
from .augment import check_augment
from .data import check_band_names, compute_value_scaling, model_classes, scale_image, select_bands
from .loop import MIN_STEPS, TrainParams, check_package_tiling, check_tile, fit, import_torch, input_percentiles
from .samplers import OBJECT_CROPS, PairSampler
from .segmentation import DenseTask, evaluate

CHANGE_COLORS = ["000000", "E31A1C", "FF7F00", "1F78B4", "33A02C", "6A3D9A", "B15928", "FFFF99"]
CHANGE_CHIP = 256  # px: the chips train_change_from_rasters cuts (at least the tile size)


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


def _scaled(pair, scaling, percentiles=None, seed=0):
    """The pair's two dates scaled: both with ``scaling``, or (``percentiles``, per-input scaling) each date by its
    own percentiles, as inference scales BEFORE and AFTER."""
    img, valid = pair["image"], pair["valid"]
    if not percentiles:
        return scale_image(img.copy(), valid, scaling + scaling)  # the same scaling for both dates
    c = img.shape[0] // 2
    own = [s for d in (0, 1) for s in compute_value_scaling(img[d * c:(d + 1) * c], valid, *percentiles, seed=seed)]
    return scale_image(img.copy(), valid, own)


# --------------------------------------------------------------------------------------------
# training


class ChangeTask(DenseTask):
    """Change: the two dates stacked as one image, scored on whole validation pairs."""

    task = "change"

    def __init__(self, train, val, images, val_images, sampler_options, dice_weight):
        self.train, self.val = train, val
        self.select_best = bool(val)  # without validation pairs the last epoch is kept
        self.images, self.val_images = images, val_images
        self.sampler_options = sampler_options
        self.dice_weight = dice_weight

    def default_steps(self, batch_size):
        area = sum(p["mask"].size for p in self.train)
        return max(MIN_STEPS, int(math.ceil(1.0 * area / (self.tile_size * self.tile_size) / batch_size)))

    def make_sampler(self, rng):
        return PairSampler(self.images, [p["mask"] for p in self.train], [p["valid"] for p in self.train],
                           self.tile_size, rng, **self.sampler_options)

    def validate(self, model, device, memory_format):
        if not self.val:
            return None, None
        k = len(self.classes)
        cm = np.zeros((k, k), dtype=np.int64)
        ces = []
        for img, p in zip(self.val_images, self.val):
            c, ce = evaluate(model, img, p["mask"], k, device, memory_format=memory_format)
            cm += c
            ces.append(ce)
        return metrics_from_confusion(cm, [c.name for c in self.classes]), float(np.nanmean(ces))

    def describe(self, device, steps, batch_size, epochs):
        return super().describe(device, steps, batch_size, epochs) + f" from {len(self.train)} pair(s)"

    def training_info(self, best_metrics):
        return {"val_iou": best_metrics["iou"] if best_metrics else None, "train_pairs": len(self.train),
                "val_pairs": len(self.val)}

    def package_extra(self, best_metrics=None):
        return {"rs_deep:dates": 2}


def train_change(pairs, out_dir, *, val_pairs=None, class_names=("no change", "change"), class_colors=None,
                 bands=None, band_names=None, builder=None, tile_size=128, dice_weight=1.0,
                 foreground_prob=OBJECT_CROPS["change"], scale_range=(0.8, 1.25), swap_dates=True, date_jitter=0.1,
                 pair_weights=None, gsd="auto", package_tile_size=256, package_overlap=32, augment=None, **options):
    """Train a change network on ``pairs`` and write a ``change`` model package to ``out_dir``.

    ``pairs`` / ``val_pairs``: ``[(before, after, label)]`` raster paths, each triple on one pixel
    grid. ``class_names``: "no change" first. ``builder``: default :data:`.builders.DEFAULT_BUILDERS`
    (a Siamese U-Net; ``in_channels`` is the number of bands per date). ``gsd``: "auto" records the
    pairs' GSD when they all have the same one (within 10 %), else None (the model takes any
    resolution); or a number, or None. Without ``val_pairs`` the network of the last epoch is kept;
    with them, the best by validation IoU (``patience`` epochs without improvement stop early).
    ``pairs`` may also be a chip folder of :func:`.chips.export_training_data` (task change): its
    training chips are the pairs and its validation chips the validation pairs. ``augment``: see
    :mod:`.augment` (flip, rotate, brightness, contrast, gamma, noise); the per-date gain/offset
    ``date_jitter`` is off when brightness and contrast are. ``options``: the run settings of
    :class:`.loop.TrainParams` (defaults: 20 epochs, batch size 8, name "change-model").

    Returns the training report (:func:`.loop.fit`; also ``out_dir/training_report.json``).
    Cancelling keeps the best network so far, if an epoch finished.
    """
    params = TrainParams.of(options, epochs=20, batch_size=8, weight_decay=1e-4, name="change-model")
    import_torch()
    from . import chips as chipsets
    if chipsets.is_chip_set(pairs):
        manifest = chipsets.load_manifest(pairs, "change")
        pairs, chip_val = chipsets.change_pairs(manifest)
        val_pairs = val_pairs if val_pairs is not None else chip_val
        names, cols = chipsets.class_info(manifest)
        if tuple(class_names) == ("no change", "change"):
            class_names, class_colors = names, class_colors or cols
        params.log(f"Training from {len(pairs)} chip pairs, validating on {len(val_pairs or [])} "
                   f"({manifest['root']})")
    augment = check_augment(augment)
    class_names = [str(n) for n in class_names]
    if len(class_names) < 2:
        raise InputError("class_names: give 'no change' first and at least one change class")
    k = len(class_names)
    classes = model_classes(class_names, class_colors, [CHANGE_COLORS[i % len(CHANGE_COLORS)] for i in range(k)])
    if not pairs:
        raise InputError("pairs: give at least one (before, after, label) triple to learn from")
    check_tile(tile_size, "tile_size")
    check_package_tiling(package_tile_size, package_overlap)

    params.prog.message(f"Reading {len(pairs)} training pair(s)")
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
    scaling = _scaling_for(train, params.seed)
    pct = input_percentiles(params, ChangeTask.task)
    photometric_off = augment.get("brightness", 1) == 0 and augment.get("contrast", 1) == 0
    task = ChangeTask(train, val, [_scaled(p, scaling, pct, params.seed) for p in train],
                      [_scaled(p, scaling, pct, params.seed) for p in val],
                      dict(weights=pair_weights, swap_dates=swap_dates and k == 2,
                           date_jitter=0.0 if photometric_off else date_jitter, scale_range=scale_range,
                           foreground_prob=foreground_prob, **augment), dice_weight)
    task.configure(
        classes=classes, band_names=band_names, band_numbers=train[0]["bands"], builder=builder,
        value_scaling=scaling, input_percentiles=pct, gsd=gsd, tile_size=tile_size, augment=augment,
        package_tile_size=package_tile_size,
        package_overlap=package_overlap,
        settings={"dice_weight": dice_weight, "foreground_prob": foreground_prob, "scale_range": list(scale_range),
                  "swap_dates": swap_dates and k == 2, "date_jitter": 0.0 if photometric_off else date_jitter},
        data={"pairs": [[p["before"], p["after"], p["label"]] for p in train],
              "val_pairs": [[p["before"], p["after"], p["label"]] for p in val]},
        samples={"train_pairs": len(train), "val_pairs": len(val),
                 "train_pixels": int(sum((p["mask"] != IGNORE).sum() for p in train)),
                 "train_changed_pixels": changed, "val_pixels": int(sum((p["mask"] != IGNORE).sum() for p in val))})
    return fit(task, params, out_dir)


def train_change_from_rasters(before, after, labels, out_dir, *, class_names=("no change", "change"),
                              class_colors=None, val_fraction=0.2, tile_size=128, chip_size=CHANGE_CHIP, temp_dir=None,
                              **options):
    """Train a change network from two rasters and their change labels, as :func:`train_change` does from pairs.

    ``labels``: ``[(shapely geometry, class value)]`` in ``before``'s CRS (the changed areas; everything else
    is no change) or a label raster. ``after`` is resampled onto ``before``'s grid when needed. The pair is
    cut into chips of ``max(chip_size, tile_size)`` px in a temporary folder inside ``temp_dir``
    (:func:`.chips.export_training_data`, every chip kept) with a spatial-block validation split: blocks two
    chips wide, ``val_fraction`` of them held back; the folder is removed at the end. ``options``: those of
    :func:`train_change` (builder, augment, the run settings...).
    """
    from .chips import export_training_data
    chip = max(int(chip_size), int(tile_size))
    tmp = tempfile.mkdtemp(prefix="rs_deep_change_chips_", dir=temp_dir)
    try:
        chips = os.path.join(tmp, "chips")
        export_training_data(before, labels, chips, task="change", class_names=class_names, class_colors=class_colors,
                             after_path=after, tile_size=chip, only_labelled=False, val_fraction=val_fraction,
                             block_size=2 * chip, log=options.get("log"), is_cancelled=options.get("is_cancelled"))
        return train_change(chips, out_dir, class_names=class_names, class_colors=class_colors, tile_size=tile_size,
                            **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["train_change", "train_change_from_rasters", "read_pair", "ChangeTask", "CHANGE_COLORS", "CHANGE_CHIP"]
