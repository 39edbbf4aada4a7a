"""rs_deep:segment — semantic segmentation of a raster layer with a model package."""
import os

from qgis.core import (QgsCategorizedSymbolRenderer, QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsFillSymbol,
                       QgsGeometry, QgsPalettedRasterRenderer, QgsProcessing,
                       QgsProcessingException, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingParameterBand, QgsProcessingParameterDefinition, QgsProcessingParameterEnum,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingUtils, QgsRasterLayer, QgsRendererCategory,
                       QgsWkbTypes)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

from .base import (DEVICES, FeedbackBridge, RSDeepAlgorithm, bundled_models, export_raster_layer, gdal_path,
                   layer_bounds, load_model_package, mask_geometries, require_dependencies)


def paletted_renderer(provider, classes):
    items = [QgsPalettedRasterRenderer.Class(c.value, QColor("#" + c.color), c.name) for c in classes]
    return QgsPalettedRasterRenderer(provider, 1, items)


def categorized_renderer(classes, geometry="polygon"):
    cats = []
    for c in classes:
        sym = QgsFillSymbol.createSimple({"color": "#" + c.color, "outline_color": "#" + c.color,
                                          "style": "solid", "outline_width": "0.4"})
        sym.setOpacity(0.6)
        cats.append(QgsRendererCategory(c.value, sym, c.name))
    return QgsCategorizedSymbolRenderer("class_id", cats)


class _StyleClasses(QgsProcessingLayerPostProcessorInterface):
    """Applies class colours and names to a result layer once Processing has loaded it."""

    keep = []  # Processing does not own post-processors: keep them alive

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        _StyleClasses.keep.append(self)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        if isinstance(layer, QgsRasterLayer):
            layer.setRenderer(paletted_renderer(layer.dataProvider(), self.classes))
        elif layer.geometryType() == QgsWkbTypes.PolygonGeometry:
            layer.setRenderer(categorized_renderer(self.classes))
        layer.triggerRepaint()


class SegmentAlgorithm(RSDeepAlgorithm):
    INPUT = "INPUT"
    MODEL = "MODEL"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    MASK = "MASK"
    OUTPUT = "OUTPUT"
    OUTPUT_VECTOR = "OUTPUT_VECTOR"
    PROBABILITIES = "PROBABILITIES"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    BATCH_SIZE = "BATCH_SIZE"
    DEVICE = "DEVICE"
    MIN_AREA = "MIN_AREA"
    SIMPLIFY = "SIMPLIFY"

    def name(self):
        return "segment"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Semantic segmentation"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        return (
            "Classifies every pixel of a raster layer with a deep-learning model package and returns a "
            "class raster styled with the model's class names and colours, optional per-class probabilities, "
            "and optional polygons of each class.<br><br>"
            "<b>Input raster</b>: any raster layer (GeoTIFF, VRT, WMS/XYZ...). Rasters larger than memory are "
            "processed tile by tile.<br>"
            "<b>Model package</b>: a folder or .zip with model.json and model.safetensors, its model.json, or "
            f"the name of a bundled model ({models}).<br>"
            "<b>Bands</b>: the raster bands to feed the model, in the model's order. Leave empty when the "
            "raster has exactly the bands the model needs.<br>"
            "<b>Extent</b>: process only this area (default: the whole layer).<br>"
            "<b>Mask</b>: process only pixels inside these polygons; others become nodata.<br>"
            "<b>Class raster</b>: Byte GeoTIFF on the input's grid; 255 is nodata.<br>"
            "<b>Class polygons</b>: one polygon per connected patch of each class (background is left out), "
            "with class_id, class_name, area_m2 and mean_prob.<br>"
            "<b>Probabilities</b>: float32 GeoTIFF, one band per class.<br>"
            "<b>Tile size / overlap / batch size</b>: default from the model package (0 = the package's value). "
            "Overlapping tiles are blended so no seams show.<br>"
            "<b>Device</b>: auto picks a CUDA GPU, then Apple MPS, then the CPU.<br>"
            "<b>Minimum area</b>: polygons smaller than this (m²) are dropped (default: 10 pixels).<br>"
            "<b>Simplify</b>: tolerance in map units for the polygons (default: one pixel; 0 = none)."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"))
        model = QgsProcessingParameterFile(self.MODEL, "Model package (folder, .zip, model.json or bundled name)",
                                           behavior=QgsProcessingParameterFile.Folder,
                                           optional=False)
        self.addParameter(model)
        self.addParameter(QgsProcessingParameterBand(self.BANDS, "Bands (in the model's order)", None, self.INPUT,
                                                     optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.MASK, "Mask (polygons)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Class raster"))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_VECTOR, "Class polygons",
                                                            QgsProcessing.TypeVectorPolygon, optional=True,
                                                            createByDefault=True))
        self.addParameter(QgsProcessingParameterRasterDestination(self.PROBABILITIES, "Probabilities",
                                                                  optional=True, createByDefault=False))
        advanced = [
            QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size (px at the model's GSD; 0 = package)",
                                         QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            QgsProcessingParameterNumber(self.OVERLAP, "Tile overlap (px; -1 = package)",
                                         QgsProcessingParameterNumber.Integer, -1, optional=True, minValue=-1),
            QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size (0 = auto)",
                                         QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            QgsProcessingParameterEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
            QgsProcessingParameterNumber(self.MIN_AREA, "Minimum polygon area (m²; -1 = 10 pixels)",
                                         QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1),
            QgsProcessingParameterNumber(self.SIMPLIFY, "Simplify tolerance (map units; -1 = one pixel)",
                                         QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1),
        ]
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.errors import Cancelled, RSDeepError
        from ..rs_deep_plugin.engine.raster import area_factor_m2
        from ..rs_deep_plugin.engine.segment import segment
        from ..rs_deep_plugin.engine.vectorize import vectorize

        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("INPUT is not a valid raster layer; choose a raster layer or file")
        pkg = load_model_package(self.parameterAsFile(parameters, self.MODEL, context), "segmentation")
        feedback.pushInfo(f"Model: {pkg.name}")
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        bounds = layer_bounds(layer, extent)
        mask_source = self.parameterAsSource(parameters, self.MASK, context)
        mask = mask_geometries(mask_source, layer.crs(), context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        probs = self.parameterAsOutputLayer(parameters, self.PROBABILITIES, context) or None
        want_vector = parameters.get(self.OUTPUT_VECTOR) not in (None, "")
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context) or None
        overlap = self.parameterAsInt(parameters, self.OVERLAP, context) if parameters.get(self.OVERLAP) \
            not in (None, "") else -1
        batch = self.parameterAsInt(parameters, self.BATCH_SIZE, context) or None
        device = DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]
        min_area = self.parameterAsDouble(parameters, self.MIN_AREA, context) \
            if parameters.get(self.MIN_AREA) not in (None, "") else -1
        simplify = self.parameterAsDouble(parameters, self.SIMPLIFY, context) \
            if parameters.get(self.SIMPLIFY) not in (None, "") else -1

        source = gdal_path(layer)
        bridge = FeedbackBridge(feedback, 0, 80 if want_vector else 100)
        if source is None:
            source = export_raster_layer(layer, extent if bounds else None, pkg.gsd, context, feedback)
            bounds = None  # the export already covers EXTENT only
        confidence = QgsProcessingUtils.generateTempFilename("rs_deep_confidence.tif") if want_vector else None
        background = [c.value for c in pkg.classes if c.name.strip().lower() in ("background", "other", "none")]
        try:
            result = segment(source, pkg, output, bands=bands, bounds=bounds, mask_geometries=mask,
                             probabilities=probs, confidence=confidence, skip_classes=background,
                             tile_size=tile, overlap=overlap, batch_size=batch, device=device,
                             progress=bridge.progress, is_cancelled=bridge.is_cancelled, log=bridge.log)
        except Cancelled as exc:
            raise QgsProcessingException(str(exc)) from exc
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        for w in result.warnings:
            feedback.reportError(w, fatalError=False)
        self._style_raster(output, pkg.classes, context)
        feedback.pushInfo(f"{result.width} x {result.height} px, {result.tiles_run}/{result.tiles} tiles run on "
                          f"{result.device} in {result.seconds:.1f} s")
        for c in pkg.classes:
            feedback.pushInfo(f"  {c.name}: {result.class_pixels.get(c.value, 0) * result.pixel_area_m2:,.1f} m²")
        results = {self.OUTPUT: output}
        if probs:
            results[self.PROBABILITIES] = probs
        if want_vector:
            px = abs(result.transform.a)
            area_f = area_factor_m2(result.crs, result.transform, result.width, result.height)
            if min_area < 0:
                min_area = 10 * result.pixel_area_m2
            if simplify < 0:
                simplify = px
            try:
                records = vectorize(output, confidence, pkg.classes, min_area_m2=min_area, simplify=simplify,
                                    area_factor=area_f,
                                    progress=FeedbackBridge(feedback, 80, 99).progress,
                                    is_cancelled=bridge.is_cancelled)
            except Cancelled as exc:
                _remove(output)
                raise QgsProcessingException(str(exc)) from exc
            finally:
                _remove(confidence)
            fields = QgsFields()
            fields.append(QgsField("class_id", QVariant.Int))
            fields.append(QgsField("class_name", QVariant.String))
            fields.append(QgsField("area_m2", QVariant.Double))
            fields.append(QgsField("mean_prob", QVariant.Double))
            sink, dest = self.parameterAsSink(parameters, self.OUTPUT_VECTOR, context, fields,
                                              QgsWkbTypes.Polygon, layer.crs())
            if sink is None:
                raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT_VECTOR))
            for rec in records:
                if feedback.isCanceled():
                    raise QgsProcessingException("Cancelled; the polygon layer was not completed.")
                feat = QgsFeature(fields)
                geom = QgsGeometry()
                geom.fromWkb(rec["geometry"].wkb)
                feat.setGeometry(geom)
                feat.setAttributes([rec["class_id"], rec["class_name"], round(rec["area_m2"], 3),
                                    rec["mean_probability"]])
                sink.addFeature(feat, QgsFeatureSink.FastInsert)
            feedback.pushInfo(f"{len(records)} polygons")
            results[self.OUTPUT_VECTOR] = dest
            if context.willLoadLayerOnCompletion(dest):
                context.layerToLoadOnCompletionDetails(dest).setPostProcessor(_StyleClasses(pkg.classes))
        feedback.setProgress(100)
        return results

    def _style_raster(self, path, classes, context):
        """Class colours and names: a .qml beside the file (any later load) and on the loaded layer."""
        layer = QgsRasterLayer(path, os.path.basename(path), "gdal")
        if layer.isValid():
            layer.setRenderer(paletted_renderer(layer.dataProvider(), classes))
            layer.saveDefaultStyle()
        if context.willLoadLayerOnCompletion(path):
            context.layerToLoadOnCompletionDetails(path).setPostProcessor(_StyleClasses(classes))


def _remove(path):
    if path and os.path.exists(path):
        try:
            os.remove(path)
        except OSError:
            pass
