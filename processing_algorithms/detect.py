"""rs_deep:detect — object detection in a raster layer with a detection model package."""
from qgis.core import (QgsCategorizedSymbolRenderer, QgsFeature, QgsFeatureSink, QgsFillSymbol,
                       QgsGeometry, QgsMarkerSymbol, QgsPointXY, QgsProcessing,
                       QgsProcessingException, QgsProcessingLayerPostProcessorInterface, QgsProcessingParameterBand,
                       QgsProcessingParameterDefinition, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsRectangle, QgsRendererCategory, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from .base import (DEVICES, FeedbackBridge, NamedEnum, RasterInput, RSDeepAlgorithm, bundled_models,
                   export_raster_layer, layer_bounds, load_model_package, max_pixels_parameter, max_pixels_value,
                   raster_input, require_dependencies)
from .outputs import RunOutputs
from .sinks import FeatureSinks


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
    "OUTPUT": "One rectangle per object, in the layer's CRS, with class_id, class_name and score (0..1).",
    "OUTPUT_CENTROIDS": "Optional: the centre point of each object, with the same attributes.",
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
                     "object: only the best is kept (non-maximum suppression); -1 = the package's value.",
    "MAX_DETECTIONS": "Most objects kept per tile; 0 = the package's value.",
}


class DetectAlgorithm(RSDeepAlgorithm):
    INPUT = "INPUT"
    MODEL = "MODEL"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    OUTPUT = "OUTPUT"
    OUTPUT_CENTROIDS = "OUTPUT_CENTROIDS"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    BATCH_SIZE = "BATCH_SIZE"
    DEVICE = "DEVICE"
    SCORE_THRESHOLD = "SCORE_THRESHOLD"
    IOU_THRESHOLD = "IOU_THRESHOLD"
    MAX_DETECTIONS = "MAX_DETECTIONS"

    def name(self):
        return "detect"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Object detection"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        labels = {
            "INPUT": "Input raster", "MODEL": "Model package", "BANDS": "Bands", "EXTENT": "Extent",
            "OUTPUT": "Objects (boxes)", "OUTPUT_CENTROIDS": "Object centres", "TILE_SIZE": "Tile size",
            "OVERLAP": "Tile overlap", "BATCH_SIZE": "Batch size", "DEVICE": "Device",
            "SCORE_THRESHOLD": "Score threshold", "IOU_THRESHOLD": "Overlap (IoU) threshold",
            "MAX_DETECTIONS": "Maximum objects per tile",
        }
        parts = ["Finds objects (trees, vehicles, buildings...) in a raster layer with a deep-learning detection "
                 "model package and returns one rectangle per object, outlined by class, with its class and "
                 f"score. Bundled models: {models}.<br><br>"]
        parts += [f"<b>{labels[k]}</b>: {v}<br>" for k, v in HELP.items()]
        return "".join(parts)

    def _add(self, param, advanced=False):
        if hasattr(param, "setHelp"):
            param.setHelp(HELP[param.name()])
        if advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(param)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self._add(RasterInput(self.INPUT, "Input raster"))
        self._add(QgsProcessingParameterFile(self.MODEL, "Model package (folder, .zip, model.json or bundled name)",
                                             behavior=QgsProcessingParameterFile.Folder, optional=False))
        self._add(QgsProcessingParameterBand(self.BANDS, "Bands (in the model's order)", None, self.INPUT,
                                             optional=True, allowMultiple=True))
        self._add(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True))
        self._add(QgsProcessingParameterFeatureSink(self.OUTPUT, "Objects (boxes)", QgsProcessing.TypeVectorPolygon))
        self._add(QgsProcessingParameterFeatureSink(self.OUTPUT_CENTROIDS, "Object centres",
                                                    QgsProcessing.TypeVectorPoint, optional=True,
                                                    createByDefault=False))
        self._add(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size (px at the model's GSD; 0 = package)",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
                  advanced=True)
        self._add(QgsProcessingParameterNumber(self.OVERLAP, "Tile overlap (px; -1 = package)",
                                               QgsProcessingParameterNumber.Integer, -1, optional=True, minValue=-1),
                  advanced=True)
        self._add(QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size (0 = auto)",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
                  advanced=True)
        self._add(NamedEnum(self.DEVICE, "Device", DEVICES, defaultValue=0), advanced=True)
        self._add(QgsProcessingParameterNumber(self.SCORE_THRESHOLD, "Score threshold (0..1; -1 = package)",
                                               QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1,
                                               maxValue=1), advanced=True)
        self._add(QgsProcessingParameterNumber(self.IOU_THRESHOLD, "Overlap (IoU) threshold for merging boxes "
                                               "(0..1; -1 = package)", QgsProcessingParameterNumber.Double, -1,
                                               optional=True, minValue=-1, maxValue=1), advanced=True)
        self._add(QgsProcessingParameterNumber(self.MAX_DETECTIONS, "Maximum objects per tile (0 = package)",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
                  advanced=True)
        self.addParameter(max_pixels_parameter())

    def _number(self, parameters, name, context, unset, integer=False):
        """The parameter's value, or None (= the package's) when it is unset or ``unset``."""
        if parameters.get(name) in (None, ""):
            return None
        value = (self.parameterAsInt if integer else self.parameterAsDouble)(parameters, name, context)
        return None if value == unset else value

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.inference.detect import detect
        from ..rs_deep_plugin.engine.errors import RSDeepError

        layer, source, crs = raster_input(self, parameters, self.INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback)
        pkg = load_model_package(self.parameterAsFile(parameters, self.MODEL, context), "detection")
        feedback.pushInfo(f"Model: {pkg.name}")
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        bounds = layer_bounds(layer, extent)
        max_pixels = max_pixels_value(self, parameters, context)
        tile = self._number(parameters, self.TILE_SIZE, context, 0, integer=True)
        overlap = self._number(parameters, self.OVERLAP, context, -1, integer=True)
        batch = self._number(parameters, self.BATCH_SIZE, context, 0, integer=True)
        device = self.parameterAsEnumName(parameters, self.DEVICE, context)
        score = self._number(parameters, self.SCORE_THRESHOLD, context, -1)
        iou = self._number(parameters, self.IOU_THRESHOLD, context, -1)
        max_det = self._number(parameters, self.MAX_DETECTIONS, context, 0, integer=True)

        bridge = FeedbackBridge(feedback, 0, 95)
        if source is None:
            source = export_raster_layer(layer, extent if bounds else None, pkg.gsd, context, feedback)
            bounds = None  # the export already covers EXTENT only
        with outputs:  # every output renamed into place at the end of the block, or none
            try:
                result = detect(source, pkg, bands=bands, bounds=bounds, tile_size=tile, overlap=overlap,
                                batch_size=batch, device=device, score_threshold=score, iou_threshold=iou,
                                max_detections=max_det, progress=bridge.progress,
                                is_cancelled=bridge.is_cancelled, log=bridge.log, max_pixels=max_pixels)
            except RSDeepError as exc:  # Cancelled included: nothing was written
                raise QgsProcessingException(str(exc)) from exc
            for w in result.warnings:
                push_warning(feedback, w)
            feedback.pushInfo(f"{len(result)} objects from {result.tiles_run}/{result.tiles} tiles on "
                              f"{result.device} in {result.seconds:.1f} s (score >= {result.score_threshold:g}, IoU "
                              f"{result.iou_threshold:g}, at most {result.max_detections} per tile)")
            for cname, count in sorted(result.class_counts().items()):
                feedback.pushInfo(f"  {cname}: {count}")

            fields = make_fields(("class_id", "int"), ("class_name", "string"), ("score", "double"))
            wanted = [(self.OUTPUT, QgsWkbTypes.Polygon)]
            if parameters.get(self.OUTPUT_CENTROIDS) not in (None, ""):
                wanted.append((self.OUTPUT_CENTROIDS, QgsWkbTypes.Point))
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                for name, wkb in wanted:
                    sink = sinks.create(name, fields, wkb, crs,
                                        style=lambda: _StyleDetections(pkg.classes), required=(name == self.OUTPUT))
                    if sink is None:
                        continue
                    for d in result.detections:
                        feat = QgsFeature(fields)
                        if wkb == QgsWkbTypes.Polygon:
                            feat.setGeometry(QgsGeometry.fromRect(QgsRectangle(d.xmin, d.ymin, d.xmax, d.ymax)))
                        else:
                            cx, cy = d.centroid
                            feat.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(cx, cy)))
                        feat.setAttributes([d.class_id, d.class_name, round(d.score, 4)])
                        sink.addFeature(feat, QgsFeatureSink.FastInsert)
        feedback.setProgress(100)
        return sinks.results
