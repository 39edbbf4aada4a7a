"""rs_deep:segment — semantic segmentation of a raster layer with a model package."""

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingParameterBand,
                       QgsProcessingParameterDefinition, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFeatureSource,
                       QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingUtils)

from ..rs_deep_plugin.compat import push_warning
from .base import (DEVICES, FeedbackBridge, NamedEnum, RSDeepAlgorithm, RasterInput, bundled_models,
                   export_raster_layer, layer_bounds, load_model_package, mask_geometries, max_pixels_parameter,
                   max_pixels_value, raster_input, report_class_areas, require_dependencies)
from .outputs import RunOutputs, remove_files
from .sinks import write_class_polygons
from .styles import StyleClasses, style_class_raster


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
        self.addParameter(RasterInput(self.INPUT, "Input raster"))
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
            NamedEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
            QgsProcessingParameterNumber(self.MIN_AREA, "Minimum polygon area (m²; -1 = 10 pixels)",
                                         QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1),
            QgsProcessingParameterNumber(self.SIMPLIFY, "Simplify tolerance (map units; -1 = one pixel)",
                                         QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1),
        ]
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(max_pixels_parameter())

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.errors import Cancelled, RSDeepError

        layer, source, crs = raster_input(self, parameters, self.INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(self.OUTPUT, self.PROBABILITIES))
        pkg = load_model_package(self.parameterAsFile(parameters, self.MODEL, context), "segmentation")
        feedback.pushInfo(f"Model: {pkg.name}")
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        bounds = layer_bounds(layer, extent)
        mask_source = self.parameterAsSource(parameters, self.MASK, context)
        mask = mask_geometries(mask_source, crs, context)
        max_pixels = max_pixels_value(self, parameters, context)
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        probs = self.parameterAsOutputLayer(parameters, self.PROBABILITIES, context) or None
        want_vector = parameters.get(self.OUTPUT_VECTOR) not in (None, "")
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context) or None
        overlap = self.parameterAsInt(parameters, self.OVERLAP, context) if parameters.get(self.OVERLAP) \
            not in (None, "") else -1
        batch = self.parameterAsInt(parameters, self.BATCH_SIZE, context) or None
        device = self.parameterAsEnumName(parameters, self.DEVICE, context)
        min_area = self.parameterAsDouble(parameters, self.MIN_AREA, context) \
            if parameters.get(self.MIN_AREA) not in (None, "") else -1
        simplify = self.parameterAsDouble(parameters, self.SIMPLIFY, context) \
            if parameters.get(self.SIMPLIFY) not in (None, "") else -1

        bridge = FeedbackBridge(feedback, 0, 80 if want_vector else 100)
        if source is None:
            source = export_raster_layer(layer, extent if bounds else None, pkg.gsd, context, feedback)
            bounds = None  # the export already covers EXTENT only
        confidence = QgsProcessingUtils.generateTempFilename("rs_deep_confidence.tif") if want_vector else None
        background = [c.value for c in pkg.classes if c.name.strip().lower() in ("background", "other", "none")]
        try:
            with outputs:  # every output renamed into place at the end of the block, or none
                results = self._run(outputs, source, pkg, output, probs, confidence, background, bands, bounds,
                                    mask, tile, overlap, batch, device, want_vector, min_area, simplify, bridge,
                                    crs, parameters, context, feedback, max_pixels)
        except (Cancelled, RSDeepError) as exc:
            raise QgsProcessingException(str(exc)) from exc
        finally:
            remove_files(confidence)
        feedback.setProgress(100)
        return results

    def _run(self, outputs, source, pkg, output, probs, confidence, background, bands, bounds, mask, tile, overlap,
             batch, device, want_vector, min_area, simplify, bridge, crs, parameters, context, feedback,
             max_pixels=None):
        from ..rs_deep_plugin.engine.geo.raster import area_factor_m2
        from ..rs_deep_plugin.engine.inference.segment import segment
        from ..rs_deep_plugin.engine.geo.vectorize import vectorize
        result = segment(source, pkg, output, bands=bands, bounds=bounds, mask_geometries=mask,
                         probabilities=probs, confidence=confidence, skip_classes=background,
                         tile_size=tile, overlap=overlap, batch_size=batch, device=device,
                         progress=bridge.progress, is_cancelled=bridge.is_cancelled, log=bridge.log,
                         transaction=outputs.transaction, max_pixels=max_pixels)
        for w in result.warnings:
            push_warning(feedback, w)
        style_class_raster(output, pkg.classes, context, result.output_file)
        report_class_areas(feedback, result, pkg.classes)
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
            records = vectorize(result.output_file, confidence, pkg.classes, min_area_m2=min_area,
                                simplify=simplify, area_factor=area_f,
                                progress=FeedbackBridge(feedback, 80, 99).progress,
                                is_cancelled=bridge.is_cancelled)
            vectors = write_class_polygons(self, parameters, context, feedback, outputs.transaction,
                                           self.OUTPUT_VECTOR, records, crs, lambda: StyleClasses(pkg.classes))
            feedback.pushInfo(f"{len(records)} polygons")
            results.update(vectors)
        return results

