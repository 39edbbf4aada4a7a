"""Oriented (rotated-box) object detection: rotated IoU and NMS against hand-computed geometry, the CenterNetOBB
target encoding on the real Atlanta footprints, learning and cross-tile merging on rasters of rotated rectangles,
rs_deep:train / rs_deep:detect / rs_deep:assess_accuracy through Processing and qgis_process, and the refusals."""
import json
import math

import numpy as np
import pytest

from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.geo import rotated
from rs_deep.rs_deep_plugin.engine.inference.detect import detect, merge_detections
from rs_deep.rs_deep_plugin.engine.models.postprocess import rotated_nms

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS, write_raster

OBB_SMALL = {"library": "rs_deep", "architecture": "CenterNetOBB", "encoder": "resnet18",
             "params": {"encoder_depth": 3, "output_stride": 2, "decoder_channels": [32, 16], "head_channels": 16}}


def _run(alg, params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=feedback or QgsProcessingFeedback())


# --------------------------------------------------------------------------------------------
# geometry by hand


def test_rotated_boxes_normalise_and_map_corners():
    # a 2 (long) x ... given short side first: the same rectangle with the long side first, turned 90 degrees
    rb = rotated.normalise_rboxes([[10, 20, 2, 4, 0.0]])[0]
    assert rb == pytest.approx([10, 20, 4, 2, math.pi / 2])
    # the corners of a 4 x 2 box turned 30 degrees, and back
    t = math.radians(30)
    c = rotated.rbox_corners([[0, 0, 4, 2, t]])[0]
    assert c[1] - c[0] == pytest.approx([4 * math.cos(t), 4 * math.sin(t)])  # the long side
    assert c[2] - c[1] == pytest.approx([-2 * math.sin(t), 2 * math.cos(t)])  # the short side
    assert rotated.corners_to_rboxes(c[None])[0] == pytest.approx([0, 0, 4, 2, t])
    assert rotated.corners_to_rboxes(c[None, ::-1])[0] == pytest.approx([0, 0, 4, 2, t])  # either way round
    # the angle is modulo 180 degrees; a square's modulo 90
    assert rotated.normalise_rboxes([[0, 0, 4, 2, t + math.pi]])[0][4] == pytest.approx(t)
    assert rotated.normalise_rboxes([[0, 0, 3, 3, math.radians(100)]])[0][4] == pytest.approx(math.radians(10))
    # envelope of a 45-degree square of side 2: half-diagonal sqrt(2)
    assert rotated.rbox_envelopes([[5, 5, 2, 2, math.pi / 4]])[0] == pytest.approx(
        [5 - math.sqrt(2), 5 - math.sqrt(2), 5 + math.sqrt(2), 5 + math.sqrt(2)])
    # map azimuth: a long side along map x (east) points at 90 degrees, along map y (north) at 0
    assert rotated.azimuth_degrees([0.0, math.pi / 2, math.pi / 4]) == pytest.approx([90, 0, 45])
    # minimum rotated rectangle of a polygon: an L-shape's
    from shapely.geometry import Polygon
    ell = Polygon([(0, 0), (6, 0), (6, 2), (2, 2), (2, 4), (0, 4)])
    assert rotated.polygons_to_rboxes([ell])[0] == pytest.approx([3, 2, 6, 4, 0.0])


def test_rotated_iou_against_hand_computed_areas():
    a = [0, 0, 4, 2, 0.0]
    cases = [
        ([0, 0, 4, 2, math.pi / 2], 4 / 12),  # a cross: 2 x 2 in common, union 8 + 8 - 4
        ([2, 0, 4, 2, 0.0], 4 / 12),  # shifted half its length
        ([0, 0, 4, 2, math.pi], 1.0),  # the same rectangle
        ([10, 0, 4, 2, 0.3], 0.0),  # apart
    ]
    iou = rotated.rotated_iou([a], [b for b, _ in cases])[0]
    assert iou == pytest.approx([v for _, v in cases], abs=1e-12)
    # a square of side 2 and the same square turned 45 degrees: a regular octagon of area 8 (sqrt 2 - 1)
    octagon = 8 * (math.sqrt(2) - 1)
    got = rotated.rotated_iou([[0, 0, 2, 2, 0.0]], [[0, 0, 2, 2, math.pi / 4]])[0, 0]
    assert got == pytest.approx(octagon / (8 - octagon), abs=1e-12)
    assert rotated.rotated_iou(np.zeros((0, 5)), [a]).shape == (0, 1)


def test_rotated_nms_by_hand():
    boxes = np.array([[0, 0, 4, 2, 0.0],  # 0.9
                      [0, 0, 4, 2, math.pi / 2],  # 0.8: IoU 1/3 with box 0
                      [0.4, 0, 4, 2, 0.0],  # 0.7: IoU 3.6 / 4.4 = 0.818 with box 0
                      [0.4, 0, 4, 2, 0.0]])  # 0.6: as box 2, another class
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 0, 0, 1])
    assert rotated.rotated_iou(boxes[:1], boxes[2:3])[0, 0] == pytest.approx(3.6 / 4.4)
    assert rotated_nms(boxes, scores, labels, 0.5).tolist() == [0, 1, 3]
    assert rotated_nms(boxes, scores, labels, 0.3).tolist() == [0, 3]  # 1/3 > 0.3
    assert rotated_nms(boxes, scores, labels, 0.9).tolist() == [0, 1, 2, 3]


def _deepness_box(x_min, x_max, y_min, y_max, rot):
    """Deepness's ``BoundingBox(x_min, x_max, y_min, y_max, rot)`` (a box turned by ``rot`` about its centre) as a
    rotated box."""
    return [(x_min + x_max) / 2, (y_min + y_max) / 2, x_max - x_min, y_max - y_min, rot]


def test_rotated_nms_gives_deepness_answers():
    """The two cases of Deepness's test_nms_with_rotation_function.py (PUTvision/qgis-plugin-deepness, Apache-2.0;
    its numbers written out here):
    NMS at IoU 0.2 with rotation keeps one detection in each."""
    human = [_deepness_box(10, 80, 20, 150, 0), _deepness_box(0, 90, 100, 190, 0), _deepness_box(0, 100, 0, 200, 0)]
    keep = rotated_nms(human, [0.99999, 0.44444, 0.88888], [0, 0, 0], 0.2)
    assert keep.tolist() == [0]
    square = [_deepness_box(100, 200, 100, 200, r) for r in (0, np.pi / 2, -np.pi / 2, np.pi)]
    assert len(rotated_nms(square, [0.99999] * 4, [0] * 4, 0.2)) == 1


def test_merge_keeps_the_whole_rotated_object_of_the_other_tile():
    """An oblique object cut by a tile edge: the cut tile's partial view (shifted, smaller, scoring higher) is
    dropped for the whole rectangle of the neighbouring tile; a lone cut box and other objects stay."""
    whole = [100, 50, 30, 10, math.radians(60)]
    partial = [104, 57, 26, 12, math.radians(110)]  # the cut view: its centre inside the whole rectangle, but
    iou, ioa, _ = rotated.pair_overlaps(rotated.rbox_polygons([partial, whole]), [0], [1])
    assert iou[0] < 0.5 and ioa[0] < 0.6  # too little overlap for NMS or the intersection-over-area rule
    other = [160, 50, 30, 10, 0.2]  # another object, cut, no neighbour holds it
    boxes = np.array([whole, partial, other])
    keep = merge_detections(boxes, [0.7, 0.9, 0.8], [0, 0, 0], tiles=[2, 1, 1], cut=[False, True, True],
                            iou_threshold=0.5)
    assert sorted(keep.tolist()) == [0, 2]
    # in one tile (no tile edge between them) both stay: NMS alone never merges them
    keep = merge_detections(boxes, [0.7, 0.9, 0.8], [0, 0, 0], tiles=[1, 1, 1], cut=[False, False, False],
                            iou_threshold=0.5)
    assert sorted(keep.tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# the real footprints as rotated boxes, and the network's encoding of them


def test_footprints_become_their_minimum_rotated_rectangles_and_round_trip_through_the_encoding():
    import shapely
    import torch
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_geojson_shapes
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.training.augment import flip_boxes, rot90_boxes
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample, load_sample
    from rs_deep.rs_deep_plugin.engine.training.samplers import rot90_points
    item = load_sample(DetectionSample(str(ATLANTA_IMAGE), str(ATLANTA_LABELS)), ["building"], None, "building",
                       "sample", oriented=True)
    assert item.rboxes.shape == (32, 5) and item.img.shape == (1, 900, 600)
    # each one the minimum rotated rectangle of its footprint, in pixels (0.5 m, north up)
    geoms, _ = read_geojson_shapes(ATLANTA_LABELS, dst_crs="EPSG:32616")
    import rasterio
    with rasterio.open(ATLANTA_IMAGE) as ds:
        inv = ~ds.transform
    px = [shapely.transform(g, lambda xy: np.stack([inv.a * xy[:, 0] + inv.c, inv.e * xy[:, 1] + inv.f], 1))
          for g in geoms]
    mrr = shapely.minimum_rotated_rectangle(np.array(px, dtype=object))
    polys = rotated.rbox_polygons(item.rboxes)
    iou = shapely.area(shapely.intersection(polys, mrr)) / shapely.area(shapely.union(polys, mrr))
    # 0.9999 on GEOS 3.11 (QGIS 3.22); 0.99987 on GEOS 3.13 (QGIS 3.44), whose minimum rotated rectangle is computed
    # by another algorithm, here once in map and once in pixel coordinates
    assert iou.min() > 0.999
    assert (item.rboxes[:, 2] >= item.rboxes[:, 3]).all() and (item.rboxes[:, 4] >= 0).all() and \
        (item.rboxes[:, 4] < math.pi).all()
    assert 10 < np.median(item.rboxes[:, 2]) < 80  # buildings of 5..40 m
    assert np.ptp(np.degrees(item.rboxes[:, 4]) % 90) > 10  # not all aligned with the grid
    # the regression targets at the object centres decode back to the same rectangles
    torch.manual_seed(0)
    model = build_model(dict(OBB_SMALL, in_channels=1, classes=1))
    rb = torch.from_numpy(item.rboxes).float()
    s = model.stride
    ys, xs = (rb[:, 1] / s).floor().long(), (rb[:, 0] / s).floor().long()
    back = model.cell_rboxes(model.encode_rboxes(rb, ys, xs), ys, xs).double().numpy()
    assert np.diag(rotated.rotated_iou(back, item.rboxes)).min() > 0.9999
    assert back[:, 2:] == pytest.approx(item.rboxes[:, 2:], abs=1e-3)
    # and the training targets of a crop hold each cell owner's rectangle
    crop = item.rboxes[(item.rboxes[:, 0] < 256) & (item.rboxes[:, 1] < 256)]
    env = torch.from_numpy(rotated.rbox_envelopes(crop)).float()
    target = {"boxes": env, "rboxes": torch.from_numpy(crop).float(), "labels": torch.ones(len(crop), dtype=int)}
    heat, tbox, weight = model.targets_for(target, (1, 128, 128), "cpu")
    assert heat.max() == 1.0 and abs(float(weight.sum()) - len(crop)) < 1e-3  # each object weighs 1
    owners = {tuple(np.round(v, 3)) for v in tbox[weight > 0][:, 4:].double().numpy()}
    assert owners == {tuple(np.round(v, 3)) for v in crop.astype(np.float32).astype(np.float64)}
    # the training crops' turns and flips move the rectangles as they move the boxes
    for k in range(4):
        for flipped in (False, True):
            moved = rotated.transform_rboxes(crop, lambda x, y: rot90_points(x, y, 256, k, flipped))
            want = rot90_boxes(rotated.rbox_envelopes(crop), 256, k)
            want = flip_boxes(want, 256) if flipped else want
            assert rotated.rbox_envelopes(moved) == pytest.approx(want, abs=1e-9)
            assert moved[:, 2:4] == pytest.approx(crop[:, 2:4])


# --------------------------------------------------------------------------------------------
# rotated rectangles learned, and merged across tiles


def rectangles_raster(path, size=256, n=16, seed=0, length=28, width=10):
    """A dark 3-band raster with ``n`` bright, separated rectangles at random angles; returns (path, pixel
    polygons)."""
    from rasterio.features import rasterize
    from shapely import affinity
    from shapely.geometry import box
    rng = np.random.default_rng(seed)
    polys = []
    for _ in range(5000):
        if len(polys) == n:
            break
        cx, cy = rng.uniform(length / 2 + 2, size - length / 2 - 2, 2)
        p = affinity.rotate(box(cx - length / 2, cy - width / 2, cx + length / 2, cy + width / 2),
                            rng.uniform(0, 180), origin=(cx, cy))
        if not any(p.buffer(4).intersects(q) for q in polys):
            polys.append(p)
    arr = np.full((size, size), 20, np.uint8)
    arr[rasterize([(p, 1) for p in polys], out_shape=(size, size)) > 0] = 220
    write_raster(path, np.repeat(arr[None], 3, 0))
    return path, polys


def _map_geojson(path, polys, raster):
    """The pixel polygons as a GeoJSON file in the raster's CRS (map coordinates)."""
    import rasterio
    import shapely
    from shapely.geometry import mapping
    with rasterio.open(raster) as ds:
        t, crs = ds.transform, ds.crs.to_string()
    feats = [{"type": "Feature", "properties": {"class": "car"},
              "geometry": mapping(shapely.transform(p, lambda xy: np.stack(
                  [t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f], 1)))}
             for p in polys]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats,
                                "crs": {"type": "name", "properties": {"name": crs}}}))
    return path


@pytest.fixture(scope="module")
def rect_model(tmp_path_factory):
    """CenterNetOBB trained by the engine on bright rectangles at random angles (pixel polygons as labels)."""
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    d = tmp_path_factory.mktemp("rects")
    raster, polys = rectangles_raster(d / "train.tif", n=20)
    test_raster, test_polys = rectangles_raster(d / "test.tif", size=200, n=12, seed=5)
    report = train_detection([DetectionSample(str(raster), [(p, "car") for p in polys])], d / "model",
                             class_names=["car"], builder=OBB_SMALL, tile_size=64, epochs=12, steps_per_epoch=25,
                             batch_size=4, lr=5e-3, package_tile_size=128, package_overlap=48, score_threshold=0.25,
                             num_threads=2, seed=0)
    return {"model": d / "model", "report": report, "test": test_raster, "polys": test_polys, "dir": d}


def test_oriented_detector_learns_rotated_rectangles_and_tiles_do_not_change_the_objects(rect_model):
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    pkg = load_package(rect_model["model"], task="detection")
    assert pkg.oriented and pkg.builder["architecture"] == "CenterNetOBB"
    meta = json.loads((rect_model["model"] / "model.json").read_text())
    assert meta["properties"]["mlm:output"][0]["result"]["dim_order"] == ["box", "cx_cy_length_width_angle_class_score"]
    assert set(rect_model["report"]["history"][0]["loss_parts"]) == {"loss_heatmap", "loss_offset", "loss_size",
                                                                     "loss_angle"}
    truth = rotated.polygons_to_rboxes(rect_model["polys"])
    runs = {}
    for tile, overlap in ((64, 30), (128, 48), (256, 0)):  # many tiles cutting the objects ... one tile
        res = detect(str(rect_model["test"]), pkg, tile_size=tile, overlap=overlap)
        pred = np.array([d.pixel_rbox for d in res]).reshape(-1, 5)
        m = detection_metrics([(pred, [d.score for d in res], np.zeros(len(res), int))],
                              [(truth, np.zeros(len(truth), int))], iou=0.5, rotated=rotated.rotated_iou)
        assert m["recall"] >= 0.9 and m["precision"] >= 0.9, (tile, m)  # 11 of the 12 at least
        runs[tile] = (res.tiles, pred)
    assert runs[64][0] > 16 and runs[256][0] == 1
    # the same objects: one to one, nearly the same rectangles, whatever the tiling
    for tile in (64, 128):
        iou = rotated.rotated_iou(runs[tile][1], runs[256][1])
        n = len(runs[256][1])
        assert iou.shape == (n, n) and (iou.max(axis=1) > 0.7).all() and (iou.max(axis=0) > 0.7).all()
        assert sorted(iou.argmax(axis=1).tolist()) == list(range(n))
    # the angles are right: within 10 degrees of the truth (modulo 180) for the objects found
    iou = rotated.rotated_iou(runs[256][1], truth)
    found = iou.max(axis=1) >= 0.5
    diff = np.abs(runs[256][1][found, 4] - truth[iou.argmax(axis=1)[found], 4]) % math.pi
    assert np.degrees(np.minimum(diff, math.pi - diff)).max() < 10


# --------------------------------------------------------------------------------------------
# Processing: train, detect, assess, qgis_process


@pytest.fixture(scope="module")
def atlanta_crop(tmp_path_factory):
    """The top-left 160 x 160 px of the Atlanta sample (a real scene with footprints in it)."""
    import subprocess
    path = tmp_path_factory.mktemp("crop") / "crop.tif"
    subprocess.run(["gdal_translate", "-q", "-srcwin", "0", "0", "160", "160", str(ATLANTA_IMAGE), str(path)],
                   check=True)
    return path


@pytest.fixture(scope="module")
def trained_on_atlanta(provider, tmp_path_factory):
    out = tmp_path_factory.mktemp("obb_train") / "buildings_obb"
    res = _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TASK": "detection",
                                 "ARCHITECTURE": "CenterNetOBB", "EPOCHS": 1, "STEPS_PER_EPOCH": 2, "TILE_SIZE": 64,
                                 "BATCH_SIZE": 2, "VALIDATION": 0.2, "DEVICE": "cpu", "OUTPUT": str(out)})
    return res


def test_oriented_training_through_processing_writes_an_oriented_package(trained_on_atlanta):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    pkg = load_package(trained_on_atlanta["OUTPUT"], task="detection")
    assert pkg.oriented and pkg.builder["architecture"] == "CenterNetOBB" and pkg.class_names() == {0: "buildings"}
    report = json.loads(open(trained_on_atlanta["REPORT"], encoding="utf-8").read())
    assert set(report["history"][0]["loss_parts"]) == {"loss_heatmap", "loss_offset", "loss_size", "loss_angle"}
    assert report["samples"]["train_boxes"] + report["samples"]["val_boxes"] == 32  # the footprints, both parts
    assert report["history"][0]["val"] is not None  # validated on the bottom 20 % (by rotated IoU)


def test_detect_writes_rotated_rectangles_with_the_models_own_angles(provider, tmp_path, trained_on_atlanta,
                                                                     atlanta_crop):
    import shapely
    import torch
    from qgis.core import QgsVectorLayer
    from rs_deep.rs_deep_plugin.engine.geo.raster import apply_scaling
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    import rasterio
    model = trained_on_atlanta["OUTPUT"]
    params = {"INPUT": str(atlanta_crop), "MODEL": model, "TILE_SIZE": 160, "OVERLAP": 0, "SCORE_THRESHOLD": 0.0,
              "MAX_DETECTIONS": 12, "IOU_THRESHOLD": 0.5, "OUTPUT": str(tmp_path / "obb.gpkg"),
              "OUTPUT_CENTROIDS": str(tmp_path / "centres.gpkg")}
    res = _run("rs_deep:detect", params)
    vec = QgsVectorLayer(res["OUTPUT"], "obb")
    assert [f.name() for f in vec.fields()][-6:] == ["class_id", "class_name", "score", "angle", "width", "length"]
    feats = sorted(vec.getFeatures(), key=lambda f: -f["score"])
    assert 0 < len(feats) <= 12
    # the network's own output on the one tile: decoded rotated boxes, NMS, mapped with the raster's transform
    pkg = load_package(model, task="detection")
    with rasterio.open(atlanta_crop) as ds:
        data = ds.read(out_dtype="float32")
        transform = ds.transform
    apply_scaling(data, pkg.value_scaling)
    rb, labels, scores = pkg.make_detection_runner(torch.device("cpu"), 0.0, 0.5, 12)(data[None])[0]
    keep = merge_detections(rb, scores, labels, np.zeros(len(rb), int), np.zeros(len(rb), bool), 0.5)
    corners, mrb = rotated.map_rboxes(transform, rb[keep])
    assert len(keep) == len(feats)
    for f, c, m, sc in zip(feats, corners, mrb, scores[keep]):
        ring = np.array([(p.x(), p.y()) for p in f.geometry().asPolygon()[0]])
        assert ring[:4] == pytest.approx(c, abs=1e-6) and ring[4] == pytest.approx(ring[0])
        assert f["score"] == pytest.approx(sc, abs=1e-4)
        assert f["length"] == pytest.approx(m[2], abs=1e-3) and f["width"] == pytest.approx(m[3], abs=1e-3)
        # angle: the long side's direction, degrees clockwise from north, from the written polygon itself
        e = [ring[1] - ring[0], ring[2] - ring[1]]
        long_edge = max(e, key=lambda v: np.hypot(*v))
        azimuth = math.degrees(math.atan2(long_edge[0], long_edge[1])) % 180
        assert min(abs(f["angle"] - azimuth), 180 - abs(f["angle"] - azimuth)) < 1e-3
        assert f["length"] == pytest.approx(max(np.hypot(*v) for v in e), abs=1e-3)
        assert shapely.Polygon(ring).area == pytest.approx(f["length"] * f["width"], rel=1e-4)
    pts = QgsVectorLayer(res["OUTPUT_CENTROIDS"], "c")
    assert pts.featureCount() == len(feats)


def test_assessment_by_rotated_iou_matches_a_hand_computation(provider, tmp_path, rect_model):
    import shapely
    from qgis.core import QgsProcessingException, QgsVectorLayer
    refs = _map_geojson(tmp_path / "rects.geojson", rect_model["polys"], rect_model["test"])
    det = _run("rs_deep:detect", {"INPUT": str(rect_model["test"]), "MODEL": str(rect_model["model"]),
                                  "SCORE_THRESHOLD": 0.02, "OUTPUT": str(tmp_path / "found.gpkg")})
    res = _run("rs_deep:assess_accuracy", {"TASK": "oriented_detection", "PREDICTION_BOXES": det["OUTPUT"],
                                           "REFERENCE": str(refs), "IOU_THRESHOLD": 0.5,
                                           "OUTPUT_HTML": str(tmp_path / "acc.html")})
    # by hand, from the written files: greedy matching by score at rotated IoU >= 0.5
    vec = QgsVectorLayer(det["OUTPUT"], "found")
    feats = sorted(vec.getFeatures(), key=lambda f: -f["score"])
    pred = [shapely.from_wkb(bytes(f.geometry().asWkb())) for f in feats]
    truth = [shapely.minimum_rotated_rectangle(shapely.from_geojson(json.dumps(f["geometry"])))
             for f in json.loads(refs.read_text())["features"]]
    matched, hits = set(), []
    for p in pred:
        with np.errstate(invalid="ignore"):  # GEOS on rectangles that merely touch (UTM coordinates)
            ious = [p.intersection(t).area / p.union(t).area if k not in matched else -1
                    for k, t in enumerate(truth)]
        best = int(np.argmax(ious))
        hits.append(ious[best] >= 0.5)
        if hits[-1]:
            matched.add(best)
    tp = sum(hits)
    fp, fn = len(pred) - tp, len(truth) - tp
    assert fp > 0 and tp >= 10  # low-scoring extras: the numbers are not trivial
    assert res["PRECISION"] == pytest.approx(tp / (tp + fp)) and res["RECALL"] == pytest.approx(tp / (tp + fn))
    assert res["F1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # AP: the area under the precision envelope of the ranked hits
    cum = np.cumsum(hits)
    precision, recall = cum / np.arange(1, len(hits) + 1), cum / len(truth)
    ap, prev_r = 0.0, 0.0
    for k in range(len(hits)):
        if hits[k]:
            ap += (recall[k] - prev_r) * precision[k:].max()
            prev_r = recall[k]
    assert res["AP"] == pytest.approx(ap)
    assert "rotated IoU" in (tmp_path / "acc.html").read_text()
    # the same rotated boxes in an axis-aligned assessment: refused, naming the fix
    with pytest.raises(QgsProcessingException, match=r"rotated boxes.*TASK to oriented_detection"):
        _run("rs_deep:assess_accuracy", {"TASK": "detection", "PREDICTION_BOXES": det["OUTPUT"],
                                         "REFERENCE": str(refs)})


def test_qgis_process_runs_an_oriented_model(tmp_path, rect_model):
    from qgis.core import QgsVectorLayer
    from qgis_env import run_qgis_process
    out = tmp_path / "rects.gpkg"
    proc = run_qgis_process(["run", "rs_deep:detect", "--json", "--", f"INPUT={rect_model['test']}",
                             f"MODEL={rect_model['model']}", f"OUTPUT={out}"])
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["results"]["OUTPUT"] == str(out)
    vec = QgsVectorLayer(str(out), "rects")
    assert 11 <= vec.featureCount() <= 13 and {"angle", "width", "length"} <= {f.name() for f in vec.fields()}
    # width and length in metres (0.5 m pixels): the 10 x 28 px rectangles
    assert all(3 < f["width"] < 7 and 11 < f["length"] < 17 for f in vec.getFeatures())


# --------------------------------------------------------------------------------------------
# refusals


def test_oriented_training_refuses_labels_that_are_not_polygons(tmp_path):
    from shapely.geometry import LineString, box
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    raster, polys = rectangles_raster(tmp_path / "r.tif", size=96, n=3)
    run = dict(class_names=["car"], builder=OBB_SMALL, tile_size=64, epochs=1, steps_per_epoch=1)
    lines = [(LineString(p.exterior.coords[:2]), "car") for p in polys]
    with pytest.raises(InputError, match=r"feature 0 is a LineString \(no area\).*digitise the objects as polygons, "
                                         r"or train an axis-aligned detector \(architecture CenterNet\)"):
        train_detection([DetectionSample(str(raster), lines)], tmp_path / "m", **run)
    with pytest.raises(InputError, match=r"oriented detection trains from polygons.*expected \(polygon\[, class\]\)"):
        train_detection([DetectionSample(str(raster), [(*p.bounds, "car") for p in polys])], tmp_path / "m", **run)
    voc = tmp_path / "boxes.xml"
    voc.write_text("<annotation></annotation>")
    with pytest.raises(InputError, match=r"Pascal VOC file of axis-aligned boxes; oriented detection trains from "
                                         "polygons"):
        train_detection([DetectionSample(str(raster), str(voc))], tmp_path / "m", **run)
    assert not (tmp_path / "m").exists()
    # and the assessment of rotated boxes wants polygons too
    from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import assess_detection
    with pytest.raises(InputError, match=r"reference_boxes: feature 0 is a Point"):
        assess_detection([(box(0, 0, 4, 2), 0, 0.9)], [(box(0, 0, 1, 1).centroid, 0)], rotated=True)


def test_oriented_packages_where_they_cannot_be_used(rect_model, tmp_path):
    from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
    with pytest.raises(InputError, match=r"oriented detector \(CenterNetOBB: rotated boxes\).*rs_deep:detect"):
        export_onnx(rect_model["model"], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
