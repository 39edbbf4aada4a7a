"""rs_deep:detect_change — change detection between two raster layers with a change model package."""

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingParameterBand,
                       QgsProcessingParameterDefinition, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingUtils)

from ..rs_deep_plugin.compat import push_warning
from .base import (DEVICES, FeedbackBridge, NamedEnum, RSDeepAlgorithm, RasterInput, bundled_models,
                   export_raster_layer, file_extent, layer_bounds, load_model_package, max_pixels_parameter,
                   max_pixels_value, raster_input, report_class_areas, require_dependencies)
from .outputs import RunOutputs, remove_files
from .sinks import write_class_polygons
from .styles import StyleClasses, style_class_raster


class ChangeAlgorithm(RSDeepAlgorithm):
    BEFORE = "BEFORE"
    AFTER = "AFTER"
    MODEL = "MODEL"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
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
        return "detect_change"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Change detection"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        return (
            "Finds what changed between two images of the same area with a deep-learning change model "
            "package, and returns a change raster styled with the model's classes, optional change "
            "probabilities and optional change polygons with their area.<br><br>"
            "<b>Before raster</b>: the earlier image. The results are on its pixel grid and in its CRS.<br>"
            "<b>After raster</b>: the later image, with the same bands as the before raster. When its CRS, "
            "resolution or grid differ it is warped onto the before raster's grid on the fly (nothing is "
            "written), and only the area both images cover is processed.<br>"
            "<b>Model package</b>: a change model (rs_deep:task \"change\"): a folder or .zip with model.json and "
            f"model.safetensors, its model.json, or the name of a bundled model ({models}).<br>"
            "<b>Bands</b>: the band numbers to compare, read from both images, in the model's order. Leave empty "
            "when the images have exactly the bands the model needs.<br>"
            "<b>Extent</b>: process only this area (default: everything both images cover).<br>"
            "<b>Change raster</b>: Byte GeoTIFF on the before raster's grid: 0 = no change, 1.. = the change "
            "classes (change, or from-to classes), 255 = nodata or not covered by both images.<br>"
            "<b>Change polygons</b>: one polygon per connected patch of change, with class_id, class_name, "
            "area_m2 and mean_prob.<br>"
            "<b>Probabilities</b>: float32 GeoTIFF, one band per class.<br>"
            "<b>Tile size / overlap / batch size</b>: default from the model package (0 = the package's value; "
            "overlap -1 = the package's value). Overlapping tiles are blended so no seams show.<br>"
            "<b>Device</b>: auto picks a CUDA GPU, then Apple MPS, then the CPU.<br>"
            "<b>Minimum area</b>: change polygons smaller than this (m²) are dropped (-1 = 10 pixels).<br>"
            "<b>Simplify</b>: tolerance in map units for the polygons (-1 = one pixel; 0 = none)."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self.addParameter(RasterInput(self.BEFORE, "Before raster (earlier date)"))
        self.addParameter(RasterInput(self.AFTER, "After raster (later date)"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Change model package (folder, .zip, model.json or "
                                                                 "bundled name)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=False))
        self.addParameter(QgsProcessingParameterBand(self.BANDS, "Bands of both dates (in the model's order)", None,
                                                     self.BEFORE, optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Change raster"))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_VECTOR, "Change polygons",
                                                            QgsProcessing.TypeVectorPolygon, optional=True,
                                                            createByDefault=True))
        self.addParameter(QgsProcessingParameterRasterDestination(self.PROBABILITIES, "Change probabilities",
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
        from ..rs_deep_plugin.engine.inference.change import detect_change
        from ..rs_deep_plugin.engine.errors import RSDeepError

        # paths are never loaded as QGIS layers (RasterInput); layers are None then
        before, src_before, crs = raster_input(self, parameters, self.BEFORE, context)
        after, src_after, after_crs = raster_input(self, parameters, self.AFTER, context)
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(self.OUTPUT, self.PROBABILITIES))
        pkg = load_model_package(self.parameterAsFile(parameters, self.MODEL, context), "change")
        feedback.pushInfo(f"Model: {pkg.name}")
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        bounds = layer_bounds(before, extent)
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

        if src_before is None:
            src_before = export_raster_layer(before, extent if bounds else None, pkg.gsd, context, feedback)
            bounds = None  # the export already covers EXTENT only
        if src_after is None:  # fetched over BEFORE's area, then warped onto BEFORE's grid like any raster
            from qgis.core import QgsCoordinateTransform
            area = extent if extent is not None and not extent.isNull() else \
                (before.extent() if before is not None else file_extent(src_before))
            xf = QgsCoordinateTransform(crs, after_crs, context.transformContext())
            src_after = export_raster_layer(after, xf.transformBoundingBox(area), pkg.gsd, context, feedback)
        bridge = FeedbackBridge(feedback, 0, 80 if want_vector else 100)
        confidence = QgsProcessingUtils.generateTempFilename("rs_deep_change_confidence.tif") if want_vector else None
        try:
            with outputs:  # every output renamed into place at the end of the block, or none
                result = detect_change(src_before, src_after, pkg, output, probabilities=probs,
                                       confidence=confidence, bands=bands, bounds=bounds, tile_size=tile,
                                       overlap=overlap, batch_size=batch, device=device, progress=bridge.progress,
                                       is_cancelled=bridge.is_cancelled, log=bridge.log,
                                       transaction=outputs.transaction, max_pixels=max_pixels)
                results = self._finish(result, outputs, pkg, output, probs, confidence, want_vector, min_area,
                                       simplify, bridge, crs, parameters, context, feedback)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        finally:
            remove_files(confidence)
        feedback.setProgress(100)
        return results

    def _finish(self, result, outputs, pkg, output, probs, confidence, want_vector, min_area, simplify, bridge,
                crs, parameters, context, feedback):
        """Style the change raster, report, write the polygons (all into the run's transaction)."""
        from ..rs_deep_plugin.engine.inference.change import change_polygons
        for w in result.warnings:
            push_warning(feedback, w)
        style_class_raster(output, pkg.classes, context, result.output_file, transparent_background=True)
        report_class_areas(feedback, result, pkg.classes)
        results = {self.OUTPUT: output}
        if probs:
            results[self.PROBABILITIES] = probs
        if want_vector:
            records = change_polygons(result, confidence, pkg.classes, min_area_m2=min_area, simplify=simplify,
                                      progress=FeedbackBridge(feedback, 80, 99).progress,
                                      is_cancelled=bridge.is_cancelled)
            vectors = write_class_polygons(self, parameters, context, feedback, outputs.transaction,
                                           self.OUTPUT_VECTOR, records, crs, lambda: StyleClasses(pkg.classes, True))
            feedback.pushInfo(f"{len(records)} change polygons, "
                              f"{sum(r['area_m2'] for r in records):,.1f} m² in all")
            results.update(vectors)
        return results

