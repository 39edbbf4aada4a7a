"""Labels for training and assessment: vector readers, reprojection, label rasters, boxes (QGIS-free).

* GeoJSON (plain ``json`` + shapely, no OGR): :func:`read_vector_labels` (polygons with a class value) and
  :func:`read_geojson_boxes` (each feature's envelope) share one reader, :func:`read_geojson_features`;
  a file that declares a CRS (or has none and holds longitudes/latitudes, RFC 7946) is reprojected to the
  image CRS by :func:`reproject_labels`.
* GeoPackage polygons through sqlite3 (:func:`read_gpkg_polygons`), Pascal VOC boxes (:func:`read_voc_boxes`).
* Label rasters on the image grid (:func:`labels_from_raster`) and polygons burnt onto it
  (:func:`labels_from_geometries`); class values 0..K-1, :data:`IGNORE` (255) = not labelled.
* Boxes between map and pixel coordinates with the raster's (inverse) affine transform
  (:func:`map_to_pixels`, valid for rotated grids too), and clipped to an image (:func:`clip_boxes`).

shapely and rasterio are imported inside the functions.
"""
import json
import os
import sqlite3

import numpy as np

from ..errors import InputError
from .raster import apply_affine

IGNORE = 255  # label value of pixels that are not labelled (nodata, outside the labelled area)
MAX_XML_BYTES = 32 << 20


# --------------------------------------------------------------------------------------------
# GeoJSON


def crs_from_geojson(obj):
    """The CRS a GeoJSON object declares in its (pre-RFC 7946) ``crs`` member, or None."""
    crs = obj.get("crs") if isinstance(obj, dict) else None
    if not isinstance(crs, dict):
        return None
    props = crs.get("properties") or {}
    name = props.get("name")
    if not isinstance(name, str):
        return None
    # urn:ogc:def:crs:EPSG::32616, urn:ogc:def:crs:OGC:1.3:CRS84, EPSG:4326
    low = name.lower()
    if low.endswith("crs84"):
        return "OGC:CRS84"
    if "epsg" in low:
        code = name.replace("::", ":").split(":")[-1]
        if code.isdigit():
            return f"EPSG:{code}"
    return name


def read_geojson_features(path, what="Label file", collection_only=False):
    """(GeoJSON object, ``[(feature index, shapely geometry, properties)]``) of a GeoJSON file.

    Features without a geometry and empty geometries are left out; an invalid geometry or file is an
    :class:`InputError` naming ``path``. A lone Feature or geometry counts as a collection of one, unless
    ``collection_only`` (then a FeatureCollection is required)."""
    from shapely.geometry import shape
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as exc:
        raise InputError(f"{what} not found: {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a valid GeoJSON file ({exc})") from exc
    kind = obj.get("type") if isinstance(obj, dict) else None
    if collection_only and (kind != "FeatureCollection" or obj.get("features") is None):
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection of box polygons")
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a GeoJSON object")
    if kind == "FeatureCollection":
        features = obj.get("features") or []
    elif kind == "Feature":
        features = [obj]
    else:
        features = [{"type": "Feature", "geometry": obj, "properties": {}}]
    out = []
    for i, feat in enumerate(features):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        if not geom:
            continue
        try:
            g = shape(geom)
        except Exception as exc:
            raise InputError(f"{path}: feature {i} has an invalid geometry ({exc})") from exc
        if g.is_empty:
            continue
        out.append((i, g, feat.get("properties") or {}))
    return obj, out


def read_vector_labels(path, class_value=1, class_field=None, dst_crs=None):
    """Polygons of a GeoJSON file as ``[(shapely geometry, class value)]`` for the trainers.

    Every polygon gets ``class_value``, or the integer in the feature property ``class_field``
    when given. Non-polygon features are skipped. With ``dst_crs`` (the image CRS, anything
    rasterio's ``CRS.from_user_input`` takes) the geometries are reprojected when the file
    declares another CRS in its ``crs`` member, or has none (RFC 7946: WGS 84) and its
    coordinates are longitudes/latitudes; otherwise they are taken to be in the image CRS already.
    """
    obj, features = read_geojson_features(path)
    out = []
    for i, g, props in features:
        if g.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue
        if g.geom_type == "GeometryCollection":
            polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
            if not polys:
                continue
            from shapely.ops import unary_union
            g = unary_union(polys)
        if not g.is_valid:
            g = g.buffer(0)
        value = class_value
        if class_field is not None:
            raw = props.get(class_field)
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise InputError(f"{path}: feature {i}: property {class_field!r} is {raw!r}; expected an "
                                 "integer class value") from None
        out.append((g, int(value)))
    if dst_crs is not None and out:
        out = reproject_labels(out, crs_from_geojson(obj), dst_crs, path)
    return out


def read_geojson_shapes(path, class_field="label", dst_crs=None):
    """GeoJSON features -> (shapely geometries in ``dst_crs``, class names [N]) of a box file: points are
    refused. The class is the property ``class_field`` (name or 0-based number; absent = the first class).
    Reprojected like :func:`read_vector_labels` when the file declares another CRS."""
    obj, features = read_geojson_features(path, "Box file", collection_only=True)
    geoms, names = [], []
    for i, geom, props in features:
        if geom.geom_type in ("Point", "MultiPoint"):
            raise InputError(f"{path}: feature {i} is a point; detection needs boxes (polygons or lines around "
                             "each object)")
        geoms.append((geom, 0))
        names.append(props.get(class_field))
    if dst_crs is not None and geoms:
        geoms = reproject_labels(geoms, crs_from_geojson(obj), dst_crs, path)
    return [g for g, _ in geoms], names


def read_geojson_boxes(path, class_field="label", dst_crs=None):
    """GeoJSON features -> (map boxes [N, 4] xmin, ymin, xmax, ymax in ``dst_crs``; class names [N]): each
    feature's box is its geometry's envelope (:func:`read_geojson_shapes`)."""
    geoms, names = read_geojson_shapes(path, class_field, dst_crs)
    boxes = np.array([g.bounds for g in geoms], dtype=np.float64).reshape(-1, 4)
    return boxes, names


def reproject_labels(labels, src_crs, dst_crs, where):
    """``[(geometry, value)]`` from ``src_crs`` (None: WGS 84 when the coordinates look like
    longitudes/latitudes, else as they are) to ``dst_crs``."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    dst = CRS.from_user_input(dst_crs)
    if src_crs is None:
        minx = min(g.bounds[0] for g, _ in labels)
        miny = min(g.bounds[1] for g, _ in labels)
        maxx = max(g.bounds[2] for g, _ in labels)
        maxy = max(g.bounds[3] for g, _ in labels)
        looks_lonlat = -180 <= minx and maxx <= 180 and -90 <= miny and maxy <= 90
        if not looks_lonlat or dst.is_geographic:
            return labels
        src_crs = "EPSG:4326"
    src = CRS.from_user_input(src_crs)
    if src == dst:
        return labels
    try:
        return [(shape(transform_geom(src, dst, mapping(g))), v) for g, v in labels]
    except Exception as exc:
        raise InputError(f"{where}: cannot reproject the labels from {src_crs} to the image CRS ({exc})") from exc


# --------------------------------------------------------------------------------------------
# GeoPackage, Pascal VOC


def _gpkg_wkb(blob):
    """Standard WKB from a GeoPackage geometry blob (strips the 'GP' header and its envelope)."""
    blob = bytes(blob)
    if blob[:2] != b"GP":
        raise InputError("not a GeoPackage geometry (no 'GP' magic)")
    flags = blob[3]
    envelope = (flags >> 1) & 0x07
    size = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}.get(envelope)
    if size is None:
        raise InputError(f"GeoPackage geometry with an invalid envelope indicator {envelope}")
    return blob[8 + size:]


def read_gpkg_polygons(path, layer=None, field=None, dst_crs=None):
    """Polygons of a GeoPackage layer as ``[(shapely geometry, value of field)]`` (sqlite3 + shapely).

    ``layer`` defaults to the only feature table; ``dst_crs`` reprojects when the layer's CRS differs.
    """
    import shapely
    if not os.path.isfile(path):
        raise InputError(f"Label file not found: {path}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InputError(f"{path}: cannot open as a GeoPackage ({exc})") from exc
    try:
        try:
            tables = [r[0] for r in con.execute("select table_name from gpkg_contents where data_type='features'")]
        except sqlite3.Error as exc:
            raise InputError(f"{path}: not a GeoPackage ({exc})") from exc
        if layer is None:
            if len(tables) != 1:
                raise InputError(f"{path}: holds the layers {tables}; name the one to use")
            layer = tables[0]
        if layer not in tables:
            raise InputError(f"{path}: no layer {layer!r}; layers: {', '.join(tables)}")
        geom_col, srs_id = con.execute("select column_name, srs_id from gpkg_geometry_columns where table_name=?",
                                       (layer,)).fetchone()
        org = con.execute("select organization, organization_coordsys_id from gpkg_spatial_ref_sys "
                          "where srs_id=?", (srs_id,)).fetchone()
        columns = [r[1] for r in con.execute(f'pragma table_info("{layer}")')]
        if field is not None and field not in columns:
            raise InputError(f"{path}: layer {layer!r} has no field {field!r}; fields: "
                             f"{', '.join(c for c in columns if c != geom_col)}")
        sel = f'"{geom_col}"' + (f', "{field}"' if field else "")
        rows = con.execute(f'select {sel} from "{layer}"').fetchall()
    finally:
        con.close()
    out = []
    for row in rows:
        if row[0] is None:
            continue
        g = shapely.from_wkb(_gpkg_wkb(row[0]))
        if g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if not g.is_valid:
            g = g.buffer(0)
        out.append((g, row[1] if field else None))
    src_crs = f"{org[0].upper()}:{org[1]}" if org and org[0] and org[0].lower() == "epsg" else None
    if dst_crs is not None and src_crs is not None and out:
        out = reproject_labels(out, src_crs, dst_crs, path)
    return out


def read_voc_boxes(path):
    """Pascal VOC annotation -> (boxes [N, 4] pixel xmin, ymin, xmax, ymax; class names [N])."""
    import xml.etree.ElementTree as ET
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"Box file not found: {path}")
    if os.path.getsize(path) > MAX_XML_BYTES:
        raise InputError(f"{path}: larger than 32 MiB; this is not a Pascal VOC annotation")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not a valid Pascal VOC XML file ({exc})") from exc
    boxes, names = [], []
    for i, obj in enumerate(root.iter("object")):
        bb = obj.find("bndbox")
        try:
            vals = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{path}: object {i} has no valid <bndbox> with xmin, ymin, xmax, ymax") from None
        boxes.append(vals)
        names.append((obj.findtext("name") or "").strip())
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), names


# --------------------------------------------------------------------------------------------
# label rasters


def label_shapes(pairs, n_classes):
    """``[(geometry, class value)]`` checked (pairs, values 0..n_classes-1), without empty geometries."""
    shapes = []
    for i, item in enumerate(pairs or []):
        try:
            geom, value = item
        except (TypeError, ValueError):
            raise InputError(f"labels[{i}]: expected a (geometry, class value) pair, got {item!r}") from None
        value = int(value)
        if not 0 <= value < n_classes:
            raise InputError(f"labels[{i}]: class value {value} is out of range; {n_classes} classes are named "
                             f"(0..{n_classes - 1})")
        if geom is None or getattr(geom, "is_empty", False):
            continue
        shapes.append((geom, value))
    return shapes


def labels_from_geometries(pairs, ds, n_classes):
    """``[(geometry, class value)]`` burnt onto the grid of the open raster ``ds`` (uint8; 0 outside them)."""
    from rasterio.features import rasterize
    shapes = label_shapes(pairs, n_classes)
    if not shapes:
        raise InputError("labels: no geometries given; give polygons of the objects to learn")
    return rasterize(shapes, out_shape=(ds.height, ds.width), transform=ds.transform, fill=0,
                     dtype="uint8")


def labels_from_raster(path, ds, n_classes):
    """The class values of a label raster on the grid of the open raster ``ds`` (uint8; :data:`IGNORE` where
    it is nodata or 255); refuses another grid, fractional values and values beyond ``n_classes``."""
    import rasterio
    try:
        lds = rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the label raster {path}: {exc}") from exc
    with lds:
        if (lds.width, lds.height) != (ds.width, ds.height) or not lds.transform.almost_equals(ds.transform):
            raise InputError(f"The label raster {path} ({lds.width}x{lds.height} px) is not on the image's "
                             f"pixel grid ({ds.width}x{ds.height} px, same transform); rasterize the labels "
                             "onto the image grid (Raster > Conversion > Rasterize with the image's extent "
                             "and resolution) or give polygons instead")
        raw = lds.read(1)
        mask = lds.read_masks(1) == 0
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        mask |= bad
        raw = np.where(bad, 0, raw)
        if np.any(raw[~mask] != np.round(raw[~mask])):
            raise InputError(f"The label raster {path} holds fractional values; it must hold integer class "
                             f"values 0..{n_classes - 1} (0 = background)")
    raw = raw.astype(np.int64)
    lab = np.full(raw.shape, IGNORE, dtype=np.uint8)
    ok = (~mask) & (raw != IGNORE)
    values = raw[ok]
    bad = np.unique(values[(values < 0) | (values >= n_classes)])
    if bad.size:
        raise InputError(f"The label raster {path} holds class values {bad[:10].tolist()} but only "
                         f"{n_classes} classes are named (values 0..{n_classes - 1}; 255 = not labelled)")
    lab[ok] = values.astype(np.uint8)
    return lab


# --------------------------------------------------------------------------------------------
# boxes


def map_to_pixels(mboxes, transform):
    """Map boxes [N, 4] (xmin, ymin, xmax, ymax) -> pixel boxes [N, 4] (column/row, origin at the top-left
    corner) on the grid of ``transform``: the envelope of the four corners through its inverse."""
    mboxes = np.asarray(mboxes, dtype=np.float64).reshape(-1, 4)
    inv = ~transform
    xs, ys = [], []
    for cx, cy in ((0, 1), (2, 1), (2, 3), (0, 3)):
        c, r = apply_affine(inv, mboxes[:, cx], mboxes[:, cy])
        xs.append(np.asarray(c, dtype=np.float64))
        ys.append(np.asarray(r, dtype=np.float64))
    xs, ys = np.stack(xs), np.stack(ys)
    return np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1).reshape(-1, 4)


def clip_boxes(boxes, labels, w, h, min_visible=0.4, min_size=2.0):
    """Clip boxes to [0, w] x [0, h]; keep those with at least ``min_visible`` of their area visible."""
    if not len(boxes):
        return boxes.reshape(0, 4), labels.reshape(0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    c = boxes.copy()
    c[:, [0, 2]] = np.clip(c[:, [0, 2]], 0, w)
    c[:, [1, 3]] = np.clip(c[:, [1, 3]], 0, h)
    vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    ok = (vis >= min_visible * np.maximum(area, 1e-9)) & (c[:, 2] - c[:, 0] >= min_size) & \
         (c[:, 3] - c[:, 1] >= min_size)
    return c[ok], labels[ok]


__all__ = ["IGNORE", "crs_from_geojson", "read_geojson_features", "read_vector_labels", "read_geojson_shapes",
           "read_geojson_boxes",
           "reproject_labels", "read_gpkg_polygons", "read_voc_boxes", "label_shapes", "labels_from_geometries",
           "labels_from_raster", "map_to_pixels", "clip_boxes"]
