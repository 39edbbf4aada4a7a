"""Training a multi-label patch classifier (BigEarthNet-style: every class present in a patch) from one labelled
raster (QGIS-free).

Labels are polygons with a class value (they may overlap: a pixel can belong to several classes) or a label raster
of class values. A patch's target is every class whose labelled pixels cover at least ``cover`` of its valid
(not nodata) pixels; pixels outside every polygon belong to no class, so a patch may have no label at all. The
network is the patch classifier of :mod:`.patches` with one sigmoid score per class, trained with a binary
cross-entropy loss in the same loop (:func:`.loop.fit`).

Validation is spatial (:func:`.data.validation_split`): the held-out strip is scored on the regular patch grid
:func:`..inference.patches.classify_patches` lays, one threshold per class is chosen there (the best F1 of
:func:`..evaluation.metrics.choose_thresholds`) and the package keeps the thresholds of the epoch it holds
(``rs_deep:class_thresholds``; 0.5 each without validation).
"""
import math
import os

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import choose_thresholds, multilabel_metrics
from ..geo.labels import IGNORE, label_shapes, labels_from_raster
from .augment import draw_geometry, flip, photometric, resize, rot90
from .data import validation_split, window_dict, window_slices
from .loop import fit, input_percentiles
from .patches import PatchTask, read_training_image, start_patch_training

COVER_DEFAULT = 0.2  # share of a patch a class must cover to be one of its labels
MIN_VALID = 0.5  # share of a patch that must hold valid pixels to be used


def class_masks(labels, ds, n_classes):
    """(masks bool [K, H, W], labelled bool [H, W]) on the grid of the open raster ``ds``: ``labels`` a label
    raster path (class values; nodata / 255 not labelled) or ``[(geometry, class value)]`` (every pixel is
    labelled; outside the polygons it belongs to no class)."""
    if isinstance(labels, (str, os.PathLike)):
        lab = labels_from_raster(labels, ds, n_classes)
        return np.stack([lab == k for k in range(n_classes)]), lab != IGNORE
    from rasterio.features import rasterize
    shapes = label_shapes(labels, n_classes)
    if not shapes:
        raise InputError("labels: no geometries given; give polygons of the classes to learn")
    masks = np.zeros((n_classes, ds.height, ds.width), dtype=bool)
    for k in range(n_classes):
        mine = [(g, 1) for g, v in shapes if v == k]
        if mine:
            masks[k] = rasterize(mine, out_shape=(ds.height, ds.width), transform=ds.transform, fill=0,
                                 dtype="uint8") > 0
    return masks, np.ones((ds.height, ds.width), dtype=bool)


def patch_targets(masks, valid, cover, min_valid=MIN_VALID):
    """The multi-label target of one patch (bool [K]; every class covering at least ``cover`` of its valid pixels),
    or None when fewer than ``min_valid`` of its pixels are valid."""
    n = int(valid.sum())
    if n == 0 or n < min_valid * valid.size:
        return None
    share = (masks & valid).reshape(masks.shape[0], -1).sum(axis=1) / n
    return share >= cover - 1e-9


def grid_targets(masks, valid, patch, stride, cover, min_valid=MIN_VALID):
    """``(cells [(row0, col0)], targets bool [N, K])`` of the patches of a regular grid entirely inside the arrays
    (as :func:`..inference.patches.classify_patches` lays them) with enough valid pixels."""
    k, h, w = masks.shape
    cells, targets = [], []
    for r in range(0, h - patch + 1, stride):
        for c in range(0, w - patch + 1, stride):
            t = patch_targets(masks[:, r:r + patch, c:c + patch], valid[r:r + patch, c:c + patch], cover, min_valid)
            if t is not None:
                cells.append((r, c))
                targets.append(t)
    return cells, (np.stack(targets) if targets else np.zeros((0, k), dtype=bool))


class MultiLabelPatchSampler:
    """Random augmented patches with their multi-label target: a crop of a random size in ``scale_range`` times the
    patch (its target taken on the crop as it is, :func:`patch_targets`), resized to the patch, turned, flipped and
    jittered (:mod:`.augment`)."""

    def __init__(self, img, masks, valid, patch, rng, cover, scale_range=(0.8, 1.25), brightness=0.1, contrast=0.25,
                 gamma=0.25, noise=0.03, flip=True, rotate=True):
        self.img, self.masks, self.valid = img, masks, valid
        self.patch, self.rng, self.cover = patch, rng, cover
        self.scale_range = scale_range
        self.flip, self.rotate = bool(flip), bool(rotate)
        self.brightness, self.contrast, self.gamma, self.noise = brightness, contrast, gamma, noise

    def sample(self, max_tries=200):
        rng, t = self.rng, self.patch
        h, w = self.valid.shape
        lo, hi = self.scale_range
        for _ in range(max_tries):
            scale = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
            src = max(8, min(int(round(t * scale)), h, w))
            y0, x0 = int(rng.integers(h - src + 1)), int(rng.integers(w - src + 1))
            valid = self.valid[y0:y0 + src, x0:x0 + src]
            target = patch_targets(self.masks[:, y0:y0 + src, x0:x0 + src], valid, self.cover)
            if target is not None:
                break
        else:
            raise InputError("No training patch has enough valid pixels: check the image's nodata and the patch size")
        img = self.img[:, y0:y0 + src, x0:x0 + src]
        if src != t:
            img, valid = resize(img, t, valid)
        k, flipped = draw_geometry(rng, self.rotate, self.flip)
        img, valid = rot90(img, k), rot90(valid, k)
        if flipped:
            img, valid = flip(img), flip(valid)
        img = np.array(img, dtype=np.float32)
        img = photometric(img, np.array(valid, dtype=bool), rng, self.brightness, self.contrast, self.gamma,
                          self.noise)
        return img, target

    def batch(self, n):
        imgs, targets = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(targets).astype(np.float32)


def predict_scores(model, batch, device, memory_format):
    """Sigmoid scores [B, K] of ``model`` on a numpy batch [B, C, H, W]."""
    import torch
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).contiguous(memory_format=memory_format)
        return torch.sigmoid(model(x).float()).cpu().numpy()


class MultiLabelPatchTask(PatchTask):
    """Multi-label patch classification: augmented patches with their class-cover targets, binary cross-entropy
    (positives weighted by the classes' rarity), scored on the held-out grid at thresholds chosen there; the best
    epoch by the validation macro F1 (ties to the later), or the last one."""

    monitor, monitor_label, curves = "macro_f1", "macro F1", ("macro_f1", "micro_f1")

    def __init__(self, train, val, train_cells, pos_weight, cover, sampler_options, select_best):
        super().__init__(train, val, train_cells, None, None, sampler_options, select_best)
        self.pos_weight = pos_weight  # [K] float32 or None
        self.cover = cover
        self.pos_tensor = None

    def make_sampler(self, rng):
        img, masks, valid = self.train
        return MultiLabelPatchSampler(img, masks, valid, self.tile_size, rng, self.cover, **self.sampler_options)

    def loss(self, logits, target):
        """Binary cross-entropy of each class's logit against the multi-hot target [B, K], positives weighted by
        ``pos_weight``."""
        import torch
        import torch.nn.functional as F
        if self.pos_weight is not None and self.pos_tensor is None:
            self.pos_tensor = torch.from_numpy(self.pos_weight).to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=self.pos_tensor)

    def validate(self, model, device, memory_format, batch_size=64):
        if self.val is None:
            return None, None
        img, cells, truth = self.val
        p = self.tile_size
        scores = [predict_scores(model, np.stack([img[:, r:r + p, c:c + p] for r, c in cells[i:i + batch_size]]),
                                 device, memory_format) for i in range(0, len(cells), batch_size)]
        scores = np.concatenate(scores)
        thresholds = choose_thresholds(scores, truth)
        metrics = multilabel_metrics(truth, scores >= np.asarray(thresholds), [c.name for c in self.classes])
        metrics["thresholds"] = thresholds
        eps = 1e-6
        s = np.clip(scores, eps, 1 - eps)
        loss = float(-np.mean(truth * np.log(s) + (~truth) * np.log(1 - s)))
        return metrics, loss

    def rank(self, metrics, val_loss, epoch):
        return (metrics["macro_f1"], epoch)

    def epoch_message(self, metrics, val_loss, best):
        return (f", held-out macro F1 {metrics['macro_f1']:.3f}, micro F1 {metrics['micro_f1']:.3f} "
                f"({metrics['patches']} patches)")

    def training_info(self, best_metrics):
        return {"val_macro_f1": best_metrics["macro_f1"] if best_metrics else None,
                "val_micro_f1": best_metrics["micro_f1"] if best_metrics else None, "cover": self.cover}

    def package_extra(self, best_metrics=None):
        k = len(self.classes)
        thresholds = list(best_metrics["thresholds"]) if best_metrics else [0.5] * k
        extra = super().package_extra(best_metrics)
        extra["mlm:output"][0]["name"] = "class_scores"
        extra.update({"rs_deep:activation": "sigmoid", "rs_deep:multi_label": True,
                      "rs_deep:class_thresholds": thresholds})
        return extra


def train_multilabel_patches(image_path, labels, out_dir, *, class_names, class_colors=None, bands=None,
                             band_names=None, builder=None, patch_size=16, val_fraction=0.25, val_side="right",
                             cover=COVER_DEFAULT, scale_range=(0.8, 1.25), balance_classes=True, select_best=False,
                             augment=None, **options):
    """Train a multi-label patch classifier on ``image_path`` and write a ``patch_classification`` package with
    ``rs_deep:multi_label`` to ``out_dir``.

    ``labels``: ``[(shapely geometry, class value)]`` in the image CRS (may overlap) or a label raster on the image
    grid. ``cover``: the share of a patch's valid pixels a class must cover to be one of its labels (0 < cover
    <= 1). ``patch_size``, ``val_fraction``, ``val_side``, ``builder``, ``augment``, ``select_best`` and
    ``options``: as :func:`.patches.train_patches`. ``balance_classes`` weighs each class's positives by its
    negatives / positives on the training grid (at most 10). Returns the training report (:func:`.loop.fit`).
    """
    params, augment, select_best, class_names, classes = start_patch_training(
        options, augment, select_best, "multi-label-classifier", class_names, class_colors, patch_size,
        "class_names: a multi-label classifier needs at least two classes (with one class, train a single-label "
        "classifier with a background class)")
    k = len(class_names)
    if any("," in n for n in class_names):
        raise InputError("class_names: a multi-label class name cannot hold a comma (the labels field lists them "
                         "comma-separated): " + "; ".join(n for n in class_names if "," in n))
    if not (isinstance(cover, (int, float)) and 0 < cover <= 1):
        raise InputError(f"cover (the share of a patch a class must cover) must be in (0, 1]; got {cover!r}")

    params.prog.message(f"Reading {image_path}")
    image = read_training_image(image_path, bands, band_names, params.seed, lambda ds: class_masks(labels, ds, k))
    data, valid, masks, h, w = image.data, image.valid, image.labels, image.height, image.width
    train_win, val_win = validation_split(w, h, val_fraction, val_side)
    rows, cols = window_slices(train_win)
    train = (data[:, rows, cols], masks[:, rows, cols], valid[rows, cols])
    train_cells, train_truth = grid_targets(train[1], train[2], patch_size, max(1, patch_size // 2), cover)
    if not train_cells:
        raise InputError("No training patch has enough valid pixels in the training part of the image; check the "
                         "image, the labels and patch_size")
    val = None
    val_truth = np.zeros((0, k), dtype=bool)
    if val_win is not None:
        vrows, vcols = window_slices(val_win)
        val_img = np.ascontiguousarray(data[:, vrows, vcols])
        val_cells, val_truth = grid_targets(masks[:, vrows, vcols], valid[vrows, vcols], patch_size, patch_size,
                                            cover)
        val = (val_img, val_cells, val_truth) if val_cells else None
    pos = train_truth.sum(axis=0).astype(np.float64)
    counts = {"train_patches_on_half_grid": int(len(train_cells)),
              "train_class_patches": {n: int(pos[i]) for i, n in enumerate(class_names)},
              "train_patches_without_label": int((~train_truth.any(axis=1)).sum()),
              "val_patches": int(len(val_truth)),
              "val_class_patches": {n: int(v) for n, v in zip(class_names, val_truth.sum(axis=0))}}
    pos_weight = None
    if balance_classes:
        neg = len(train_truth) - pos
        pos_weight = np.clip(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), 1.0, 10.0).astype(np.float32)

    task = MultiLabelPatchTask(train, val, train_cells, pos_weight, float(cover), dict(scale_range=scale_range,
                                                                                      **augment),
                               select_best and val is not None)
    task.train_size = f"train {train_win[3]}x{train_win[2]} px, validation {val_side} {val_fraction:.0%}"
    task.configure(
        classes=classes, band_names=image.band_names, band_numbers=image.bands, builder=builder,
        value_scaling=image.scaling, input_percentiles=input_percentiles(params, task.task), gsd=image.gsd,
        tile_size=patch_size, augment=augment, package_tile_size=patch_size, package_overlap=0,
        settings={"patch_size": patch_size, "multi_label": True, "cover": float(cover),
                  "scale_range": list(scale_range),
                  "pos_weight": pos_weight.tolist() if pos_weight is not None else None},
        data={"image": os.path.basename(os.fspath(image_path)), "image_size": {"width": w, "height": h},
              "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                             "window": window_dict(val_win)}},
        samples=counts)
    return fit(task, params, out_dir)


__all__ = ["train_multilabel_patches", "MultiLabelPatchTask", "MultiLabelPatchSampler", "class_masks",
           "patch_targets", "grid_targets", "predict_scores", "COVER_DEFAULT"]
