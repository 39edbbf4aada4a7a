"""rs_deep:detect_change — change detection between two raster layers with a change model package."""
from qgis.core import QgsCoordinateTransform

from ..rs_deep_plugin.engine.tasks import CHANGE
from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .layers import export_raster_layer, file_extent
from .outputs import ClassOutputs, RunOutputs
from .params import (OUTPUT, PROBABILITIES, add_class_outputs, add_input_block, add_max_pixels, add_polygon_block,
                     add_tiling_block, read_area, read_model, read_raster, read_tiling)

BEFORE = "BEFORE"
AFTER = "AFTER"


class ChangeAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = CHANGE.algorithm_name, CHANGE.label

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
        add_input_block(self, rasters=((BEFORE, "Before raster (earlier date)"), (AFTER, "After raster (later date)")),
                        model="Change model package (folder, .zip, model.json or bundled name)",
                        bands="Bands of both dates (in the model's order)")
        add_class_outputs(self, "Change raster", "Change polygons", "Change probabilities")
        add_tiling_block(self)
        add_polygon_block(self)
        add_max_pixels(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.change import change_polygons, detect_change
        # paths are never loaded as QGIS layers (RasterInput); layers are None then
        before = read_raster(self, parameters, BEFORE, context)
        after = read_raster(self, parameters, AFTER, context)
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(OUTPUT, PROBABILITIES))
        pkg = read_model(self, parameters, context, feedback, CHANGE)
        read_area(self, parameters, context, before)
        dest = ClassOutputs(self, parameters, context, "rs_deep_change_confidence.tif")
        tiling = read_tiling(self, parameters, context)
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
                                   transaction=outputs.transaction, max_pixels=before.max_pixels, **tiling,
                                   **bridge.callbacks)
            return dest.results(feedback, outputs, pkg, result, before.crs, lambda progress: change_polygons(
                result, dest.confidence, pkg.classes, min_area_m2=dest.min_area, simplify=dest.simplify,
                progress=progress, is_cancelled=bridge.is_cancelled), change=True)
