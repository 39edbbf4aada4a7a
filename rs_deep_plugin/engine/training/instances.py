"""Training an instance segmentation network (Mask R-CNN) from label polygons (QGIS-free).

Detection training (:mod:`.detection`) with a mask per object: each label polygon is one object (its class from the
``class_field`` property, or the one class), rasterised onto the image grid once (:func:`.data.instance_pixel_masks`);
the crops carry the objects' masks and the boxes enclosing them (:class:`.samplers.BoxCropSampler`); the network is
the allow-listed Mask R-CNN of :data:`.builders.DEFAULT_BUILDERS` (``maskrcnn_mobilenet_v3_large_fpn``, built
offline). Validation images are run tile by tile as :func:`..inference.instances.segment_instances` runs a raster
(an object is taken from the tile whose core holds its centre, doubles merged by polygon IoU) and scored by
precision, recall, F1 and AP at mask (polygon) IoU 0.5 (:func:`.metrics.detection_metrics` with ``polygons=``).
"""
import numpy as np

from ..geo.rotated import polygon_iou
from ..geo.vectorize import mask_polygon
from ..models.package import TASKS
from .detection import DetectionTask, detection_output_metadata, image_tiles, train_detection


def predict_instances(model, img, valid, tile, overlap, score_threshold, iou_threshold, max_detections, device,
                      batch_size=4):
    """The objects of an in-memory scaled image [C, H, W], tiled and merged as
    :func:`..inference.instances.segment_instances` does: (polygons in pixel coordinates, scores [N], labels [N])."""
    from affine import Affine
    from ..inference.detect import box_centres
    from ..inference.instances import merge_instances
    from ..models.runners import InstanceRunner
    runner = InstanceRunner(model, device, score_threshold, iou_threshold, max_detections)
    polys, scores, labels, tiles = [], [], [], []
    for k0, part, data, vals, grid in image_tiles(img, valid, tile, overlap, batch_size):
        for k, ((x, y), (boxes, labs, scs, masks)) in enumerate(zip(part, runner(data))):
            mx, my = box_centres(boxes)
            cx0, cy0, cx1, cy1 = grid.core(x, y)
            ok = vals[k][np.clip(my.astype(np.int64), 0, tile - 1), np.clip(mx.astype(np.int64), 0, tile - 1)]
            ok &= (x + mx >= cx0) & (x + mx < cx1) & (y + my >= cy0) & (y + my < cy1)
            for j in np.flatnonzero(ok):
                poly = mask_polygon(masks[j], Affine.translation(x, y))
                if poly is not None:
                    polys.append(poly)
                    scores.append(scs[j])
                    labels.append(labs[j])
                    tiles.append(k0 + k)
    keep = merge_instances(polys, scores, labels, tiles, iou_threshold)
    return [polys[k] for k in keep], np.asarray(scores)[keep], np.asarray(labels, dtype=np.int64)[keep]


def truth_polygons(item):
    """(polygons in pixel coordinates, labels) of a loaded instance sample's objects (its ``instances`` raster)."""
    from affine import Affine
    polys, labels = [], []
    for k in range(len(item.labels)):
        poly = mask_polygon(item.instances == k + 1, Affine.identity())
        if poly is not None:
            polys.append(poly)
            labels.append(int(item.labels[k]))
    return polys, np.asarray(labels, dtype=np.int64)


def instance_output_metadata(classes, builder):
    """The MLM ``mlm:output`` of an instance segmentation package: per object a box, a class, a score and a mask."""
    out = detection_output_metadata(classes, builder)
    out[0].update(name="instances", tasks=[TASKS["instance_segmentation"]],
                  result={"shape": [-1, 6], "dim_order": ["object", "xmin_ymin_xmax_ymax_class_score"],
                          "data_type": "float32", "rs_deep:masks": "one probability mask per object, its tile's size"})
    return out


class InstanceTask(DetectionTask):
    """Instance segmentation: crops with their objects' boxes and masks; validated tile by tile as the engine runs
    a raster, the best epoch by validation AP at mask IoU 0.5 (ties broken by F1)."""

    task = "instance_segmentation"
    masks = True

    def training_loss(self, model, batch, device, memory_format):
        import torch
        images = [torch.from_numpy(img).to(device) for img, _, _, _ in batch]
        targets = [{"boxes": torch.from_numpy(b).reshape(-1, 4).to(device),
                    "labels": torch.from_numpy(lab.astype(np.int64) + 1).to(device),
                    "masks": torch.from_numpy(m.astype(np.uint8)).to(device)} for _, b, lab, m in batch]
        loss_dict = model(images, targets)
        return sum(loss_dict.values()), loss_dict

    def predict(self, model, item, device):
        return predict_instances(model, item.img, item.valid, self.tile_size, self.tile_size // 8,
                                 min(0.05, self.score_threshold), self.iou_threshold, min(self.max_detections, 100),
                                 device)

    def truth(self, item):
        return truth_polygons(item)

    def matching(self):
        return {"polygons": polygon_iou}

    def epoch_message(self, metrics, val_loss, best):
        return " (masks)" + super().epoch_message(metrics, val_loss, best)

    def package_extra(self, best_metrics=None):
        return dict(super().package_extra(best_metrics),
                    **{"mlm:output": instance_output_metadata(self.classes, self.builder)})


def train_instances(samples, out_dir, *, labels=None, class_names=("object",), **options):
    """Train a Mask R-CNN and write an instance segmentation package (+ ``training_report.json``) to ``out_dir``.

    ``samples``: an image path (with ``labels``: a GeoJSON file of polygons in the image's CRS, or rows
    ``(shapely polygon[, class])`` in pixels) or a list of :class:`.data.DetectionSample` whose ``boxes`` are such
    polygons; each polygon is one object. The other options are those of :func:`.detection.train_detection`
    (default network: :data:`.builders.DEFAULT_BUILDERS`'s Mask R-CNN, name "instance-model")."""
    options.setdefault("name", "instance-model")
    return train_detection(samples, out_dir, boxes=labels, class_names=class_names, task_type=InstanceTask,
                           **options)


__all__ = ["train_instances", "InstanceTask", "predict_instances", "truth_polygons", "instance_output_metadata"]
