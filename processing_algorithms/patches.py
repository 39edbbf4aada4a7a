"""rs_deep:classify_patches — patch (scene) classification of a raster layer with a classifier package."""
from qgis.core import QgsProcessing, QgsProcessingParameterFeatureSink, QgsProcessingParameterNumber, QgsWkbTypes

from ..rs_deep_plugin.compat import make_fields, push_warning
from ..rs_deep_plugin.engine.inference.patches import score_fields
from ..rs_deep_plugin.engine.tasks import PATCH_CLASSIFICATION
from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .outputs import RunOutputs
from .params import (BANDS, BANDS_HELP, EXTENT, INPUT, MODEL, OUTPUT, PATCH_RUN_HELP, TTA, TTA_HELP,
                     add, add_cluster, add_input_block, add_max_pixels, add_tiling_block, add_tta, help_string,
                     optional_number, read_area, read_cluster, read_model, read_raster, read_tiling, read_tta)
from .sinks import FeatureSinks, write_polygons
from .styles import StyleClasses

TOP = 3  # the best classes written per patch
PATCH_SIZE = "PATCH_SIZE"
STRIDE = "STRIDE"
THRESHOLD = "THRESHOLD"
HELP = {
    INPUT: "Any raster layer (GeoTIFF, VRT, WMS/XYZ...). Rasters larger than memory are read patch by patch.",
    MODEL: "A patch classifier (rs_deep:task \"patch_classification\"): a folder or .zip with model.json and "
           "model.safetensors, its model.json, or the name of a bundled model.",
    BANDS: BANDS_HELP,
    EXTENT: "Classify only this area (default: the whole layer). Patches are laid from its top-left corner.",
    PATCH_SIZE: "Side of a patch in pixels at the model's ground sampling distance (0 = the model's patch size). "
                "Rasters at another resolution are resampled to the model's.",
    STRIDE: "Distance between patch starts, in pixels at the model's GSD (0 = the patch size: patches side by side; "
            "smaller = overlapping patches).",
    THRESHOLD: "Multi-label classifiers only: the score a class needs to be one of a patch's labels, the same for "
               "every class (empty = the package's own threshold per class, chosen on the validation part when it "
               "was trained). Refused for a single-label classifier, which gives each patch its best class.",
    OUTPUT: "One polygon per patch with enough valid pixels. Single-label classifier: class_id, class_name, score "
            "(probability of the winning class), and class_2/score_2, class_3/score_3 (the next best). Multi-label "
            "classifier: labels (the classes whose score reaches their threshold, comma-separated, in the model's "
            "class order; empty when none does), n_labels, and one score field per class (score_ and the class name "
            "in lower-case ASCII, e.g. score_spring_cereal).",
    TTA: TTA_HELP.replace("each tile", "each patch").replace(", turned back,", ""),
    **PATCH_RUN_HELP,
}
LABELS = {PATCH_SIZE: "Patch size", STRIDE: "Stride", THRESHOLD: "Threshold (multi-label)", OUTPUT: "Patches"}


class PatchClassificationAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME = PATCH_CLASSIFICATION.algorithm_name, PATCH_CLASSIFICATION.label

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return help_string("Labels every square patch of a raster layer with a deep-learning scene classifier (for "
                           "example the dominant crop or land cover of each cell) and returns the patches as polygons "
                           "with the winning class, its score and the next best classes; a multi-label classifier "
                           "gives every class present in a patch, with a score per class. Bundled models: "
                           f"{', '.join(bundled_models()) or 'none'}.", HELP, LABELS)

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_input_block(self, model="Patch classifier package (folder, .zip, model.json or bundled name)", help=HELP)
        integer = QgsProcessingParameterNumber.Integer
        add(self, QgsProcessingParameterNumber(PATCH_SIZE, "Patch size (px at the model's GSD; 0 = package)", integer,
                                               0, optional=True, minValue=0), HELP)
        add(self, QgsProcessingParameterNumber(STRIDE, "Stride (px at the model's GSD; 0 = patch size)", integer, 0,
                                               optional=True, minValue=0), HELP)
        add(self, QgsProcessingParameterNumber(THRESHOLD, "Threshold (multi-label; empty = the package's per class)",
                                               QgsProcessingParameterNumber.Double, None, optional=True), HELP)
        add(self, QgsProcessingParameterFeatureSink(OUTPUT, "Patches", QgsProcessing.TypeVectorPolygon), HELP)
        add_tta(self, HELP)
        add_tiling_block(self, tiles=False, help=HELP)
        add_max_pixels(self)
        add_cluster(self)

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.inference.patches import classify_patches
        raster = read_raster(self, parameters, INPUT, context)  # a path is never loaded as a layer
        outputs = RunOutputs(self, parameters, context, feedback)
        pkg = read_model(self, parameters, context, feedback, PATCH_CLASSIFICATION)
        read_area(self, parameters, context, raster)
        patch = self.parameterAsInt(parameters, PATCH_SIZE, context) or None
        stride = self.parameterAsInt(parameters, STRIDE, context) or None
        tiling = read_tiling(self, parameters, context, tiles=False)
        tta = read_tta(self, parameters, context)
        threshold = optional_number(self, parameters, THRESHOLD, context, None)
        raster.fetch(pkg.gsd, context, feedback)
        bridge = FeedbackBridge(feedback, 0, 95)
        with outputs:  # every output renamed into place at the end of the block, or none
            result = classify_patches(raster.source, pkg, patch_size=patch, stride=stride, bands=raster.bands,
                                      bounds=raster.bounds, top_k=TOP, max_pixels=raster.max_pixels, tta=tta,
                                      threshold=threshold, **tiling, **bridge.callbacks,
                                      **read_cluster(self, parameters, context))
            for w in result.warnings:
                push_warning(feedback, w)
            # the sink is created only now: a cancelled or failed run leaves no layer behind
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                self._write(sinks, result, pkg, raster.crs, feedback)
            feedback.pushInfo(f"{result.patches_run} of {result.patches} patches classified ({result.native_patch} "
                              f"px, stride {result.native_stride} px of the raster) on {result.device} in "
                              f"{result.seconds:.1f} s, test-time augmentation {result.tta}")
            for name, count in sorted(result.class_counts().items(), key=lambda kv: -kv[1]):
                feedback.pushInfo(f"  {name}: {count} patches")
        return sinks.results

    @staticmethod
    def _write(sinks, result, pkg, crs, feedback):
        """One polygon per patch: the winning class and score, then the next best classes and their scores; or
        (multi-label) the labels and the score of every class."""
        if result.multi_label:
            fields = make_fields(("labels", "string"), ("n_labels", "int"),
                                 *[(n, "double") for n in score_fields(result.class_names)])
            style = None

            def attributes(rec):
                return [",".join(rec["labels"]), len(rec["labels"])] + list(rec["scores"])
        else:
            fields = make_fields(("class_id", "int"), ("class_name", "string"), ("score", "double"),
                                 *[(f"{kind}_{i}", t) for i in range(2, TOP + 1)
                                   for kind, t in (("class", "string"), ("score", "double"))])

            def style():
                return StyleClasses(pkg.classes)

            def attributes(rec):
                attrs = [rec["class_id"], rec["class_name"], round(rec["score"], 4)]
                for i in range(1, TOP):
                    attrs += [rec["top"][i][1], round(rec["top"][i][2], 4)] if i < len(rec["top"]) else [None, None]
                return attrs
        sink = sinks.create(OUTPUT, fields, QgsWkbTypes.Polygon, crs, style=style)
        write_polygons(sink, fields, result.features, attributes, feedback,
                       "Cancelled; the patch layer was not completed.")
