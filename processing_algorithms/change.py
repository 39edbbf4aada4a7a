"""rs_deep:detect_change — change detection between two raster layers with a change model package."""
from qgis.core import QgsCoordinateTransform

from ..rs_deep_plugin.engine.tasks import CHANGE
from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .layers import export_raster_layer, file_extent
from .outputs import ClassOutputs, RunOutputs
from .params import (BANDS, CLASS_RASTER_HELP, EXTENT, MODEL, OUTPUT, OUTPUT_VECTOR, PROBABILITIES, TTA, TTA_HELP,
                     add_class_outputs, add_input_block, add_max_pixels, add_polygon_block, add_tiling_block, add_tta,
                     help_string, read_area, read_model, read_raster, read_tiling, read_tta, add_cluster,
                     read_cluster)

BEFORE = "BEFORE"
AFTER = "AFTER"
HELP = {
    BEFORE: "The earlier image. The results are on its pixel grid and in its CRS.",
    AFTER: "The later image, with the same bands as the before raster. When its CRS, resolution or grid differ it is "
           "warped onto the before raster's grid on the fly (nothing is written), and only the area both images "
           "cover is processed.",
    MODEL: "A change model (rs_deep:task \"change\"): a folder or .zip with model.json and model.safetensors, its "
           "model.json, or the name of a bundled model.",
    BANDS: "The band numbers to compare, read from both images, in the model's order. Leave empty when the images "
           "have exactly the bands the model needs.",
    EXTENT: "Process only this area (default: everything both images cover).",
    OUTPUT: "Byte GeoTIFF on the before raster's grid: 0 = no change, 1.. = the change classes (change, or from-to "
            "classes), 255 = nodata or not covered by both images.",
    OUTPUT_VECTOR: "One polygon per connected patch of change, with class_id, class_name, area_m2 and mean_prob.",
    PROBABILITIES: "Float32 GeoTIFF, one band per class.",
    TTA: TTA_HELP + " Both dates are flipped and rotated alike.",
    **CLASS_RASTER_HELP,
}
LABELS = {BEFORE: "Before raster", AFTER: "After raster", OUTPUT: "Change raster", OUTPUT_VECTOR: "Change polygons",
          PROBABILITIES: "Probabilities"}


class ChangeAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = CHANGE.algorithm_name, CHANGE.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Finds what changed between two images of the same area with a deep-learning change model "
                           "package, and returns a change raster styled with the model's classes, optional change "
                           "probabilities and optional change polygons with their area. Bundled models: "
                           f"{', '.join(bundled_models()) or 'none'}.", HELP, LABELS)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, rasters=((BEFORE, "Before raster (earlier date)"), (AFTER, "After raster (later date)")),
                        model="Change model package (folder, .zip, model.json or bundled name)",
                        bands="Bands of both dates (in the model's order)", help=HELP)
        add_class_outputs(self, "Change raster", "Change polygons", "Change probabilities", help=HELP)
        add_tta(self, HELP)
        add_tiling_block(self, help=HELP)
        add_polygon_block(self, help=HELP)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.change import detect_change
        from ..rs_deep_plugin.engine.inference.segment import class_polygons
        # paths are never loaded as QGIS layers (RasterInput); layers are None then
        before = read_raster(self, parameters, BEFORE, context)
        after = read_raster(self, parameters, AFTER, context)
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(OUTPUT, PROBABILITIES))
        pkg = read_model(self, parameters, context, feedback, CHANGE)
        read_area(self, parameters, context, before)
        dest = ClassOutputs(self, parameters, context, "rs_deep_change_confidence.tif")
        tiling = read_tiling(self, parameters, context)
        tta = read_tta(self, parameters, context)
        before.fetch(pkg.gsd, context, feedback)
        if after.source is None:  # fetched over BEFORE's area, then warped onto BEFORE's grid like any raster
            area = before.extent if before.extent is not None and not before.extent.isNull() else \
                (before.layer.extent() if before.layer is not None else file_extent(before.source))
            xf = QgsCoordinateTransform(before.crs, after.crs, context.transformContext())
            after.source = export_raster_layer(after.layer, xf.transformBoundingBox(area), pkg.gsd, context, feedback)
        bridge = FeedbackBridge(feedback, 0, 80 if dest.vector else 100)
        with dest, outputs:  # every output renamed into place at the end of the block, or none
            result = detect_change(before.source, after.source, pkg, dest.raster, probabilities=dest.probabilities,
                                   confidence=dest.confidence, bands=before.bands, bounds=before.bounds,
                                   transaction=outputs.transaction, max_pixels=before.max_pixels, tta=tta, **tiling,
                                   **bridge.callbacks,
                                   **read_cluster(self, parameters, context))
            return dest.results(feedback, outputs, pkg, result, before.crs, lambda progress: class_polygons(
                result, dest.confidence, pkg.classes, min_area_m2=dest.min_area, simplify=dest.simplify,
                progress=progress, is_cancelled=bridge.is_cancelled), change=True)
