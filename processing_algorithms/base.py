"""Helpers shared by the RS Deep algorithms: their base class, model lookup, layer access, feedback, errors."""
import math
import os

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProcessingAlgorithm,
                       QgsProcessingException, QgsProcessingParameterDefinition, QgsProcessingParameterEnum,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterLayer, QgsProcessingUtils,
                       QgsRasterBlockFeedback, QgsRasterFileWriter, QgsRasterPipe, QgsRectangle, QgsUnitTypes)
from qgis.PyQt.QtGui import QIcon

from ..rs_deep_plugin.deps import missing_dependencies, missing_message
from .provider_icon import ICON

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(PLUGIN_DIR, "resources", "models")
DEVICES = ["auto", "cpu", "cuda", "mps"]
MAX_EXPORT_PIXELS = 40000 * 40000
MAX_PIXELS = "MAX_PIXELS"
DEFAULT_MAX_PIXELS = 2_000_000_000  # about 45 000 x 45 000 px


class RSDeepAlgorithm(QgsProcessingAlgorithm):
    """What every RS Deep algorithm shares: the provider's icon, its toolbox group (``GROUP_ID``) and
    ``createInstance``."""

    GROUP_ID = "apply"
    GROUPS = {"apply": "Apply models", "train": "Train and assess"}

    def group(self):
        return self.GROUPS[self.GROUP_ID]

    def groupId(self):  # noqa: N802 (QGIS API)
        return self.GROUP_ID

    def icon(self):
        return QIcon(ICON)

    def createInstance(self):  # noqa: N802 (QGIS API)
        return type(self)()

    def parameterAsEnumName(self, parameters, name, context):  # noqa: N802 (QGIS style)
        """The chosen option of a ``NamedEnum`` parameter as its name, whether given by index or by name."""
        return self.parameterDefinition(name).names[self._enum_index(parameters, name, context)]

    def parameterAsEnumNames(self, parameters, name, context):  # noqa: N802 (QGIS style)
        """The chosen options of a multiple ``NamedEnum`` parameter as names."""
        definition = self.parameterDefinition(name)
        value = parameters.get(name)
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            return [definition.names[definition.index(v)] for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [definition.names[definition.index(v)] for v in value]
        return [definition.names[i] for i in self.parameterAsEnums(parameters, name, context)]

    def _enum_index(self, parameters, name, context):
        definition = self.parameterDefinition(name)
        value = parameters.get(name)
        if isinstance(value, str) and value.strip().lower() in definition.names:
            return definition.index(value)
        return self.parameterAsEnum(parameters, name, context)


class NamedEnum(QgsProcessingParameterEnum):
    """An enum parameter whose options also have names, so that ``qgis_process`` users and scripts may write
    ``TASK=segmentation`` as well as ``TASK=0`` on every QGIS version (QGIS's own static strings, from 3.24, refuse
    indices). The dialog shows the labels; read the value with ``RSDeepAlgorithm.parameterAsEnumName``."""

    def __init__(self, name, description, labels, names=None, defaultValue=0, allowMultiple=False,
                 optional=False):
        super().__init__(name, description, list(labels), allowMultiple, defaultValue, optional)
        self.names = [n.lower() for n in (names or labels)]

    def clone(self):
        copy = NamedEnum(self.name(), self.description(), self.options(), self.names, self.defaultValue(),
                         self.allowMultiple(), bool(self.flags() & QgsProcessingParameterDefinition.FlagOptional))
        copy.setFlags(self.flags())
        copy.setHelp(self.help())
        return copy

    def index(self, value):
        """The index of an option given by index or name."""
        text = str(value).strip().lower()
        return self.names.index(text) if text in self.names else int(text)

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS API)
        if isinstance(value, str) and value.strip() and not value.strip().lstrip("-").isdigit():
            parts = value.split(",") if self.allowMultiple() else [value]
            if all(p.strip().lower() in self.names for p in parts):
                return True
        return super().checkValueIsAcceptable(value, context)


class RasterInput(QgsProcessingParameterRasterLayer):
    """A raster layer parameter that takes a raster file path as it is, without loading it as a QGIS layer.

    QGIS (3.22 at least) computes band statistics whenever it creates a ``QgsRasterLayer`` (the default
    contrast enhancement of its renderer), and GDAL saves them beside the file (``in.tif.aux.xml``) or into
    the file itself for a VRT. Processing creates that layer while it checks the parameters
    (``QgsProcessingParameterRasterLayer.checkValueIsAcceptable``), so an input given as a path (qgis_process,
    scripts, models) was changed by every run. A layer already in the project (the dialog) is checked as
    before. Read the value with :func:`raster_input`."""

    def clone(self):
        copy = RasterInput(self.name(), self.description(), self.defaultValue(),
                           bool(self.flags() & QgsProcessingParameterDefinition.FlagOptional))
        copy.setFlags(self.flags())
        copy.setHelp(self.help())
        return copy

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS API)
        if raster_file(value):
            return True
        return super().checkValueIsAcceptable(value, context)


def raster_file(value):
    """``value`` when it is the path of an existing file (a raster given by its path), else None."""
    return value if isinstance(value, str) and value.strip() and os.path.isfile(value) else None


def raster_input(alg, parameters, name, context):
    """A raster parameter (:class:`RasterInput`) as ``(layer, source, crs)``: a file path gives no layer (it is
    read by the engine only, never loaded as a QGIS layer: see :class:`RasterInput`), its own path and its CRS;
    a layer gives itself, its GDAL path (None for other providers: WMS, XYZ...) and its CRS."""
    path = raster_file(parameters.get(name))
    if path is None:
        layer = alg.parameterAsRasterLayer(parameters, name, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"{name} is not a valid raster layer; choose a raster layer or file")
        return layer, gdal_path(layer), layer.crs()
    try:
        import rasterio
        with rasterio.open(path) as ds:
            wkt = ds.crs.to_wkt() if ds.crs else None
    except Exception as exc:
        raise QgsProcessingException(f"{name}: {path} is not a raster GDAL can read ({exc}); choose a raster "
                                     "layer or file") from exc
    return None, path, QgsCoordinateReferenceSystem.fromWkt(wkt) if wkt else QgsCoordinateReferenceSystem()


def file_extent(path):
    """The extent of a raster file in its own CRS, as a QgsRectangle (read by the engine's reader, not by a
    QGIS layer: see :class:`RasterInput`)."""
    import rasterio
    with rasterio.open(path) as ds:
        b = ds.bounds
    return QgsRectangle(b.left, b.bottom, b.right, b.top)


def max_pixels_parameter():
    """The advanced MAX_PIXELS parameter of the tiled algorithms: a guard against starting, by mistake, a run
    of hours or days (a huge VRT, a forgotten EXTENT)."""
    param = QgsProcessingParameterNumber(MAX_PIXELS, "Largest area to process (pixels; 0 = no limit)",
                                         QgsProcessingParameterNumber.Double, DEFAULT_MAX_PIXELS, optional=True,
                                         minValue=0)
    param.setHelp("A larger area (the raster, or EXTENT) is refused before any work: set EXTENT, or raise this "
                  f"(default {DEFAULT_MAX_PIXELS:,} px, about 45,000 x 45,000; 0 = no limit).")
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def max_pixels_value(alg, parameters, context):
    """MAX_PIXELS as the engine takes it: None for no limit."""
    if parameters.get(MAX_PIXELS) in (None, ""):
        return DEFAULT_MAX_PIXELS
    value = alg.parameterAsDouble(parameters, MAX_PIXELS, context)
    return int(value) if value > 0 else None


def require_dependencies():
    missing = missing_dependencies()
    if missing:
        raise QgsProcessingException(missing_message(missing))


def bundled_models():
    """Names of the model packages shipped in resources/models."""
    if not os.path.isdir(MODELS_DIR):
        return []
    return sorted(d for d in os.listdir(MODELS_DIR) if os.path.isfile(os.path.join(MODELS_DIR, d, "model.json")))


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
    from ..rs_deep_plugin.engine.errors import RSDeepError
    from ..rs_deep_plugin.engine.models.loading import load_package
    try:
        return load_package(resolve_model_path(value), task=task)
    except RSDeepError as exc:
        raise QgsProcessingException(str(exc)) from exc


def report_class_areas(feedback, result, classes):
    """The run's size, tiles, device and time, then the area of each class (segmentation and change)."""
    feedback.pushInfo(f"{result.width} x {result.height} px, {result.tiles_run}/{result.tiles} tiles run on "
                      f"{result.device} in {result.seconds:.1f} s")
    for c in classes:
        feedback.pushInfo(f"  {c.name}: {result.class_pixels.get(c.value, 0) * result.pixel_area_m2:,.1f} m²")


class FeedbackBridge:
    """Engine progress/cancel callbacks -> QgsProcessingFeedback."""

    def __init__(self, feedback, start=0.0, end=100.0):
        self.feedback = feedback
        self.start, self.end = start, end

    def progress(self, fraction, message=None):
        if message:
            self.feedback.pushInfo(message)
        if fraction is not None:
            self.feedback.setProgress(self.start + (self.end - self.start) * fraction)

    def is_cancelled(self):
        return self.feedback.isCanceled()

    def log(self, message):
        self.feedback.pushInfo(message)


def gdal_path(layer):
    """The GDAL dataset name of a file-based raster layer, or None for other providers."""
    if layer.providerType() != "gdal":
        return None
    source = layer.source()
    return source.split("|")[0] if "|" in source and os.path.exists(source.split("|")[0]) else source


def layer_bounds(layer, extent):
    """EXTENT (already in the layer's CRS) as a (xmin, ymin, xmax, ymax) tuple, or None when not given. An
    extent with no width or no height is refused (it used to mean "the whole layer")."""
    if extent is None or extent.isNull():
        return None
    for what, size in (("width", extent.width()), ("height", extent.height())):
        if not size > 0:
            raise QgsProcessingException(f"EXTENT has zero {what}; draw an area or leave it empty")
    return (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())


def export_raster_layer(layer, extent, gsd_m, context, feedback):
    """Read a non-file raster layer (WMS, XYZ, WCS...) through QGIS into a temporary GeoTIFF.

    The layer is fetched over ``extent`` (its own extent if None) at ``gsd_m`` metres per pixel.
    """
    crs = layer.crs()
    rect = QgsRectangle(extent) if extent is not None and not extent.isEmpty() else layer.extent()
    if rect.isEmpty():
        raise QgsProcessingException(f"Layer {layer.name()} has an empty extent; set EXTENT to the area to process")
    px = gsd_m or layer.rasterUnitsPerPixelX() or 1.0
    if crs.isGeographic() and gsd_m:
        px = gsd_m / (111_320.0 * max(0.01, math.cos(math.radians(rect.center().y()))))
    elif gsd_m and crs.isValid():
        px = gsd_m / QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), QgsUnitTypes.DistanceMeters)
        if crs.authid() in ("EPSG:3857", "EPSG:900913"):  # web mercator: ground metres = map metres x cos(lat)
            wgs84 = QgsCoordinateTransform(crs, QgsCoordinateReferenceSystem("EPSG:4326"), context.transformContext())
            lat = wgs84.transform(rect.center()).y()
            px /= max(0.01, math.cos(math.radians(lat)))
    ncols, nrows = max(1, math.ceil(rect.width() / px)), max(1, math.ceil(rect.height() / px))
    if ncols * nrows > MAX_EXPORT_PIXELS:
        raise QgsProcessingException(
            f"Reading {layer.name()} at {gsd_m} m would need {ncols} x {nrows} pixels; set EXTENT to a "
            "smaller area")
    rect = QgsRectangle(rect.xMinimum(), rect.yMaximum() - nrows * px, rect.xMinimum() + ncols * px, rect.yMaximum())
    path = QgsProcessingUtils.generateTempFilename("rs_deep_input.tif")
    feedback.pushInfo(f"Fetching {layer.name()} ({layer.providerType()}) at {px:.6g} map units per pixel: "
                      f"{ncols} x {nrows} px")
    pipe = QgsRasterPipe()
    if not pipe.set(layer.dataProvider().clone()):
        raise QgsProcessingException(f"Cannot read layer {layer.name()}")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"])
    block_feedback = QgsRasterBlockFeedback()
    feedback.canceled.connect(block_feedback.cancel)
    block_feedback.progressChanged.connect(lambda p: feedback.setProgress(p * 0.2))
    err = writer.writeRaster(pipe, ncols, nrows, rect, crs, context.transformContext(), block_feedback)
    if feedback.isCanceled():
        raise QgsProcessingException("Cancelled; nothing was written.")
    if err != QgsRasterFileWriter.NoError:
        raise QgsProcessingException(f"Could not read layer {layer.name()} through QGIS (error {int(err)})")
    return path


def mask_geometries(source, target_crs, context):
    """Features of a polygon source as shapely geometries in ``target_crs``; None without a source. A source that
    is not a polygon layer, or holds no polygon, is refused."""
    if source is None:
        return None
    import shapely
    from qgis.core import QgsWkbTypes
    kind = QgsWkbTypes.geometryType(source.wkbType())
    if kind != QgsWkbTypes.PolygonGeometry:
        raise QgsProcessingException(f"MASK must be a polygon layer; {source.sourceName()} holds "
                                     f"{QgsWkbTypes.displayString(source.wkbType())} geometries. Give polygons of "
                                     "the area to process, or no MASK.")
    xform = None
    if source.sourceCrs().isValid() and target_crs.isValid() and source.sourceCrs() != target_crs:
        xform = QgsCoordinateTransform(source.sourceCrs(), target_crs, context.transformContext())
    geoms = []
    for f in source.getFeatures():
        g = f.geometry()
        if g is None or g.isEmpty():
            continue
        if xform is not None:
            g.transform(xform)
        geoms.append(shapely.from_wkb(bytes(g.asWkb())))
    if not geoms:
        raise QgsProcessingException(f"MASK ({source.sourceName()}) has no polygons; give a polygon layer with at "
                                     "least one feature, or no MASK")
    return geoms
