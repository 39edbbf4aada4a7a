"""QGIS layers as the engine takes them, shared by the RS Deep algorithms: a raster layer as a file (its own, or one
read through QGIS), features as shapely geometries in a raster's CRS, boxes from features, attribute values as
class values."""
import math
import os

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProcessingException,
                       QgsProcessingUtils, QgsRasterBlockFeedback, QgsRasterFileWriter, QgsRasterPipe, QgsRectangle,
                       QgsUnitTypes, QgsWkbTypes)

from ..rs_deep_plugin.compat import push_warning

MAX_EXPORT_PIXELS = 40000 * 40000

# -- rasters ---------------------------------------------------------------------------------------------------------


def gdal_path(layer):
    """The GDAL dataset name of a file-based raster layer, or None for other providers."""
    if layer.providerType() != "gdal":
        return None
    source = layer.source()
    return source.split("|")[0] if "|" in source and os.path.exists(source.split("|")[0]) else source


class FileRaster:
    """A raster file given by its path, with the QgsRasterLayer methods the training and assessment algorithms use
    (isValid, name, source, providerType, crs, extent, width, height, rasterUnitsPerPixelX), read with rasterio. A
    path is never loaded as a QGIS layer: QGIS 3.22 computes band statistics for a new layer and GDAL writes them
    beside the user's file (``.aux.xml``; see ``params.RasterInput``)."""

    def __init__(self, path):
        import rasterio
        with rasterio.open(path) as ds:
            self._crs = QgsCoordinateReferenceSystem.fromWkt(ds.crs.to_wkt()) if ds.crs else \
                QgsCoordinateReferenceSystem()
            b = ds.bounds
            self._extent = QgsRectangle(b.left, b.bottom, b.right, b.top)
            self._size, self._res = (ds.width, ds.height), abs(ds.transform.a)
        self._path = os.fspath(path)

    def isValid(self):  # noqa: N802 (QGIS names)
        return True

    def name(self):
        return os.path.splitext(os.path.basename(self._path))[0]

    def source(self):
        return self._path

    def providerType(self):  # noqa: N802
        return "gdal"

    def crs(self):
        return QgsCoordinateReferenceSystem(self._crs)

    def extent(self):
        return QgsRectangle(self._extent)

    def width(self):
        return self._size[0]

    def height(self):
        return self._size[1]

    def rasterUnitsPerPixelX(self):  # noqa: N802
        return self._res

    def renderer(self):
        return None  # no style: class names come from the file's category names or a model package


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


def file_extent(path):
    """The extent of a raster file in its own CRS, as a QgsRectangle (read by the engine's reader, not by a
    QGIS layer: see ``params.RasterInput``)."""
    return FileRaster(path).extent()


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


def file_or_fetch(layer, what, area, gsd, context, feedback):
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


def raster_extent_box(layer):
    from shapely.geometry import box
    e = layer.extent()
    return box(e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum())


# -- features --------------------------------------------------------------------------------------------------------


def is_null(value):
    return value is None or (hasattr(value, "isNull") and value.isNull())


def class_value_or_name(value):
    """An attribute as an int class value when it is one (3, 3.0, "3"), else its stripped text."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else str(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            return text
        return int(f) if f.is_integer() else text


def _transform_to(source, target_crs, context):
    """The transform from a feature source's CRS to ``target_crs``, or None when there is nothing to do."""
    if source.sourceCrs().isValid() and target_crs.isValid() and source.sourceCrs() != target_crs:
        return QgsCoordinateTransform(source.sourceCrs(), target_crs, context.transformContext())
    return None


def mask_geometries(source, target_crs, context):
    """Features of a polygon source as shapely geometries in ``target_crs``; None without a source. A source that
    is not a polygon layer, or holds no polygon, is refused."""
    if source is None:
        return None
    import shapely
    kind = QgsWkbTypes.geometryType(source.wkbType())
    if kind != QgsWkbTypes.PolygonGeometry:
        raise QgsProcessingException(f"MASK must be a polygon layer; {source.sourceName()} holds "
                                     f"{QgsWkbTypes.displayString(source.wkbType())} geometries. Give polygons of "
                                     "the area to process, or no MASK.")
    xform = _transform_to(source, target_crs, context)
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


def read_labelled_polygons(source, field_name, target_crs, context, feedback, what):
    """Features of ``source`` as ``[(shapely geometry in target_crs, attribute value or None)]``.

    Features without a geometry, or whose ``field_name`` is NULL (reported), are left out."""
    import shapely
    if source is None:
        raise QgsProcessingException(f"{what} is not a valid vector layer")
    field_index = -1
    if field_name:
        field_index = source.fields().lookupField(field_name)
        if field_index < 0:
            names = ", ".join(f.name() for f in source.fields()) or "none"
            raise QgsProcessingException(f"{what} has no field {field_name!r}; its fields: {names}")
    xform = _transform_to(source, target_crs, context)
    out, nulls = [], 0
    for f in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled while reading the features; nothing was written.")
        g = f.geometry()
        if g is None or g.isNull() or g.isEmpty():
            continue
        if g.type() != QgsWkbTypes.PolygonGeometry:
            continue
        value = None
        if field_index >= 0:
            value = f.attributes()[field_index]
            if is_null(value):
                nulls += 1
                continue
        g = QgsGeometry(g)
        if QgsWkbTypes.isCurvedType(g.wkbType()):
            g = QgsGeometry(g.constGet().segmentize())
        if xform is not None:
            try:
                g.transform(xform)
            except Exception as exc:
                raise QgsProcessingException(f"Cannot transform a feature of {what} to the raster's CRS "
                                             f"({target_crs.authid()}): {exc}") from exc
        geom = shapely.from_wkb(bytes(g.asWkb()))
        if geom.is_empty:
            continue
        out.append((geom, value))
    if nulls:
        push_warning(feedback, f"{nulls} feature(s) of {what} have no value in {field_name!r} and were left out")
    if not out:
        raise QgsProcessingException(f"{what} has no polygon feature" + (f" with a value in {field_name!r}"
                                                                        if field_name else "")
                                     + "; give a layer with (multi)polygons")
    return out


def check_overlap(pairs, layer, what):
    """Stop with a clear message when no polygon overlaps the raster."""
    area = raster_extent_box(layer)
    if not any(g.intersects(area) for g, _ in pairs):
        e = layer.extent()
        raise QgsProcessingException(
            f"None of the {len(pairs)} features of {what} overlaps the raster {layer.name()} (extent "
            f"{e.xMinimum():.6g}, {e.yMinimum():.6g} : {e.xMaximum():.6g}, {e.yMaximum():.6g} in "
            f"{layer.crs().authid() or 'no CRS'}); check that the features are in the raster's area and that "
            "their layer's CRS is set correctly")


# -- boxes -----------------------------------------------------------------------------------------------------------


def box_label(value):
    """A class attribute as detection assessment compares it: its value or name, as lower-case text."""
    return str(class_value_or_name(value)).strip().lower()


def _centre_inside(box, area):
    return area is None or area.contains((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def reference_boxes(source, field, crs, area, context, feedback, shapes=False):
    """The bounding boxes of a polygon source in ``crs`` whose centre is in ``area`` (a QgsRectangle, or None for
    everywhere), as ``(xmin, ymin, xmax, ymax, class)``; the class is :func:`box_label` of ``field``, 0 without it.
    ``shapes``: the polygons themselves, as ``(shapely geometry, class)`` (rotated boxes are assessed from them)."""
    refs = read_labelled_polygons(source, field, crs, context, feedback, "REFERENCE")
    out = []
    for g, v in refs:
        b = tuple(g.bounds)
        if _centre_inside(b, area):
            label = box_label(v) if field else 0
            out.append((g, label) if shapes else b + (label,))
    return out


def predicted_patches(source, labels_field, area, feedback):
    """The polygons of ``source`` whose centre is in ``area`` (a QgsRectangle, or None for everywhere) with their
    labels: ``[(shapely geometry, [class names])]``, the names split from the comma-separated ``labels_field``
    (empty or NULL: no label)."""
    import shapely
    index = source.fields().lookupField(labels_field)
    if index < 0:
        names = ", ".join(f.name() for f in source.fields()) or "none"
        raise QgsProcessingException(f"The predicted patches have no field {labels_field!r} (its fields: {names}); "
                                     "give the layer written by Patch classification with a multi-label model, or "
                                     "set PREDICTION_CLASS_FIELD to the field holding the comma-separated labels")
    out = []
    for f in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled; nothing was written.")
        g = f.geometry()
        if g is None or g.isNull() or g.isEmpty() or g.type() != QgsWkbTypes.PolygonGeometry:
            continue
        r = g.boundingBox()
        if not _centre_inside((r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()), area):
            continue
        value = f.attributes()[index]
        labels = [] if is_null(value) else [n.strip() for n in str(value).split(",") if n.strip()]
        out.append((shapely.from_wkb(bytes(g.asWkb())), labels))
    return out


def predicted_boxes(source, score_field, class_field, area, feedback, shapes=False):
    """The bounding boxes of the features of ``source`` whose centre is in ``area``, as ``(xmin, ymin, xmax, ymax,
    class, score)``: the class is :func:`box_label` of ``class_field`` (0 without it or for NULL), the score that of
    ``score_field`` (1 without it). Features with a NULL score are left out, and counted in a warning. ``shapes``:
    ``(shapely geometry, class, score)`` instead (rotated boxes)."""
    import shapely
    boxes, missing_score = [], 0
    for f in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled; nothing was written.")
        g = f.geometry()
        if g is None or g.isNull() or g.isEmpty():
            continue
        r = g.boundingBox()
        b = (r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum())
        if not _centre_inside(b, area):
            continue
        score = f[score_field] if score_field else 1.0
        if is_null(score):
            missing_score += 1
            continue
        cls = box_label(f[class_field]) if class_field and not is_null(f[class_field]) else 0
        boxes.append((shapely.from_wkb(bytes(g.asWkb())), cls, float(score)) if shapes else b + (cls, float(score)))
    if missing_score:
        push_warning(feedback, f"{missing_score} predicted box(es) have no {score_field!r} and were left out")
    return boxes
