"""Instance segmentation: the Mask R-CNN package, training from polygons, one polygon per object through the tiled
engine and rs_deep:segment_instances (Processing, qgis_process), objects cut by tile borders coming out once,
assessment by mask IoU, and the refusals (another task's model, a package whose network gives no masks)."""
import json
import os
import shutil

import numpy as np
import pytest

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.geo.rotated import polygon_iou
from rs_deep.rs_deep_plugin.engine.inference.instances import merge_instances, segment_instances
from rs_deep.rs_deep_plugin.engine.models.loading import load_package

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS, make_package, write_raster
from test_detect import make_detection_package
from test_oriented import atlanta_crop  # noqa: F401 (a fixture: the top-left 160 x 160 px of the Atlanta sample)


def _run(alg, params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=feedback or QgsProcessingFeedback())


def _footprints(crs=None):
    """The 32 real Atlanta building footprints (shapely, map coordinates)."""
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_geojson_shapes
    geoms, _ = read_geojson_shapes(str(ATLANTA_LABELS), class_field=None, dst_crs=crs)
    return geoms


@pytest.fixture(scope="module")
def roofs(tmp_path_factory):
    """A raster derived from the real footprints: the Atlanta sample's grid (600 x 900 px, 0.5 m, EPSG:32616) with
    the 32 footprints bright on a dark ground, and a Mask R-CNN trained on it by the engine (about a CPU minute)."""
    import rasterio
    from rasterio.features import rasterize
    from rs_deep.rs_deep_plugin.engine.training.instances import train_instances
    d = tmp_path_factory.mktemp("roofs")
    with rasterio.open(ATLANTA_IMAGE) as ds:
        transform, crs, shape = ds.transform, ds.crs, (ds.height, ds.width)
    geoms = _footprints(crs)
    burnt = rasterize([(g, 1) for g in geoms], out_shape=shape, transform=transform)
    raster = write_raster(d / "roofs.tif", np.where(burnt > 0, 200, 30).astype(np.uint8), transform=transform,
                          crs=crs.to_string())
    report = train_instances(str(raster), d / "model", labels=str(ATLANTA_LABELS), class_names=["building"],
                             epochs=10, steps_per_epoch=25, batch_size=2, tile_size=128, lr=2e-3,
                             package_tile_size=128, package_overlap=48, score_threshold=0.2, num_threads=2, seed=0)
    return {"raster": raster, "model": d / "model", "report": report, "footprints": geoms}


@pytest.fixture(scope="module")
def trained_on_atlanta(provider, tmp_path_factory):
    """rs_deep:train TASK=instance_segmentation on the real Atlanta image and its footprints (a few steps)."""
    out = tmp_path_factory.mktemp("inst_train") / "buildings_instances"
    return _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS),
                                  "TASK": "instance_segmentation", "EPOCHS": 1, "STEPS_PER_EPOCH": 4, "TILE_SIZE": 128,
                                  "BATCH_SIZE": 2, "VALIDATION": 0, "DEVICE": "cpu", "OUTPUT": str(out)})


# --------------------------------------------------------------------------------------------
# the package and the merge


def test_the_package_is_a_mask_rcnn_of_task_instance_segmentation(roofs):
    pkg = load_package(roofs["model"], task="instance_segmentation")
    assert pkg.builder["architecture"] == "maskrcnn_mobilenet_v3_large_fpn" and pkg.class_names() == {0: "building"}
    meta = json.loads((roofs["model"] / "model.json").read_text())["properties"]
    assert meta["mlm:tasks"] == ["instance-segmentation"] and meta["rs_deep:task"] == "instance_segmentation"
    assert meta["mlm:output"][0]["name"] == "instances"
    history = roofs["report"]["history"]
    assert {"loss_mask", "loss_classifier", "loss_box_reg"} <= set(history[0]["loss_parts"])
    assert history[-1]["loss_parts"]["loss_mask"] < history[0]["loss_parts"]["loss_mask"]  # the masks are learnt
    assert roofs["report"]["samples"]["train_boxes"] == 32


def test_merge_keeps_the_whole_object_of_the_other_tile_and_drops_doubles():
    """Real footprints seen whole by one tile and cut by the border of another: the whole ones are kept, whatever
    the scores; a footprint given twice by the same tile goes by IoU."""
    from shapely.geometry import box
    whole = _footprints()[:6]
    cut = []
    for g in whole:  # the part of each footprint left of 70 % of its width
        x0, y0, x1, y1 = g.bounds
        cut.append(g.intersection(box(x0 - 1, y0 - 1, x0 + 0.7 * (x1 - x0), y1 + 1)))
    polys = whole + cut
    scores = [0.5] * 6 + [0.9] * 6  # the cut parts score higher
    keep = merge_instances(polys, scores, np.zeros(12, int), [1] * 6 + [2] * 6, iou_threshold=0.5)
    assert sorted(keep.tolist()) == list(range(6))
    # alone, the parts stay (nothing else holds these objects)
    assert sorted(merge_instances(cut, scores[6:], np.zeros(6, int), [2] * 6, 0.5).tolist()) == list(range(6))
    # the same footprint twice (slightly moved) from one tile: the better one stays
    moved = [g.buffer(0.2) for g in whole]
    keep = merge_instances(whole + moved, [0.4] * 6 + [0.6] * 6, np.zeros(12, int), [1] * 12, 0.5)
    assert sorted(keep.tolist()) == list(range(6, 12))
    # another class is another object
    keep = merge_instances(whole + moved, [0.4] * 6 + [0.6] * 6, [0] * 6 + [1] * 6, [1] * 12, 0.5)
    assert len(keep) == 12


def test_objects_cut_by_tile_borders_come_out_once(roofs):
    """Small tiles that cut many roofs against one tile holding the whole raster: the same objects, once each."""
    runs = {}
    for tile, overlap in ((128, 48), (928, 0)):
        res = segment_instances(str(roofs["raster"]), roofs["model"], tile_size=tile, overlap=overlap,
                                score_threshold=0.8)
        runs[tile] = res
    small, one = runs[128], runs[928]
    assert small.tiles > 50 and one.tiles == 1
    assert small.raw_instances > len(small)  # tiles saw objects twice: the merge removed them
    a, b = [d.polygon for d in small], [d.polygon for d in one]
    iou = polygon_iou(a, b)
    # never twice: each small-tile object is one object, and an object within the overlap (48 px) is taken whole
    # from one tile (a larger one may be cut into parts: a 50 x 31 px roof came out as two halves on one grid). An
    # object's size is that of the real footprint it shows (the one-tile mask of a 51 px L-shaped roof was 36 px
    # wide, and the small tiles gave the roof's two wings), or its own where it shows none.
    def size(p):
        return max(p.bounds[2] - p.bounds[0], p.bounds[3] - p.bounds[1]) / one.transform.a
    truth = roofs["footprints"]
    on_truth = polygon_iou(b, truth)
    extent = np.array([size(truth[on_truth[k].argmax()]) if on_truth[k].max() > 0.3 else size(p)
                       for k, p in enumerate(b)])
    # enough objects within the overlap for the check to mean something (8 of the 24 the one tile found here: most
    # of these roofs are 49-56 px, so the share moves with which roofs a run's network finds)
    assert (extent <= 48).sum() >= 6
    assert ((iou > 0.5).sum(axis=0)[extent <= 48] <= 1).all() and ((iou > 0.5).sum(axis=1) <= 1).all()
    assert (iou.max(axis=0) > 0.5).mean() >= 0.6  # most objects of the one tile are found by the small tiles
    # the roofs crossing the borders between the small tiles' cores came out, each once
    from rs_deep.rs_deep_plugin.engine.inference.tiling import TileGrid
    grid = TileGrid(0, 0, 600, 900, 128, 48)
    cuts_x = [(grid.core(x, 0)[2]) for x in grid.xs[:-1]]
    t = one.transform
    crossing = [k for k, p in enumerate(b) if any(p.bounds[0] < t.c + cx * t.a < p.bounds[2] for cx in cuts_x)]
    crossing = [k for k in crossing if extent[k] <= 48 and iou[:, k].max() > 0.5]
    assert crossing and all((iou[:, k] > 0.5).sum() == 1 for k in crossing)
    # each output polygon is one object: no two overlap much
    self_iou = polygon_iou(a, a)
    np.fill_diagonal(self_iou, 0)
    assert self_iou.max() <= 0.5
    # against the true footprints (the raster was derived from them): masks, not boxes
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics
    m = detection_metrics([(b, [d.score for d in one], np.zeros(len(b), int))],
                          [(roofs["footprints"], np.zeros(32, int))], polygons=polygon_iou)
    assert m["masks"] and m["truth"] == 32 and m["precision"] >= 0.5


# --------------------------------------------------------------------------------------------
# Processing: train, segment_instances, assess, cancel, qgis_process


def test_training_through_processing_writes_an_instance_package(trained_on_atlanta):
    pkg = load_package(trained_on_atlanta["OUTPUT"], task="instance_segmentation")
    assert pkg.builder["architecture"] == "maskrcnn_mobilenet_v3_large_fpn" and pkg.class_names() == {0: "buildings"}
    report = json.loads(open(trained_on_atlanta["REPORT"], encoding="utf-8").read())
    assert "loss_mask" in report["history"][0]["loss_parts"] and report["samples"]["train_boxes"] == 32


def test_segment_instances_writes_one_polygon_per_object_with_class_and_score(provider, tmp_path, trained_on_atlanta,
                                                                              atlanta_crop):
    from qgis.core import QgsVectorLayer, QgsWkbTypes
    model = trained_on_atlanta["OUTPUT"]
    params = dict(score_threshold=0.0, max_detections=20)
    res = _run("rs_deep:segment_instances", {"INPUT": str(atlanta_crop), "MODEL": model, "SCORE_THRESHOLD": 0.0,
                                             "MAX_DETECTIONS": 20, "OUTPUT": str(tmp_path / "objects.gpkg")})
    vec = QgsVectorLayer(res["OUTPUT"], "objects")
    assert vec.isValid() and vec.geometryType() == QgsWkbTypes.PolygonGeometry
    assert [f.name() for f in vec.fields()][-4:] == ["class", "class_id", "score", "area_m2"]
    engine = segment_instances(str(atlanta_crop), model, **params)
    feats = list(vec.getFeatures())
    assert len(feats) == len(engine) > 0
    for f in feats:
        g = f.geometry()
        assert g.isGeosValid() and QgsWkbTypes.flatType(g.wkbType()) == QgsWkbTypes.Polygon
        assert f["class"] == "buildings" and f["class_id"] == 0 and 0.0 <= f["score"] <= 1.0
        assert f["area_m2"] == pytest.approx(g.area(), rel=1e-3)  # metres (EPSG:32616)
    got = sorted(round(f["score"], 4) for f in feats)
    assert got == sorted(round(d.score, 4) for d in engine)
    # the polygons are the masks' outlines, on the raster's pixel grid (0.5 m) inside the crop
    import rasterio
    with rasterio.open(atlanta_crop) as ds:
        b = ds.bounds
    for f in feats:
        r = f.geometry().boundingBox()
        assert b.left - 1e-6 <= r.xMinimum() and r.xMaximum() <= b.right + 1e-6
        assert b.bottom - 1e-6 <= r.yMinimum() and r.yMaximum() <= b.top + 1e-6
        assert (r.xMinimum() - b.left) / 0.5 == pytest.approx(round((r.xMinimum() - b.left) / 0.5), abs=1e-6)
    # assessed by mask IoU against the real footprints
    acc = _run("rs_deep:assess_accuracy", {"TASK": "instance_segmentation", "PREDICTION_BOXES": res["OUTPUT"],
                                           "REFERENCE": str(ATLANTA_LABELS),
                                           "EXTENT": f"{b.left},{b.right},{b.bottom},{b.top} [EPSG:32616]",
                                           "OUTPUT_HTML": str(tmp_path / "acc.html"),
                                           "OUTPUT_TABLE": str(tmp_path / "acc.gpkg")})
    assert all(0.0 <= acc[k] <= 1.0 for k in ("PRECISION", "RECALL", "F1", "AP"))
    assert "mask (polygon) IoU" in (tmp_path / "acc.html").read_text()


def test_assessment_matches_outlines_not_boxes():
    """Mask IoU: an L-shaped footprint against its own bounding box is no match; against itself it is."""
    from shapely.geometry import Polygon, box
    from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import assess_detection
    ell = Polygon([(0, 0), (10, 0), (10, 2), (2, 2), (2, 10), (0, 10)])
    by_mask = assess_detection([(box(0, 0, 10, 10), 0, 0.9)], [(ell, 0)], masks=True)
    by_box = assess_detection([box(0, 0, 10, 10).bounds + (0, 0.9)], [ell])  # its envelope
    assert by_mask["tp"] == 0 and by_mask["masks"] and by_box["tp"] == 1
    assert assess_detection([(ell, 0, 0.9)], [(ell, 0)], masks=True)["f1"] == 1.0


def test_cancel_leaves_no_file(provider, tmp_path, trained_on_atlanta):
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    shutil.copy(ATLANTA_IMAGE, tmp_path / "in.tif")
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda p: feedback.cancel() if p > 5 else None)
    with pytest.raises(QgsProcessingException, match="cancelled"):
        _run("rs_deep:segment_instances", {"INPUT": str(tmp_path / "in.tif"), "MODEL": trained_on_atlanta["OUTPUT"],
                                           "TILE_SIZE": 128, "OVERLAP": 32, "BATCH_SIZE": 1,
                                           "OUTPUT": str(tmp_path / "o.gpkg")},
             feedback)
    assert sorted(os.listdir(tmp_path)) == ["in.tif"]


def test_qgis_process_runs_an_instance_model(tmp_path, trained_on_atlanta, atlanta_crop):
    from qgis.core import QgsVectorLayer
    from qgis_env import run_qgis_process
    out = tmp_path / "objects.gpkg"
    proc = run_qgis_process(["run", "rs_deep:segment_instances", "--json", "--", f"INPUT={atlanta_crop}",
                             f"MODEL={trained_on_atlanta['OUTPUT']}", "SCORE_THRESHOLD=0", "MAX_DETECTIONS=20",
                             f"OUTPUT={out}"])
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["results"]["OUTPUT"] == str(out)
    vec = QgsVectorLayer(str(out), "objects")
    engine = segment_instances(str(atlanta_crop), trained_on_atlanta["OUTPUT"], score_threshold=0.0,
                               max_detections=20)
    assert vec.featureCount() == len(engine) > 0
    assert {"class", "class_id", "score", "area_m2"} <= {f.name() for f in vec.fields()}


# --------------------------------------------------------------------------------------------
# refusals


def test_other_tasks_models_are_refused_with_the_algorithm_to_use(provider, tmp_path, trained_on_atlanta,
                                                                  atlanta_crop):
    from qgis.core import QgsProcessingException
    seg = make_package(tmp_path / "seg", in_channels=1)
    det = make_detection_package(tmp_path / "det", in_channels=1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QgsProcessingException, match=r"this is a segmentation model; this tool needs an "
                                                     r"instance_segmentation model \(segmentation models run with "
                                                     r"rs_deep:segment\)"):
        _run("rs_deep:segment_instances", {"INPUT": str(atlanta_crop), "MODEL": str(seg),
                                           "OUTPUT": str(out / "o.gpkg")})
    with pytest.raises(QgsProcessingException, match=r"this is a detection model; this tool needs an "
                                                     r"instance_segmentation model \(object detection models run "
                                                     r"with rs_deep:detect\)"):
        _run("rs_deep:segment_instances", {"INPUT": str(atlanta_crop), "MODEL": str(det),
                                           "OUTPUT": str(out / "o.gpkg")})
    with pytest.raises(QgsProcessingException, match=r"this is an instance_segmentation model; this tool needs a "
                                                     r"detection model \(instance segmentation models run with "
                                                     r"rs_deep:segment_instances\)"):
        _run("rs_deep:detect", {"INPUT": str(atlanta_crop), "MODEL": trained_on_atlanta["OUTPUT"],
                                "OUTPUT": str(out / "o.gpkg")})
    assert os.listdir(out) == []
    with pytest.raises(InputError, match="instance_segmentation model; object detection needs a detection model"):
        from rs_deep.rs_deep_plugin.engine.inference.detect import detect
        detect(str(atlanta_crop), load_package(trained_on_atlanta["OUTPUT"]))


def _declare(package, task, mlm_task):
    """The package folder with its model.json declaring another task (the weights unchanged)."""
    meta = json.loads((package / "model.json").read_text())
    meta["properties"].update({"rs_deep:task": task, "mlm:tasks": [mlm_task]})
    (package / "model.json").write_text(json.dumps(meta))
    return package


def test_a_package_whose_network_does_not_fit_its_task_is_refused(tmp_path, trained_on_atlanta):
    """The wrong output layout: a Mask R-CNN declared a detector, a Faster R-CNN declared an instance model."""
    src = trained_on_atlanta["OUTPUT"]
    as_detector = tmp_path / "as_detector"
    shutil.copytree(src, as_detector)
    _declare(as_detector, "detection", "object-detection")
    with pytest.raises(ModelPackageError, match=r"maskrcnn_mobilenet_v3_large_fpn gives masks: it is no detection "
                                                r"network"):
        load_package(as_detector)
    det = _declare(make_detection_package(tmp_path / "det", in_channels=1), "instance_segmentation",
                   "instance-segmentation")
    with pytest.raises(ModelPackageError, match=r"gives no masks: it is no instance_segmentation network \(instance "
                                                r"segmentation: maskrcnn_mobilenet_v3_large_fpn"):
        load_package(det)


def test_training_refusals_name_the_fix(tmp_path, provider):
    from qgis.core import QgsProcessingException
    from rs_deep.rs_deep_plugin.engine.training.instances import train_instances
    with pytest.raises(InputError, match=r"instance segmentation trains from polygons.*expected \(polygon\[, "
                                         r"class\]\), got .*or train a detector \(TASK detection\) from boxes"):
        train_instances(str(ATLANTA_IMAGE), tmp_path / "m", labels=[(0, 0, 10, 10)], epochs=1, steps_per_epoch=1)
    with pytest.raises(InputError, match="no instance_segmentation network; instance segmentation trains "
                                         "maskrcnn_mobilenet_v3_large_fpn"):
        train_instances(str(ATLANTA_IMAGE), tmp_path / "m", labels=str(ATLANTA_LABELS), epochs=1, steps_per_epoch=1,
                        builder={"library": "torchvision", "architecture": "fasterrcnn_mobilenet_v3_large_fpn"})
    with pytest.raises(QgsProcessingException, match="instance segmentation trains from INPUT and LABELS"):
        _run("rs_deep:train", {"CHIPS": str(tmp_path), "TASK": "instance_segmentation", "OUTPUT": str(tmp_path / "o")})
    with pytest.raises(QgsProcessingException, match="ARCHITECTURE .* gives no masks; for instance segmentation"):
        _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS),
                               "TASK": "instance_segmentation", "ARCHITECTURE": "Unet", "OUTPUT": str(tmp_path / "o")})
