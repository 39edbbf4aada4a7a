"""rs_deep:classify_patches — patch (scene) classification of a raster layer with a classifier package."""
from qgis.core import (QgsFeature, QgsFeatureSink, QgsGeometry, QgsProcessing, QgsProcessingException,
                       QgsProcessingParameterBand, QgsProcessingParameterDefinition, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from .base import (DEVICES, FeedbackBridge, NamedEnum, RSDeepAlgorithm, RasterInput, bundled_models,
                   export_raster_layer, layer_bounds, load_model_package, max_pixels_parameter, max_pixels_value,
                   raster_input, require_dependencies)
from .outputs import RunOutputs
from .sinks import FeatureSinks
from .styles import StyleClasses

TOP = 3  # the best classes written per patch


class PatchClassificationAlgorithm(RSDeepAlgorithm):
    INPUT = "INPUT"
    MODEL = "MODEL"
    BANDS = "BANDS"
    EXTENT = "EXTENT"
    PATCH_SIZE = "PATCH_SIZE"
    STRIDE = "STRIDE"
    OUTPUT = "OUTPUT"
    BATCH_SIZE = "BATCH_SIZE"
    DEVICE = "DEVICE"

    def name(self):
        return "classify_patches"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Patch classification"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        return (
            "Labels every square patch of a raster layer with a deep-learning scene classifier (for example the "
            "dominant crop or land cover of each cell) and returns the patches as polygons with the winning "
            "class, its score and the next best classes.<br><br>"
            "<b>Input raster</b>: any raster layer (GeoTIFF, VRT, WMS/XYZ...). Rasters larger than memory are "
            "read patch by patch.<br>"
            "<b>Model package</b>: a patch classifier (rs_deep:task \"patch_classification\"): a folder or .zip "
            f"with model.json and model.safetensors, its model.json, or the name of a bundled model ({models}).<br>"
            "<b>Bands</b>: the raster bands to feed the model, in the model's order. Leave empty when the raster "
            "has exactly the bands the model needs.<br>"
            "<b>Extent</b>: classify only this area (default: the whole layer). Patches are laid from its "
            "top-left corner.<br>"
            "<b>Patch size</b>: side of a patch in pixels at the model's ground sampling distance (0 = the "
            "model's patch size). Rasters at another resolution are resampled to the model's.<br>"
            "<b>Stride</b>: distance between patch starts, in pixels at the model's GSD (0 = the patch size: "
            "patches side by side; smaller = overlapping patches).<br>"
            "<b>Patches</b>: one polygon per patch with enough valid pixels, with class_id, class_name, score "
            "(probability of the winning class), and class_2/score_2, class_3/score_3 (the next best).<br>"
            "<b>Batch size</b>: patches run at once (0 = auto).<br>"
            "<b>Device</b>: auto picks a CUDA GPU, then Apple MPS, then the CPU."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self.addParameter(RasterInput(self.INPUT, "Input raster"))
        self.addParameter(QgsProcessingParameterFile(self.MODEL, "Patch classifier package (folder, .zip, "
                                                                 "model.json or bundled name)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=False))
        self.addParameter(QgsProcessingParameterBand(self.BANDS, "Bands (in the model's order)", None, self.INPUT,
                                                     optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.PATCH_SIZE, "Patch size (px at the model's GSD; "
                                                                        "0 = package)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.STRIDE, "Stride (px at the model's GSD; 0 = patch size)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Patches", QgsProcessing.TypeVectorPolygon))
        advanced = [
            QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size (0 = auto)",
                                         QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            NamedEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
        ]
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(max_pixels_parameter())

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.errors import RSDeepError
        from ..rs_deep_plugin.engine.inference.patches import classify_patches

        layer, source, crs = raster_input(self, parameters, self.INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback)
        pkg = load_model_package(self.parameterAsFile(parameters, self.MODEL, context), "patch_classification")
        feedback.pushInfo(f"Model: {pkg.name}")
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        bounds = layer_bounds(layer, extent)
        max_pixels = max_pixels_value(self, parameters, context)
        patch = self.parameterAsInt(parameters, self.PATCH_SIZE, context) or None
        stride = self.parameterAsInt(parameters, self.STRIDE, context) or None
        batch = self.parameterAsInt(parameters, self.BATCH_SIZE, context) or None
        device = self.parameterAsEnumName(parameters, self.DEVICE, context)

        if source is None:
            source = export_raster_layer(layer, extent if bounds else None, pkg.gsd, context, feedback)
            bounds = None  # the export already covers EXTENT only
        bridge = FeedbackBridge(feedback, 0, 95)
        with outputs:  # every output renamed into place at the end of the block, or none
            try:
                result = classify_patches(source, pkg, patch_size=patch, stride=stride, bands=bands, bounds=bounds,
                                          batch_size=batch, device=device, top_k=TOP, progress=bridge.progress,
                                          is_cancelled=bridge.is_cancelled, log=bridge.log, max_pixels=max_pixels)
            except RSDeepError as exc:
                raise QgsProcessingException(str(exc)) from exc
            for w in result.warnings:
                push_warning(feedback, w)
            # the sink is created only now: a cancelled or failed run leaves no layer behind
            fields = make_fields(("class_id", "int"), ("class_name", "string"), ("score", "double"),
                                 *[(f"{kind}_{i}", t) for i in range(2, TOP + 1)
                                   for kind, t in (("class", "string"), ("score", "double"))])
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                sink = sinks.create(self.OUTPUT, fields, QgsWkbTypes.Polygon, crs,
                                    style=lambda: StyleClasses(pkg.classes))
                for rec in result.features:
                    if feedback.isCanceled():
                        raise QgsProcessingException("Cancelled; the patch layer was not completed.")
                    feat = QgsFeature(fields)
                    geom = QgsGeometry()
                    geom.fromWkb(rec["geometry"].wkb)
                    feat.setGeometry(geom)
                    attrs = [rec["class_id"], rec["class_name"], round(rec["score"], 4)]
                    for i in range(1, TOP):
                        if i < len(rec["top"]):
                            attrs += [rec["top"][i][1], round(rec["top"][i][2], 4)]
                        else:
                            attrs += [None, None]
                    feat.setAttributes(attrs)
                    sink.addFeature(feat, QgsFeatureSink.FastInsert)
            feedback.pushInfo(f"{result.patches_run} of {result.patches} patches classified ({result.native_patch} "
                              f"px, stride {result.native_stride} px of the raster) on {result.device} in "
                              f"{result.seconds:.1f} s")
            for name, count in sorted(result.class_counts().items(), key=lambda kv: -kv[1]):
                feedback.pushInfo(f"  {name}: {count} patches")
        feedback.setProgress(100)
        return sinks.results
