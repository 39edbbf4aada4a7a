"""Training a semantic segmentation model from one labelled raster (QGIS-free).

The training image is small (a scene or a clip of one), so it is read into memory once
(:mod:`.data`; or the chips of an export). The pipeline mirrors inference exactly:

* value scaling is computed from the data (per band min-max over the 1st..99th percentile of
  valid pixels), stored in the package as MLM ``value_scaling`` and applied with
  :func:`.raster.apply_scaling`, the function :mod:`.segment` uses;
* nodata pixels are 0 after scaling (as :class:`.raster.RasterReader` fills them) and are
  ignored by the loss.

Validation is spatial: a strip of the image (the bottom ``val_fraction`` of its rows by
default) is held back and no training crop ever touches it. Training crops are random
(a quarter of them centred near labelled objects by default; :class:`.samplers.CropSampler`), randomly rescaled,
flipped, rotated by multiples of 90 degrees, with brightness/contrast jitter and mild noise. The loss
is cross-entropy plus soft Dice on the foreground classes. The loop is :func:`.loop.fit`: the best
network by validation IoU (mean over the non-background classes) is kept and written as a model
package (:func:`.package.save_package`) together with ``training_report.json``.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import confusion_matrix, metrics_from_confusion
from ..geo.labels import IGNORE, labels_from_geometries, labels_from_raster, read_vector_labels
from ..geo.raster import pixel_size_metres
from ..models.package import DEFAULT_COLORS
from .augment import check_augment
from .builders import resolve_builder
from .data import (band_names as image_band_names, class_counts, compute_value_scaling, model_classes, read_image,
                   representative_side, scale_image, validation_split, window_dict, window_slices, AUTO_SIDE)
from .loop import (MIN_STEPS, TrainingTask, TrainParams, check_package_tiling, check_tile, fit, import_torch,
                   input_percentiles)
from .samplers import COPY_PASTE, OBJECT_CROPS, MultiCropSampler

# --------------------------------------------------------------------------------------------
# model, loss, metrics


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


def predict_region(model, img, device, chunk=1024, memory_format=None, raw=False):
    """(class indices [H, W], probabilities [K, H, W]) for an in-memory region [C, H, W]; ``raw``: (None, the
    network's values [K, H, W]) (regression).

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
                logits = model(x)[0, :, :ph, :pw].float()
                p = (logits if raw else torch.softmax(logits, dim=0)).cpu().numpy()
                if probs_out is None:
                    probs_out = np.zeros((p.shape[0], h, w), dtype=np.float32)
                probs_out[:, y0:y0 + ph, x0:x0 + pw] = p
                if not raw:
                    pred[y0:y0 + ph, x0:x0 + pw] = np.argmax(p, axis=0)
    return (None, probs_out) if raw else (pred, probs_out)


def evaluate(model, img, lab, n_classes, device, memory_format=None):
    """(confusion matrix, mean cross-entropy) of ``model`` on an in-memory region."""
    pred, probs = predict_region(model, img, device, memory_format=memory_format)
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


class DenseTask(TrainingTask):
    """A task whose network labels every pixel (segmentation, change): cross-entropy + soft Dice
    (:func:`segmentation_loss`), the best epoch by validation IoU (mean over the foreground classes), ties
    broken by the lower validation loss."""

    monitor, monitor_label, curves = "iou", "IoU", ("iou",)
    dice_weight = 1.0

    def build_model(self, device, memory_format):
        from ..models.architectures import build_model
        self.builder = resolve_builder(self.task, self.builder, len(self.band_names), len(self.classes))
        return build_model(self.builder).to(device).to(memory_format=memory_format)

    def training_loss(self, model, batch, device, memory_format):
        import torch
        x, y = batch
        xt = torch.from_numpy(x).to(device).contiguous(memory_format=memory_format)
        yt = torch.from_numpy(y.astype(np.int64)).to(device)
        loss, _, _ = segmentation_loss(model(xt), yt, len(self.classes), self.dice_weight)
        return loss, None

    def rank(self, metrics, val_loss, epoch):
        return (round(metrics["iou"], 6), -val_loss)

    def epoch_message(self, metrics, val_loss, best):
        return (f", val loss {val_loss:.4f}, val IoU {metrics['iou']:.3f} "
                f"(best {best['metrics']['iou']:.3f} at epoch {best['epoch']})")

    def describe(self, device, steps, batch_size, epochs):
        return (f"Training {self.builder['architecture']}/{self.builder['encoder']} on {device}: {epochs} epochs x "
                f"{steps} steps x {batch_size} crops of {self.tile_size} px")


# --------------------------------------------------------------------------------------------
# training


@dataclass
class SegmentationData:
    """The training data of a segmentation run (:func:`image_data`, :func:`chip_data`)."""

    train: list  # [(img float32 [C, H, W] scaled, lab uint8 [H, W], valid bool [H, W])]
    val: list  # the same, for validation
    scaling: list  # MLM value_scaling, one entry per band
    gsd: float
    bands: list  # band numbers
    band_names: list
    counts: dict  # labelled pixels (data.class_counts)
    validation: dict  # how the validation data were chosen
    image_size: dict


def image_data(image_path, labels, class_names, bands, band_names, seed, val_fraction, val_side, log, prog):
    """One labelled image, cut into a training region and a validation strip (:func:`.data.validation_split`)."""
    k = len(class_names)
    prog.message(f"Reading {image_path}")
    ds, bands, data, valid = read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        crs, transform = ds.crs, ds.transform
        band_names = image_band_names(ds, bands, band_names)
        if isinstance(labels, (str, os.PathLike)) and str(labels).lower().endswith((".geojson", ".json")):
            labels = read_vector_labels(labels, class_value=1, dst_crs=crs)
        if isinstance(labels, (str, os.PathLike)):
            lab = labels_from_raster(labels, ds, k)
        else:
            lab = labels_from_geometries(list(labels), ds, k)
    finally:
        ds.close()
    lab = lab.copy()
    lab[~valid] = IGNORE
    fg_total = int(((lab > 0) & (lab != IGNORE)).sum())
    if fg_total == 0:
        raise InputError("The labels cover no pixel of the image: check that the polygons overlap the image "
                         "and are in the image's CRS")
    scaling = compute_value_scaling(data, valid, seed=seed)
    scale_image(data, valid, scaling)
    gsd = pixel_size_metres(crs, transform, w, h)

    if val_side == AUTO_SIDE and val_fraction and 0 < val_fraction < 0.9:  # else validation_split says why
        val_side = representative_side(lab, val_fraction, k, IGNORE)
        log(f"Validation strip: the {val_side} {val_fraction:.0%} of the image (the edge strip whose classes are "
            "closest to the whole image's)")
    train_win, val_win = validation_split(w, h, val_fraction, val_side)
    rows, cols = window_slices(train_win)
    train = [(data[:, rows, cols], lab[rows, cols], valid[rows, cols])]
    val = []
    if val_win is not None:
        rows, cols = window_slices(val_win)
        val = [(np.ascontiguousarray(data[:, rows, cols]), lab[rows, cols], valid[rows, cols])]
    counts = class_counts([t[1] for t in train], [v[1] for v in val], class_names)
    if not any(v for c, v in counts["train_class_pixels"].items() if c != class_names[0]):
        raise InputError(f"No labelled objects fall in the training part of the image (the {val_side} "
                         f"{val_fraction:.0%} is held back for validation); label objects elsewhere too, "
                         "or change val_side")
    if val and not any(v for c, v in counts["val_class_pixels"].items() if c != class_names[0]):
        log("Warning: the validation strip holds no labelled objects; validation IoU only counts false alarms")
    validation = {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                  "window": window_dict(val_win)}
    return SegmentationData(train, val, scaling, gsd, bands, band_names, counts, validation,
                            {"width": w, "height": h})


def chip_data(manifest, class_names, bands, band_names, seed, log):
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
        scale_image(img, valid, scaling)
    counts = class_counts([t[1] for t in train], [v[1] for v in val], class_names)
    if not any(v for c, v in counts["train_class_pixels"].items() if c != class_names[0]):
        raise InputError(f"The training chips in {manifest['root']} hold no labelled object")
    names = band_names or manifest.get("band_names") or [f"b{b}" for b in manifest["bands"]]
    split = manifest.get("split", {})
    validation = {"chips": split.get("val_chips", len(val)), "block_size": split.get("block_size"),
                  "fraction": split.get("val_fraction", 0.0), "method": "spatial blocks (chip export)"}
    log(f"Training from {len(train)} chips, validating on {len(val)} ({manifest['root']})")
    return SegmentationData(train, val, scaling, manifest.get("gsd"), list(manifest["bands"]),
                            [str(n) for n in names], counts, validation,
                            {"width": manifest["source"].get("width"), "height": manifest["source"].get("height"),
                             "chips": len(train) + len(val)})


class SegmentationTask(DenseTask):
    """Segmentation: crops of one image (or of chips), validated on the held-out strip (or chips)."""

    task = "segmentation"

    def __init__(self, data, sampler_options, dice_weight):
        self.train, self.val = data.train, data.val
        self.select_best = bool(data.val)  # without validation the last epoch is kept
        self.sampler_options = sampler_options
        self.dice_weight = dice_weight
        self.train_px = sum(lab.size for _, lab, _ in data.train)
        self.where = ""

    def default_steps(self, batch_size):
        return max(MIN_STEPS, int(math.ceil(2.0 * self.train_px / (self.tile_size * self.tile_size) / batch_size)))

    def make_sampler(self, rng):
        return MultiCropSampler(self.train, self.tile_size, rng, **self.sampler_options)

    def validate(self, model, device, memory_format):
        if not self.val:
            return None, None
        cm, val_loss = evaluate_regions(model, self.val, len(self.classes), device, memory_format=memory_format)
        return metrics_from_confusion(cm, [c.name for c in self.classes]), val_loss

    def describe(self, device, steps, batch_size, epochs):
        return (super().describe(device, steps, batch_size, epochs)
                + f"; {self.train_px} training px, {self.where}")

    def training_info(self, best_metrics):
        return {"val_iou": best_metrics["iou"] if best_metrics else None,
                "train_pixels": self.samples["train_pixels"], "val_pixels": self.samples["val_pixels"]}


def train_segmentation(image_path, labels, out_dir, *, class_names=None, class_colors=None, bands=None,
                       band_names=None, builder=None, tile_size=256, val_fraction=0.2, val_side=AUTO_SIDE,
                       dice_weight=1.0, foreground_prob=OBJECT_CROPS["segmentation"], scale_range=(0.8, 1.25),
                       augment=None, package_tile_size=512, package_overlap=64, paste_prob=COPY_PASTE, **options):
    """Train a segmentation network on ``image_path`` and write a model package to ``out_dir``.

    ``labels``: a label raster on the image grid (class values, 0 = background, 255 or nodata =
    not labelled), a GeoJSON file of polygons (class 1) or a list of ``(shapely geometry, class value)``
    in the image CRS (rasterized; everything outside the polygons is background). ``class_names`` names
    the classes 0..K-1 (0 is the background). ``bands``: 1-based band numbers (default: every non-alpha
    band). ``image_path`` may also be a chip folder of :func:`.chips.export_training_data` (task
    segmentation), trained and validated as split there. ``val_fraction`` of the image along ``val_side``
    is held out for validation ("auto": the edge strip whose classes are closest to the whole image's,
    :func:`.data.representative_side`; or bottom, top, left, right). ``builder``: default
    :data:`.builders.DEFAULT_BUILDERS` (a light U-Net).
    ``augment`` (:mod:`.augment`): ``flip``, ``rotate`` (on by default) and the photometric jitter of the
    crops (scaled values): ``brightness`` (shift, default 0.1), ``contrast`` (log factor, 0.25), ``gamma``
    (log exponent, 0.25) and ``noise`` (max Gaussian sigma, 0.03); crops are always rescaled by a random
    factor in ``scale_range``. ``paste_prob``: the share of crops into which 1-3 labelled objects of the
    training data are pasted (copy-paste, :meth:`.samplers.CropSampler.paste`; 0: off). ``options``: the run
    settings of :class:`.loop.TrainParams` (defaults: 30 epochs, batch size 8, patience 8, name
    "segmentation-model"); ``steps_per_epoch`` defaults to enough batches to see the training area about twice.

    Returns the training report (:func:`.loop.fit`; also written to ``out_dir/training_report.json``).
    When ``is_cancelled()`` turns true, the best network so far (if any epoch finished) is written
    before :class:`Cancelled` is raised.
    """
    params = TrainParams.of(options, epochs=30, batch_size=8, weight_decay=1e-4, patience=8,
                            name="segmentation-model")
    import_torch()
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
    classes = model_classes(class_names, class_colors, [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(k)])
    check_tile(tile_size, "tile_size")
    check_package_tiling(package_tile_size, package_overlap)
    augment = check_augment(augment)
    if not 0.0 <= float(paste_prob) <= 1.0:
        raise InputError(f"paste_prob is a share of the training crops, from 0 (no copy-paste) to 1; got "
                         f"{paste_prob}")

    if chipset is not None:
        data = chip_data(chipset, class_names, bands, band_names, params.seed, params.log)
    else:
        data = image_data(image_path, labels, class_names, bands, band_names, params.seed, val_fraction, val_side,
                          params.log, params.prog)
    task = SegmentationTask(data, dict(scale_range=scale_range, foreground_prob=foreground_prob,
                                       paste_prob=paste_prob, **augment), dice_weight)
    task.where = (f"validation {len(data.val)} chips" if chipset is not None
                  else f"validation {val_side} {val_fraction:.0%}" if data.val else "no validation")
    task.configure(
        classes=classes, band_names=data.band_names, band_numbers=data.bands, builder=builder,
        value_scaling=data.scaling, input_percentiles=input_percentiles(params, task.task), gsd=data.gsd,
        tile_size=tile_size, augment=augment, package_tile_size=package_tile_size, package_overlap=package_overlap,
        settings={"dice_weight": dice_weight, "foreground_prob": foreground_prob, "paste_prob": paste_prob,
                  "scale_range": list(scale_range)},
        data={"image": os.path.basename(os.fspath(image_path)), "image_size": data.image_size,
              "validation": data.validation},
        samples=data.counts)
    return fit(task, params, out_dir)


__all__ = ["train_segmentation", "SegmentationTask", "DenseTask", "segmentation_loss", "evaluate", "evaluate_regions",
           "predict_region", "image_data", "chip_data", "SegmentationData"]
