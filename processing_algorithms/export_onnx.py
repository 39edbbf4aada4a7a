"""rs_deep:export_onnx — export a segmentation or detection model package to one ONNX file (Deepness/GeoDeep
metadata)."""
from qgis.core import QgsProcessingParameterBoolean, QgsProcessingParameterFileDestination, QgsProcessingParameterNumber

from .base import FeedbackBridge, RSDeepAlgorithm, bundled_models
from .outputs import RunOutputs, StagedOutput
from .params import INPUT, OUTPUT, add, model_parameter, number_or, resolve_model_path

OPSET = "OPSET"
EMBEDDING = "EMBEDDING"
PATCH_SIZE = "PATCH_SIZE"

INPUT_HELP = ("The model package to export: a package folder, a .zip of one, its model.json, or the name of a "
              "bundled model ({models}). Segmentation packages, and detection packages with RS Deep's CenterNet (the "
              "default of Train a model, and the bundled trees_demo).")
OUTPUT_HELP = ("The .onnx file to write (one file, no external data). Its metadata_props hold the package's "
               "model.json (rs_deep:model_json) and the Deepness/GeoDeep keys (model_type, class_names, resolution "
               "in cm, tile_size, tiles_overlap in %, standardization_mean/std when the value scaling can be "
               "written so).")
OPSET_HELP = "ONNX opset version of the exported graph (default 17; onnxruntime 1.14 or newer runs it)."
EMBEDDING_HELP = ("Export only the encoder of a segmentation package, as an embedding model for similarity search "
                  "(rs_deep:find_similar; Deepness's 'Recognition' model type): each patch becomes the mean features "
                  "of the encoder's three deepest stages. A network trained to find buildings makes patches with "
                  "buildings alike.")
PATCH_SIZE_HELP = ("With EMBEDDING: the patch size of the embedding model, in pixels at the package's resolution (a "
                   "multiple of 32; 0 = the package's tile size).")


class ExportOnnxAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME, GROUP_ID = "export_onnx", "Export model package to ONNX", "train"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        return (
            "Exports a segmentation or detection model package to a single ONNX file that RS Deep, Deepness and "
            "GeoDeep can run. The graph takes float32 tiles [batch, bands, tile, tile] (any batch size). "
            "Segmentation returns class probabilities [batch, classes, tile, tile]; detection returns YOLO v5-style "
            "rows [batch, cells, 5 + classes] (centre x, centre y, width, height in tile pixels, score, class "
            "scores; det_type YOLO_v5_or_v7_default). Needs the optional packages onnx and onnxruntime.<br><br>"
            f"<b>Model package</b>: {INPUT_HELP.format(models=models)}<br>"
            f"<b>ONNX file</b>: {OUTPUT_HELP}<br>"
            f"<b>Opset</b>: {OPSET_HELP}<br>"
            f"<b>Encoder as an embedding model</b>: {EMBEDDING_HELP}<br>"
            f"<b>Patch size</b>: {PATCH_SIZE_HELP}"
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        models = ", ".join(bundled_models()) or "none"
        add(self, model_parameter(name=INPUT), {INPUT: INPUT_HELP.format(models=models)})
        add(self, QgsProcessingParameterFileDestination(OUTPUT, "ONNX file", "ONNX models (*.onnx)"),
            {OUTPUT: OUTPUT_HELP})
        add(self, QgsProcessingParameterNumber(OPSET, "ONNX opset", QgsProcessingParameterNumber.Integer, 17,
                                               optional=True, minValue=13, maxValue=21), {OPSET: OPSET_HELP},
            advanced=True)
        add(self, QgsProcessingParameterBoolean(EMBEDDING, "Encoder as an embedding model (for similarity search)",
                                                False, optional=True), {EMBEDDING: EMBEDDING_HELP})
        add(self, QgsProcessingParameterNumber(PATCH_SIZE, "Patch size of the embedding model (px; 0 = tile size)",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            {PATCH_SIZE: PATCH_SIZE_HELP})

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.models.onnx.export import export_onnx
        outputs = RunOutputs(self, parameters, context, feedback)  # OUTPUT is not the model; SIGTERM cancels
        source = resolve_model_path(self.parameterAsFile(parameters, INPUT, context))
        output = self.parameterAsFileOutput(parameters, OUTPUT, context)
        if not output.lower().endswith(".onnx"):
            output += ".onnx"
        opset = number_or(self, parameters, OPSET, context, 17, integer=True)
        embedding = self.parameterAsBool(parameters, EMBEDDING, context)
        patch = number_or(self, parameters, PATCH_SIZE, context, 0, integer=True) or None
        log = FeedbackBridge(feedback).log
        with outputs:  # one file, written to a hidden temporary file and renamed with the commit (or removed)
            staged = outputs.transaction.add(StagedOutput(output))
            export_onnx(source, staged.tmp, opset=opset, log=lambda message: log(message.replace(staged.tmp, output)),
                        embedding=embedding, patch_size=patch)
        return {OUTPUT: output}
