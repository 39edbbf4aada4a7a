"""Helpers shared by the RS Deep algorithms: their base class, model lookup, layer access, feedback, errors."""
import math
import os

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProcessingAlgorithm,
                       QgsProcessingException, QgsProcessingUtils, QgsRasterBlockFeedback, QgsRasterFileWriter,
                       QgsRasterPipe, QgsRectangle, QgsUnitTypes)
from qgis.PyQt.QtGui import QIcon

from ..rs_deep_plugin.deps import missing_dependencies, missing_message
from .provider_icon import ICON

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(PLUGIN_DIR, "resources", "models")
DEVICES = ["auto", "cpu", "cuda", "mps"]
MAX_EXPORT_PIXELS = 40000 * 40000


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
    from ..rs_deep_plugin.engine.package import load_package
    try:
        return load_package(resolve_model_path(value), task=task)
    except RSDeepError as exc:
        raise QgsProcessingException(str(exc)) from exc


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
    """EXTENT (already in the layer's CRS) as a (xmin, ymin, xmax, ymax) tuple, or None."""
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
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
    """Features of a polygon source as shapely geometries in ``target_crs``."""
    if source is None:
        return None
    import shapely
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
    return geoms
