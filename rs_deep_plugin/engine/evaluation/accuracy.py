"""Accuracy assessment of results against reference labels (QGIS-free).

* :func:`assess_segmentation` compares a class raster (e.g. the output of :func:`.segment.segment`)
  with a reference: a label raster (resampled nearest onto the prediction's grid when the grids
  differ) or polygons with a class value (rasterized onto the prediction's grid, pixel centres).
  Reading is block-wise, so memory is bounded by the block size, not by the raster's size.
  Pixels that are nodata in either raster are not counted.
* :func:`assess_detection` scores boxes against reference boxes with
  :func:`.metrics.detection_metrics` (precision, recall, F1, AP at an IoU threshold).
* :func:`assess_multilabel_patches` scores the label sets of multi-label patches (e.g. the output of
  :func:`.patches.classify_patches`) against reference polygons with :func:`.metrics.multilabel_metrics`.
* :func:`write_report` writes the metrics as a self-contained HTML page and/or a CSV table.

Conventions: the confusion matrix has the reference in its rows and the prediction in its
columns; class value 0 is the background when the reference is polygons.
"""
import csv
import html
import io
import math
import os
import xml.etree.ElementTree as ET

import numpy as np

from ..errors import InputError, require
from ..files import write_atomic
from ..geo.rotated import polygon_iou, rotated_iou
from ..geo.writer import quiet_osgeo_exceptions_warning
from ..progress import Progress
from .metrics import detection_metrics, metrics_from_confusion, multilabel_metrics

OUTSIDE_CHOICES = ("background", "ignore")
DEFAULT_BLOCK = 1024
_NO_CLASS = -(2 ** 31)  # reference value of pixels outside the polygons with outside="ignore"
_PRED_OFFSET = 2 ** 31


def _rasterio():
    return require("rasterio")


# --------------------------------------------------------------------------------------------
# class names


def raster_category_names(path):
    """``{value: name}`` from a raster's category names (GDAL; GeoTIFF keeps them in ``.aux.xml``).

    Empty names are left out; returns ``{}`` when the raster names no categories."""
    path = os.fspath(path)
    names = None
    try:
        from osgeo import gdal
        with quiet_osgeo_exceptions_warning():  # GDAL's exception setting is left as the host has it
            ds = gdal.Open(path)
        if ds is not None:
            names = ds.GetRasterBand(1).GetCategoryNames()
            ds = None
    except Exception:
        names = None
    if names is None:
        aux = path + ".aux.xml"
        if os.path.isfile(aux):
            try:
                root = ET.parse(aux).getroot()
                band = next((b for b in root.iter("PAMRasterBand") if b.get("band", "1") == "1"), None)
                cats = band.find("CategoryNames") if band is not None else None
                names = [c.text or "" for c in cats.iter("Category")] if cats is not None else None
            except ET.ParseError:
                names = None
    return {i: n for i, n in enumerate(names or []) if n and n.strip()}


def _names_map(class_names):
    if class_names is None:
        return {}
    if isinstance(class_names, dict):
        return {int(k): str(v) for k, v in class_names.items()}
    return {i: str(n) for i, n in enumerate(class_names)}


# --------------------------------------------------------------------------------------------
# segmentation


def _windows(window, block):
    from rasterio.windows import Window
    c0, r0, w, h = int(window.col_off), int(window.row_off), int(window.width), int(window.height)
    for r in range(r0, r0 + h, block):
        for c in range(c0, c0 + w, block):
            yield Window(c, r, min(block, c0 + w - c), min(block, r0 + h - r))


def _area_window(ds, bounds):
    from rasterio.windows import Window, from_bounds
    full = Window(0, 0, ds.width, ds.height)
    if bounds is None:
        return full
    xmin, ymin, xmax, ymax = (float(v) for v in bounds)
    if not (xmax > xmin and ymax > ymin):
        raise InputError(f"bounds: expected (xmin, ymin, xmax, ymax) with xmin < xmax and ymin < ymax; got {bounds}")
    win = from_bounds(xmin, ymin, xmax, ymax, transform=ds.transform)
    col0, row0 = math.floor(win.col_off + 1e-9), math.floor(win.row_off + 1e-9)
    col1 = math.ceil(win.col_off + win.width - 1e-9)
    row1 = math.ceil(win.row_off + win.height - 1e-9)
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, ds.width), min(row1, ds.height)
    if col1 <= col0 or row1 <= row0:
        raise InputError(f"bounds {tuple(bounds)} do not overlap the prediction raster {ds.name} "
                         f"(bounds {tuple(ds.bounds)}); give an area inside it, in its CRS")
    return Window(col0, row0, col1 - col0, row1 - row0)


def _as_int(arr, what, where):
    """(int64 class values, finite mask) of a block; fractional values are refused."""
    if np.issubdtype(arr.dtype, np.floating):
        ok = np.isfinite(arr)
        if np.any(arr[ok] != np.round(arr[ok])):
            raise InputError(f"{where}: the {what} holds fractional values; it must hold integer class values")
        return np.where(ok, arr, 0).astype(np.int64), ok
    return arr.astype(np.int64), np.ones(arr.shape, dtype=bool)


class _RasterReference:
    """A label raster read on the prediction's grid (directly, or through a nearest-neighbour WarpedVRT)."""

    def __init__(self, path, pred):
        rasterio = _rasterio()
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT
        self.path = os.fspath(path)
        try:
            self.src = rasterio.open(self.path)
        except Exception as exc:
            raise InputError(f"Cannot open the reference raster {self.path}: {exc}") from exc
        self.vrt = None
        same_grid = ((self.src.width, self.src.height) == (pred.width, pred.height)
                     and self.src.transform.almost_equals(pred.transform)
                     and (self.src.crs == pred.crs or self.src.crs is None or pred.crs is None))
        if same_grid:
            self.ds = self.src
            self.resampled = False
        else:
            if (self.src.crs is None) != (pred.crs is None):
                self.src.close()
                raise InputError(f"The reference raster {self.path} and the prediction are on different grids and "
                                 "only one of them has a CRS; assign the missing CRS first")
            opts = dict(resampling=Resampling.nearest, width=pred.width, height=pred.height,
                        transform=pred.transform)
            if pred.crs is not None:
                opts["crs"] = pred.crs
            if self.src.nodata is None:
                opts["add_alpha"] = True  # so that pixels outside the reference's footprint are masked
            self.vrt = WarpedVRT(self.src, **opts)
            self.ds = self.vrt
            self.resampled = True

    def read(self, window):
        data, finite = _as_int(self.ds.read(1, window=window), "reference raster", self.path)
        return data, finite & (self.ds.read_masks(1, window=window) > 0)

    def close(self):
        if self.vrt is not None:
            self.vrt.close()
        self.src.close()


class _PolygonReference:
    """Polygons rasterized block by block onto the prediction's grid (pixel centres)."""

    def __init__(self, pairs, outside):
        from shapely import STRtree
        shapes = []
        for i, item in enumerate(pairs):
            try:
                geom, value = item
            except (TypeError, ValueError):
                raise InputError(f"reference[{i}]: expected a (geometry, class value) pair, got {item!r}") from None
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise InputError(f"reference[{i}]: class value {value!r} is not an integer") from None
            if geom is None or getattr(geom, "is_empty", True):
                continue
            if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
                raise InputError(f"reference[{i}]: a {geom.geom_type}; the reference must be polygons")
            if not geom.is_valid:
                geom = geom.buffer(0)
            shapes.append((geom, value))
        if not shapes:
            raise InputError("reference: no polygons given; give the reference polygons with their class values")
        self.shapes = shapes
        self.tree = STRtree([g for g, _ in shapes])
        self.fill = 0 if outside == "background" else _NO_CLASS
        self.resampled = False

    def read(self, window, transform):
        from rasterio.features import rasterize
        from rasterio.windows import bounds as window_bounds
        from shapely.geometry import box
        h, w = int(window.height), int(window.width)
        area = box(*window_bounds(window, transform))
        idx = sorted(int(i) for i in self.tree.query(area))
        out = np.full((h, w), self.fill, dtype=np.int32)
        if idx:
            from rasterio.windows import transform as window_transform
            out = rasterize([self.shapes[i] for i in idx], out_shape=(h, w),
                            transform=window_transform(window, transform), fill=self.fill, dtype="int32")
        return out.astype(np.int64), out != _NO_CLASS


def assess_segmentation(predicted_raster, reference, *, class_names=None, bounds=None, ignore_value=None,
                        outside="background", block_size=DEFAULT_BLOCK, progress=None, is_cancelled=None):
    """Pixel-wise accuracy of a class raster against a reference.

    ``predicted_raster``: a class raster (band 1 holds integer class values). ``reference``: a
    label raster path (resampled nearest onto the prediction's grid when the grids differ) or a
    list of ``(shapely geometry, class value)`` polygons in the prediction's CRS (rasterized on
    the prediction's grid by pixel centre; later polygons win where they overlap). Pixels outside
    every polygon are the background, class 0 (``outside="background"``) or not counted
    (``outside="ignore"``). ``class_names``: ``{value: name}`` or a list indexed by value
    (default: the prediction's category names). ``bounds``: only this area (xmin, ymin, xmax,
    ymax in the prediction's CRS). ``ignore_value``: a reference value that means "not labelled".
    Nodata pixels of either raster are not counted.

    Returns a dict: ``classes`` (per class: value, name, iou, f1, precision, recall, support =
    reference pixels, predicted = predicted pixels; a metric whose denominator is 0 is None),
    ``confusion_matrix`` (rows reference, columns prediction, in the order of ``class_values``),
    ``class_values``, ``class_names``, ``overall_accuracy``, ``kappa`` (Cohen's), ``mean_iou``
    and ``mean_f1`` (over the classes present in the reference or the prediction), ``pixels``.
    """
    rasterio = _rasterio()
    prog = Progress(progress, is_cancelled)
    if outside not in OUTSIDE_CHOICES:
        raise InputError(f"outside must be one of {', '.join(OUTSIDE_CHOICES)}; got {outside!r}")
    if not isinstance(block_size, int) or block_size < 16:
        raise InputError(f"block_size must be an integer of at least 16; got {block_size!r}")
    path = os.fspath(predicted_raster)
    try:
        pred = rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the prediction raster {path}: {exc}") from exc
    ref = None
    try:
        names = _names_map(class_names) or raster_category_names(path)
        if isinstance(reference, (str, os.PathLike)):
            ref = _RasterReference(reference, pred)
            read_ref = ref.read
            ref_kind = "raster" + (" (resampled nearest onto the prediction's grid)" if ref.resampled else "")
        else:
            if reference is None:
                raise InputError("reference: give a label raster or a list of (polygon, class value) pairs")
            polys = _PolygonReference(list(reference), outside)
            read_ref = lambda win: polys.read(win, pred.transform)  # noqa: E731
            ref_kind = f"{len(polys.shapes)} polygons (outside: {outside})"
        area = _area_window(pred, bounds)
        if not isinstance(reference, (str, os.PathLike)):
            from rasterio.windows import bounds as window_bounds
            from shapely.geometry import box
            if not len(polys.tree.query(box(*window_bounds(area, pred.transform)), predicate="intersects")):
                raise InputError(f"None of the {len(polys.shapes)} reference polygons overlaps the assessed area of "
                                 f"{os.path.basename(path)} (bounds {tuple(round(v, 3) for v in pred.bounds)}); "
                                 "check that the polygons are in the prediction's CRS")
        wins = list(_windows(area, block_size))
        counts = {}
        for n, win in enumerate(wins):
            prog.check()
            p, ok = _as_int(pred.read(1, window=win), "prediction raster", path)
            ok &= pred.read_masks(1, window=win) > 0
            r, rvalid = read_ref(win)
            ok &= rvalid
            if ignore_value is not None:
                ok &= r != int(ignore_value)
            if ok.any():
                codes = (r[ok] << 32) + (p[ok] + _PRED_OFFSET)
                u, c = np.unique(codes, return_counts=True)
                for code, cnt in zip(u.tolist(), c.tolist()):
                    counts[code] = counts.get(code, 0) + cnt
            prog.update((n + 1) / len(wins))
        pairs = {((code >> 32), (code & 0xFFFFFFFF) - _PRED_OFFSET): cnt for code, cnt in counts.items()}
        total = sum(pairs.values())
        if total == 0:
            raise InputError("No pixel to compare: the reference and the prediction do not overlap (check the CRS "
                             "and the area), or every overlapping pixel is nodata or not labelled")
        values = sorted(set(names) | {a for a, _ in pairs} | {b for _, b in pairs})
        index = {v: i for i, v in enumerate(values)}
        cm = np.zeros((len(values), len(values)), dtype=np.int64)
        for (a, b), cnt in pairs.items():
            cm[index[a], index[b]] += cnt
        result = metrics_from_confusion(cm, names, values)
        result.update(task="segmentation", reference=ref_kind, prediction=os.path.basename(path),
                      window={"col_off": int(area.col_off), "row_off": int(area.row_off),
                              "width": int(area.width), "height": int(area.height)})
        return result
    finally:
        if ref is not None:
            ref.close()
        pred.close()


# --------------------------------------------------------------------------------------------
# detection


def _rows(boxes, what, with_score):
    out_b, out_l, out_s = [], [], []
    for i, row in enumerate(boxes or []):
        if hasattr(row, "bounds") and hasattr(row, "geom_type"):  # a shapely geometry: its envelope
            if row.is_empty:
                continue
            row = tuple(row.bounds)
        row = list(row)
        if len(row) < 4 or len(row) > (6 if with_score else 5):
            raise InputError(f"{what}[{i}]: expected (xmin, ymin, xmax, ymax, class"
                             f"{', score' if with_score else ''}), got {row!r}")
        try:
            x0, y0, x1, y1 = (float(v) for v in row[:4])
        except (TypeError, ValueError):
            raise InputError(f"{what}[{i}]: box coordinates must be numbers, got {row[:4]!r}") from None
        out_b.append([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
        out_l.append(row[4] if len(row) > 4 else 0)
        if with_score:
            out_s.append(float(row[5]) if len(row) > 5 else 1.0)
    labels = [str(v) if isinstance(v, str) else int(v) for v in out_l]
    return np.array(out_b, dtype=np.float64).reshape(-1, 4), labels, np.array(out_s, dtype=np.float64)


def _geometry_rows(rows, what, with_score, kind):
    """(shapely geometries, labels, scores) of rows ``(geometry[, class[, score]])`` or bare shapely geometries;
    ``kind`` names what is assessed in the error ("rotated boxes", "instances")."""
    geoms, out_l, out_s = [], [], []
    for i, row in enumerate(rows or []):
        row = (row,) if hasattr(row, "geom_type") else tuple(row)
        if not row or not hasattr(row[0], "geom_type") or len(row) > (3 if with_score else 2):
            raise InputError(f"{what}[{i}]: {kind} are assessed from polygons: expected (polygon, class"
                             f"{', score' if with_score else ''}), got {row!r}")
        geoms.append(row[0])
        out_l.append(row[1] if len(row) > 1 else 0)
        if with_score:
            out_s.append(float(row[2]) if len(row) > 2 else 1.0)
    labels = [str(v) if isinstance(v, str) else int(v) for v in out_l]
    return geoms, labels, np.array(out_s, dtype=np.float64)


def _polygon_rows(rows, what, with_score):
    """Polygons (an object array; empty geometries left out), labels and scores of rows ``(polygon[, class[,
    score]])``: instance outlines, matched by polygon IoU."""
    geoms, labels, scores = _geometry_rows(rows, what, with_score, "instances")
    keep = [k for k, g in enumerate(geoms) if not g.is_empty]
    polys = np.empty(len(keep), dtype=object)
    polys[:] = [geoms[k] for k in keep]
    return polys, [labels[k] for k in keep], scores[keep] if with_score else scores


def _rotated_rows(rows, what, with_score):
    """Rotated boxes [N, 5] (each geometry's minimum rotated rectangle), labels and scores of rows
    ``(geometry[, class[, score]])`` or bare shapely geometries."""
    from ..geo.rotated import polygons_to_rboxes
    geoms, labels, scores = _geometry_rows(rows, what, with_score, "rotated boxes")
    try:
        rb = polygons_to_rboxes(geoms, what)
    except ValueError as exc:
        raise InputError(f"{exc}; rotated boxes are polygons (the rotated rectangles of an oriented detector, the "
                         "objects' outlines for the reference)") from None
    return rb, labels, scores


def assess_detection(predicted_boxes, reference_boxes, iou=0.5, score_threshold=0.0, rotated=False, masks=False):
    """Precision, recall, F1 and AP of boxes against reference boxes (one image / area).

    ``predicted_boxes``: rows ``(xmin, ymin, xmax, ymax[, class[, score]])`` or shapely geometries
    (their envelope; class 0, score 1); ``reference_boxes``: rows ``(xmin, ymin, xmax, ymax[,
    class])`` or geometries, in the same coordinates. Matching is
    :func:`.metrics.detection_metrics` (greedy by score, one match per reference box).

    ``rotated``: rotated boxes, matched by rotated IoU: rows ``(polygon[, class[, score]])`` (or bare
    polygons), each one's minimum rotated rectangle (the rectangles of an oriented detector stay themselves; a
    reference footprint becomes its minimum rotated rectangle).

    ``masks``: instance segmentation: rows ``(polygon[, class[, score]])``, the objects' outlines themselves, matched
    by polygon (mask) IoU.
    """
    if not 0 < float(iou) <= 1:
        raise InputError(f"iou must be in (0, 1]; got {iou}")
    if masks:
        pb, pl, ps = _polygon_rows(predicted_boxes, "predicted_boxes", True)
        tb, tl, _ = _polygon_rows(reference_boxes, "reference_boxes", False)
    elif rotated:
        pb, pl, ps = _rotated_rows(predicted_boxes, "predicted_boxes", True)
        tb, tl, _ = _rotated_rows(reference_boxes, "reference_boxes", False)
    else:
        pb, pl, ps = _rows(predicted_boxes, "predicted_boxes", True)
        tb, tl, _ = _rows(reference_boxes, "reference_boxes", False)
    # one label space (class names and numbers may both appear): map every label to an integer
    lookup = {}
    for v in list(tl) + list(pl):
        lookup.setdefault(v, len(lookup))
    pl = np.array([lookup[v] for v in pl], dtype=np.int64)
    tl = np.array([lookup[v] for v in tl], dtype=np.int64)
    out = detection_metrics([(pb, ps, pl)], [(tb, tl)], iou=float(iou), score_threshold=float(score_threshold),
                            rotated=rotated_iou if rotated and not masks else None,
                            polygons=polygon_iou if masks else None)
    out.update(task="detection", predicted=int(len(pb)))
    return out


# --------------------------------------------------------------------------------------------
# multi-label patches


def assess_multilabel_patches(patches, reference, class_names=None, cover=0.2):
    """Per-class precision, recall and F1, micro and macro F1 of multi-label patches against reference polygons.

    ``patches``: ``[(shapely polygon, [class names])]`` (a patch and its predicted labels); ``reference``:
    ``[(shapely geometry, class name)]`` in the same CRS. A patch's true labels are the classes whose reference
    polygons cover at least ``cover`` of its area (as rs_deep:train labels the training patches; outside every
    polygon no class). ``class_names``: the classes in order (default: the sorted names of both); a name outside
    them is refused. Returns :func:`.metrics.multilabel_metrics` with ``task`` "multilabel", ``class_names``,
    ``cover``, ``truth`` and ``predicted`` (the label sets, one list of names per patch).
    """
    shapely = require("shapely", "shapely")
    if not (isinstance(cover, (int, float)) and 0 < cover <= 1):
        raise InputError(f"cover must be in (0, 1]; got {cover!r}")
    patches = [(g, [str(n) for n in labels]) for g, labels in patches if g is not None and not g.is_empty]
    if not patches:
        raise InputError("No predicted patch to assess (the patch layer is empty in the assessed area)")
    reference = [(g, str(n)) for g, n in reference if g is not None and not g.is_empty]
    found = sorted({n for _, n in reference} | {n for _, labels in patches for n in labels})
    names = [str(n) for n in class_names] if class_names else found
    unknown = [n for n in found if n not in names]
    if unknown:
        raise InputError(f"Class names {', '.join(repr(n) for n in unknown)} are not among the classes "
                         f"({', '.join(names)}); the reference's class field must hold the model's class names")
    geoms = np.array([g for g, _ in patches], dtype=object)
    areas = shapely.area(geoms)
    if np.any(areas <= 0):
        raise InputError("A predicted patch has no area; give the polygon layer written by Patch classification")
    truth = np.zeros((len(patches), len(names)), dtype=bool)
    for k, name in enumerate(names):
        mine = [g for g, n in reference if n == name]
        if mine:
            union = shapely.union_all(mine)
            truth[:, k] = shapely.area(shapely.intersection(geoms, union)) / areas >= cover - 1e-9
    index = {n: k for k, n in enumerate(names)}
    pred = np.zeros_like(truth)
    for i, (_, labels) in enumerate(patches):
        for n in labels:
            pred[i, index[n]] = True
    out = multilabel_metrics(truth, pred, names)
    out.update(task="multilabel", class_names=names, cover=float(cover),
               truth=[[n for n, t in zip(names, row) if t] for row in truth],
               predicted=[[n for n, t in zip(names, row) if t] for row in pred])
    return out


# --------------------------------------------------------------------------------------------
# reports


def _fmt(v, digits=4):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _atomic_write(path, text):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"Cannot write {path}: the folder {folder} does not exist")
    return write_atomic(path, text)


CSV_FIELDS = ("class_id", "class_name", "iou", "f1", "precision", "recall", "support", "predicted")
DETECTION_FIELDS = ("precision", "recall", "f1", "ap", "tp", "fp", "fn", "truth", "predicted", "iou",
                    "score_threshold")


MULTILABEL_FIELDS = ("class_id", "class_name", "precision", "recall", "f1", "support", "predicted", "tp", "fp", "fn")


def table_rows(metrics):
    """The rows of the CSV table: one per class (segmentation, multi-label) or one summary row (detection)."""
    if metrics.get("task") == "detection":
        return [{k: metrics.get(k) for k in DETECTION_FIELDS}]
    if metrics.get("task") == "multilabel":
        return [dict(class_id=i, class_name=n, **{k: metrics["classes"][n][k] for k in MULTILABEL_FIELDS[2:]})
                for i, n in enumerate(metrics["class_names"])]
    return [{"class_id": c["value"], "class_name": c["name"], "iou": c["iou"], "f1": c["f1"],
             "precision": c["precision"], "recall": c["recall"], "support": c["support"],
             "predicted": c["predicted"]} for c in metrics["classes"]]


def _csv_text(metrics):
    buf = io.StringIO()
    fields = {"detection": DETECTION_FIELDS, "multilabel": MULTILABEL_FIELDS}.get(metrics.get("task"), CSV_FIELDS)
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in table_rows(metrics):
        w.writerow({k: ("" if row[k] is None else (repr(row[k]) if isinstance(row[k], float) else row[k]))
                    for k in fields})
    return buf.getvalue()


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:0.8em 0 1.6em}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}td.name,th.name{text-align:left}
td.diag{background:#d8f0d8;font-weight:bold}caption{text-align:left;font-weight:bold;padding:4px 0}
.note{color:#555;font-size:90%}"""


def _html_text(metrics, title):
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>{e(title)}</h1>\n"]
    if metrics.get("task") == "detection":
        parts.append("<table><caption>Detection metrics</caption><tr>"
                     + "".join(f"<th>{e(k)}</th>" for k in DETECTION_FIELDS) + "</tr><tr>"
                     + "".join(f"<td>{e(_fmt(metrics.get(k)))}</td>" for k in DETECTION_FIELDS) + "</tr></table>\n")
        parts.append(f"<p class=\"note\">A prediction is a true positive when it overlaps a not yet matched "
                     f"reference box of its class with "
                     f"{'mask (polygon) IoU' if metrics.get('masks') else 'rotated IoU (minimum rotated rectangles)' if metrics.get('rotated') else 'IoU'} "
                     f"&ge; {e(_fmt(metrics.get('iou'), 2))}; AP is the "
                     "all-point interpolated average precision, averaged over the classes.</p>\n")
    elif metrics.get("task") == "multilabel":
        parts.append(_multilabel_html(metrics))
    else:
        summary = [("Overall accuracy", metrics["overall_accuracy"]), ("Cohen's kappa", metrics["kappa"]),
                   ("Mean IoU", metrics["mean_iou"]), ("Mean F1", metrics["mean_f1"]),
                   ("Pixels compared", metrics["pixels"])]
        if metrics.get("reference"):
            summary.append(("Reference", metrics["reference"]))
        if metrics.get("prediction"):
            summary.append(("Prediction", metrics["prediction"]))
        parts.append("<table><caption>Summary</caption>"
                     + "".join(f"<tr><th class=\"name\">{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in summary)
                     + "</table>\n")
        head = ("class_id", "class_name", "IoU", "F1", "precision", "recall", "support (reference px)",
                "predicted px")
        parts.append("<table><caption>Per class</caption><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
                     + "</tr>\n")
        for c in metrics["classes"]:
            cells = [c["value"], c["name"], c["iou"], c["f1"], c["precision"], c["recall"], c["support"],
                     c["predicted"]]
            parts.append("<tr>" + "".join(
                f"<td class=\"name\">{e(_fmt(v))}</td>" if j == 1 else f"<td>{e(_fmt(v)) or '&ndash;'}</td>"
                for j, v in enumerate(cells)) + "</tr>\n")
        parts.append("</table>\n")
        names = metrics["class_names"]
        cm = metrics["confusion_matrix"]
        parts.append("<table><caption>Confusion matrix (pixels; rows: reference, columns: prediction)</caption>"
                     "<tr><th class=\"name\">reference \\ prediction</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "<th>total</th></tr>\n")
        for i, row in enumerate(cm):
            parts.append(f"<tr><th class=\"name\">{e(names[i])}</th>" + "".join(
                f"<td class=\"diag\">{v}</td>" if i == j else f"<td>{v}</td>" for j, v in enumerate(row))
                + f"<td>{sum(row)}</td></tr>\n")
        parts.append("<tr><th class=\"name\">total</th>" + "".join(
            f"<td>{sum(r[j] for r in cm)}</td>" for j in range(len(names))) + f"<td>{metrics['pixels']}</td></tr>"
            "</table>\n")
        parts.append("<p class=\"note\">IoU = TP / (TP + FP + FN); F1 = 2 TP / (2 TP + FP + FN); precision = TP / "
                     "predicted; recall = TP / reference. Mean IoU and mean F1 average the classes present in the "
                     "reference or the prediction. Nodata pixels of either raster are not counted; "
                     "&ndash; = undefined (no pixel of that class).</p>\n")
    parts.append("</body></html>\n")
    return "".join(parts)


def _multilabel_html(metrics):
    e = html.escape
    summary = [("Micro F1", metrics["micro_f1"]), ("Micro precision", metrics["micro_precision"]),
               ("Micro recall", metrics["micro_recall"]), ("Macro F1", metrics["macro_f1"]),
               ("Exact match (whole label set right)", metrics["exact_match"]),
               ("Hamming accuracy", metrics["hamming_accuracy"]), ("Patches", metrics["patches"]),
               ("Label cover", metrics["cover"])]
    parts = ["<table><caption>Summary</caption>" + "".join(
        f"<tr><th class=\"name\">{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in summary) + "</table>\n",
        "<table><caption>Per class</caption><tr>" + "".join(f"<th>{e(h)}</th>" for h in MULTILABEL_FIELDS)
        + "</tr>\n"]
    for row in table_rows(metrics):
        parts.append("<tr>" + "".join(
            f"<td class=\"name\">{e(_fmt(row[k]))}</td>" if k == "class_name" else
            f"<td>{e(_fmt(row[k])) or '&ndash;'}</td>" for k in MULTILABEL_FIELDS) + "</tr>\n")
    parts.append("</table>\n<p class=\"note\">A patch's reference labels are the classes whose reference polygons "
                 f"cover at least {e(_fmt(metrics['cover'], 2))} of it. Per class: precision = TP / predicted, recall "
                 "= TP / reference, F1 = 2 TP / (2 TP + FP + FN), counted over patches; micro scores pool the counts "
                 "of every class, macro F1 averages the classes' F1 (those present in the reference or the "
                 "prediction); &ndash; = undefined.</p>\n")
    return "".join(parts)


def write_report(metrics, html_path=None, csv_path=None, title="Accuracy assessment", transaction=None):
    """Write ``metrics`` (from :func:`assess_segmentation` or :func:`assess_detection`) as a
    self-contained HTML page and/or a CSV table. Each file is written to a temporary file beside
    it and renamed, so a failure never leaves a partial report; with ``transaction`` (an
    :class:`.outputs.OutputTransaction`) they are renamed when it commits. Returns ``{"html": path,
    "csv": path}`` for the files written (their final paths)."""
    out = {}
    for key, path, text in (("html", html_path, lambda: _html_text(metrics, title)),
                            ("csv", csv_path, lambda: _csv_text(metrics))):
        if not path:
            continue
        if transaction is None:
            out[key] = _atomic_write(path, text())
        else:
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            if not os.path.isdir(folder):
                raise InputError(f"Cannot write {path}: the folder {folder} does not exist")
            transaction.write(path, text())
            out[key] = os.fspath(path)
    return out


__all__ = ["assess_segmentation", "assess_detection", "assess_multilabel_patches", "write_report",
           "raster_category_names", "table_rows", "OUTSIDE_CHOICES"]
