"""rs_deep:find_similar — similarity search (recognition): the patches of a raster layer that look most like a query
image, with an embedding model (a Deepness 'Recognition' ONNX model)."""
from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.tasks import RECOGNITION
from .base import FeedbackBridge, RSDeepAlgorithm
from .outputs import RunOutputs
from .params import (BANDS, BANDS_HELP, EXTENT, INPUT, INPUT_HELP, MODEL, OUTPUT, PATCH_RUN_HELP, RESOLUTION,
                     RESOLUTION_HELP, add, add_cluster, add_input_block, add_max_pixels, add_resolution,
                     add_tiling_block, extent_bounds, help_string, read_area, read_cluster, read_model, read_raster,
                     read_resolution, read_tiling)
from .sinks import FeatureSinks, write_polygons
from .styles import StyleSimilarity

QUERY = "QUERY"
QUERY_EXTENT = "QUERY_EXTENT"
STRIDE = "STRIDE"
OUTPUT_RASTER = "OUTPUT_RASTER"
HELP = {
    INPUT: INPUT_HELP,
    MODEL: "An embedding model that returns one vector per image: a Deepness ONNX model of model_type "
           "'Recognition'. Its input size is the patch size.",
    QUERY: "An image of what to look for (PNG, JPEG, GeoTIFF...), with the bands the model takes (RGB for an RGB "
           "model; an alpha band is left out). It is resized to the model's input size as Deepness does (pixel "
           "centres aligned, no smoothing), so give it at about the processing resolution of the raster. Or leave it "
           "empty and give QUERY_EXTENT.",
    QUERY_EXTENT: "Instead of a query image: an area of the input layer to look for (draw it on the map), read as "
                  "the patches are. A longer side is squeezed into the model's square input: draw a square for an "
                  "undistorted query.",
    BANDS: BANDS_HELP,
    EXTENT: "Search only this area (default: the whole layer). Patches are laid from its top-left corner.",
    STRIDE: "Distance between patch starts, in pixels at the processing resolution (0 = the patch size: patches side "
            "by side; smaller = overlapping patches, a finer similarity map).",
    OUTPUT: "One polygon per patch with enough valid pixels (at least half of its part inside the area): "
            "similarity (cosine similarity of its embedding to the query's, -1 to 1), rank (1 = the most similar; "
            "equal similarities keep the grid's order, rows first), row and col on the patch grid.",
    OUTPUT_RASTER: "Optional float32 GeoTIFF on the input's grid: each pixel the mean similarity of the patches that "
                   "cover it (Deepness's similarity map); nodata where no patch was run.",
    RESOLUTION: RESOLUTION_HELP,
    **PATCH_RUN_HELP,
}
LABELS = {QUERY: "Query image", QUERY_EXTENT: "Query area", STRIDE: "Stride", OUTPUT: "Patches",
          OUTPUT_RASTER: "Similarity raster"}


class FindSimilarAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = RECOGNITION.algorithm_name, RECOGNITION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Searches a raster layer for places that look like a query image: an embedding model "
                           "turns the query and every patch of the raster into a vector, and each patch gets the "
                           "cosine similarity of its vector to the query's and its rank. Sort the patch layer by "
                           "rank for the best matches; the optional raster maps the similarity.", HELP, LABELS)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, model="Recognition model (Deepness ONNX)", help=HELP)
        add(self, QgsProcessingParameterFile(QUERY, "Query image", fileFilter="Images (*.png *.jpg *.jpeg *.tif "
                                             "*.tiff *.bmp);;All files (*.*)", optional=True), HELP)
        add(self, QgsProcessingParameterExtent(QUERY_EXTENT, "Query area (instead of an image)", optional=True), HELP)
        add(self, QgsProcessingParameterNumber(STRIDE, "Stride (px at the processing resolution; 0 = patch size)",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Patches", QgsProcessing.TypeVectorPolygon), HELP)
        add(self, QgsProcessingParameterRasterDestination(OUTPUT_RASTER, "Similarity raster", optional=True,
                                                          createByDefault=False), HELP)
        add_resolution(self)
        add_tiling_block(self, tiles=False, help=HELP)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.similar import find_similar
        raster = read_raster(self, parameters, INPUT, context)
        outputs = RunOutputs(self, parameters, context, feedback, rasters=(OUTPUT_RASTER,))
        pkg = read_model(self, parameters, context, feedback, RECOGNITION)
        read_area(self, parameters, context, raster)
        query = self.parameterAsFile(parameters, QUERY, context) or None
        query_bounds = extent_bounds(self.parameterAsExtent(parameters, QUERY_EXTENT, context, raster.crs),
                                     QUERY_EXTENT) if parameters.get(QUERY_EXTENT) not in (None, "") else None
        if (query is None) == (query_bounds is None):
            raise QgsProcessingException("Give QUERY (an image of what to look for: PNG, JPEG, GeoTIFF) or "
                                         "QUERY_EXTENT (an area of the input layer), one of the two")
        stride = self.parameterAsInt(parameters, STRIDE, context) or None
        gsd = read_resolution(self, parameters, context)
        raster_path = self.parameterAsOutputLayer(parameters, OUTPUT_RASTER, context) or None
        tiling = read_tiling(self, parameters, context, tiles=False)
        raster.fetch(gsd or pkg.gsd, context, feedback)
        bridge = FeedbackBridge(feedback, 0, 95)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = find_similar(raster.source, pkg, query, query_bounds=query_bounds, stride=stride,
                                  bands=raster.bands, bounds=raster.bounds,
                                  max_pixels=raster.max_pixels, gsd=gsd, raster_output=raster_path,
                                  transaction=outputs.transaction, **tiling, **bridge.callbacks,
                                  **read_cluster(self, parameters, context))
            for w in result.warnings:
                push_warning(feedback, w)
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                self._write(sinks, result, raster.crs, feedback)
            feedback.pushInfo(f"{result.patches_run} of {result.patches} patches compared ({result.native_patch} px, "
                              f"stride {result.native_stride} px of the raster) on {result.device} in "
                              f"{result.seconds:.1f} s")
            for f in result.best(3):
                feedback.pushInfo(f"  rank {f['rank']}: similarity {f['similarity']:.4f}, patch row {f['row']}, "
                                  f"col {f['col']}")
        out = dict(sinks.results)
        if raster_path:
            out[OUTPUT_RASTER] = raster_path
        return out

    @staticmethod
    def _write(sinks, result, crs, feedback):
        fields = make_fields(("similarity", "double"), ("rank", "int"), ("row", "int"), ("col", "int"))
        sink = sinks.create(OUTPUT, fields, QgsWkbTypes.Polygon, crs, style=StyleSimilarity)
        write_polygons(sink, fields, result.features,
                       lambda rec: [round(rec["similarity"], 6), rec["rank"], rec["row"], rec["col"]], feedback,
                       "Cancelled; the patch layer was not completed.")
