"""rs_deep:export_training_data — a raster and its labels as georeferenced chips with a manifest."""
import os

from qgis.core import (QgsCoordinateTransform, QgsProcessing, QgsProcessingException, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingParameterBoolean, QgsProcessingParameterDefinition,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsRectangle)

from .assess import check_overlap, class_value_or_name, read_labelled_polygons
from .base import FeedbackBridge, NamedEnum, RSDeepAlgorithm, export_raster_layer, gdal_path, require_dependencies
from .outputs import RunOutputs

TASKS = ["segmentation", "detection", "change"]
TASK_LABELS = ["Semantic segmentation", "Object detection", "Change detection"]
BACKGROUND = {"segmentation": ("background",), "change": ("no change", "no_change", "unchanged", "background")}


def _sorted_values(values):
    ints = [v for v in values if isinstance(v, int)]
    texts = [v for v in values if not isinstance(v, int)]
    return sorted(ints) + sorted(texts, key=lambda t: t.lower())


def map_classes(task, pairs, field, layer_name):
    """(class names, ``[(geometry, class value)]``) from labelled polygons, as the trainers take them.

    Segmentation and change: the background / no change is class 0 (a polygon whose class is named
    'background' - or 'no change' for change - marks it), the other values are 1..K in sorted
    order. Detection: the sorted values are 0..K-1. Without a class field every polygon is one
    class named after the layer (change: 'change')."""
    if field:
        values = [class_value_or_name(v) for _, v in pairs]
    else:
        values = [("change" if task == "change" else layer_name)] * len(pairs)
    classes = _sorted_values(set(values))
    if task == "detection":
        index = {c: i for i, c in enumerate(classes)}
        return [str(c) for c in classes], [(g, index[v]) for (g, _), v in zip(pairs, values)]
    fg = [c for c in classes if str(c).strip().lower() not in BACKGROUND[task]]
    if not fg:
        raise QgsProcessingException("LABELS only holds background polygons; label the objects (or changes) to learn")
    index = {c: i + 1 for i, c in enumerate(fg)}
    first = "background" if task == "segmentation" else "no change"
    return [first] + [str(c) for c in fg], [(g, index.get(v, 0)) for (g, _), v in zip(pairs, values)]


def label_colors(layer, field, class_names, task):
    """Class colours from the labels layer's style, when it has one: a categorized renderer on ``field`` (its
    categories' colours, matched by value or name), or, without a class field, a single-symbol renderer (the
    one labelled class). Classes the style does not name keep RS Deep's default colours; None without a style."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsSingleSymbolRenderer
    from ..rs_deep_plugin.engine.models.package import DEFAULT_COLORS
    renderer = layer.renderer() if layer is not None and hasattr(layer, "renderer") else None
    found = {}
    if isinstance(renderer, QgsCategorizedSymbolRenderer) and field and renderer.classAttribute() == field:
        for cat in renderer.categories():
            if cat.symbol() is not None and cat.value() is not None:
                found[str(class_value_or_name(cat.value())).strip().lower()] = cat.symbol().color().name()
    elif isinstance(renderer, QgsSingleSymbolRenderer) and not field and renderer.symbol() is not None:
        found = {str(n).strip().lower(): renderer.symbol().color().name() for n in class_names
                 if str(n).strip().lower() not in BACKGROUND.get(task, ())}
    if not found:
        return None
    offset = 1 if task in ("detection", "patch_classification") else 0
    colors = []
    for i, name in enumerate(class_names):
        c = found.get(str(name).strip().lower())
        colors.append(c[1:].upper() if c else DEFAULT_COLORS[(i + offset) % len(DEFAULT_COLORS)])
    return colors


def raster_file(layer, what):
    """The file behind a raster layer; web and database layers must be saved as a file first."""
    path = gdal_path(layer)
    if path is None:
        raise QgsProcessingException(
            f"{what} {layer.name()} is not a raster file ({layer.providerType()} layer): this reads the pixels from "
            "a file. Save the layer as a GeoTIFF first (Export > Save As..., or Raster > Conversion > Translate) "
            "over the area you labelled, and use that file; or run 'Export training data (chips)', which fetches "
            "web layers itself, and train from its chips (CHIPS)")
    return path


def label_raster_classes(path, task):
    """Class names of a label raster: its category names, else 'class N' for each value up to the largest."""
    import numpy as np
    import rasterio
    from ..rs_deep_plugin.engine.evaluation.accuracy import raster_category_names
    if task == "change":
        return ["no change", "change"]
    top = 0
    with rasterio.open(path) as ds:
        for _, win in ds.block_windows(1):
            a = ds.read(1, window=win, masked=True)
            vals = a.compressed()
            vals = vals[(vals != 255) & np.isfinite(vals)] if vals.size else vals
            if vals.size:
                top = max(top, int(vals.max()))
    if top < 1:
        raise QgsProcessingException(f"The label raster {os.path.basename(path)} holds no class above 0 (0 is the "
                                     "background, 255 not labelled); label the objects to learn")
    names = raster_category_names(path)
    return [names.get(0, "background")] + [names.get(v, f"class {v}") for v in range(1, top + 1)]


class ExportTrainingDataAlgorithm(RSDeepAlgorithm):
    GROUP_ID = "train"
    INPUT = "INPUT"
    LABELS = "LABELS"
    CLASS_FIELD = "CLASS_FIELD"
    LABEL_RASTER = "LABEL_RASTER"
    TASK = "TASK"
    INPUT_AFTER = "INPUT_AFTER"
    TILE_SIZE = "TILE_SIZE"
    STRIDE = "STRIDE"
    ONLY_LABELLED = "ONLY_LABELLED"
    VALIDATION = "VALIDATION"
    BLOCK_SIZE = "BLOCK_SIZE"
    SEED = "SEED"
    GSD = "GSD"
    OUTPUT = "OUTPUT"
    MANIFEST = "MANIFEST"
    CHIPS = "CHIPS"
    TRAIN_CHIPS = "TRAIN_CHIPS"
    VAL_CHIPS = "VAL_CHIPS"

    def name(self):
        return "export_training_data"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Export training data (chips)"

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
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster (before, for change)"))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, "Labels (polygons)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field", None, self.LABELS,
                                                      QgsProcessingParameterField.Any, optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.LABEL_RASTER, "Label raster (instead of polygons)",
                                                            optional=True))
        self.addParameter(NamedEnum(self.TASK, "Task", TASK_LABELS, TASKS, defaultValue=0))
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT_AFTER, "After raster (change detection)",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size (px)",
                                                       QgsProcessingParameterNumber.Integer, 256, minValue=16,
                                                       maxValue=4096))
        self.addParameter(QgsProcessingParameterNumber(self.STRIDE, "Stride (px; 0 = the tile size)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        self.addParameter(QgsProcessingParameterBoolean(self.ONLY_LABELLED, "Only chips that touch labels", True))
        self.addParameter(QgsProcessingParameterNumber(self.VALIDATION, "Validation fraction (share of blocks)",
                                                       QgsProcessingParameterNumber.Double, 0.2, minValue=0.0,
                                                       maxValue=0.5))
        self.addParameter(QgsProcessingParameterNumber(self.BLOCK_SIZE, "Split block size (px; 0 = 4 x tile size)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        seed = QgsProcessingParameterNumber(self.SEED, "Random seed of the split", QgsProcessingParameterNumber.Integer,
                                            0, optional=True, minValue=0)
        seed.setFlags(seed.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(seed)
        gsd = QgsProcessingParameterNumber(self.GSD, "Pixel size for web layers (m; 0 = the layer's own)",
                                           QgsProcessingParameterNumber.Double, 0.0, optional=True, minValue=0.0)
        gsd.setFlags(gsd.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(gsd)
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Output folder"))
        self.addOutput(QgsProcessingOutputFile(self.MANIFEST, "Manifest (JSON)"))
        self.addOutput(QgsProcessingOutputNumber(self.CHIPS, "Chips"))
        self.addOutput(QgsProcessingOutputNumber(self.TRAIN_CHIPS, "Training chips"))
        self.addOutput(QgsProcessingOutputNumber(self.VAL_CHIPS, "Validation chips"))

    @staticmethod
    def _file_or_fetch(layer, what, area, gsd, context, feedback):
        """The layer's file, or (web and database layers) a GeoTIFF fetched through QGIS over ``area`` (the
        labels' extent, one tenth wider on every side) at ``gsd`` metres (0: the layer's own resolution)."""
        if gdal_path(layer) is not None:
            return raster_file(layer, what)
        rect = QgsRectangle(area)
        rect.grow(max(rect.width(), rect.height()) * 0.1 or layer.rasterUnitsPerPixelX() * 64)
        rect = rect.intersect(layer.extent()) if not layer.extent().isEmpty() else rect
        if rect.isEmpty():
            raise QgsProcessingException(f"The labels do not overlap {what} {layer.name()}; check their CRS")
        feedback.pushInfo(f"{what} {layer.name()} is a {layer.providerType()} layer: fetching it over the labels' "
                          "extent" + (f" at {gsd:g} m per pixel" if gsd else " at its own resolution"))
        return export_raster_layer(layer, rect, gsd or None, context, feedback)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.training.chips import check_output_folder, export_training_data
        from ..rs_deep_plugin.engine.errors import RSDeepError

        outputs = RunOutputs(self, parameters, context, feedback)
        try:  # before any work: a folder that is not an earlier export is never used
            if self.parameterAsFileOutput(parameters, self.OUTPUT, context):
                check_output_folder(self.parameterAsFileOutput(parameters, self.OUTPUT, context))
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("INPUT is not a valid raster layer; choose a raster layer or file")
        if not layer.crs().isValid():
            raise QgsProcessingException(f"INPUT {layer.name()} has no CRS; set it (Layer Properties > Source) "
                                         "so the labels and chips can be placed")
        task = self.parameterAsEnumName(parameters, self.TASK, context)
        after_layer = None
        if task == "change":
            after_layer = self.parameterAsRasterLayer(parameters, self.INPUT_AFTER, context)
            if after_layer is None or not after_layer.isValid():
                raise QgsProcessingException("Change detection needs the after raster: set INPUT_AFTER")
        source = self.parameterAsSource(parameters, self.LABELS, context)
        label_layer = self.parameterAsRasterLayer(parameters, self.LABEL_RASTER, context)
        if source is not None and label_layer is not None:
            raise QgsProcessingException("Give LABELS (polygons) or LABEL_RASTER, not both")
        if source is None and label_layer is None:
            raise QgsProcessingException("Give the labels: LABELS (polygons) or LABEL_RASTER")
        if label_layer is not None:
            if task == "detection":
                raise QgsProcessingException("Detection needs boxes: give LABELS (polygons), not LABEL_RASTER")
            labels = raster_file(label_layer, "LABEL_RASTER")
            class_names = label_raster_classes(labels, task)
            class_colors = None
            area = label_layer.extent()
            if label_layer.crs() != layer.crs():
                area = QgsCoordinateTransform(label_layer.crs(), layer.crs(),
                                              context.transformContext()).transformBoundingBox(area)
        else:
            field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
            pairs = read_labelled_polygons(source, field, layer.crs(), context, feedback, "LABELS")
            check_overlap(pairs, layer, "LABELS")
            class_names, labels = map_classes(task, pairs, field, source.sourceName() or "object")
            class_colors = label_colors(self.parameterAsVectorLayer(parameters, self.LABELS, context), field,
                                        class_names, task)
            if class_colors:
                feedback.pushInfo("Class colours from the labels layer's style")
            import shapely
            x0, y0, x1, y1 = shapely.GeometryCollection([g for g, _ in pairs]).bounds
            area = QgsRectangle(x0, y0, x1, y1)
        gsd = self.parameterAsDouble(parameters, self.GSD, context) if parameters.get(self.GSD) not in (None, "") \
            else 0.0
        image = self._file_or_fetch(layer, "INPUT", area, gsd, context, feedback)
        after = self._file_or_fetch(after_layer, "INPUT_AFTER", area, gsd, context, feedback) \
            if after_layer is not None else None
        feedback.pushInfo("Classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
        out_dir = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out_dir:
            raise QgsProcessingException("OUTPUT: give the folder to write the chips to")
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        stride = self.parameterAsInt(parameters, self.STRIDE, context) or tile
        if stride > tile:
            raise QgsProcessingException(f"STRIDE ({stride}) is larger than TILE_SIZE ({tile}): pixels between chips "
                                         "would be lost; use a stride up to the tile size")
        bridge = FeedbackBridge(feedback)
        try:
            with outputs:  # the folder is put in place at the end of the block, or nothing is
                m = export_training_data(
                    image, labels, out_dir, task=task, class_names=class_names, class_colors=class_colors,
                    after_path=after, tile_size=tile,
                    stride=stride, only_labelled=self.parameterAsBoolean(parameters, self.ONLY_LABELLED, context),
                    val_fraction=self.parameterAsDouble(parameters, self.VALIDATION, context),
                    block_size=self.parameterAsInt(parameters, self.BLOCK_SIZE, context) or None,
                    seed=self.parameterAsInt(parameters, self.SEED, context),
                    progress=bridge.progress, is_cancelled=bridge.is_cancelled, log=bridge.log,
                    transaction=outputs.transaction)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        split = m["split"]
        feedback.setProgress(100)
        return {self.OUTPUT: os.path.dirname(m["path"]), self.MANIFEST: m["path"], self.CHIPS: len(m["chips"]),
                self.TRAIN_CHIPS: split["train_chips"], self.VAL_CHIPS: split["val_chips"]}
