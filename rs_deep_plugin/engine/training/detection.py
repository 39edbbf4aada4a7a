"""Training an object detector from boxes (QGIS-free).

Training images are small (scenes or clips of them), so they are read into memory once.
The pipeline mirrors inference (:mod:`.detect`):

* images are brought to the model's ground sampling distance (``gsd``) once, as the engine
  does tile by tile when a raster's GSD differs from the package's;
* value scaling is computed from the training pixels (:func:`.train.compute_value_scaling`),
  stored in the package and applied with :func:`.raster.apply_scaling`; nodata is 0;
* the network is an allow-listed torchvision detector (:mod:`.arch_torchvision`) that never
  resizes its input, trained on random square crops of ``tile_size`` px (scaled, flipped,
  rotated by multiples of 90 degrees, with brightness/contrast jitter and mild noise);
* validation images, when given, are run tile by tile with overlap and merged with
  :func:`.detect.merge_detections`, the function the engine uses, and scored by precision,
  recall, F1 and average precision at IoU 0.5.

Samples are :class:`DetectionSample` (or ``(image, boxes)`` pairs): an image file (GeoTIFF,
PNG, JPEG... anything GDAL reads) or array, and its boxes as a GeoJSON file (map coordinates
of the image's CRS), a Pascal VOC ``.xml`` (pixel coordinates) or a list of pixel boxes
``(xmin, ymin, xmax, ymax[, class])`` (column/row, origin at the image's top-left corner).
:func:`split_sample` holds back a strip of an image for a spatial validation split.
"""
import copy
import math
import os
import time

import numpy as np

from ..errors import Cancelled, InputError, MissingDependency
from ..evaluation.metrics import detection_metrics
from ..geo.raster import GSD_TOLERANCE
from ..models.package import DEFAULT_COLORS, ModelClass, TASKS, save_package
from ..progress import Progress
from .augment import check_augment
from .data import (DetectionSample, as_sample, check_band_names, compute_value_scaling, load_sample,
                   resample_to_gsd, scale_image)
from .loop import check_tile, seed_everything
from .report import REPORT_NAME, write_training_report
from .samplers import BoxCropSampler

DEFAULT_BUILDER = {
    "library": "torchvision",
    "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
    "encoder_weights": None,
    "params": {"fpn_channels": 128, "representation_size": 256, "returned_layers": [3, 4],
               "anchor_sizes": [16, 32, 64, 128]},
}


# --------------------------------------------------------------------------------------------
# prediction on in-memory images


def predict_image(model, img, valid, tile, overlap, score_threshold, iou_threshold, max_detections, device,
                  batch_size=4):
    """Boxes of an in-memory scaled image [C, H, W], tiled and merged exactly as :func:`.detect.detect` does.

    Returns (boxes [N, 4] pixels, scores [N], labels [N])."""
    from ..inference.detect import edge_cut_flags, merge_detections
    from ..models.runners import DetectionRunner
    from ..inference.tiling import TileGrid
    c, h, w = img.shape
    grid = TileGrid(0, 0, w, h, tile, overlap)
    runner = DetectionRunner(model, device, score_threshold, iou_threshold, max_detections)
    out_b, out_s, out_l, out_t, out_c = [], [], [], [], []
    seq = [(x, y) for y in grid.ys for x in grid.xs]
    for k0 in range(0, len(seq), batch_size):
        part = seq[k0:k0 + batch_size]
        data = np.zeros((len(part), c, tile, tile), dtype=np.float32)
        vals = np.zeros((len(part), tile, tile), dtype=bool)
        for k, (x, y) in enumerate(part):
            ww, hh = min(tile, w - x), min(tile, h - y)
            data[k, :, :hh, :ww] = img[:, y:y + hh, x:x + ww]
            vals[k, :hh, :ww] = valid[y:y + hh, x:x + ww]
        for k, ((x, y), (boxes, labels, scores)) in enumerate(zip(part, runner(data))):
            if not len(boxes):
                continue
            cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, tile - 1)
            cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, tile - 1)
            ok = vals[k][cy, cx]
            boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
            cut = edge_cut_flags(boxes, tile, (x > 0, y > 0, x + tile < w, y + tile < h))
            out_b.append(boxes + np.array([x, y, x, y], dtype=np.float64))
            out_s.append(scores)
            out_l.append(labels)
            out_t.append(np.full(len(boxes), k0 + k))
            out_c.append(cut)
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes, scores, labels = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)
    keep = merge_detections(boxes, scores, labels, np.concatenate(out_t), np.concatenate(out_c), iou_threshold)
    boxes = boxes[keep]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes, scores[keep], labels[keep]


# --------------------------------------------------------------------------------------------
# training


def resolve_detection_builder(builder, in_channels, n_classes):
    from ..models.architectures import validate_builder
    b = copy.deepcopy(DEFAULT_BUILDER if builder is None else builder)
    b.setdefault("library", "torchvision")
    b["encoder_weights"] = None
    for key, value in (("in_channels", in_channels), ("classes", n_classes)):
        if b.get(key) is None:
            b[key] = value
        elif b[key] != value:
            raise InputError(f"builder.{key} is {b[key]} but the training data need {value}")
    return validate_builder(b, "builder")


def detection_output_metadata(classes, builder):
    """The MLM ``mlm:output`` of a detection package: boxes with a class and a score per object."""
    return [{
        "name": "detections",
        "tasks": [TASKS["detection"]],
        "result": {"shape": [-1, 6], "dim_order": ["box", "xmin_ymin_xmax_ymax_class_score"],
                   "data_type": "float32"},
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


def train_detection(samples, out_dir, *, boxes=None, class_names=("object",), class_colors=None, val_samples=None,
                    bands=None, band_names=None, builder=None, gsd="auto", value_scaling=None, tile_size=256,
                    epochs=20, steps_per_epoch=None, batch_size=4, lr=2e-3, weight_decay=1e-4, seed=0,
                    scale_range=(0.8, 1.25), object_prob=0.7, min_visible=0.4, sample_weights=None, keep="best",
                    device="auto", num_threads=None, progress=None, is_cancelled=None, log=None, name="detection-model",
                    description="", package_tile_size=512, package_overlap=64, score_threshold=None,
                    iou_threshold=None, max_detections=None, weights_dtype="float16", class_field="label",
                    proposals=256, roi_batch=64, augment=None, patience=0):
    """Train a detection network and write a model package (+ ``training_report.json``) to ``out_dir``.

    ``samples``: an image path (with ``boxes``: GeoJSON, VOC .xml or pixel boxes) or a list of
    :class:`DetectionSample` / ``(image, boxes)`` pairs. ``class_names``: the object classes
    (no background). ``val_samples``: images scored after every epoch (precision/recall/AP at
    IoU 0.5); with ``keep="best"`` the epoch of best validation AP is packaged, with
    ``keep="last"`` (or without validation samples) the last epoch. ``gsd``: the model's
    metres per pixel ("auto": the first georeferenced sample's; None: every image as it is);
    images of another known GSD are resampled to it. ``score_threshold``, ``iou_threshold``,
    ``max_detections`` are stored in the package as its defaults. ``sample_weights``: the share
    of training crops taken from each sample (relative numbers, one per sample; default: in
    proportion to the images' areas). ``samples`` may also be a chip folder of
    :func:`.chips.export_training_data` (task detection): its training chips are the samples and
    its validation chips the validation samples. ``augment``: flip, rotate, brightness, contrast,
    noise (see :func:`.train.train_segmentation`). ``patience``: with validation samples, stop
    after that many epochs without a better validation AP (0: never).

    Returns the training report. When ``is_cancelled()`` turns true after an epoch finished,
    that network is written before :class:`Cancelled` is raised.
    """
    t0 = time.time()
    prog = Progress(progress, is_cancelled)
    log = log or (lambda msg: None)
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise MissingDependency(f"PyTorch is not installed ({exc}); run 'make setup'") from exc
    from ..models.architectures import build_model
    from ..models.detection_options import IOU_THRESHOLD, MAX_DETECTIONS, SCORE_THRESHOLD, check_thresholds
    from ..models.runners import device_description, select_device

    from . import chips as chipsets
    if chipsets.is_chip_set(samples):
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
    colors = list(class_colors) if class_colors else [DEFAULT_COLORS[1 + i % (len(DEFAULT_COLORS) - 1)]
                                                      for i in range(k)]
    if len(colors) != k:
        raise InputError(f"class_colors: {len(colors)} colours for {k} classes")
    classes = [ModelClass(i, n, str(c).lstrip("#").upper()) for i, (n, c) in enumerate(zip(class_names, colors))]
    check_tile(tile_size, "tile_size")
    check_tile(package_tile_size, "package_tile_size")
    if not 0 <= package_overlap < package_tile_size // 2:
        raise InputError(f"package_overlap must be in [0, {package_tile_size // 2}); got {package_overlap}")
    if batch_size < 1 or epochs < 1:
        raise InputError("batch_size and epochs must be at least 1")
    if keep not in ("best", "last"):
        raise InputError(f"keep must be 'best' or 'last'; got {keep!r}")
    score_t, iou_t, max_d = check_thresholds(SCORE_THRESHOLD if score_threshold is None else score_threshold,
                                             IOU_THRESHOLD if iou_threshold is None else iou_threshold,
                                             MAX_DETECTIONS if max_detections is None else max_detections)

    # ---- data ---------------------------------------------------------------------------
    if isinstance(samples, (str, os.PathLike, np.ndarray)):
        if boxes is None:
            raise InputError("boxes: give the boxes of the training image (GeoJSON, Pascal VOC .xml or a list)")
        samples = [DetectionSample(samples, boxes)]
    samples = [as_sample(s, i) for i, s in enumerate(samples or [])]
    if not samples:
        raise InputError("samples: give at least one training image with boxes")
    val_samples = [as_sample(s, i) for i, s in enumerate(val_samples or [])]
    prog.message(f"Reading {len(samples)} training and {len(val_samples)} validation image(s)")
    train_items = [load_sample(s, class_names, bands, class_field, f"samples[{i}]") for i, s in enumerate(samples)]
    val_items = [load_sample(s, class_names, bands, class_field, f"val_samples[{i}]")
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
    n_train_boxes = int(sum(len(it.boxes) for it in train_items))
    if n_train_boxes == 0:
        raise InputError("No boxes fall in the training images: check that the boxes overlap the images and are "
                         "in the image's CRS (GeoJSON) or pixels (VOC, lists)")
    if value_scaling is None:
        pix = np.concatenate([it.img[:, it.valid] for it in train_items], axis=1)
        value_scaling = compute_value_scaling(pix[:, None, :], np.ones((1, pix.shape[1]), dtype=bool), seed=seed)
        del pix
    for it in train_items + val_items:
        scale_image(it.img, it.valid, value_scaling)

    # ---- model --------------------------------------------------------------------------
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        dev = select_device(device)
        builder = resolve_detection_builder(builder, n_bands, k)
        # channels_last: much faster (depthwise) convolutions on CPU (oneDNN) and on tensor-core GPUs
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        model = build_model(builder).to(dev).to(memory_format=fmt)
        set_training_sizes(model, proposals, roi_batch)
        if steps_per_epoch is None:
            area = sum(it.valid.size for it in train_items)
            steps_per_epoch = max(4, int(math.ceil(area / (tile_size * tile_size) / batch_size)))
        steps_per_epoch = int(steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=min(0.3, max(0.05, 2.0 / epochs)),
                                                    div_factor=10.0, final_div_factor=100.0)
        sampler = BoxCropSampler(train_items, tile_size, rng, scale_range=scale_range, object_prob=object_prob,
                                 min_visible=min_visible, weights=sample_weights, **augment)
        log(f"Training {builder['architecture']} on {device_description(dev)}: {epochs} epochs x {steps_per_epoch} "
            f"steps x {batch_size} crops of {tile_size} px; {n_train_boxes} training boxes in {len(train_items)} "
            f"image(s), {sum(len(it.boxes) for it in val_items)} validation boxes")
        report = {
            "name": name, "task": "detection", "out_dir": os.fspath(out_dir), "classes": class_names,
            "bands": band_names, "builder": builder, "value_scaling": value_scaling, "gsd": gsd, "seed": seed,
            "device": device_description(dev), "threads": torch.get_num_threads(), "tile_size": tile_size,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "epochs_planned": epochs,
            "steps_per_epoch": steps_per_epoch, "keep": keep if val_items else "last",
            "sample_shares": [round(float(v), 4) for v in sampler.p],
            "thresholds": {"score_threshold": score_t, "iou_threshold": iou_t, "max_detections": max_d},
            "train_images": [{"name": it.name, "width": it.img.shape[2], "height": it.img.shape[1],
                              "boxes": int(len(it.boxes))} for it in train_items],
            "val_images": [{"name": it.name, "width": it.img.shape[2], "height": it.img.shape[1],
                            "boxes": int(len(it.boxes))} for it in val_items],
            "crops_seen": 0, "train_loss": [], "loss_parts": [], "val": [], "epochs_run": 0, "best_epoch": None,
            "best": None, "cancelled": False, "seconds": None, "augment": augment, "patience": patience,
            "stopped_early": False,
        }
        best = {"key": None, "state": None, "epoch": None, "metrics": None}

        def validate_now():
            preds, truths = [], []
            for it in val_items:
                b, s, lab = predict_image(model, it.img, it.valid, tile_size, tile_size // 8, min(0.05, score_t),
                                          iou_t, max_d, dev)
                preds.append((b, s, lab))
                truths.append((it.boxes, it.labels))
            model.train()
            return detection_metrics(preds, truths, iou=0.5, score_threshold=score_t)

        def finish(cancelled):
            if best["state"] is None:
                return None
            model.load_state_dict(best["state"])
            model.eval()
            extra = {
                "rs_deep:score_threshold": score_t, "rs_deep:iou_threshold": iou_t, "rs_deep:max_detections": max_d,
                "mlm:output": detection_output_metadata(classes, builder),
                "rs_deep:training": {"best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": seed,
                                     "val": best["metrics"], "train_boxes": n_train_boxes}}
            save_package(model.cpu(), out_dir, weights_dtype=weights_dtype, name=name, task="detection",
                         bands=band_names, classes=classes, builder=builder, tile_size=package_tile_size,
                         overlap=package_overlap, gsd=gsd, value_scaling=value_scaling, description=description,
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
                losses, parts = [], {}
                for step in range(steps_per_epoch):
                    train_prog.check()
                    crops = sampler.batch(batch_size)
                    images = [torch.from_numpy(img).to(dev) for img, _, _ in crops]
                    targets = [{"boxes": torch.from_numpy(b).reshape(-1, 4).to(dev),
                                "labels": torch.from_numpy(lab.astype(np.int64) + 1).to(dev)} for _, b, lab in crops]
                    loss_dict = model(images, targets)
                    loss = sum(loss_dict.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 10.0)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    for kk, v in loss_dict.items():
                        parts.setdefault(kk, []).append(float(v.detach()))
                    report["crops_seen"] += batch_size
                    train_prog.update(((epoch - 1) * steps_per_epoch + step + 1) / total_steps)
                train_loss = float(np.mean(losses))
                report["train_loss"].append(round(train_loss, 5))
                report["loss_parts"].append({kk: round(float(np.mean(v)), 5) for kk, v in parts.items()})
                report["epochs_run"] = epoch
                msg = f"Epoch {epoch}/{epochs}: loss {train_loss:.4f}"
                if val_items:
                    metrics = validate_now()
                    report["val"].append({kk: (round(v, 5) if isinstance(v, float) else v)
                                          for kk, v in metrics.items()})
                    key = (metrics["ap"], metrics["f1"]) if keep == "best" else (epoch,)
                    msg += (f", validation AP50 {metrics['ap']:.3f}, precision {metrics['precision']:.3f}, recall "
                            f"{metrics['recall']:.3f} (score >= {score_t:g})")
                else:
                    metrics, key = None, (epoch,)
                if best["key"] is None or key > best["key"]:
                    best.update(key=key, epoch=epoch, metrics=metrics,
                                state={kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()})
                    since_best = 0
                else:
                    since_best += 1
                log(msg)
                train_prog.update(epoch / epochs, msg)
                if val_items and keep == "best" and patience and since_best >= patience and epoch < epochs:
                    report["stopped_early"] = True
                    log(f"Stopping early: no better validation AP for {patience} epochs")
                    break
        except Cancelled:
            saved = finish(cancelled=True)
            if saved is not None:
                raise Cancelled(f"Training was cancelled after {report['epochs_run']} epoch(s); the network of "
                                f"epoch {best['epoch']} was written to {out_dir}") from None
            raise Cancelled("Training was cancelled before the first epoch finished; nothing was written.") from None
        prog.sub(0.97, 1.0).update(0.0, "Writing the model package")
        result = finish(cancelled=False)
        prog.update(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if num_threads:
            torch.set_num_threads(old_threads)


__all__ = ["train_detection", "predict_image", "resolve_detection_builder", "detection_output_metadata",
           "set_training_sizes", "DEFAULT_BUILDER"]
