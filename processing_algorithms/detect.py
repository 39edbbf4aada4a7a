"""rs_deep:detect — object detection in a raster layer with a detection model package."""
from qgis.core import (QgsFeature, QgsFeatureSink, QgsGeometry, QgsPointXY, QgsProcessing,
                       QgsProcessingParameterFeatureSink, QgsRectangle, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.tasks import DETECTION
from .base import RSDeepAlgorithm, bundled_models
from .outputs import RunOutputs
from .params import (RESOLUTION_HELP, OBJECT_HELP, THRESHOLD_LABELS, add, add_cluster,
                     add_input_block, add_max_pixels, add_resolution, add_thresholds, add_tiling_block, help_string,
                     read_cluster, read_object_run)
from .sinks import FeatureSinks
from .styles import StyleObjects

OUTPUT = "OUTPUT"
OUTPUT_CENTROIDS = "OUTPUT_CENTROIDS"


HELP = {
    **OBJECT_HELP,  # SCORE_THRESHOLD: its own below
    "MODEL": "A detection model package: a folder or .zip holding model.json and model.safetensors, its "
             "model.json, or the name of a bundled model.",
    "EXTENT": "Search only this area (default: the whole layer). Objects are clipped to it.",
    "OUTPUT": "One rectangle per object, in the layer's CRS, with class_id, class_name and score (0..1). An oriented "
              "model (CenterNetOBB, or a YOLOv8/11-OBB ONNX model: Deepness det_type YOLO_Ultralytics_obb) gives "
              "rotated rectangles with also angle (the direction of the long side in "
              "degrees clockwise from grid north, 0..180), width (short side) and length (long side) in the layer's "
              "units.",
    "OUTPUT_CENTROIDS": "Optional: the centre point of each object, with the same attributes.",
    "RESOLUTION": RESOLUTION_HELP,
    "TILE_SIZE": "Tile size in pixels at the model's GSD (a multiple of 32); 0 = the package's value. Objects must "
                 "fit comfortably in one tile.",
    "OVERLAP": "Overlap of neighbouring tiles in pixels; -1 = the package's value. Objects cut by a tile edge are "
               "taken from the neighbouring tile that holds them whole, so the overlap should exceed the size of "
               "the largest objects.",
    "SCORE_THRESHOLD": "Objects scoring below this (0..1) are dropped; -1 = the package's value. Lower it to find "
                       "more objects (and more false alarms).",
    "IOU_THRESHOLD": "Boxes of one class overlapping by more than this intersection over union (0..1) are the same "
                     "object: only the best is kept (non-maximum suppression; rotated rectangles' IoU for an "
                     "oriented model); -1 = the package's value.",
}


class DetectAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = DETECTION.algorithm_name, DETECTION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Finds objects (trees, vehicles, buildings...) in a raster layer with a deep-learning "
                           "detection model package and returns one rectangle per object, outlined by class, with its "
                           f"class and score. Bundled models: {', '.join(bundled_models()) or 'none'}.", HELP,
                           {OUTPUT: "Objects (boxes)", OUTPUT_CENTROIDS: "Object centres",
                            **THRESHOLD_LABELS})

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Objects (boxes)", QgsProcessing.TypeVectorPolygon), HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT_CENTROIDS, "Object centres", QgsProcessing.TypeVectorPoint,
                                                    optional=True, createByDefault=False), HELP)
        add_resolution(self)
        add_tiling_block(self, help=HELP)
        add_thresholds(self, HELP, "boxes")
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.detect import detect
        outputs = RunOutputs(self, parameters, context, feedback)
        raster, pkg, run = read_object_run(self, parameters, context, feedback, DETECTION)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = detect(raster.source, pkg, **run, **read_cluster(self, parameters, context))
            for w in result.warnings:
                push_warning(feedback, w)
            feedback.pushInfo(f"{len(result)} objects from {result.tiles_run}/{result.tiles} tiles on "
                              f"{result.device} in {result.seconds:.1f} s (score >= {result.score_threshold:g}, IoU "
                              f"{result.iou_threshold:g}, at most {result.max_detections} per tile)")
            for cname, count in sorted(result.class_counts().items()):
                feedback.pushInfo(f"  {cname}: {count}")
            wanted = [(OUTPUT, QgsWkbTypes.Polygon)]
            if parameters.get(OUTPUT_CENTROIDS) not in (None, ""):
                wanted.append((OUTPUT_CENTROIDS, QgsWkbTypes.Point))
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                for name, wkb in wanted:
                    self._write(sinks, name, wkb, result, pkg, raster.crs)
        return sinks.results

    @staticmethod
    def _write(sinks, name, wkb, result, pkg, crs):
        """The objects as boxes (``wkb`` Polygon) or centres (Point) into the sink output ``name``."""
        oriented = bool(getattr(pkg, "oriented", False))
        extra = (("angle", "double"), ("width", "double"), ("length", "double")) if oriented else ()
        fields = make_fields(("class_id", "int"), ("class_name", "string"), ("score", "double"), *extra)
        sink = sinks.create(name, fields, wkb, crs, style=lambda: StyleObjects(pkg.classes),
                            required=(name == OUTPUT))
        if sink is None:
            return
        for d in result.detections:
            feat = QgsFeature(fields)
            if wkb == QgsWkbTypes.Polygon and d.polygon is not None:  # the rotated rectangle
                feat.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in d.ring]]))
            elif wkb == QgsWkbTypes.Polygon:
                feat.setGeometry(QgsGeometry.fromRect(QgsRectangle(d.xmin, d.ymin, d.xmax, d.ymax)))
            else:
                cx, cy = d.centroid
                feat.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(cx, cy)))
            values = [d.class_id, d.class_name, round(d.score, 4)]
            if oriented:
                values += [round(d.angle, 3), round(d.width, 4), round(d.length, 4)]
            feat.setAttributes(values)
            sink.addFeature(feat, QgsFeatureSink.FastInsert)
