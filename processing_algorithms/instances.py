"""rs_deep:segment_instances — instance segmentation: one polygon per object, with an instance segmentation model
package (Mask R-CNN, or a YOLOv8/11-seg ONNX model)."""
from qgis.core import QgsFeature, QgsFeatureSink, QgsGeometry, QgsProcessing, QgsProcessingParameterFeatureSink, \
    QgsWkbTypes

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.tasks import INSTANCE_SEGMENTATION
from .base import RSDeepAlgorithm
from .outputs import RunOutputs
from .params import (RESOLUTION_HELP, OBJECT_HELP, THRESHOLD_LABELS, add, add_cluster, add_input_block,
                     add_max_pixels, add_resolution, add_thresholds, add_tiling_block, help_string, read_cluster,
                     read_object_run)
from .sinks import FeatureSinks
from .styles import StyleObjects

OUTPUT = "OUTPUT"

HELP = {
    **OBJECT_HELP,
    "MODEL": "An instance segmentation model package (a Mask R-CNN trained with rs_deep:train, TASK "
             "instance_segmentation): a folder or .zip holding model.json and model.safetensors, or its model.json; "
             "or a YOLOv8/11-seg ONNX model with Deepness metadata (det_type YOLO_Ultralytics_segmentation).",
    "OUTPUT": "One polygon per object (its outline, from its mask), in the layer's CRS, with class (name), "
              "class_id, score (0..1) and area_m2.",
    "RESOLUTION": RESOLUTION_HELP,
    "TILE_SIZE": "Tile size in pixels at the model's GSD (a multiple of 32); 0 = the package's value. Objects must "
                 "fit comfortably in one tile.",
    "OVERLAP": "Overlap of neighbouring tiles in pixels; -1 = the package's value. Each object is taken from the one "
               "tile whose middle part holds its centre, whole when it is smaller than the overlap: the overlap "
               "should exceed the size of the largest objects.",
    "IOU_THRESHOLD": "Polygons of one class overlapping by more than this intersection over union (0..1) are the same "
                     "object: only the best is kept; -1 = the package's value.",
    "EXTENT": "Search only this area (default: the whole layer). Objects are clipped to it.",
}


class SegmentInstancesAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = INSTANCE_SEGMENTATION.algorithm_name, INSTANCE_SEGMENTATION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Finds objects (buildings, trees, vehicles...) in a raster layer with an instance "
                           "segmentation model package (Mask R-CNN, or a YOLOv8/11-seg ONNX model) and returns one "
                           "polygon per object, its outline, with its class and score. Objects cut by tile borders "
                           "come out once.", HELP,
                           {OUTPUT: "Objects (polygons)", **THRESHOLD_LABELS})

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Objects (polygons)", QgsProcessing.TypeVectorPolygon),
            HELP)
        add_resolution(self)
        add_tiling_block(self, help=HELP)
        add_thresholds(self, HELP, "polygons")
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.instances import segment_instances
        outputs = RunOutputs(self, parameters, context, feedback)
        raster, pkg, run = read_object_run(self, parameters, context, feedback, INSTANCE_SEGMENTATION)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = segment_instances(raster.source, pkg, **run, **read_cluster(self, parameters, context))
            for w in result.warnings:
                push_warning(feedback, w)
            feedback.pushInfo(f"{len(result)} objects ({result.raw_instances} from the tiles before merging) from "
                              f"{result.tiles_run}/{result.tiles} tiles on {result.device} in {result.seconds:.1f} s "
                              f"(score >= {result.score_threshold:g}, polygon IoU {result.iou_threshold:g}, at most "
                              f"{result.max_detections} per tile)")
            for cname, count in sorted(result.class_counts().items()):
                feedback.pushInfo(f"  {cname}: {count}")
            fields = make_fields(("class", "string"), ("class_id", "int"), ("score", "double"), ("area_m2", "double"))
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                sink = sinks.create(OUTPUT, fields, QgsWkbTypes.Polygon, raster.crs,
                                    style=lambda: StyleObjects(pkg.classes), required=True)
                for d in result.instances:
                    feat = QgsFeature(fields)
                    feat.setGeometry(QgsGeometry.fromWkt(d.polygon.wkt))
                    feat.setAttributes([d.class_name, d.class_id, round(d.score, 4), round(d.area_m2, 2)])
                    sink.addFeature(feat, QgsFeatureSink.FastInsert)
        return sinks.results
