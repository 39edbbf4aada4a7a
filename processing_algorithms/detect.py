"""rs_deep:detect — object detection in a raster layer with a detection model package."""
from qgis.core import (QgsCategorizedSymbolRenderer, QgsFeature, QgsFeatureSink, QgsFillSymbol, QgsGeometry,
                       QgsMarkerSymbol, QgsPointXY, QgsProcessing, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterNumber, QgsRectangle,
                       QgsRendererCategory, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.tasks import DETECTION
from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .outputs import RunOutputs
from .params import (INPUT, RESOLUTION_HELP, add, add_input_block, add_max_pixels, add_resolution, add_tiling_block,
                     help_string, optional_number, read_area, read_model, read_raster, read_resolution, read_tiling,
                     add_cluster, read_cluster)
from .sinks import FeatureSinks

OUTPUT = "OUTPUT"
OUTPUT_CENTROIDS = "OUTPUT_CENTROIDS"
SCORE_THRESHOLD = "SCORE_THRESHOLD"
IOU_THRESHOLD = "IOU_THRESHOLD"
MAX_DETECTIONS = "MAX_DETECTIONS"


def outlined_renderer(classes, points=False):
    """Boxes drawn as outlines (the image stays visible), one colour per class; points as circles."""
    cats = []
    for c in classes:
        if points:
            sym = QgsMarkerSymbol.createSimple({"name": "circle", "color": "#" + c.color, "size": "2",
                                                "outline_color": "#000000", "outline_width": "0.2"})
        else:
            sym = QgsFillSymbol.createSimple({"style": "no", "outline_color": "#" + c.color, "outline_width": "0.5",
                                              "joinstyle": "miter"})
        cats.append(QgsRendererCategory(c.value, sym, c.name))
    return QgsCategorizedSymbolRenderer("class_id", cats)


class _StyleDetections(QgsProcessingLayerPostProcessorInterface):
    """Styles a result layer by class once Processing has loaded it."""

    keep = []  # Processing does not own post-processors: keep them alive

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        _StyleDetections.keep.append(self)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        points = layer.geometryType() == QgsWkbTypes.PointGeometry
        layer.setRenderer(outlined_renderer(self.classes, points=points))
        layer.triggerRepaint()


HELP = {
    "INPUT": "Raster layer to search (GeoTIFF, VRT, WMS/XYZ...). Rasters of any size are processed tile by tile; "
             "non-file layers are first read through QGIS at the model's ground sampling distance.",
    "MODEL": "A detection model package: a folder or .zip holding model.json and model.safetensors, its "
             "model.json, or the name of a bundled model.",
    "BANDS": "Raster bands to feed the model, in the model's order. Leave empty when the raster has exactly the "
             "bands the model needs (an alpha band is ignored).",
    "EXTENT": "Search only this area (default: the whole layer). Objects are clipped to it.",
    "OUTPUT": "One rectangle per object, in the layer's CRS, with class_id, class_name and score (0..1). An oriented "
              "model (CenterNetOBB) gives rotated rectangles with also angle (the direction of the long side in "
              "degrees clockwise from grid north, 0..180), width (short side) and length (long side) in the layer's "
              "units.",
    "OUTPUT_CENTROIDS": "Optional: the centre point of each object, with the same attributes.",
    "RESOLUTION": RESOLUTION_HELP,
    "TILE_SIZE": "Tile size in pixels at the model's GSD (a multiple of 32); 0 = the package's value. Objects must "
                 "fit comfortably in one tile.",
    "OVERLAP": "Overlap of neighbouring tiles in pixels; -1 = the package's value. Objects cut by a tile edge are "
               "taken from the neighbouring tile that holds them whole, so the overlap should exceed the size of "
               "the largest objects.",
    "BATCH_SIZE": "Tiles per forward pass; 0 = automatic (larger on a GPU).",
    "DEVICE": "auto picks a CUDA GPU, then Apple MPS, then the CPU.",
    "SCORE_THRESHOLD": "Objects scoring below this (0..1) are dropped; -1 = the package's value. Lower it to find "
                       "more objects (and more false alarms).",
    "IOU_THRESHOLD": "Boxes of one class overlapping by more than this intersection over union (0..1) are the same "
                     "object: only the best is kept (non-maximum suppression; rotated rectangles' IoU for an "
                     "oriented model); -1 = the package's value.",
    "MAX_DETECTIONS": "Most objects kept per tile; 0 = the package's value.",
}


class DetectAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = DETECTION.algorithm_name, DETECTION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Finds objects (trees, vehicles, buildings...) in a raster layer with a deep-learning "
                           "detection model package and returns one rectangle per object, outlined by class, with its "
                           f"class and score. Bundled models: {', '.join(bundled_models()) or 'none'}.", HELP,
                           {OUTPUT: "Objects (boxes)", OUTPUT_CENTROIDS: "Object centres",
                            SCORE_THRESHOLD: "Score threshold", IOU_THRESHOLD: "Overlap (IoU) threshold",
                            MAX_DETECTIONS: "Maximum objects per tile"})

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Objects (boxes)", QgsProcessing.TypeVectorPolygon), HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT_CENTROIDS, "Object centres", QgsProcessing.TypeVectorPoint,
                                                    optional=True, createByDefault=False), HELP)
        add_resolution(self)
        add_tiling_block(self, help=HELP)
        double, integer = QgsProcessingParameterNumber.Double, QgsProcessingParameterNumber.Integer
        add(self, QgsProcessingParameterNumber(SCORE_THRESHOLD, "Score threshold (0..1; -1 = package)", double, -1,
                                               optional=True, minValue=-1, maxValue=1), HELP, advanced=True)
        add(self, QgsProcessingParameterNumber(IOU_THRESHOLD, "Overlap (IoU) threshold for merging boxes (0..1; -1 = "
                                               "package)", double, -1, optional=True, minValue=-1, maxValue=1),
            HELP, advanced=True)
        add(self, QgsProcessingParameterNumber(MAX_DETECTIONS, "Maximum objects per tile (0 = package)", integer, 0,
                                               optional=True, minValue=0), HELP, advanced=True)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.detect import detect
        raster = read_raster(self, parameters, INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback)
        pkg = read_model(self, parameters, context, feedback, DETECTION)
        read_area(self, parameters, context, raster)
        tiling = read_tiling(self, parameters, context)
        gsd = read_resolution(self, parameters, context)
        thresholds = dict(score_threshold=optional_number(self, parameters, SCORE_THRESHOLD, context, -1),
                          iou_threshold=optional_number(self, parameters, IOU_THRESHOLD, context, -1),
                          max_detections=optional_number(self, parameters, MAX_DETECTIONS, context, 0, integer=True))
        bridge = FeedbackBridge(feedback, 0, 95)
        raster.fetch(gsd or pkg.gsd, context, feedback)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = detect(raster.source, pkg, bands=raster.bands, bounds=raster.bounds, max_pixels=raster.max_pixels,
                            gsd=gsd, **tiling, **thresholds, **bridge.callbacks,
                            **read_cluster(self, parameters, context))
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
        sink = sinks.create(name, fields, wkb, crs, style=lambda: _StyleDetections(pkg.classes),
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
