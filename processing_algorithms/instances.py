"""rs_deep:segment_instances — instance segmentation: one polygon per object, with an instance segmentation model
package (Mask R-CNN)."""
from qgis.core import QgsFeature, QgsFeatureSink, QgsGeometry, QgsProcessing, QgsProcessingParameterFeatureSink, \
    QgsWkbTypes

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.tasks import INSTANCE_SEGMENTATION
from .base import FeedbackBridge, RSDeepAlgorithm
from .outputs import RunOutputs
from .params import (INPUT, IOU_THRESHOLD, MAX_DETECTIONS, RESOLUTION_HELP, SCORE_THRESHOLD, add, add_input_block,
                     add_max_pixels, add_resolution, add_thresholds, add_tiling_block, help_string, read_area,
                     read_model, read_raster, read_resolution, read_thresholds, read_tiling)
from .sinks import FeatureSinks
from .styles import StyleObjects

OUTPUT = "OUTPUT"

HELP = {
    "INPUT": "Raster layer to search (GeoTIFF, VRT, WMS/XYZ...). Rasters of any size are processed tile by tile; "
             "non-file layers are first read through QGIS at the model's ground sampling distance.",
    "MODEL": "An instance segmentation model package (a Mask R-CNN trained with rs_deep:train, TASK "
             "instance_segmentation): a folder or .zip holding model.json and model.safetensors, or its model.json.",
    "BANDS": "Raster bands to feed the model, in the model's order. Leave empty when the raster has exactly the "
             "bands the model needs (an alpha band is ignored).",
    "EXTENT": "Search only this area (default: the whole layer). Objects are clipped to it.",
    "OUTPUT": "One polygon per object (its outline, from its mask), in the layer's CRS, with class (name), "
              "class_id, score (0..1) and area_m2.",
    "RESOLUTION": RESOLUTION_HELP,
    "TILE_SIZE": "Tile size in pixels at the model's GSD (a multiple of 32); 0 = the package's value. Objects must "
                 "fit comfortably in one tile.",
    "OVERLAP": "Overlap of neighbouring tiles in pixels; -1 = the package's value. Each object is taken from the one "
               "tile whose middle part holds its centre, whole when it is smaller than the overlap: the overlap "
               "should exceed the size of the largest objects.",
    "BATCH_SIZE": "Tiles per forward pass; 0 = automatic (larger on a GPU).",
    "DEVICE": "auto picks a CUDA GPU, then Apple MPS, then the CPU.",
    "SCORE_THRESHOLD": "Objects scoring below this (0..1) are dropped; -1 = the package's value.",
    "IOU_THRESHOLD": "Polygons of one class overlapping by more than this intersection over union (0..1) are the same "
                     "object: only the best is kept; -1 = the package's value.",
    "MAX_DETECTIONS": "Most objects kept per tile; 0 = the package's value.",
}


class SegmentInstancesAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = INSTANCE_SEGMENTATION.algorithm_name, INSTANCE_SEGMENTATION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Finds objects (buildings, trees, vehicles...) in a raster layer with an instance "
                           "segmentation model package (Mask R-CNN) and returns one polygon per object, its outline, "
                           "with its class and score. Objects cut by tile borders come out once.", HELP,
                           {OUTPUT: "Objects (polygons)", SCORE_THRESHOLD: "Score threshold",
                            IOU_THRESHOLD: "Overlap (IoU) threshold", MAX_DETECTIONS: "Maximum objects per tile"})

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Objects (polygons)", QgsProcessing.TypeVectorPolygon),
            HELP)
        add_resolution(self)
        add_tiling_block(self, help=HELP)
        add_thresholds(self, HELP, "polygons")
        add_max_pixels(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.instances import segment_instances
        raster = read_raster(self, parameters, INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback)
        pkg = read_model(self, parameters, context, feedback, INSTANCE_SEGMENTATION)
        read_area(self, parameters, context, raster)
        tiling = read_tiling(self, parameters, context)
        gsd = read_resolution(self, parameters, context)
        thresholds = read_thresholds(self, parameters, context)
        bridge = FeedbackBridge(feedback, 0, 95)
        raster.fetch(gsd or pkg.gsd, context, feedback)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = segment_instances(raster.source, pkg, bands=raster.bands, bounds=raster.bounds,
                                       max_pixels=raster.max_pixels, gsd=gsd, **tiling, **thresholds,
                                       **bridge.callbacks)
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
