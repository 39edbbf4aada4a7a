"""Training a patch (scene) classifier from one labelled raster (QGIS-free).

Labels are a class per pixel (a label raster on the image grid, or polygons with a class value,
rasterized; pixels outside every polygon get ``background_class``). A training patch is a
random crop of ``patch_size`` px (:class:`.samplers.PatchSampler`: rescaled, flipped, rotated and
jittered); its label is the majority class of its labelled pixels, and patches whose majority covers
less than ``min_purity`` of them are skipped. Value scaling and the validation split are those of
:mod:`.data`, the loop :func:`.loop.fit`, so training mirrors what :func:`.patches.classify_patches`
feeds the network.

Validation is spatial (:func:`.data.validation_split`): a strip of the image is held back, no training
patch touches it, and it is scored on the regular patch grid :func:`.patches.classify_patches`
uses (:func:`.metrics.classification_metrics`). The network of the last epoch is kept (the strip only
measures), unless ``select_best`` or ``patience``.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import classification_metrics
from ..geo.labels import IGNORE, label_shapes, labels_from_geometries, labels_from_raster
from ..geo.raster import pixel_size_metres
from ..models.package import DEFAULT_COLORS
from .augment import check_augment
from .builders import resolve_builder
from .data import (band_names as image_band_names, compute_value_scaling, grid_patches, model_classes, read_image,
                   scale_image, validation_split, window_dict, window_slices)
from .loop import MIN_STEPS, TrainingTask, TrainParams, fit, import_torch, input_percentiles
from .samplers import PatchSampler

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


class PatchTask(TrainingTask):
    """Patch classification: augmented patches with their majority label, scored on the regular patch grid of
    the held-out strip; the best epoch by validation accuracy (ties to the later), or the last one."""

    task = "patch_classification"
    monitor, monitor_label, curves = "accuracy", "accuracy", ("accuracy",)

    def __init__(self, train, val, train_cells, class_weights, min_purity, sampler_options, select_best):
        self.train, self.val = train, val  # (img, lab, valid) of the training part; (img, lab) or None
        self.train_cells = train_cells
        self.class_weights = class_weights
        self.min_purity = min_purity
        self.sampler_options = sampler_options
        self.select_best = select_best
        self.weight_tensor = None
        self.train_size = ""

    def build_model(self, device, memory_format):
        from ..models.architectures import build_model
        self.builder = resolve_builder(self.task, self.builder, len(self.band_names), len(self.classes))
        return build_model(self.builder).to(device).to(memory_format=memory_format)

    def default_steps(self, batch_size):
        return max(MIN_STEPS, int(math.ceil(2.0 * len(self.train_cells) / batch_size)))

    def make_sampler(self, rng):
        img, lab, valid = self.train
        return PatchSampler(img, lab, valid, self.tile_size, len(self.classes), rng, min_purity=self.min_purity,
                            **self.sampler_options)

    def training_loss(self, model, batch, device, memory_format):
        import torch
        x, y = batch
        xt = torch.from_numpy(x).to(device).contiguous(memory_format=memory_format)
        return self.loss(model(xt), torch.from_numpy(y).to(device)), None

    def loss(self, logits, target):
        """The loss of a batch of class logits [B, K] against the targets (on the logits' device): cross-entropy
        weighted by ``class_weights``, with label smoothing."""
        import torch
        import torch.nn.functional as F
        if self.class_weights is not None and self.weight_tensor is None:
            self.weight_tensor = torch.from_numpy(self.class_weights).to(logits.device)
        return F.cross_entropy(logits, target, weight=self.weight_tensor, label_smoothing=0.05)

    def validate(self, model, device, memory_format):
        if self.val is None:
            return None, None
        img, lab = self.val
        k = len(self.classes)
        cm = evaluate_grid(model, img, lab, self.tile_size, self.tile_size, k, device, self.min_purity, memory_format)
        return classification_metrics(cm, [c.name for c in self.classes]), None

    def rank(self, metrics, val_loss, epoch):
        return (metrics["accuracy"], epoch)

    def epoch_message(self, metrics, val_loss, best):
        return f", held-out patch accuracy {metrics['accuracy']:.3f} ({metrics['patches']} patches)"

    def describe(self, device, steps, batch_size, epochs):
        return (f"Training {self.builder['architecture']} on {device}: {epochs} epochs x {steps} steps x "
                f"{batch_size} patches of {self.tile_size} px; {self.train_size}")

    def training_info(self, best_metrics):
        return {"val_accuracy": best_metrics["accuracy"] if best_metrics else None}

    def package_extra(self, best_metrics=None):
        k = len(self.classes)
        return {"mlm:output": [{"name": "classes", "tasks": ["scene-classification"],
                                "result": {"shape": [-1, k], "dim_order": ["batch", "class"], "data_type": "float32"},
                                "classification:classes": [{"value": c.value, "name": c.name, "color_hint": c.color}
                                                           for c in self.classes],
                                "post_processing_function": None}]}


@dataclass
class TrainingImage:
    """A training image read by :func:`read_training_image`."""

    data: object  # float32 [C, H, W], scaled; 0 where not valid
    valid: object  # bool [H, W]
    labels: object  # what the reader of the labels returned
    bands: list
    band_names: list
    scaling: list
    gsd: float
    width: int
    height: int


def read_training_image(image_path, bands, band_names, seed, read_labels):
    """The image of a patch trainer, with its labels: ``read_labels(open dataset)`` returns ``(labels, labelled)``
    (``labelled``: bool [H, W] of the pixels the labels cover, or None: all); pixels outside it are not valid. The
    value scaling is computed on the valid pixels (:func:`.data.compute_value_scaling`) and applied."""
    ds, bands, data, valid = read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        crs, transform = ds.crs, ds.transform
        band_names = image_band_names(ds, bands, band_names)
        labels, labelled = read_labels(ds)
    finally:
        ds.close()
    if labelled is not None:
        valid &= labelled
    scaling = compute_value_scaling(data, valid, seed=seed)
    scale_image(data, valid, scaling)
    return TrainingImage(data, valid, labels, bands, band_names, scaling, pixel_size_metres(crs, transform, w, h),
                         w, h)


def start_patch_training(options, augment, select_best, name, class_names, class_colors, patch_size, too_few):
    """What a patch trainer checks first: ``(params, augment, select_best, class_names, classes)`` from the run
    ``options`` (:class:`.loop.TrainParams`, default name ``name``), the augment switches, the classes (at least
    two, else ``too_few`` is the message) and ``patch_size`` (at least 8 px); patience turns ``select_best`` on."""
    params = TrainParams.of(options, epochs=20, batch_size=64, weight_decay=1e-3, name=name)
    augment = check_augment(augment)
    import_torch()
    class_names = [str(n) for n in (class_names or [])]
    k = len(class_names)
    if k < 2:
        raise InputError(too_few)
    classes = model_classes(class_names, class_colors,
                            [DEFAULT_COLORS[(i + 1) % len(DEFAULT_COLORS)] for i in range(k)])
    if not isinstance(patch_size, int) or patch_size < 8:
        raise InputError(f"patch_size must be at least 8 px; got {patch_size!r}")
    return params, augment, bool(select_best or params.patience), class_names, classes


def train_patches(image_path, labels, out_dir, *, class_names, class_colors=None, background_class=None, bands=None,
                  band_names=None, builder=None, patch_size=16, val_fraction=0.25, val_side="right", min_purity=0.5,
                  scale_range=(0.8, 1.25), balance_classes=True, select_best=False, augment=None, **options):
    """Train a patch classifier on ``image_path`` and write a ``patch_classification`` package to ``out_dir``.

    ``labels``: a label raster on the image grid (class values; 255 / nodata = not labelled) or
    ``[(shapely geometry, class value)]`` in the image CRS. ``background_class``: the class of
    pixels outside every polygon (None: not labelled). ``patch_size``: px at the image's GSD,
    stored as the package's patch size. ``val_fraction`` of the image along ``val_side`` is held out.
    ``builder``: default :data:`.builders.DEFAULT_BUILDERS` (a timm ResNet-18). ``balance_classes`` weighs
    the loss by inverse class frequency. ``augment`` (:mod:`.augment`): flip, rotate, brightness, contrast,
    gamma, noise. The network of the last epoch is kept unless ``select_best``; ``patience`` > 0 keeps the best
    epoch by validation accuracy and stops after that many epochs without a better one. ``options``: the run
    settings of :class:`.loop.TrainParams` (defaults: 20 epochs, batch size 64, weight decay 1e-3, name
    "patch-classifier"). Returns the training report (:func:`.loop.fit`; also in ``out_dir``).
    """
    params, augment, select_best, class_names, classes = start_patch_training(
        options, augment, select_best, "patch-classifier", class_names, class_colors, patch_size,
        "class_names: give at least two classes")
    k = len(class_names)
    if background_class is not None and not 0 <= int(background_class) < k:
        raise InputError(f"background_class {background_class} is not one of the classes 0..{k - 1}")

    params.prog.message(f"Reading {image_path}")

    def read_labels(ds):
        if isinstance(labels, (str, os.PathLike)):
            return labels_from_raster(labels, ds, k), None
        # rasterize burns 0 outside the polygons: shift the classes by one, then map 0 to the background
        shifted = [(g, v + 1) for g, v in label_shapes(labels, k)]
        lab = labels_from_geometries(shifted, ds, k + 1).astype(np.int16) - 1
        outside = IGNORE if background_class is None else int(background_class)
        return np.where(lab < 0, outside, lab).astype(np.uint8), None

    image = read_training_image(image_path, bands, band_names, params.seed, read_labels)
    data, valid, lab, h, w = image.data, image.valid, image.labels, image.height, image.width
    lab[~valid] = IGNORE
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


    task = PatchTask((train_img, train_lab, train_valid), (val_img, val_lab) if val_img is not None else None,
                     train_cells, weights, min_purity, dict(scale_range=scale_range, **augment),
                     select_best and val_img is not None)
    task.train_size = (f"train {train_win[3]}x{train_win[2]} px, validation "
                       f"{val_side} {val_fraction:.0%}")
    task.configure(
        classes=classes, band_names=image.band_names, band_numbers=image.bands, builder=builder,
        value_scaling=image.scaling, input_percentiles=input_percentiles(params, task.task), gsd=image.gsd,
        tile_size=patch_size, augment=augment, package_tile_size=patch_size, package_overlap=0,
        settings={"patch_size": patch_size, "min_purity": min_purity, "scale_range": list(scale_range),
                  "background_class": background_class,
                  "class_weights": weights.tolist() if weights is not None else None},
        data={"image": os.path.basename(os.fspath(image_path)), "image_size": {"width": w, "height": h},
              "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                             "window": window_dict(val_win)}},
        samples=counts)
    return fit(task, params, out_dir)


__all__ = ["train_patches", "PatchTask", "evaluate_grid", "start_patch_training", "read_training_image",
           "TrainingImage"]
