"""rs_deep:segment — semantic segmentation of a raster layer with a model package."""

from qgis.core import QgsProcessing, QgsProcessingParameterFeatureSource, QgsProcessingParameterNumber

from ..rs_deep_plugin.engine.tasks import SEGMENTATION, is_background
from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .layers import mask_geometries
from .outputs import ClassOutputs, RunOutputs
from .params import (BANDS, BANDS_HELP, CLASS_RASTER_HELP, EXTENT, EXTENT_HELP, INPUT, INPUT_HELP, MASK_HELP, MODEL,
                     OUTPUT, OUTPUT_VECTOR, PROBABILITIES, RESOLUTION, RESOLUTION_HELP, TTA, TTA_HELP, add,
                     add_class_outputs, add_input_block,
                     add_max_pixels, add_polygon_block, add_resolution, add_tiling_block, add_tta, help_string,
                     optional_number, read_area, read_model, read_raster, read_resolution, read_tiling, read_tta,
                     add_cluster, read_cluster)

MASK = "MASK"
THRESHOLD = "THRESHOLD"
HELP = {
    INPUT: INPUT_HELP,
    MODEL: "A folder or .zip with model.json and model.safetensors, its model.json, or the name of a bundled model.",
    BANDS: BANDS_HELP,
    EXTENT: EXTENT_HELP,
    MASK: MASK_HELP,
    OUTPUT: "Byte GeoTIFF on the input's grid; 255 is nodata.",
    OUTPUT_VECTOR: "One polygon per connected patch of each class (background is left out), with class_id, "
                   "class_name, area_m2 and mean_prob.",
    PROBABILITIES: "Float32 GeoTIFF, one band per class.",
    THRESHOLD: "A pixel whose winning class probability is below this is class 0 (background), as in Deepness; a "
               "one-channel (sigmoid) model gives class 1 where its probability reaches it. -1: the model's own "
               "(an ONNX model's seg_thresh), else the most probable class.",
    RESOLUTION: RESOLUTION_HELP,
    TTA: TTA_HELP,
    **CLASS_RASTER_HELP,
}
LABELS = {MASK: "Mask", THRESHOLD: "Probability threshold", OUTPUT: "Class raster", OUTPUT_VECTOR: "Class polygons",
          PROBABILITIES: "Probabilities"}


class SegmentAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = SEGMENTATION.algorithm_name, SEGMENTATION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Classifies every pixel of a raster layer with a deep-learning model package and returns a "
                           "class raster styled with the model's class names and colours, optional per-class "
                           "probabilities, and optional polygons of each class. Bundled models: "
                           f"{', '.join(bundled_models()) or 'none'}.", HELP, LABELS)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, help=HELP)
        add(self, QgsProcessingParameterFeatureSource(MASK, "Mask (polygons)", [QgsProcessing.TypeVectorPolygon],
                                                      optional=True), HELP)
        add_class_outputs(self, "Class raster", "Class polygons", "Probabilities", help=HELP)
        add(self, QgsProcessingParameterNumber(THRESHOLD, "Probability threshold (-1 = the model's)",
                                               QgsProcessingParameterNumber.Double, -1, optional=True, minValue=-1,
                                               maxValue=1), HELP, advanced=True)
        add_resolution(self)
        add_tta(self)
        add_tiling_block(self, help=HELP)
        add_polygon_block(self, help=HELP)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.segment import class_polygons, segment
        raster = read_raster(self, parameters, INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(OUTPUT, PROBABILITIES))
        pkg = read_model(self, parameters, context, feedback, SEGMENTATION)
        read_area(self, parameters, context, raster)
        mask = mask_geometries(self.parameterAsSource(parameters, MASK, context), raster.crs, context)
        dest = ClassOutputs(self, parameters, context, "rs_deep_confidence.tif")
        tiling = read_tiling(self, parameters, context)
        threshold = optional_number(self, parameters, THRESHOLD, context, -1)
        gsd = read_resolution(self, parameters, context)
        tta = read_tta(self, parameters, context)
        bridge = FeedbackBridge(feedback, 0, 80 if dest.vector else 100)
        raster.fetch(gsd or pkg.gsd, context, feedback)
        background = [c.value for c in pkg.classes if is_background(c.name)]
        with dest, outputs:  # every output renamed into place at the end of the block, or none
            result = segment(raster.source, pkg, dest.raster, bands=raster.bands, bounds=raster.bounds,
                             mask_geometries=mask, probabilities=dest.probabilities, confidence=dest.confidence,
                             skip_classes=background, transaction=outputs.transaction, max_pixels=raster.max_pixels,
                             threshold=threshold, gsd=gsd, tta=tta, **tiling, **bridge.callbacks,
                             **read_cluster(self, parameters, context))
            return dest.results(feedback, outputs, pkg, result, raster.crs,
                                lambda progress: class_polygons(
                result, dest.confidence, pkg.classes, min_area_m2=dest.min_area, simplify=dest.simplify,
                progress=progress, is_cancelled=bridge.is_cancelled))
