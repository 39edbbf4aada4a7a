"""Accuracy assessment (engine + rs_deep:assess_accuracy) and training from QGIS (rs_deep:train), on the real
Atlanta sample: exact confusion counts against an independent numpy computation, kappa/OA by hand, nodata,
other grids, detection boxes, the HTML/CSV report, and the chain raster + labels -> model -> apply -> report."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.transform import from_origin

from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import (assess_detection, assess_segmentation, raster_category_names,
                                                               write_report)
from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics, metrics_from_confusion
from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
from rs_deep.rs_deep_plugin.engine.geo.writer import write_category_names

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS, DEV_PLUGINS

IMAGE = ATLANTA_IMAGE
FOOTPRINTS = ATLANTA_LABELS
NODATA = 255


# --------------------------------------------------------------------------------------------
# fixtures: a prediction made from the real footprints (eroded, shifted, missed, false alarms, nodata)


def _grid():
    with rasterio.open(IMAGE) as ds:
        return ds.profile, ds.transform, (ds.height, ds.width), ds.crs


def _truth(labels, transform, shape):
    return rasterize(labels, out_shape=shape, transform=transform, fill=0, dtype="uint8")


@pytest.fixture(scope="module")
def footprints():
    return read_vector_labels(FOOTPRINTS, class_value=1)


@pytest.fixture(scope="module")
def prediction(tmp_path_factory, footprints):
    """Class raster on the image grid: buildings eroded by 1 m, every 4th shifted 3 m east, every 7th missed,
    two false-alarm squares, a nodata block (255) and the category names background/building."""
    from shapely.affinity import translate
    profile, transform, shape, _ = _grid()
    shapes = []
    for i, (g, _) in enumerate(footprints):
        if i % 7 == 3:
            continue
        g = g.buffer(-1.0)
        if i % 4 == 0:
            g = translate(g, 3.0, 0.0)
        if not g.is_empty:
            shapes.append((g, 1))
    pred = rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8")
    pred[20:40, 30:60] = 1        # false alarms
    pred[700:720, 500:530] = 1
    pred[100:180, 200:330] = NODATA  # a nodata block over buildings and background
    path = tmp_path_factory.mktemp("acc") / "pred.tif"
    profile.update(dtype="uint8", nodata=NODATA, count=1, compress="deflate", tiled=True, blockxsize=128,
                   blockysize=128)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(pred, 1)
    write_category_names(str(path), ["background", "building"])
    return path, pred


def _cm(truth, pred, valid, k=2):
    """Independent confusion matrix with numpy (rows reference, columns prediction)."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (truth[valid].astype(np.int64), pred[valid].astype(np.int64)), 1)
    return cm


def _kappa_by_hand(cm):
    n = cm.sum()
    po = np.trace(cm) / n
    pe = sum(cm[i, :].sum() * cm[:, i].sum() for i in range(cm.shape[0])) / n ** 2
    return po, (po - pe) / (1 - pe)


# --------------------------------------------------------------------------------------------
# engine


def test_confusion_counts_match_numpy_and_nodata_is_skipped(prediction, footprints):
    path, pred = prediction
    _, transform, shape, _ = _grid()
    truth = _truth(footprints, transform, shape)
    valid = pred != NODATA
    expected = _cm(truth, pred, valid)
    assert expected[1, 0] > 0 and expected[0, 1] > 0 and expected[1, 1] > 0  # the test has all kinds of errors
    m = assess_segmentation(path, footprints, block_size=100)  # blocks not aligned with the file's 128 px tiles
    assert m["confusion_matrix"] == expected.tolist()
    assert m["pixels"] == int(valid.sum()) == shape[0] * shape[1] - 80 * 130
    assert m["class_values"] == [0, 1] and m["class_names"] == ["background", "building"]  # category names
    po, kappa = _kappa_by_hand(expected)
    assert m["overall_accuracy"] == pytest.approx(po, abs=1e-12)
    assert m["kappa"] == pytest.approx(kappa, abs=1e-12)
    b = m["classes"][1]
    tp, fp, fn = expected[1, 1], expected[0, 1], expected[1, 0]
    assert (b["support"], b["predicted"]) == (expected[1].sum(), expected[:, 1].sum())
    assert b["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert b["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert b["precision"] == pytest.approx(tp / (tp + fp)) and b["recall"] == pytest.approx(tp / (tp + fn))
    bg = m["classes"][0]
    assert m["mean_iou"] == pytest.approx((bg["iou"] + b["iou"]) / 2)
    # memory is bounded by the block: any block size gives the same counts
    assert assess_segmentation(path, footprints, block_size=4096)["confusion_matrix"] == expected.tolist()


def test_outside_ignore_counts_only_labelled_pixels(prediction, footprints):
    path, pred = prediction
    _, transform, shape, _ = _grid()
    inside = _truth(footprints, transform, shape) > 0
    m = assess_segmentation(path, footprints, outside="ignore", block_size=256)
    expected = _cm(np.ones(shape, np.uint8), pred, inside & (pred != NODATA))
    assert m["confusion_matrix"] == expected.tolist()
    assert m["classes"][0]["support"] == 0 and m["classes"][0]["recall"] is None  # undefined, not 0 or 1
    with pytest.raises(InputError, match="outside"):
        assess_segmentation(path, footprints, outside="nothing")


def test_class_values_in_polygons_and_class_names_argument(prediction, footprints):
    """Polygons of class 2 (absent from the prediction) and explicit names: a 3 x 3 matrix."""
    path, pred = prediction
    _, transform, shape, _ = _grid()
    pairs = [(g, 2 if i % 5 == 0 else 1) for i, (g, _) in enumerate(footprints)]
    truth = _truth(pairs, transform, shape)
    m = assess_segmentation(path, pairs, class_names={0: "bg", 1: "house", 2: "shed"})
    assert m["class_names"] == ["bg", "house", "shed"]
    assert m["confusion_matrix"] == _cm(truth, pred, pred != NODATA, k=3).tolist()
    shed = m["classes"][2]
    assert shed["predicted"] == 0 and shed["precision"] is None and shed["iou"] == 0.0


def test_reference_raster_on_the_same_grid_equals_the_polygons(prediction, footprints, tmp_path):
    path, pred = prediction
    profile, transform, shape, _ = _grid()
    truth = _truth(footprints, transform, shape)
    truth[400:420, 0:600] = NODATA  # reference nodata: not counted either
    ref = tmp_path / "ref.tif"
    profile.update(dtype="uint8", nodata=NODATA, count=1)
    with rasterio.open(ref, "w", **profile) as ds:
        ds.write(truth, 1)
    m = assess_segmentation(path, str(ref), block_size=256)
    assert m["confusion_matrix"] == _cm(truth, pred, (pred != NODATA) & (truth != NODATA)).tolist()
    assert m["reference"] == "raster"
    # a float reference without nodata: NaN is not counted, fractional classes are refused
    as_float = truth.astype("float32")
    as_float[truth == NODATA] = np.nan
    profile.update(dtype="float32", nodata=None)
    with rasterio.open(tmp_path / "f.tif", "w", **profile) as ds:
        ds.write(as_float, 1)
    assert assess_segmentation(path, str(tmp_path / "f.tif"))["confusion_matrix"] == m["confusion_matrix"]
    as_float[0, 0] = 0.5
    with rasterio.open(tmp_path / "f.tif", "w", **profile) as ds:
        ds.write(as_float, 1)
    with pytest.raises(InputError, match="fractional"):
        assess_segmentation(path, str(tmp_path / "f.tif"))


def test_reference_raster_on_another_grid_is_resampled_nearest(prediction, footprints, tmp_path):
    """A reference at 0.25 m covering only part of the prediction, without nodata: nearest sampling at the
    prediction's pixel centres is fine[2i+1, 2j+1]; pixels outside the reference's footprint are not counted."""
    path, pred = prediction
    _, transform, shape, crs = _grid()
    r0, c0, rows, cols = 150, 40, 500, 450  # the reference's area in prediction pixels
    fine_t = from_origin(transform.c + c0 * 0.5, transform.f - r0 * 0.5, 0.25, 0.25)
    fine = rasterize(footprints, out_shape=(rows * 2, cols * 2), transform=fine_t, fill=0, dtype="uint8")
    ref = tmp_path / "fine.tif"
    with rasterio.open(ref, "w", driver="GTiff", width=cols * 2, height=rows * 2, count=1, dtype="uint8", crs=crs,
                       transform=fine_t) as ds:
        ds.write(fine, 1)
    m = assess_segmentation(path, str(ref), block_size=200)
    sampled = fine[1::2, 1::2]
    sub = pred[r0:r0 + rows, c0:c0 + cols]
    assert m["confusion_matrix"] == _cm(sampled, sub, sub != NODATA).tolist()
    assert "resampled" in m["reference"]
    assert m["pixels"] == int((sub != NODATA).sum())


def test_bounds_and_ignore_value(prediction, footprints, tmp_path):
    path, pred = prediction
    profile, transform, shape, _ = _grid()
    truth = _truth(footprints, transform, shape)
    # bounds: rows 300..600, cols 100..400 (in map units, inside pixel edges)
    xmin, ymax = transform * (100, 300)
    xmax, ymin = transform * (400, 600)
    m = assess_segmentation(path, footprints, bounds=(xmin + 0.1, ymin + 0.1, xmax - 0.1, ymax - 0.1))
    sub = (slice(300, 600), slice(100, 400))
    assert m["confusion_matrix"] == _cm(truth[sub], pred[sub], pred[sub] != NODATA).tolist()
    labelled = truth.copy()
    labelled[:, :300] = 9  # "not labelled" in the reference
    ref = tmp_path / "ref9.tif"
    profile.update(dtype="uint8", nodata=None, count=1)
    with rasterio.open(ref, "w", **profile) as ds:
        ds.write(labelled, 1)
    m = assess_segmentation(path, str(ref), ignore_value=9)
    keep = (pred != NODATA) & (labelled != 9)
    assert m["confusion_matrix"] == _cm(labelled, pred, keep).tolist()
    with pytest.raises(InputError, match="do not overlap"):
        assess_segmentation(path, footprints, bounds=(0, 0, 10, 10))


def test_no_overlap_and_bad_reference_are_clear(prediction, footprints, tmp_path):
    from shapely.affinity import translate
    path, _ = prediction
    far = [(translate(g, 50_000, 0), v) for g, v in footprints]
    with pytest.raises(InputError, match="None of the 32 reference polygons overlaps"):
        assess_segmentation(path, far)
    with pytest.raises(InputError, match="No pixel to compare"):  # only nodata where the polygons are
        assess_segmentation(path, [(footprints[0][0], 1)], outside="ignore",
                            bounds=footprints[0][0].bounds, ignore_value=1)
    with pytest.raises(InputError, match="no polygons"):
        assess_segmentation(path, [])
    with pytest.raises(InputError, match="Cannot open the reference raster"):
        assess_segmentation(path, str(tmp_path / "missing.tif"))


def test_kappa_and_accuracy_by_hand():
    m = metrics_from_confusion([[50, 10], [5, 35]], {0: "a", 1: "b"}, values=[0, 1])
    assert m["overall_accuracy"] == pytest.approx(0.85)
    pe = (60 * 55 + 40 * 45) / 100 ** 2
    assert m["kappa"] == pytest.approx((0.85 - pe) / (1 - pe))
    assert m["classes"][0]["iou"] == pytest.approx(50 / 65) and m["classes"][1]["iou"] == pytest.approx(35 / 50)
    assert m["mean_iou"] == pytest.approx((50 / 65 + 35 / 50) / 2)
    perfect = metrics_from_confusion([[10, 0], [0, 0]])
    assert perfect["kappa"] == 1.0 and perfect["classes"][1]["iou"] is None and perfect["mean_iou"] == 1.0


def test_change_scores_count_every_change_class_as_change():
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import change_scores
    cm = [[50, 5, 5], [10, 20, 2], [4, 3, 30]]  # rows truth: no change, new, removed
    s = change_scores(cm, ["no change", "new", "removed"])
    assert (s["tp"], s["fp"], s["fn"]) == (55, 10, 14) and s["classes"] == "new, removed"
    assert s["precision"] == pytest.approx(55 / 65) and s["recall"] == pytest.approx(55 / 69)
    assert s["f1"] == pytest.approx(110 / 134) and s["iou"] == pytest.approx(55 / 79)
    none = change_scores(np.array([[9, 0], [0, 0]]))
    assert none["precision"] is None and none["iou"] is None and none["classes"] == "change"


def test_detection_metrics_via_boxes(footprints):
    """Boxes from the real footprints: 20 found (shifted 0.5 m), 12 missed, 5 false alarms."""
    truth = [g.bounds for g, _ in footprints]
    pred = []
    for i, (x0, y0, x1, y1) in enumerate(truth[:20]):
        pred.append((x0 + 0.5, y0, x1 + 0.5, y1, 0, 0.9 - i * 0.01))
    for k in range(5):
        pred.append((733601.0 + 10 * k, 3724700.0, 733605.0 + 10 * k, 3724704.0, 0, 0.95))
    m = assess_detection(pred, truth, iou=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (20, 5, 12)
    assert m["precision"] == pytest.approx(20 / 25) and m["recall"] == pytest.approx(20 / 32)
    assert m["f1"] == pytest.approx(2 * 0.8 * 0.625 / (0.8 + 0.625))
    same = detection_metrics([(np.array([p[:4] for p in pred]), np.array([p[5] for p in pred]),
                               np.zeros(len(pred), int))], [(np.array(truth), np.zeros(len(truth), int))], iou=0.5)
    assert m["ap"] == pytest.approx(same["ap"])
    # a box shifted by more than half its width is not a match at IoU 0.5
    x0, y0, x1, y1 = truth[0]
    assert assess_detection([(x0 + (x1 - x0) * 0.7, y0, x1 + (x1 - x0) * 0.7, y1)], [truth[0]])["tp"] == 0
    # shapely geometries and class names work too
    g = footprints[0][0]
    named = assess_detection([(*g.bounds, "building", 0.8)], [(*g.bounds, "building")])
    assert named["tp"] == 1 and named["ap"] == pytest.approx(1.0)


def test_write_report_html_and_csv(prediction, footprints, tmp_path):
    path, _ = prediction
    m = assess_segmentation(path, footprints)
    out = write_report(m, html_path=tmp_path / "r.html", csv_path=tmp_path / "r.csv", title="Atlanta <test>")
    assert set(out) == {"html", "csv"}
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Atlanta &lt;test&gt;" in text and "Confusion matrix" in text and "<script" not in text
    assert "http" not in text  # self-contained
    for row in m["confusion_matrix"]:
        for v in row:
            assert f">{v}<" in text
    rows = list(csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8")))
    assert [r["class_name"] for r in rows] == ["background", "building"]
    assert float(rows[1]["iou"]) == pytest.approx(m["classes"][1]["iou"], rel=1e-12)
    assert int(rows[1]["support"]) == m["classes"][1]["support"]
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.html"]  # no temporary file left
    with pytest.raises(InputError, match="does not exist"):
        write_report(m, html_path=tmp_path / "no" / "r.html")
    det = assess_detection([(0, 0, 10, 10)], [(0, 0, 10, 10)])
    write_report(det, html_path=tmp_path / "d.html", csv_path=tmp_path / "d.csv")
    assert "Detection metrics" in (tmp_path / "d.html").read_text()
    assert next(csv.DictReader((tmp_path / "d.csv").open()))["tp"] == "1"


def test_category_names(prediction, tmp_path):
    path, _ = prediction
    assert raster_category_names(path) == {0: "background", 1: "building"}
    assert raster_category_names(IMAGE) == {}


def test_category_names_print_no_gdal_future_warning(prediction):
    # GDAL >= 3.9 (QGIS 3.44) warns once per process, on stderr, when the host has not chosen between exceptions and
    # return codes; reading category names must not print it (a fresh process: the warning comes once at most)
    path, _ = prediction
    code = ("import sys, warnings; sys.path.insert(0, sys.argv[1]); "
            "from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import raster_category_names\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    print(raster_category_names(sys.argv[2]))\n"
            "print([str(w.message) for w in seen])")
    proc = subprocess.run([sys.executable, "-c", code, str(DEV_PLUGINS), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["{0: 'background', 1: 'building'}", "[]"], proc.stdout
    assert "UseExceptions" not in proc.stderr


# --------------------------------------------------------------------------------------------
# QGIS


class RecordingFeedback:
    """A QgsProcessingFeedback that keeps the messages and can cancel when one matches."""

    def __new__(cls, cancel_on=None):
        from qgis.core import QgsProcessingFeedback

        class _Feedback(QgsProcessingFeedback):
            def __init__(self):
                super().__init__()
                self.messages = []

            def pushInfo(self, info):  # noqa: N802 (QGIS API)
                self.messages.append(info)
                if cancel_on and cancel_on in info:
                    self.cancel()
                super().pushInfo(info)

            def pushWarning(self, warning):  # noqa: N802 (QGIS API)
                self.messages.append(warning)
                super().pushWarning(warning)

            def reportError(self, error, fatalError=False):  # noqa: N802,N803 (QGIS API)
                self.messages.append(error)
                super().reportError(error, fatalError)

        return _Feedback()


def _run(alg, params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=feedback or QgsProcessingFeedback())


def _geojson(path, features, crs="EPSG:32616"):
    """Polygons ``[(shapely geometry, properties)]`` as a GeoJSON file declaring ``crs``."""
    from shapely.geometry import mapping
    code = crs.split(":")[1]
    obj = {"type": "FeatureCollection",
           "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{code}"}},
           "features": [{"type": "Feature", "geometry": mapping(g), "properties": p} for g, p in features]}
    Path(path).write_text(json.dumps(obj))
    return str(path)


def test_algorithms_are_registered_with_help(provider):
    from qgis.core import QgsApplication
    reg = QgsApplication.processingRegistry()
    assess = reg.algorithmById("rs_deep:assess_accuracy")
    train = reg.algorithmById("rs_deep:train")
    assert assess is not None and train is not None
    names = {p.name() for p in assess.parameterDefinitions()}
    assert {"PREDICTION", "REFERENCE", "CLASS_FIELD", "REFERENCE_RASTER", "OUTSIDE", "OUTPUT_HTML",
            "OUTPUT_TABLE"} <= names
    assert {o.name() for o in assess.outputDefinitions()} >= {"OVERALL_ACCURACY", "KAPPA", "MEAN_IOU",
                                                               "OUTPUT_HTML", "OUTPUT_TABLE"}
    names = {p.name() for p in train.parameterDefinitions()}
    assert {"INPUT", "LABELS", "CLASS_FIELD", "TASK", "ARCHITECTURE", "ENCODER", "EPOCHS", "BATCH_SIZE",
            "LEARNING_RATE", "TILE_SIZE", "DEVICE", "OUTPUT"} <= names
    assert "REPORT" in {o.name() for o in train.outputDefinitions()}
    for alg in (assess, train):
        assert all(p.description() for p in alg.parameterDefinitions())
        assert len(alg.shortHelpString()) > 500
    # every ARCHITECTURE choice is on the engine's allow-lists
    from rs_deep.processing_algorithms.train import ARCHITECTURES, AUTO
    from rs_deep.rs_deep_plugin.engine.models.arch_smp import SMP_ARCHITECTURES
    from rs_deep.rs_deep_plugin.engine.models.architectures import validate_builder
    from rs_deep.rs_deep_plugin.engine.training.builders import (CENTERNET_PARAMS, DETECTION_ARCHITECTURES,
                                                                 SEGMENTATION_ARCHITECTURES)
    assert ARCHITECTURES == [AUTO] + SEGMENTATION_ARCHITECTURES + DETECTION_ARCHITECTURES
    assert SEGMENTATION_ARCHITECTURES == list(SMP_ARCHITECTURES)
    assert DETECTION_ARCHITECTURES[0] == "CenterNet" and DETECTION_ARCHITECTURES[-1] == "CenterNetOBB"
    for arch in ("CenterNet", "CenterNetOBB"):
        validate_builder({"library": "rs_deep", "architecture": arch, "encoder": "resnet18", "in_channels": 1,
                          "classes": 1, "encoder_weights": None, "params": CENTERNET_PARAMS})
    for arch in DETECTION_ARCHITECTURES[1:-1]:
        validate_builder({"library": "torchvision", "architecture": arch, "in_channels": 1, "classes": 1,
                          "encoder_weights": None, "params": {}})


def test_assess_accuracy_processing_writes_report_and_table(provider, prediction, footprints, tmp_path):
    """Reference polygons in another CRS (WGS 84) with class names; the numbers are the engine's."""
    from qgis.core import QgsVectorLayer
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    path, pred = prediction
    feats = [(shape(transform_geom("EPSG:32616", "EPSG:4326", mapping(g))), {"kind": "Building"})
             for g, _ in footprints]
    ref = _geojson(tmp_path / "ref4326.geojson", feats, crs="EPSG:4326")
    html, table = tmp_path / "report.html", tmp_path / "table.csv"
    fb = RecordingFeedback()
    res = _run("rs_deep:assess_accuracy", {"PREDICTION": str(path), "REFERENCE": ref, "CLASS_FIELD": "kind",
                                            "OUTSIDE": 0, "OUTPUT_HTML": str(html), "OUTPUT_TABLE": str(table)}, fb)
    expected = assess_segmentation(path, footprints)
    assert res["OVERALL_ACCURACY"] == pytest.approx(expected["overall_accuracy"], abs=1e-4)
    assert res["KAPPA"] == pytest.approx(expected["kappa"], abs=1e-3)
    assert res["MEAN_IOU"] == pytest.approx(expected["mean_iou"], abs=1e-3)
    assert html.is_file() and "Confusion matrix" in html.read_text()
    layer = QgsVectorLayer(res["OUTPUT_TABLE"], "t")
    assert layer.isValid()
    assert [f.name() for f in layer.fields()] == ["class_id", "class_name", "iou", "f1", "precision", "recall",
                                                  "support"]
    rows = {f["class_name"]: f for f in layer.getFeatures()}
    assert set(rows) == {"background", "building"}
    b = expected["classes"][1]
    assert int(rows["building"]["class_id"]) == 1
    assert abs(int(rows["building"]["support"]) - b["support"]) <= 20  # WGS 84 round trip moves a few edge pixels
    assert float(rows["building"]["iou"]) == pytest.approx(b["iou"], abs=2e-3)
    del layer, rows
    assert any("overall accuracy" in m for m in fb.messages)


def test_assess_accuracy_with_a_reference_raster_and_integer_classes(provider, prediction, footprints, tmp_path):
    path, pred = prediction
    profile, transform, shape, _ = _grid()
    truth = _truth(footprints, transform, shape)
    ref = tmp_path / "ref.tif"
    profile.update(dtype="uint8", nodata=NODATA, count=1)
    with rasterio.open(ref, "w", **profile) as ds:
        ds.write(truth, 1)
    res = _run("rs_deep:assess_accuracy", {"PREDICTION": str(path), "REFERENCE_RASTER": str(ref),
                                            "OUTPUT_HTML": str(tmp_path / "r.html"),
                                            "OUTPUT_TABLE": str(tmp_path / "t.csv")})
    po, kappa = _kappa_by_hand(_cm(truth, pred, pred != NODATA))
    assert res["OVERALL_ACCURACY"] == pytest.approx(po, abs=1e-12) and res["KAPPA"] == pytest.approx(kappa, abs=1e-12)
    rows = list(csv.DictReader(open(res["OUTPUT_TABLE"], encoding="utf-8")))
    assert [int(r["support"]) for r in rows] == _cm(truth, pred, pred != NODATA).sum(axis=1).tolist()
    # integer class values in the field, outside = ignore
    ints = _geojson(tmp_path / "ints.geojson", [(g, {"cls": 1}) for g, _ in footprints])
    res = _run("rs_deep:assess_accuracy", {"PREDICTION": str(path), "REFERENCE": ints, "CLASS_FIELD": "cls",
                                            "OUTSIDE": 1, "OUTPUT_HTML": str(tmp_path / "i.html")})
    inside = (truth > 0) & (pred != NODATA)
    assert res["OVERALL_ACCURACY"] == pytest.approx((pred[inside] == 1).mean(), abs=1e-12)


def test_assess_accuracy_bad_input_is_clear(provider, prediction, footprints, tmp_path):
    from qgis.core import QgsProcessingException
    from shapely.affinity import translate
    path, _ = prediction
    names = _geojson(tmp_path / "names.geojson", [(g, {"kind": "tower"}) for g, _ in footprints])
    far = _geojson(tmp_path / "far.geojson", [(translate(g, 80_000, 0), {"kind": 1}) for g, _ in footprints])
    base = {"PREDICTION": str(path), "OUTPUT_HTML": str(tmp_path / "r.html")}
    with pytest.raises(QgsProcessingException, match="either REFERENCE"):
        _run("rs_deep:assess_accuracy", base)
    with pytest.raises(QgsProcessingException, match="'tower'.*background, 1=building"):
        _run("rs_deep:assess_accuracy", dict(base, REFERENCE=names, CLASS_FIELD="kind"))
    with pytest.raises(QgsProcessingException, match="overlaps"):
        _run("rs_deep:assess_accuracy", dict(base, REFERENCE=far, CLASS_FIELD="kind"))
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------------------------
# rs_deep:train, then rs_deep:segment and rs_deep:assess_accuracy


TINY = {"TASK": 0, "ARCHITECTURE": 1, "ENCODER": "resnet18", "EPOCHS": 2, "BATCH_SIZE": 2, "LEARNING_RATE": 0.002,
        "TILE_SIZE": 64, "STEPS_PER_EPOCH": 2, "VALIDATION": 0.2, "DEVICE": 1}


@pytest.fixture(scope="module")
def labels_with_class(tmp_path_factory, footprints):
    d = tmp_path_factory.mktemp("labels")
    return _geojson(d / "buildings.geojson", [(g, {"kind": "building"}) for g, _ in footprints])


def test_train_segment_assess_chain(provider, labels_with_class, tmp_path):
    """Raster + labels -> model package -> class raster -> accuracy report, all through Processing."""
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    fb = RecordingFeedback()
    out = tmp_path / "pkg"
    res = _run("rs_deep:train", dict(TINY, INPUT=str(IMAGE), LABELS=labels_with_class, CLASS_FIELD="kind",
                                     OUTPUT=str(out), EMA=0.99, SEED=3, OBJECT_CROPS=0.4,
                                     AUGMENT="flips,rotations,brightness"), fb)
    assert res["OUTPUT"] == str(out.resolve()) or Path(res["OUTPUT"]) == out
    pkg = load_package(res["OUTPUT"], task="segmentation")
    assert [c.name for c in pkg.classes] == ["background", "building"]
    assert pkg.builder["architecture"] == "Unet" and pkg.builder["encoder"] == "resnet18"
    report = json.loads(Path(res["REPORT"]).read_text())
    assert report["epochs_run"] == 2 and len(report["history"]) == 2 and report["tile_size"] == 64
    assert report["ema_decay"] == 0.99 and report["seed"] == 3  # EMA and SEED reach the engine
    assert report["settings"]["foreground_prob"] == 0.4  # so does OBJECT_CROPS
    assert report["settings"]["paste_prob"] == 0  # AUGMENT without copy_paste: none
    assert report["data"]["validation"]["side"] == "right"  # the strip most like the whole sample (auto)
    epochs = [m for m in fb.messages if m.startswith("Epoch ")]
    assert len(epochs) == 2 and "loss" in epochs[0] and "val IoU" in epochs[1]  # once each, with the metrics
    seg = _run("rs_deep:segment", {"INPUT": str(IMAGE), "MODEL": res["OUTPUT"], "OUTPUT": str(tmp_path / "seg.tif"),
                                   "OUTPUT_VECTOR": None, "DEVICE": 1})
    acc = _run("rs_deep:assess_accuracy", {"PREDICTION": seg["OUTPUT"], "REFERENCE": labels_with_class,
                                           "CLASS_FIELD": "kind", "OUTPUT_HTML": str(tmp_path / "acc.html"),
                                           "OUTPUT_TABLE": str(tmp_path / "acc.csv")})
    engine = assess_segmentation(seg["OUTPUT"], read_vector_labels(FOOTPRINTS, class_value=1))
    assert acc["OVERALL_ACCURACY"] == pytest.approx(engine["overall_accuracy"], abs=1e-12)
    assert engine["pixels"] == 600 * 900
    rows = list(csv.DictReader(open(acc["OUTPUT_TABLE"], encoding="utf-8")))
    assert [r["class_name"] for r in rows] == ["background", "building"]
    assert "Confusion matrix" in (tmp_path / "acc.html").read_text()


def test_train_cancel_after_an_epoch_keeps_the_best_model(provider, labels_with_class, tmp_path):
    from qgis.core import QgsProcessingException
    out = tmp_path / "cancelled"
    fb = RecordingFeedback(cancel_on="Epoch 1/")
    with pytest.raises(QgsProcessingException, match=r"cancelled after 1 epoch.*written to"):
        _run("rs_deep:train", dict(TINY, EPOCHS=4, INPUT=str(IMAGE), LABELS=labels_with_class, OUTPUT=str(out)), fb)
    assert (out / "model.json").is_file() and (out / "training_report.json").is_file()
    assert json.loads((out / "training_report.json").read_text())["cancelled"] is True


def test_train_cancel_before_the_first_epoch_writes_nothing(provider, labels_with_class, tmp_path):
    from qgis.core import QgsProcessingException
    out = tmp_path / "nothing"
    fb = RecordingFeedback()
    fb.cancel()
    with pytest.raises(QgsProcessingException, match="nothing was written"):
        _run("rs_deep:train", dict(TINY, INPUT=str(IMAGE), LABELS=labels_with_class, OUTPUT=str(out)), fb)
    assert not out.exists() or not os.listdir(out)


def test_train_bad_input_is_clear(provider, labels_with_class, footprints, tmp_path):
    from osgeo import ogr, osr
    from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer
    from shapely.affinity import translate
    empty = str(tmp_path / "empty.gpkg")
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(empty)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32616)
    lyr = ds.CreateLayer("labels", srs, ogr.wkbPolygon)
    lyr.CreateField(ogr.FieldDefn("kind", ogr.OFTString))
    lyr = ds = None
    far = _geojson(tmp_path / "far.geojson", [(translate(g, 0, 90_000), {"kind": "building"}) for g, _ in footprints])
    base = dict(TINY, INPUT=str(IMAGE), OUTPUT=str(tmp_path / "pkg"))
    with pytest.raises(QgsProcessingException, match="no polygon feature"):
        _run("rs_deep:train", dict(base, LABELS=empty))
    with pytest.raises(QgsProcessingException, match="no field 'nope'"):
        _run("rs_deep:train", dict(base, LABELS=labels_with_class, CLASS_FIELD="nope"))
    with pytest.raises(QgsProcessingException, match="None of the 32 features of LABELS overlaps"):
        _run("rs_deep:train", dict(base, LABELS=far))
    with pytest.raises(QgsProcessingException, match="set ARCHITECTURE to auto"):
        _run("rs_deep:train", dict(base, LABELS=labels_with_class, TASK=2))
    with pytest.raises(QgsProcessingException, match="unknown encoder 'nosuchnet'"):
        _run("rs_deep:train", dict(base, LABELS=labels_with_class, ENCODER="nosuchnet"))
    with pytest.raises(QgsProcessingException, match="multiple of 32"):
        _run("rs_deep:train", dict(base, LABELS=labels_with_class, TILE_SIZE=50))
    xyz = QgsRasterLayer(f"type=xyz&url=file://{tmp_path}/tiles/{{z}}/{{x}}/{{y}}.png&zmax=9&zmin=7", "xyz", "wms")
    assert xyz.isValid()
    QgsProject.instance().addMapLayer(xyz)
    layer_id = xyz.id()
    del xyz
    try:
        with pytest.raises(QgsProcessingException, match="not a raster file.*GeoTIFF"):
            _run("rs_deep:train", dict(base, INPUT=layer_id, LABELS=labels_with_class))
    finally:
        QgsProject.instance().removeMapLayer(layer_id)
    assert not (tmp_path / "pkg").exists()


def test_train_detection_end_to_end(provider, footprints, tmp_path):
    """Detection labels -> boxes of each feature's envelope, classes the sorted field values, bottom rows held out;
    a real (tiny) CenterNet training run writes a detection package that rs_deep:detect runs."""
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.geo.labels import map_to_pixels, read_geojson_boxes
    feats = [(g, {"size": "big" if g.area > 200 else "small"}) for g, _ in footprints]
    labels = _geojson(tmp_path / "boxes.geojson", feats)
    fb = RecordingFeedback()
    res = _run("rs_deep:train", dict(TINY, TASK=1, ARCHITECTURE=0, TILE_SIZE=64, INPUT=str(IMAGE), LABELS=labels,
                                     CLASS_FIELD="size", VALIDATION=0.25, OUTPUT=str(tmp_path / "det")), fb)
    assert res["OUTPUT"] == str(tmp_path / "det")
    pkg = load_package(res["OUTPUT"], task="detection")
    assert [c.name for c in pkg.classes] == ["big", "small"]
    assert pkg.builder["library"] == "rs_deep" and pkg.builder["architecture"] == "CenterNet"
    assert pkg.builder["encoder"] == "resnet18" and pkg.builder["in_channels"] == 1
    report = json.loads(Path(res["REPORT"]).read_text())
    assert report["task"] == "detection" and report["epochs_run"] == 2
    # the boxes the trainer got: every footprint's envelope, split at the held-out row (bottom 25 % = 225 rows)
    with rasterio.open(IMAGE) as ds:
        expected = map_to_pixels(read_geojson_boxes(FOOTPRINTS, dst_crs=ds.crs)[0], ds.transform)
    cut = 675
    in_train = int(((expected[:, 1] + expected[:, 3]) / 2 < cut).sum())
    images = report["data"]
    assert images["train_images"][0]["height"] == cut and images["val_images"][0]["height"] == 900 - cut
    assert 0 < images["train_images"][0]["boxes"] <= len(expected)
    assert abs(images["train_images"][0]["boxes"] - in_train) <= 4  # boxes cut by the split may go either way
    assert any(m.startswith("Epoch 2/2: loss") for m in fb.messages)
    out = tmp_path / "found.gpkg"
    found = _run("rs_deep:detect", {"INPUT": str(IMAGE), "MODEL": res["OUTPUT"], "OUTPUT": str(out),
                                    "SCORE_THRESHOLD": 0.0})
    assert Path(found["OUTPUT"]).exists()


def test_train_patch_classification(provider, labels_with_class, tmp_path):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    fb = RecordingFeedback()
    res = _run("rs_deep:train", dict(TINY, TASK=2, ARCHITECTURE=0, TILE_SIZE=16, EPOCHS=1, BATCH_SIZE=4,
                                     INPUT=str(IMAGE), LABELS=labels_with_class, CLASS_FIELD="kind",
                                     OUTPUT=str(tmp_path / "patches")), fb)
    pkg = load_package(res["OUTPUT"], task="patch_classification")
    assert [c.name for c in pkg.classes] == ["background", "building"] and pkg.tile_size == 16
    assert pkg.builder["architecture"] == "resnet18"
    assert any(m.startswith("Epoch 1/1: loss") for m in fb.messages)
    assert json.loads(Path(res["REPORT"]).read_text())["task"] == "patch_classification"


def test_assess_accuracy_through_qgis_process(prediction, footprints, tmp_path):
    """qgis_process with the reference polygons straight from the sample (no class field: the prediction's only
    non-background class)."""
    from qgis_env import run_qgis_process
    path, pred = prediction
    proc = run_qgis_process(["run", "rs_deep:assess_accuracy", "--json", "--", f"PREDICTION={path}",
                             f"REFERENCE={FOOTPRINTS}", f"OUTPUT_HTML={tmp_path / 'q.html'}",
                             f"OUTPUT_TABLE={tmp_path / 'q.csv'}"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    _, transform, shape, _ = _grid()
    po, kappa = _kappa_by_hand(_cm(_truth(footprints, transform, shape), pred, pred != NODATA))
    assert res["OVERALL_ACCURACY"] == pytest.approx(po, abs=1e-12) and res["KAPPA"] == pytest.approx(kappa, abs=1e-12)
    assert (tmp_path / "q.html").is_file() and (tmp_path / "q.csv").is_file()
    bad = run_qgis_process(["run", "rs_deep:assess_accuracy", "--", f"PREDICTION={path}",
                            f"OUTPUT_HTML={tmp_path / 'bad.html'}"], check=False)
    assert bad.returncode != 0 and "either REFERENCE" in bad.stdout + bad.stderr
