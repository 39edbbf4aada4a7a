"""rs_deep:predict_raster — raster to raster: regression (a value per pixel) and super-resolution with a model."""

from qgis.core import (QgsProcessing, QgsProcessingParameterFeatureSource, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination)

from ..rs_deep_plugin.compat import push_warning
from ..rs_deep_plugin.engine.tasks import RASTER_TASKS, REGRESSION
from .base import FeedbackBridge, RSDeepAlgorithm
from .layers import mask_geometries
from .outputs import RunOutputs
from .params import (BANDS, BANDS_HELP, EXTENT, EXTENT_HELP, INPUT, INPUT_HELP, MASK_HELP, MODEL, OUTPUT, RESOLUTION,
                     RESOLUTION_HELP, add, add_cluster, add_input_block, add_max_pixels, add_resolution,
                     add_tiling_block, help_string, load_model_package, optional_number, read_area, read_cluster,
                     read_raster, read_resolution, read_tiling, read_value_scaling, VALUE_SCALING, VALUE_SCALING_HELP)

MASK = "MASK"
OUTPUT_SCALING = "OUTPUT_SCALING"
HELP = {
    INPUT: INPUT_HELP,
    MODEL: "A regression or super-resolution model: an RS Deep package (folder or .zip with model.json and "
           "model.safetensors) or a Deepness ONNX 'Regressor' / 'Superresolution' model.",
    BANDS: BANDS_HELP,
    EXTENT: EXTENT_HELP,
    MASK: MASK_HELP,
    OUTPUT: "GeoTIFF, one band per model output channel. Regression: float32 on the input's grid, in the units "
            "the model states. Super-resolution: the input's extent on a grid 'scale' times finer, float32 or the "
            "8/16-bit type the model states (0 is then nodata). Tiles overlap and are blended, as in segmentation.",
    OUTPUT_SCALING: "Multiply the model's values by this (Deepness's output scaling). 0: the model's own "
                    "(a package's rs_deep:value_scale, an ONNX model's reg_output_scaling, else 1).",
    RESOLUTION: RESOLUTION_HELP,
    VALUE_SCALING: VALUE_SCALING_HELP,
}
LABELS = {MASK: "Mask", OUTPUT: "Output raster", OUTPUT_SCALING: "Output scaling"}


class PredictRasterAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = REGRESSION.algorithm_name, "Predict a raster (regression, super-resolution)"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Applies a raster-to-raster model to a raster layer: a regression model gives a value per "
                           "pixel for each of its output channels (e.g. building cover, canopy height), a "
                           "super-resolution model an image several times finer over the same extent. Segmentation "
                           "and detection models run with rs_deep:segment and rs_deep:detect.", HELP, LABELS)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSource(MASK, "Mask (polygons)", [QgsProcessing.TypeVectorPolygon],
                                                      optional=True), HELP)
        add(self, QgsProcessingParameterRasterDestination(OUTPUT, "Output raster"), HELP)
        add(self, QgsProcessingParameterNumber(OUTPUT_SCALING, "Output scaling (0 = the model's)",
                                               QgsProcessingParameterNumber.Double, 0, optional=True),
            HELP, advanced=True)
        add_resolution(self)
        add_tiling_block(self, help=HELP)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.predict import predict_raster
        raster = read_raster(self, parameters, INPUT, context)
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(OUTPUT,))
        pkg = read_value_scaling(self, parameters, context,
                                 load_model_package(self.parameterAsFile(parameters, MODEL, context), RASTER_TASKS))
        feedback.pushInfo(f"Model: {pkg.name} ({pkg.task.replace('_', '-')})")
        read_area(self, parameters, context, raster)
        mask = mask_geometries(self.parameterAsSource(parameters, MASK, context), raster.crs, context)
        path = self.parameterAsOutputLayer(parameters, OUTPUT, context)
        tiling = read_tiling(self, parameters, context)
        gsd = read_resolution(self, parameters, context)
        scaling = optional_number(self, parameters, OUTPUT_SCALING, context, 0)
        bridge = FeedbackBridge(feedback, 0, 100)
        raster.fetch(gsd or pkg.gsd, context, feedback)
        with outputs:
            result = predict_raster(raster.source, pkg, path, bands=raster.bands, bounds=raster.bounds,
                                    mask_geometries=mask, transaction=outputs.transaction,
                                    max_pixels=raster.max_pixels, gsd=gsd, value_scale=scaling, **tiling,
                                    **bridge.callbacks, **read_cluster(self, parameters, context))
            for w in result.warnings:
                push_warning(feedback, w)
            unit = f" {result.units}" if result.units else ""
            for name, st in zip(result.band_names, result.statistics):
                if st:
                    feedback.pushInfo(f"{name}: mean {st['mean']:.4g}{unit} (min {st['min']:.4g}, max "
                                      f"{st['max']:.4g})")
            feedback.pushInfo(f"{result.width} x {result.height} px, {result.dtype}"
                              + (f", {result.scale} times finer than the input" if result.scale > 1 else ""))
        return {OUTPUT: path}
