"""rs_deep:export_training_data — a raster and its labels as georeferenced chips with a manifest."""
import os

from qgis.core import (QgsCoordinateTransform, QgsProcessingException, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingParameterBoolean,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber, QgsRectangle)

from ..rs_deep_plugin.engine.tasks import CHANGE, DETECTION, SEGMENTATION
from .base import FeedbackBridge, RSDeepAlgorithm
from .labels import label_colors, label_raster_classes, map_classes
from .layers import check_overlap, file_or_fetch, raster_file, read_labelled_polygons
from .outputs import RunOutputs
from .params import (CLASS_FIELD, INPUT, INPUT_AFTER, LABEL_RASTER, LABELS, OUTPUT, TASK, TILE_SIZE, add,
                     add_training_data_block, number_or, read_raster_layer)

CHIP_TASKS = [SEGMENTATION, DETECTION, CHANGE]
STRIDE = "STRIDE"
ONLY_LABELLED = "ONLY_LABELLED"
VALIDATION = "VALIDATION"
BLOCK_SIZE = "BLOCK_SIZE"
SEED = "SEED"
GSD = "GSD"
MANIFEST = "MANIFEST"
#: the chip counts returned besides the folder and the manifest
COUNTS = {"CHIPS": "Chips", "TRAIN_CHIPS": "Training chips", "VAL_CHIPS": "Validation chips"}


class ExportTrainingDataAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME, GROUP_ID = "export_training_data", "Export training data (chips)", "train"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return (
            "Cuts a raster and its labels into square georeferenced chips (GeoTIFF) with a manifest.json, split "
            "into training and validation by spatial blocks. 'Train a model' takes the folder (CHIPS); other "
            "tools can read the GeoTIFFs and the manifest.<br><br>"
            "<b>Input raster</b>: any raster layer (before image for change detection). Web and database "
            "layers (WMS, XYZ, WCS...) are fetched through QGIS over the labels' extent, at <b>Pixel size for "
            "web layers</b> (metres; 0 = the layer's own resolution).<br>"
            "<b>Labels</b>: polygons in any CRS (reprojected to the raster's). Segmentation: the outlines, every "
            "pixel outside is background. Detection: each feature's bounding box is an object. Change: the "
            "changed areas.<br>"
            "<b>Class field</b>: optional class of each feature (sorted values; 'background' marks background).<br>"
            "<b>Label raster</b>: instead of polygons (segmentation, change): class values, 0 = background / no "
            "change, 255 or nodata = not labelled; a change mask may be 0/1 or 0/255.<br>"
            "<b>After raster</b>: change detection only; resampled onto the before raster's grid if needed.<br>"
            "<b>Tile size, stride</b>: chip size and step in pixels (stride 0 = the tile size, no overlap).<br>"
            "<b>Only chips that touch labels</b>: skip chips without any labelled object.<br>"
            "<b>Validation fraction, block size</b>: the raster is cut into square blocks (0 = 4 x the tile size); "
            "that share of the blocks is held back for validation, and chips crossing a block edge between the two "
            "sides are dropped, so no pixel is in both (random pixels or chips would leak).<br>"
            "<b>Output folder</b>: images/, labels/ (and after/), manifest.json. An earlier export in the folder is "
            "replaced once the new one is complete; a cancelled run leaves nothing."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        add_training_data_block(self, CHIP_TASKS)
        integer, double = QgsProcessingParameterNumber.Integer, QgsProcessingParameterNumber.Double
        self.addParameter(QgsProcessingParameterNumber(TILE_SIZE, "Tile size (px)", integer, 256, minValue=16,
                                                       maxValue=4096))
        self.addParameter(QgsProcessingParameterNumber(STRIDE, "Stride (px; 0 = the tile size)", integer, 0,
                                                       optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterBoolean(ONLY_LABELLED, "Only chips that touch labels", True))
        self.addParameter(QgsProcessingParameterNumber(VALIDATION, "Validation fraction (share of blocks)", double,
                                                       0.2, minValue=0.0, maxValue=0.5))
        self.addParameter(QgsProcessingParameterNumber(BLOCK_SIZE, "Split block size (px; 0 = 4 x tile size)", integer,
                                                       0, optional=True, minValue=0))
        add(self, QgsProcessingParameterNumber(SEED, "Random seed of the split", integer, 0, optional=True,
                                               minValue=0), advanced=True)
        add(self, QgsProcessingParameterNumber(GSD, "Pixel size for web layers (m; 0 = the layer's own)", double, 0.0,
                                               optional=True, minValue=0.0), advanced=True)
        self.addParameter(QgsProcessingParameterFolderDestination(OUTPUT, "Output folder"))
        self.addOutput(QgsProcessingOutputFile(MANIFEST, "Manifest (JSON)"))
        for name, description in COUNTS.items():
            self.addOutput(QgsProcessingOutputNumber(name, description))

    def process(self, parameters, context, feedback):
        from ..rs_deep_plugin.engine.training.chips import check_output_folder, export_training_data
        outputs = RunOutputs(self, parameters, context, feedback)
        out_dir = self.parameterAsFileOutput(parameters, OUTPUT, context)
        if out_dir:
            check_output_folder(out_dir)  # before any work: a folder that is not an earlier export is never used
        layer = read_raster_layer(self, parameters, INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("INPUT is not a valid raster layer; choose a raster layer or file")
        if not layer.crs().isValid():
            raise QgsProcessingException(f"INPUT {layer.name()} has no CRS; set it (Layer Properties > Source) "
                                         "so the labels and chips can be placed")
        task = self.parameterAsEnumName(parameters, TASK, context)
        after_layer = None
        if task == CHANGE.name:
            after_layer = read_raster_layer(self, parameters, INPUT_AFTER, context)
            if after_layer is None or not after_layer.isValid():
                raise QgsProcessingException("Change detection needs the after raster: set INPUT_AFTER")
        labels, class_names, class_colors, area = self._labels(parameters, context, feedback, layer, task)
        gsd = number_or(self, parameters, GSD, context, 0.0)
        image = file_or_fetch(layer, "INPUT", area, gsd, context, feedback)
        after = file_or_fetch(after_layer, "INPUT_AFTER", area, gsd, context, feedback) \
            if after_layer is not None else None
        feedback.pushInfo("Classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
        if not out_dir:
            raise QgsProcessingException("OUTPUT: give the folder to write the chips to")
        tile = self.parameterAsInt(parameters, TILE_SIZE, context)
        stride = self.parameterAsInt(parameters, STRIDE, context) or tile
        if stride > tile:
            raise QgsProcessingException(f"STRIDE ({stride}) is larger than TILE_SIZE ({tile}): pixels between chips "
                                         "would be lost; use a stride up to the tile size")
        bridge = FeedbackBridge(feedback)
        with outputs:  # the folder is put in place at the end of the block, or nothing is
            m = export_training_data(
                image, labels, out_dir, task=task, class_names=class_names, class_colors=class_colors,
                after_path=after, tile_size=tile, stride=stride,
                only_labelled=self.parameterAsBoolean(parameters, ONLY_LABELLED, context),
                val_fraction=self.parameterAsDouble(parameters, VALIDATION, context),
                block_size=self.parameterAsInt(parameters, BLOCK_SIZE, context) or None,
                seed=self.parameterAsInt(parameters, SEED, context), transaction=outputs.transaction,
                **bridge.callbacks)
        split = m["split"]
        return {OUTPUT: os.path.dirname(m["path"]), MANIFEST: m["path"], "CHIPS": len(m["chips"]),
                "TRAIN_CHIPS": split["train_chips"], "VAL_CHIPS": split["val_chips"]}

    def _labels(self, parameters, context, feedback, layer, task):
        """LABELS or LABEL_RASTER as (labels as the engine takes them, class names, class colours or None, the
        labelled area in the raster's CRS)."""
        source = self.parameterAsSource(parameters, LABELS, context)
        label_layer = read_raster_layer(self, parameters, LABEL_RASTER, context)
        if source is not None and label_layer is not None:
            raise QgsProcessingException("Give LABELS (polygons) or LABEL_RASTER, not both")
        if source is None and label_layer is None:
            raise QgsProcessingException("Give the labels: LABELS (polygons) or LABEL_RASTER")
        if label_layer is not None:
            if task == DETECTION.name:
                raise QgsProcessingException("Detection needs boxes: give LABELS (polygons), not LABEL_RASTER")
            labels = raster_file(label_layer, "LABEL_RASTER")
            area = label_layer.extent()
            if label_layer.crs() != layer.crs():
                area = QgsCoordinateTransform(label_layer.crs(), layer.crs(),
                                              context.transformContext()).transformBoundingBox(area)
            return labels, label_raster_classes(labels, task), None, area
        import shapely
        field = self.parameterAsString(parameters, CLASS_FIELD, context)
        pairs = read_labelled_polygons(source, field, layer.crs(), context, feedback, "LABELS")
        check_overlap(pairs, layer, "LABELS")
        class_names, labels = map_classes(task, pairs, field, source.sourceName() or "object")
        class_colors = label_colors(self.parameterAsVectorLayer(parameters, LABELS, context), field, class_names,
                                    task)
        if class_colors:
            feedback.pushInfo("Class colours from the labels layer's style")
        x0, y0, x1, y1 = shapely.GeometryCollection([g for g, _ in pairs]).bounds
        return labels, class_names, class_colors, QgsRectangle(x0, y0, x1, y1)
