"""Parameter blocks shared by the RS Deep algorithms, each with its reader: the model, the input raster(s) with their
bands and extent, tiling and device, polygon options, the class-raster outputs and the MAX_PIXELS guard.

An algorithm declares a block in ``initAlgorithm`` (``add_*``: names, defaults, dialog order, advanced flags and help
as users and ``qgis_process`` know them) and reads it back in ``process`` (``read_*``: the values as the engine takes
them)::

    add_input_block(self)               # INPUT, MODEL, BANDS, EXTENT
    add_tiling_block(self)              # TILE_SIZE, OVERLAP, BATCH_SIZE, DEVICE, VALUE_SCALING (advanced)
    ...
    raster = read_raster(self, parameters, INPUT, context)
    pkg = read_model(self, parameters, context, feedback, SEGMENTATION)
    read_area(self, parameters, context, raster)
    engine_call(raster.source, pkg, bands=raster.bands, bounds=raster.bounds, **read_tiling(self, parameters, context))
"""
import os

from qgis.core import (QgsProcessing, QgsProcessingException,
                       QgsProcessingParameterBand, QgsProcessingParameterDefinition, QgsProcessingParameterExtent,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFeatureSource,
                       QgsProcessingParameterField, QgsProcessingParameterFile, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString)

from ..rs_deep_plugin.engine.inference.distributed import SCHEDULER_ENV, default_cluster
from ..rs_deep_plugin.engine.models.package import SCALING_CHOICES
from ..rs_deep_plugin.engine.models.tta import TTA_CHOICES
from .base import DEVICES, MODELS_DIR, FeedbackBridge, NamedEnum, bundled_models
from .layers import FileRaster, export_raster_layer, gdal_path


def add(alg, param, help=None, advanced=False):
    """Add ``param`` to ``alg``, with its help from ``help`` ({name: text}) when it has one there, and the
    advanced flag."""
    if help and param.name() in help:
        param.setHelp(help[param.name()])
    if advanced:
        param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    alg.addParameter(param)


def optional_number(alg, parameters, name, context, unset, integer=False):
    """A number parameter's value, or None (= the package's) when it is not given or ``unset``."""
    if parameters.get(name) in (None, ""):
        return None
    value = (alg.parameterAsInt if integer else alg.parameterAsDouble)(parameters, name, context)
    return None if value == unset else value


def number_or(alg, parameters, name, context, default, integer=False):
    """A number parameter's value, or ``default`` when it is not given."""
    if parameters.get(name) in (None, ""):
        return default
    return (alg.parameterAsInt if integer else alg.parameterAsDouble)(parameters, name, context)


# -- the model block -------------------------------------------------------------------------------------------------

MODEL = "MODEL"
MODEL_LABEL = "Model package (folder, .zip, model.json or bundled name)"


def model_parameter(description=MODEL_LABEL, name=MODEL):
    """The model package parameter: a folder, a .zip, a model.json or a bundled model's name."""
    return QgsProcessingParameterFile(name, description, behavior=QgsProcessingParameterFile.Folder, optional=False)


def resolve_model_path(value):
    """MODEL may be a folder, a .zip, a model.json, or the name of a bundled model."""
    value = (value or "").strip()
    if value and not os.path.exists(value) and os.sep not in value and "/" not in value:
        candidate = os.path.join(MODELS_DIR, value)
        if os.path.isdir(candidate):
            return candidate
        names = ", ".join(bundled_models()) or "none"
        raise QgsProcessingException(f"Model package not found: {value!r}. Give a package folder, .zip or "
                                     f"model.json, or a bundled model name ({names}).")
    return value


def load_model_package(value, task):
    """The model package of a MODEL value, checked to be of ``task`` (a name of ``engine.tasks``; None: any)."""
    from ..rs_deep_plugin.engine.models.loading import load_package
    return load_package(resolve_model_path(value), task=task)


def read_model(alg, parameters, context, feedback, task):
    """MODEL as a loaded package of ``task`` (an ``engine.tasks.Task``; its name is logged), with the run's
    VALUE_SCALING when the algorithm has it (:func:`read_value_scaling`)."""
    pkg = load_model_package(alg.parameterAsFile(parameters, MODEL, context), task.name)
    feedback.pushInfo(f"Model: {pkg.name}")
    return read_value_scaling(alg, parameters, context, pkg)


VALUE_SCALING = "VALUE_SCALING"
VALUE_SCALING_LABELS = ("As the model says", "The training data's (stored in the model)",
                        "This input's own 1st-99th percentiles")
VALUE_SCALING_HELP = ("How the raster's values are scaled for the model. 'As the model says': by the training data's "
                      "range, or by each input's own 1st-99th percentiles for packages trained with INPUT_SCALING "
                      "'input' (and RS Deep 0.14-0.17 segmentation packages). 'This input's own' makes a model robust "
                      "to a darker or brighter scene of the same content (another date, sun or view angle), but moves "
                      "every value when the input holds brighter or darker things than the training data (a town, "
                      "clouds, bare fields); 'The training data's' keeps absolute values (e.g. reflectance, where a "
                      "brighter field means something).")


def read_value_scaling(alg, parameters, context, pkg):
    """``pkg`` with VALUE_SCALING applied (the package as it is when the algorithm has no such parameter)."""
    if alg.parameterDefinition(VALUE_SCALING) is None:
        return pkg
    from ..rs_deep_plugin.engine.errors import RSDeepError
    from ..rs_deep_plugin.engine.models.package import with_input_scaling
    try:
        return with_input_scaling(pkg, alg.parameterAsEnumName(parameters, VALUE_SCALING, context))
    except RSDeepError as exc:
        raise QgsProcessingException(str(exc)) from exc


# -- the input block: raster(s), bands, extent -----------------------------------------------------------------------

INPUT = "INPUT"
BANDS = "BANDS"
EXTENT = "EXTENT"
BANDS_LABEL = "Bands (in the model's order)"


class RasterInput(QgsProcessingParameterRasterLayer):
    """A raster layer parameter that takes a raster file path as it is, without loading it as a QGIS layer.

    QGIS (3.22 at least) computes band statistics whenever it creates a ``QgsRasterLayer`` (the default
    contrast enhancement of its renderer), and GDAL saves them beside the file (``in.tif.aux.xml``) or into
    the file itself for a VRT. Processing creates that layer while it checks the parameters
    (``QgsProcessingParameterRasterLayer.checkValueIsAcceptable``), so an input given as a path (qgis_process,
    scripts, models) was changed by every run. A layer already in the project (the dialog) is checked as
    before. Read the value with :func:`read_raster`."""

    def clone(self):
        copy = RasterInput(self.name(), self.description(), self.defaultValue(),
                           bool(self.flags() & QgsProcessingParameterDefinition.FlagOptional))
        copy.setFlags(self.flags())
        copy.setHelp(self.help())
        return copy

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS API)
        if existing_file(value):
            return True
        return super().checkValueIsAcceptable(value, context)


def existing_file(value):
    """``value`` when it is the path of an existing file (a raster given by its path), else None."""
    return value if isinstance(value, str) and value.strip() and os.path.isfile(value) else None


def add_input_block(alg, rasters=((INPUT, "Input raster"),), model=MODEL_LABEL, bands=BANDS_LABEL, help=None):
    """The input rasters (:class:`RasterInput`, ``[(name, description)]``), MODEL, BANDS (of the first raster) and
    EXTENT, in this order; ``help``: {name: text} of those that have one."""
    for name, description in rasters:
        add(alg, RasterInput(name, description), help)
    add(alg, model_parameter(model), help)
    add(alg, QgsProcessingParameterBand(BANDS, bands, None, rasters[0][0], optional=True, allowMultiple=True), help)
    add(alg, QgsProcessingParameterExtent(EXTENT, "Extent", optional=True), help)


class Raster:
    """A raster input as read by :func:`read_raster`: ``layer`` (None for a file path, which is read by the engine
    only, never loaded as a QGIS layer: see :class:`RasterInput`), ``source`` (its file; None for a web or database
    layer until :meth:`fetch`) and ``crs``; :func:`read_area` adds ``bands``, ``extent`` (EXTENT in the raster's
    CRS), ``bounds`` (EXTENT as the engine takes it; None: everywhere) and ``max_pixels``."""

    def __init__(self, layer, source, crs):
        self.layer, self.source, self.crs = layer, source, crs
        self.bands = self.extent = self.bounds = self.max_pixels = None

    def fetch(self, gsd, context, feedback):
        """A web or database layer read through QGIS at ``gsd`` into a temporary GeoTIFF (over EXTENT when it is
        set: ``bounds`` is then None, the file covers EXTENT only); returns ``source``."""
        if self.source is None:
            self.source = export_raster_layer(self.layer, self.extent if self.bounds else None, gsd, context,
                                              feedback)
            self.bounds = None
        return self.source


def read_raster(alg, parameters, name, context):
    """A raster parameter (:class:`RasterInput`) as a :class:`Raster`: a file path gives no layer, its own path and
    its CRS; a layer gives itself, its GDAL path (None for other providers: WMS, XYZ...) and its CRS."""
    layer = read_raster_layer(alg, parameters, name, context)
    if layer is None or not layer.isValid():
        raise QgsProcessingException(f"{name} is not a valid raster layer; choose a raster layer or file")
    if isinstance(layer, FileRaster):  # a file path: read by the engine only
        return Raster(None, layer.source(), layer.crs())
    return Raster(layer, gdal_path(layer), layer.crs())


def read_raster_layer(alg, parameters, name, context):
    """A raster parameter (:class:`RasterInput`) as a layer: a file path as a :class:`.layers.FileRaster` (never
    loaded as a QGIS layer, so nothing is written beside the user's file), a layer as itself; None when unset."""
    path = existing_file(parameters.get(name))
    if path is None:
        return alg.parameterAsRasterLayer(parameters, name, context)
    try:
        return FileRaster(path)
    except Exception as exc:
        raise QgsProcessingException(f"{name}: {path} is not a raster GDAL can read ({exc}); choose a raster "
                                     "layer or file") from exc


def extent_bounds(extent, name=EXTENT):
    """An extent parameter (``name``, already in the layer's CRS) as a (xmin, ymin, xmax, ymax) tuple, or None when
    not given. An extent with no width or no height is refused (it used to mean "the whole layer")."""
    if extent is None or extent.isNull():
        return None
    for what, size in (("width", extent.width()), ("height", extent.height())):
        if not size > 0:
            raise QgsProcessingException(f"{name} has zero {what}; draw an area or leave it empty")
    return (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())


def read_area(alg, parameters, context, raster):
    """BANDS, EXTENT (in the CRS of ``raster``) and MAX_PIXELS into ``raster`` (a :class:`Raster`)."""
    raster.bands = alg.parameterAsInts(parameters, BANDS, context) or None
    raster.extent = alg.parameterAsExtent(parameters, EXTENT, context, raster.crs)
    raster.bounds = extent_bounds(raster.extent)
    raster.max_pixels = read_max_pixels(alg, parameters, context)
    return raster


# -- the tiling and device block -------------------------------------------------------------------------------------

TILE_SIZE = "TILE_SIZE"
OVERLAP = "OVERLAP"
BATCH_SIZE = "BATCH_SIZE"
DEVICE = "DEVICE"


def add_tiling_block(alg, tiles=True, help=None):
    """TILE_SIZE and OVERLAP (with ``tiles``), BATCH_SIZE, DEVICE and VALUE_SCALING (read with the model:
    :func:`read_model`), all advanced; ``help``: {name: text}."""
    integer = QgsProcessingParameterNumber.Integer
    if tiles:
        add(alg, QgsProcessingParameterNumber(TILE_SIZE, "Tile size (px at the model's GSD; 0 = package)", integer, 0,
                                              optional=True, minValue=0), help, advanced=True)
        add(alg, QgsProcessingParameterNumber(OVERLAP, "Tile overlap (px; -1 = package)", integer, -1, optional=True,
                                              minValue=-1), help, advanced=True)
    add(alg, QgsProcessingParameterNumber(BATCH_SIZE, "Batch size (0 = auto)", integer, 0, optional=True, minValue=0),
        help, advanced=True)
    add(alg, NamedEnum(DEVICE, "Device", DEVICES, defaultValue=0), help, advanced=True)
    add(alg, NamedEnum(VALUE_SCALING, "Value scaling of the input", VALUE_SCALING_LABELS, SCALING_CHOICES,
                       defaultValue=0), dict({VALUE_SCALING: VALUE_SCALING_HELP}, **(help or {})), advanced=True)


def read_tiling(alg, parameters, context, tiles=True):
    """The block's values as the engine's keyword arguments: ``tile_size`` and ``overlap`` (with ``tiles``; None:
    the package's), ``batch_size`` (None: automatic), ``device``."""
    values = {"batch_size": optional_number(alg, parameters, BATCH_SIZE, context, 0, integer=True),
              "device": alg.parameterAsEnumName(parameters, DEVICE, context)}
    if tiles:
        values["tile_size"] = optional_number(alg, parameters, TILE_SIZE, context, 0, integer=True)
        values["overlap"] = optional_number(alg, parameters, OVERLAP, context, -1, integer=True)
    return values


# -- the thresholds of the algorithms that find objects (detection, instance segmentation) ----------------------------

SCORE_THRESHOLD = "SCORE_THRESHOLD"
IOU_THRESHOLD = "IOU_THRESHOLD"
MAX_DETECTIONS = "MAX_DETECTIONS"


#: the thresholds' names in the help
THRESHOLD_LABELS = {SCORE_THRESHOLD: "Score threshold", IOU_THRESHOLD: "Overlap (IoU) threshold",
                    MAX_DETECTIONS: "Maximum objects per tile"}
#: the help the algorithms that find objects share (each adds its own and may replace these)
OBJECT_HELP = {
    "INPUT": "Raster layer to search (GeoTIFF, VRT, WMS/XYZ...). Rasters of any size are processed tile by tile; "
             "non-file layers are first read through QGIS at the model's ground sampling distance.",
    "BANDS": "Raster bands to feed the model, in the model's order. Leave empty when the raster has exactly the "
             "bands the model needs (an alpha band is ignored).",
    "BATCH_SIZE": "Tiles per forward pass; 0 = automatic (larger on a GPU).",
    "DEVICE": "auto picks a CUDA GPU, then Apple MPS, then the CPU.",
    VALUE_SCALING: VALUE_SCALING_HELP,
    "SCORE_THRESHOLD": "Objects scoring below this (0..1) are dropped; -1 = the package's value.",
    "MAX_DETECTIONS": "Most objects kept per tile; 0 = the package's value.",
}


def add_thresholds(alg, help=None, merged="boxes"):
    """SCORE_THRESHOLD, IOU_THRESHOLD (of the ``merged`` objects: "boxes", "polygons") and MAX_DETECTIONS, advanced;
    -1 / 0 leave the package's values."""
    double, integer = QgsProcessingParameterNumber.Double, QgsProcessingParameterNumber.Integer
    add(alg, QgsProcessingParameterNumber(SCORE_THRESHOLD, "Score threshold (0..1; -1 = package)", double, -1,
                                          optional=True, minValue=-1, maxValue=1), help, advanced=True)
    add(alg, QgsProcessingParameterNumber(IOU_THRESHOLD, f"Overlap (IoU) threshold for merging {merged} (0..1; -1 = "
                                          "package)", double, -1, optional=True, minValue=-1, maxValue=1),
        help, advanced=True)
    add(alg, QgsProcessingParameterNumber(MAX_DETECTIONS, "Maximum objects per tile (0 = package)", integer, 0,
                                          optional=True, minValue=0), help, advanced=True)


def read_thresholds(alg, parameters, context):
    """The thresholds as the engine's keyword arguments (None: the package's)."""
    return dict(score_threshold=optional_number(alg, parameters, SCORE_THRESHOLD, context, -1),
                iou_threshold=optional_number(alg, parameters, IOU_THRESHOLD, context, -1),
                max_detections=optional_number(alg, parameters, MAX_DETECTIONS, context, 0, integer=True))


def read_object_run(alg, parameters, context, feedback, task):
    """The inputs of an algorithm that finds objects (detection, instance segmentation): INPUT, MODEL (of ``task``),
    EXTENT, RESOLUTION, the tiling block and the thresholds. Returns ``(raster, package, the engine call's keyword
    arguments)`` (with the progress and cancel callbacks, 0..95 %), the raster fetched at the resolution."""
    raster = read_raster(alg, parameters, INPUT, context)  # a path is never loaded as a layer
    pkg = read_model(alg, parameters, context, feedback, task)
    read_area(alg, parameters, context, raster)
    gsd = read_resolution(alg, parameters, context)
    kwargs = dict(bands=raster.bands, bounds=raster.bounds, max_pixels=raster.max_pixels, gsd=gsd,
                  **read_tiling(alg, parameters, context), **read_thresholds(alg, parameters, context),
                  **FeedbackBridge(feedback, 0, 95).callbacks)
    raster.fetch(gsd or pkg.gsd, context, feedback)
    return raster, pkg, kwargs


TTA = "TTA"
TTA_LABELS = ("None", "Flips", "Flips and 90° rotations")  # the dialog's, for TTA_CHOICES (none, flips, d4)
TTA_HELP = ("Test-time augmentation: each tile also runs flipped (left-right, upside down) or flipped and rotated by "
            "90°, and the class probabilities, turned back, are averaged. Costs 3× (flips) or 8× (flips and "
            "rotations) the model time; usually gains a little accuracy, most on areas unlike the training data. "
            "On the command line: none, flips or d4.")


def add_tta(alg, help=None):
    """The advanced TTA parameter (test-time augmentation: none, flips, d4) of the inference algorithms that
    return class probabilities; ``help``: {name: text} (default :data:`TTA_HELP`)."""
    add(alg, NamedEnum(TTA, "Test-time augmentation", TTA_LABELS, TTA_CHOICES, defaultValue=0),
        help or {TTA: TTA_HELP}, advanced=True)


def read_tta(alg, parameters, context):
    """TTA as the engine's ``tta``: "none", "flips" or "d4"."""
    return alg.parameterAsEnumName(parameters, TTA, context)


RESOLUTION = "RESOLUTION"
RESOLUTION_HELP = ("The raster is resampled to this pixel size before the model sees it (Deepness's resolution, in cm "
                   "per pixel), and the results mapped back to its grid. 0: the model's own (an ONNX model's "
                   "resolution metadata, a package's GSD), else the raster's.")


def add_resolution(alg):
    """The advanced RESOLUTION parameter (cm per pixel, as Deepness): the processing resolution of a model that does
    not state its own (0: the model's, else the raster's)."""
    add(alg, QgsProcessingParameterNumber(RESOLUTION, "Processing resolution (cm/px; 0 = the model's or the "
                                          "raster's)", QgsProcessingParameterNumber.Double, 0, optional=True,
                                          minValue=0),
        {RESOLUTION: RESOLUTION_HELP}, advanced=True)


def read_resolution(alg, parameters, context):
    """RESOLUTION as the engine's ``gsd``: metres per pixel, or None (the model's)."""
    value = optional_number(alg, parameters, RESOLUTION, context, 0)
    return value / 100.0 if value else None


# -- the MAX_PIXELS guard --------------------------------------------------------------------------------------------

MAX_PIXELS = "MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2_000_000_000  # about 45 000 x 45 000 px


def add_max_pixels(alg):
    """The advanced MAX_PIXELS parameter of the tiled algorithms: a guard against starting, by mistake, a run
    of hours or days (a huge VRT, a forgotten EXTENT)."""
    param = QgsProcessingParameterNumber(MAX_PIXELS, "Largest area to process (pixels; 0 = no limit)",
                                         QgsProcessingParameterNumber.Double, DEFAULT_MAX_PIXELS, optional=True,
                                         minValue=0)
    add(alg, param, {MAX_PIXELS: "A larger area (the raster, or EXTENT) is refused before any work: set EXTENT, or "
                                 f"raise this (default {DEFAULT_MAX_PIXELS:,} px, about 45,000 x 45,000; 0 = no "
                                 "limit)."}, advanced=True)


def read_max_pixels(alg, parameters, context):
    """MAX_PIXELS as the engine takes it: None for no limit."""
    value = number_or(alg, parameters, MAX_PIXELS, context, DEFAULT_MAX_PIXELS)
    return int(value) if value > 0 else None


CLUSTER = "CLUSTER"
CLUSTER_BLOCK = "CLUSTER_BLOCK"
DEFAULT_CLUSTER_BLOCK = 4096


def add_cluster(alg):
    """The advanced CLUSTER and CLUSTER_BLOCK parameters of the inference algorithms: run the tiles on a Dask
    cluster (:mod:`..rs_deep_plugin.engine.inference.distributed`)."""
    add(alg, QgsProcessingParameterString(CLUSTER, "Dask cluster (scheduler address or local:N; empty = this process)",
                                          defaultValue="", optional=True),
        {CLUSTER: "Run the tiles on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (N worker "
                  "processes on this machine, sharing its cores). The results are the same as in one process; every worker must be able to "
                  "read the input raster at the same path (or URL), and the outputs are written here. Empty: the "
                  f"environment variable {SCHEDULER_ENV}, else this process. Needs dask[distributed]."},
        advanced=True)
    integer = QgsProcessingParameterNumber.Integer
    add(alg, QgsProcessingParameterNumber(CLUSTER_BLOCK, "Cluster block size (px)", integer, DEFAULT_CLUSTER_BLOCK,
                                          optional=True, minValue=256),
        {CLUSTER_BLOCK: "With CLUSTER: the raster is cut into blocks of about this many pixels a side (whole rows of "
                        "tiles for segmentation, change and raster outputs), one Dask task each; every tile runs "
                        "once."}, advanced=True)


def read_cluster(alg, parameters, context):
    """CLUSTER and CLUSTER_BLOCK as the engine's ``cluster`` (None: this process) and ``block_size``."""
    value = alg.parameterAsString(parameters, CLUSTER, context) if CLUSTER in parameters else ""
    return {"cluster": default_cluster(value),
            "block_size": number_or(alg, parameters, CLUSTER_BLOCK, context, DEFAULT_CLUSTER_BLOCK, integer=True)}


# -- class (or change) raster outputs and their polygons -------------------------------------------------------------

OUTPUT = "OUTPUT"
OUTPUT_VECTOR = "OUTPUT_VECTOR"
PROBABILITIES = "PROBABILITIES"
MIN_AREA = "MIN_AREA"
SIMPLIFY = "SIMPLIFY"


def add_class_outputs(alg, raster, polygons, probabilities, help=None):
    """OUTPUT (the class raster), OUTPUT_VECTOR (its polygons, optional, on by default) and PROBABILITIES
    (optional, off by default), with these descriptions; ``help``: {name: text}."""
    add(alg, QgsProcessingParameterRasterDestination(OUTPUT, raster), help)
    add(alg, QgsProcessingParameterFeatureSink(OUTPUT_VECTOR, polygons, QgsProcessing.TypeVectorPolygon, optional=True,
                                               createByDefault=True), help)
    add(alg, QgsProcessingParameterRasterDestination(PROBABILITIES, probabilities, optional=True,
                                                     createByDefault=False), help)


def add_polygon_block(alg, help=None):
    """MIN_AREA and SIMPLIFY of the polygons (advanced; -1: the defaults, 10 pixels and one pixel)."""
    double = QgsProcessingParameterNumber.Double
    add(alg, QgsProcessingParameterNumber(MIN_AREA, "Minimum polygon area (m²; -1 = 10 pixels)", double, -1,
                                          optional=True, minValue=-1), help, advanced=True)
    add(alg, QgsProcessingParameterNumber(SIMPLIFY, "Simplify tolerance (map units; -1 = one pixel)", double, -1,
                                          optional=True, minValue=-1), help, advanced=True)


# -- the training-data block: a raster and its labels ----------------------------------------------------------------

LABELS = "LABELS"
CLASS_FIELD = "CLASS_FIELD"
LABEL_RASTER = "LABEL_RASTER"
TASK = "TASK"
INPUT_AFTER = "INPUT_AFTER"


def add_training_data_block(alg, tasks, input_optional=False, label_raster=True):
    """INPUT (the raster, the before image for change), LABELS (polygons), CLASS_FIELD, LABEL_RASTER (with
    ``label_raster``), TASK (``tasks``: ``engine.tasks.Task`` choices, by label or name) and INPUT_AFTER (change)."""
    alg.addParameter(RasterInput(INPUT, "Input raster (before, for change)", optional=input_optional))
    alg.addParameter(QgsProcessingParameterFeatureSource(LABELS, "Labels (polygons)", [QgsProcessing.TypeVectorPolygon],
                                                         optional=True))
    alg.addParameter(QgsProcessingParameterField(CLASS_FIELD, "Class field", None, LABELS,
                                                 QgsProcessingParameterField.Any, optional=True))
    if label_raster:
        alg.addParameter(RasterInput(LABEL_RASTER, "Label raster (instead of polygons)", optional=True))
    alg.addParameter(NamedEnum(TASK, "Task", [t.label for t in tasks], [t.name for t in tasks], defaultValue=0))
    alg.addParameter(RasterInput(INPUT_AFTER, "After raster (change detection)", optional=True))


# -- help ------------------------------------------------------------------------------------------------------------

#: the bold names of the blocks' parameters in an algorithm's help
HELP_LABELS = {INPUT: "Input raster", MODEL: "Model package", BANDS: "Bands", EXTENT: "Extent", TILE_SIZE: "Tile size",
               OVERLAP: "Tile overlap", BATCH_SIZE: "Batch size", DEVICE: "Device", MIN_AREA: "Minimum area",
               SIMPLIFY: "Simplify", RESOLUTION: "Processing resolution", TTA: "Test-time augmentation",
               CLUSTER: "Dask cluster", CLUSTER_BLOCK: "Cluster block size",
               VALUE_SCALING: "Value scaling of the input"}
BANDS_HELP = ("The raster bands to feed the model, in the model's order. Leave empty when the raster has exactly the "
              "bands the model needs.")
INPUT_HELP = "Any raster layer (GeoTIFF, VRT, WMS/XYZ...). Rasters larger than memory are processed tile by tile."
EXTENT_HELP = "Process only this area (default: the whole layer)."
MASK_HELP = "Process only pixels inside these polygons; others become nodata."
DEVICE_HELP = "auto picks a CUDA GPU, then Apple MPS, then the CPU."
#: the help of the run options of the algorithms that run patches (classify_patches, find_similar)
PATCH_RUN_HELP = {BATCH_SIZE: "Patches run at once (0 = auto).", DEVICE: DEVICE_HELP, VALUE_SCALING: VALUE_SCALING_HELP}
#: the help of the tiling and polygon blocks of a class or change raster
CLASS_RASTER_HELP = {
    TILE_SIZE: "Tile size in pixels at the model's GSD (a multiple of 32); 0 = the package's value.",
    OVERLAP: "Overlap of neighbouring tiles in pixels; -1 = the package's value. Overlapping tiles are blended so no "
             "seams show.",
    BATCH_SIZE: "Tiles per forward pass; 0 = automatic (larger on a GPU).",
    DEVICE: DEVICE_HELP,
    VALUE_SCALING: VALUE_SCALING_HELP,
    MIN_AREA: "Polygons smaller than this (m²) are dropped; -1 = 10 pixels.",
    SIMPLIFY: "Tolerance in map units for the polygons; -1 = one pixel, 0 = none.",
}


def help_string(intro, help, labels=None):
    """An algorithm's help: ``intro``, then each parameter of ``help`` ({name: text}, in dialog order) with its name
    in bold (``labels``, then :data:`HELP_LABELS`)."""
    labels = dict(HELP_LABELS, **(labels or {}))
    return intro + "<br><br>" + "".join(f"<b>{labels[k]}</b>: {v}<br>" for k, v in help.items())
