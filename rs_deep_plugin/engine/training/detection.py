"""Training an object detector from boxes (QGIS-free).

Training images are small (scenes or clips of them), so they are read into memory once.
The pipeline mirrors inference (:mod:`.detect`):

* images are brought to the model's ground sampling distance (``gsd``) once, as the engine
  does tile by tile when a raster's GSD differs from the package's;
* value scaling is computed from the training pixels (:func:`.data.compute_value_scaling`),
  stored in the package and applied with :func:`.raster.apply_scaling`; nodata is 0;
* the network is an allow-listed detector that never resizes its input: the builder given, by
  default the torchvision Faster R-CNN MobileNetV3-FPN of :data:`.builders.DEFAULT_BUILDERS` (the
  toolbox's "auto" is RS Deep's CenterNet, :mod:`.arch_centernet`, as the bundled trees model); it is
  trained by :func:`.loop.fit` on random square crops of ``tile_size`` px
  (:class:`.samplers.BoxCropSampler`: scaled, flipped, rotated by multiples of 90 degrees, with
  brightness/contrast jitter and mild noise);
* validation images, when given, are run tile by tile with overlap and merged with
  :func:`.detect.merge_detections`, the function the engine uses, and scored by precision,
  recall, F1 and average precision at IoU 0.5 (:func:`.metrics.detection_metrics`).

Samples are :class:`.data.DetectionSample` (or ``(image, boxes)`` pairs): an image file (GeoTIFF,
PNG, JPEG... anything GDAL reads) or array, and its boxes as a GeoJSON file (map coordinates
of the image's CRS), a Pascal VOC ``.xml`` (pixel coordinates) or a list of pixel boxes
``(xmin, ymin, xmax, ymax[, class])`` (column/row, origin at the image's top-left corner; map
coordinates with ``coords="map"``). :func:`.data.split_sample` holds back a strip of an image for a
spatial validation split.
"""
import math
import os

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import detection_metrics
from ..geo.raster import GSD_TOLERANCE
from ..geo.rotated import rotated_iou
from ..models.arch_centernet import is_oriented, rbox_envelopes_torch
from ..models.package import DEFAULT_COLORS, TASKS
from .augment import check_augment
from .builders import resolve_builder
from .data import (DetectionSample, as_sample, check_band_names, compute_value_scaling, load_sample,
                   model_classes, resample_to_gsd, scale_image)
from .loop import (MIN_STEPS, TrainingTask, TrainParams, check_package_tiling, check_tile, fit, import_torch,
                   input_percentiles)
from .samplers import BoxCropSampler

# --------------------------------------------------------------------------------------------
# prediction on in-memory images


def predict_image(model, img, valid, tile, overlap, score_threshold, iou_threshold, max_detections, device,
                  batch_size=4, oriented=False):
    """Boxes of an in-memory scaled image [C, H, W], tiled and merged exactly as :func:`.detect.detect` does.

    Returns (boxes [N, 4] pixels, or rotated boxes [N, 5] of an ``oriented`` detector, scores [N], labels [N])."""
    from ..inference.detect import BoxMerger, shift_boxes, tile_boxes
    from ..models.runners import DetectionRunner
    c, h, w = img.shape
    runner = DetectionRunner(model, device, score_threshold, iou_threshold, max_detections)
    merger = BoxMerger(5 if oriented else 4)
    for k0, part, data, vals, _ in image_tiles(img, valid, tile, overlap, batch_size):
        for k, ((x, y), (boxes, labels, scores)) in enumerate(zip(part, runner(data))):
            boxes, labels, scores, cut = tile_boxes(boxes, labels, scores, vals[k], tile,
                                                    (x > 0, y > 0, x + tile < w, y + tile < h))
            merger.add(shift_boxes(boxes, 1.0, x, y), scores, labels, k0 + k, cut)
    return merger.merge(iou_threshold, w, h)


def image_tiles(img, valid, tile, overlap, batch_size):
    """The tiles of an in-memory image [C, H, W] in batches, as the engine tiles a raster (:class:`.tiling.TileGrid`,
    zeros beyond the image): ``(index of the first tile, [(x, y)], data [B, C, T, T], valid [B, T, T], grid)``."""
    from ..inference.tiling import TileGrid
    c, h, w = img.shape
    grid = TileGrid(0, 0, w, h, tile, overlap)
    seq = [(x, y) for y in grid.ys for x in grid.xs]
    for k0 in range(0, len(seq), batch_size):
        part = seq[k0:k0 + batch_size]
        data = np.zeros((len(part), c, tile, tile), dtype=np.float32)
        vals = np.zeros((len(part), tile, tile), dtype=bool)
        for k, (x, y) in enumerate(part):
            ww, hh = min(tile, w - x), min(tile, h - y)
            data[k, :, :hh, :ww] = img[:, y:y + hh, x:x + ww]
            vals[k, :hh, :ww] = valid[y:y + hh, x:x + ww]
        yield k0, part, data, vals, grid


# --------------------------------------------------------------------------------------------
# training


def detection_output_metadata(classes, builder):
    """The MLM ``mlm:output`` of a detection package: boxes with a class and a score per object (an oriented
    detector: rotated boxes, centre, length, width and the long side's angle in radians, pixels, y down)."""
    result = {"shape": [-1, 6], "dim_order": ["box", "xmin_ymin_xmax_ymax_class_score"], "data_type": "float32"}
    if is_oriented(builder):
        result = {"shape": [-1, 7], "dim_order": ["box", "cx_cy_length_width_angle_class_score"],
                  "data_type": "float32"}
    return [{
        "name": "detections",
        "tasks": [TASKS["detection"]],
        "result": result,
        "classification:classes": [{"value": c.value, "name": c.name, "color_hint": c.color} for c in classes],
        "post_processing_function": None,
    }]


def set_training_sizes(model, proposals=256, roi_batch=64):
    """Lighter Faster R-CNN sampling for small tiles (these settings are not part of the weights)."""
    rpn = getattr(model, "rpn", None)
    if rpn is not None:
        rpn._pre_nms_top_n["training"] = proposals * 2
        rpn._post_nms_top_n["training"] = proposals
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        heads.fg_bg_sampler.batch_size_per_image = roi_batch


class DetectionTask(TrainingTask):
    """Detection: crops with their boxes, validated tile by tile as the engine detects; the best epoch by
    validation AP50 (ties broken by F1)."""

    task = "detection"
    masks = False  # InstanceTask (:mod:`.instances`): the samples' objects are polygons with their pixels
    monitor, monitor_label, curves = "ap", "AP", ("f1", "ap", "precision", "recall")
    clip_grad_norm = 10.0
    # precision "auto" trains detectors in float32: trained in bfloat16, the tiny Mask R-CNN and oriented CenterNet
    # of tests/test_instances.py and tests/test_oriented.py fell below their checks (0.16.0)
    auto_bfloat16 = False

    def __init__(self, train_items, val_items, sampler_options, thresholds, sizes, select_best):
        self.train_items, self.val_items = train_items, val_items
        self.sampler_options = sampler_options
        self.score_threshold, self.iou_threshold, self.max_detections = thresholds
        self.sizes = sizes  # Faster R-CNN's training proposals and RoI batch
        self.select_best = select_best
        self.train_boxes = int(sum(len(it.boxes) for it in train_items))
        self.oriented = bool(train_items) and train_items[0].rboxes is not None

    def build_model(self, device, memory_format):
        from ..models.architectures import build_model
        self.builder = resolve_builder(self.task, self.builder, len(self.band_names), len(self.classes))
        model = build_model(self.builder).to(device).to(memory_format=memory_format)
        set_training_sizes(model, *self.sizes)
        return model

    def parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def default_steps(self, batch_size):
        area = sum(it.valid.size for it in self.train_items)
        return max(MIN_STEPS, int(math.ceil(area / (self.tile_size * self.tile_size) / batch_size)))

    def make_sampler(self, rng):
        sampler = BoxCropSampler(self.train_items, self.tile_size, rng, **self.sampler_options)
        self.settings["sample_shares"] = [round(float(v), 4) for v in sampler.p]
        return sampler

    def training_loss(self, model, batch, device, memory_format):
        import torch
        images = [torch.from_numpy(img).to(device) for img, _, _ in batch]
        if self.oriented:  # rotated boxes [N, 5]; the heatmap Gaussians are those of their envelopes
            rbs = [torch.from_numpy(b).reshape(-1, 5).to(device) for _, b, _ in batch]
            targets = [{"boxes": rbox_envelopes_torch(rb), "rboxes": rb,
                        "labels": torch.from_numpy(lab.astype(np.int64) + 1).to(device)}
                       for rb, (_, _, lab) in zip(rbs, batch)]
        else:
            targets = [{"boxes": torch.from_numpy(b).reshape(-1, 4).to(device),
                        "labels": torch.from_numpy(lab.astype(np.int64) + 1).to(device)} for _, b, lab in batch]
        loss_dict = model(images, targets)
        return sum(loss_dict.values()), loss_dict

    def validate(self, model, device, memory_format):
        if not self.val_items:
            return None, None
        preds = [self.predict(model, it, device) for it in self.val_items]
        truths = [self.truth(it) for it in self.val_items]
        return detection_metrics(preds, truths, iou=0.5, score_threshold=self.score_threshold,
                                 **self.matching()), None

    def predict(self, model, item, device):
        """The objects of a validation item, found as the engine finds them (all scoring 0.05 or more, for AP)."""
        return predict_image(model, item.img, item.valid, self.tile_size, self.tile_size // 8,
                             min(0.05, self.score_threshold), self.iou_threshold, self.max_detections, device,
                             oriented=self.oriented)

    def truth(self, item):
        """The true objects of a validation item, as :func:`.metrics.detection_metrics` takes them."""
        return (item.rboxes if self.oriented else item.boxes, item.labels)

    def matching(self):
        """How :func:`.metrics.detection_metrics` matches objects: rotated boxes by rotated IoU."""
        return {"rotated": rotated_iou if self.oriented else None}

    def rank(self, metrics, val_loss, epoch):
        return (metrics["ap"], metrics["f1"])

    def epoch_message(self, metrics, val_loss, best):
        return (f", validation AP50 {metrics['ap']:.3f}, precision {metrics['precision']:.3f}, recall "
                f"{metrics['recall']:.3f} (score >= {self.score_threshold:g})")

    def describe(self, device, steps, batch_size, epochs):
        return (super().describe(device, steps, batch_size, epochs) + f"; {self.train_boxes} training boxes in "
                f"{len(self.train_items)} image(s), {sum(len(it.boxes) for it in self.val_items)} validation boxes")

    def training_info(self, best_metrics):
        return {"val": best_metrics, "train_boxes": self.train_boxes}

    def package_extra(self, best_metrics=None):
        return {"rs_deep:score_threshold": self.score_threshold, "rs_deep:iou_threshold": self.iou_threshold,
                "rs_deep:max_detections": self.max_detections,
                "mlm:output": detection_output_metadata(self.classes, self.builder)}


def train_detection(samples, out_dir, *, boxes=None, class_names=("object",), class_colors=None, val_samples=None,
                    bands=None, band_names=None, builder=None, gsd="auto", value_scaling=None, tile_size=256,
                    scale_range=(0.8, 1.25), object_prob=0.7, min_visible=0.4, sample_weights=None, keep="best",
                    package_tile_size=512, package_overlap=64, score_threshold=None, iou_threshold=None,
                    max_detections=None, class_field="label", proposals=256, roi_batch=64, augment=None,
                    task_type=DetectionTask, **options):
    """Train a detection network and write a model package (+ ``training_report.json``) to ``out_dir``.

    ``samples``: an image path (with ``boxes``: GeoJSON, VOC .xml or pixel boxes) or a list of
    :class:`.data.DetectionSample` / ``(image, boxes)`` pairs. ``class_names``: the object classes
    (no background). ``val_samples``: images scored after every epoch (precision/recall/AP at
    IoU 0.5); with ``keep="best"`` the epoch of best validation AP is packaged, with
    ``keep="last"`` (or without validation samples) the last epoch. ``builder``: default
    :data:`.builders.DEFAULT_BUILDERS` (Faster R-CNN MobileNetV3-FPN sized for small objects; the toolbox's
    "auto" is CenterNet, :func:`.builders.toolbox_builder`); the oriented ``CenterNetOBB`` trains from polygons
    (a GeoJSON file, or rows ``(shapely polygon[, class])``): their minimum rotated rectangles are its boxes, and
    its validation matches rotated boxes by rotated IoU. ``gsd``: the model's
    metres per pixel ("auto": the first georeferenced sample's; None: every image as it is);
    images of another known GSD are resampled to it. ``score_threshold``, ``iou_threshold``,
    ``max_detections`` are stored in the package as its defaults. ``sample_weights``: the share
    of training crops taken from each sample (relative numbers, one per sample; default: in
    proportion to the images' areas). ``samples`` may also be a chip folder of
    :func:`.chips.export_training_data` (task detection): its training chips are the samples and
    its validation chips the validation samples. ``augment`` (:mod:`.augment`): flip, rotate, brightness,
    contrast, noise, and gamma (off unless given). ``options``: the run settings of
    :class:`.loop.TrainParams` (defaults: 20 epochs, batch size 4, name "detection-model"); ``patience``:
    with validation samples and ``keep="best"``, stop after that many epochs without a better validation AP.
    ``task_type``: the :class:`DetectionTask` (boxes) or a subclass: :class:`.instances.InstanceTask` (a box and a mask
    per object, from polygons; :func:`.instances.train_instances`).

    Returns the training report (:func:`.loop.fit`). When ``is_cancelled()`` turns true after an epoch
    finished, that network is written before :class:`Cancelled` is raised.
    """
    params = TrainParams.of(options, epochs=20, batch_size=4, weight_decay=1e-4, name="detection-model")
    import_torch()
    from ..models.detection_options import IOU_THRESHOLD, MAX_DETECTIONS, SCORE_THRESHOLD, check_thresholds
    from . import chips as chipsets
    log = params.log
    if chipsets.is_chip_set(samples):
        if task_type.masks:
            raise InputError("Chips hold boxes, not the objects' outlines; instance segmentation trains from a raster "
                             "and label polygons: give INPUT and LABELS instead")
        if is_oriented(builder):
            raise InputError("Chips hold axis-aligned boxes; an oriented detector (CenterNetOBB) trains from a raster "
                             "and label polygons (their minimum rotated rectangles): give INPUT and LABELS instead")
        manifest = chipsets.load_manifest(samples, "detection")
        samples, chip_val = chipsets.detection_samples(manifest)
        val_samples = val_samples if val_samples is not None else chip_val
        names, cols = chipsets.class_info(manifest)
        if not class_names or tuple(class_names) == ("object",):
            class_names, class_colors = names, class_colors or cols
        log(f"Training from {len(samples)} chips, validating on {len(val_samples or [])} ({manifest['root']})")
    augment = check_augment(augment)
    class_names = [str(n) for n in (class_names or [])]
    if not class_names:
        raise InputError("class_names: give the object classes to detect, e.g. ['tree']")
    k = len(class_names)
    classes = model_classes(class_names, class_colors,
                            [DEFAULT_COLORS[1 + i % (len(DEFAULT_COLORS) - 1)] for i in range(k)])
    check_tile(tile_size, "tile_size")
    check_package_tiling(package_tile_size, package_overlap)
    if keep not in ("best", "last"):
        raise InputError(f"keep must be 'best' or 'last'; got {keep!r}")
    thresholds = check_thresholds(SCORE_THRESHOLD if score_threshold is None else score_threshold,
                                  IOU_THRESHOLD if iou_threshold is None else iou_threshold,
                                  MAX_DETECTIONS if max_detections is None else max_detections)

    if isinstance(samples, (str, os.PathLike, np.ndarray)):
        if boxes is None:
            raise InputError("boxes: give the boxes of the training image (GeoJSON, Pascal VOC .xml or a list)")
        samples = [DetectionSample(samples, boxes)]
    samples = [as_sample(s, i) for i, s in enumerate(samples or [])]
    if not samples:
        raise InputError("samples: give at least one training image with boxes")
    val_samples = [as_sample(s, i) for i, s in enumerate(val_samples or [])]
    params.prog.message(f"Reading {len(samples)} training and {len(val_samples)} validation image(s)")
    if builder is None and params.init_from:  # the package's own network: an oriented one needs oriented samples
        from .transfer import read_init_package
        start = read_init_package(params.init_from, task_type.task)
        if is_oriented(start.builder):
            builder = {k: v for k, v in start.builder.items() if k not in ("in_channels", "classes")}
    oriented = is_oriented(builder)  # CenterNetOBB: rotated boxes from the label polygons
    train_items = [load_sample(s, class_names, bands, class_field, f"samples[{i}]", oriented, task_type.masks)
                   for i, s in enumerate(samples)]
    val_items = [load_sample(s, class_names, bands, class_field, f"val_samples[{i}]", oriented, task_type.masks)
                 for i, s in enumerate(val_samples)]
    n_bands = train_items[0].img.shape[0]
    for it in train_items + val_items:
        if it.img.shape[0] != n_bands:
            raise InputError(f"{it.name} has {it.img.shape[0]} bands but {train_items[0].name} has {n_bands}; "
                             "every image needs the same bands (choose them with bands=)")
    band_names = check_band_names(band_names, n_bands) if band_names else train_items[0].band_names
    if gsd == "auto":
        gsd = next((it.gsd for it in train_items if it.gsd), None)
    if gsd is not None and (isinstance(gsd, bool) or not isinstance(gsd, (int, float)) or not gsd > 0):
        raise InputError(f"gsd: expected metres per pixel (> 0), 'auto' or None; got {gsd!r}")

    def to_model_gsd(it):
        if gsd and it.gsd and abs(it.gsd / gsd - 1.0) > GSD_TOLERANCE:
            log(f"{it.name}: {it.gsd:.3g} m pixels resampled to the model's {gsd:.3g} m")
            return resample_to_gsd(it, gsd)
        return it

    train_items = [to_model_gsd(it) for it in train_items]
    val_items = [to_model_gsd(it) for it in val_items]
    if not sum(len(it.boxes) for it in train_items):
        raise InputError("No boxes fall in the training images: check that the boxes overlap the images and are "
                         "in the image's CRS (GeoJSON) or pixels (VOC, lists)")
    percentiles = input_percentiles(params, task_type.task)
    if percentiles and value_scaling is not None:
        raise InputError("value_scaling is given, but the package is to scale each input by its own percentiles "
                         "(input_scaling): leave one of them out")
    if value_scaling is None:  # stored in the package (the ONNX export and other tools use it)
        pix = np.concatenate([it.img[:, it.valid] for it in train_items], axis=1)
        value_scaling = compute_value_scaling(pix[:, None, :], np.ones((1, pix.shape[1]), dtype=bool),
                                              seed=params.seed)
        del pix
    for it in train_items + val_items:  # per-input scaling: each image by its own percentiles, as inference will
        own = compute_value_scaling(it.img, it.valid, *percentiles, seed=params.seed) if percentiles else None
        scale_image(it.img, it.valid, own or value_scaling)

    task = task_type(train_items, val_items,
                         dict(scale_range=scale_range, object_prob=object_prob, min_visible=min_visible,
                              weights=sample_weights, **augment),
                         thresholds, (proposals, roi_batch), select_best=keep == "best" and bool(val_items))
    def images(items):
        return [{"name": it.name, "width": it.img.shape[2], "height": it.img.shape[1], "boxes": int(len(it.boxes))}
                for it in items]

    task.configure(
        classes=classes, band_names=band_names, builder=builder, value_scaling=value_scaling,
        input_percentiles=percentiles, gsd=gsd,
        tile_size=tile_size, augment=augment, package_tile_size=package_tile_size, package_overlap=package_overlap,
        settings={"keep": keep if val_items else "last", "scale_range": list(scale_range), "object_prob": object_prob,
                  "min_visible": min_visible,
                  "thresholds": dict(zip(("score_threshold", "iou_threshold", "max_detections"), thresholds))},
        data={"train_images": images(train_items), "val_images": images(val_items)},
        samples={"train_images": len(train_items), "train_boxes": task.train_boxes, "val_images": len(val_items),
                 "val_boxes": int(sum(len(it.boxes) for it in val_items))})
    return fit(task, params, out_dir)


__all__ = ["train_detection", "DetectionTask", "predict_image", "image_tiles", "detection_output_metadata", "set_training_sizes"]
