"""Deepness YOLO models of the two det_types RS Deep used to refuse: ``YOLO_Ultralytics_obb`` (oriented boxes,
rs_deep:detect) and ``YOLO_Ultralytics_segmentation`` (instance masks, rs_deep:segment_instances).

No real YOLO model ships offline, so the tests export small torch modules with Ultralytics' exact output layouts:
the OBB one returns rows [B, 4 + C + 1, N] (cx, cy, w, h, class scores, angle in radians), the segmentation one rows
[B, 4 + C + 32, N] (cx, cy, w, h, class scores, mask coefficients) and prototypes [B, 32, T / 4, T / 4]. Each finds
the bright objects of one band (class 0: band 1, class 1: band 2) by their pixels, so the objects have known
positions, sizes and angles on a raster derived from Deepness's test orthophoto (darkened, with the objects painted
in), one of them cut by a tile border."""
import math

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsVectorLayer

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.inference.detect import detect
from rs_deep.rs_deep_plugin.engine.inference.instances import segment_instances
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.onnx.runners import decode_yolo_obb, decode_yolo_seg

from conftest import DATA, write_raster
from test_onnx import make_onnx

FOTOMAP = DATA / "deepness" / "dummy_fotomap_small.tif"  # 2 cm, EPSG:32633
GSD = 0.02
TILE = 128  # the models' fixed input; 25 % overlap: 32 px, tiles every 96 px
META = {"model_type": '"Detector"', "resolution": "2", "tiles_overlap": "25", "det_conf": "0.5",
        "det_iou_thresh": "0.4"}
#: (centre x, centre y, length, width, angle of the long side in degrees, clockwise on the screen), raster pixels.
#: The first lies in one tile; the second crosses the right edge of the first tile column (x = 128).
OBB_OBJECTS = [(60.3, 70.6, 40.0, 14.0, 30.0), (124.0, 150.2, 30.0, 12.0, 120.0)]
SCORES = (0.9, 0.8)


def _run(alg, params):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())


def _base(path, painted):
    """A 320 x 224 px crop of Deepness's orthophoto (3 bands) darkened to at most 40 % (every pixel value < 0.5 x
    255), with ``painted`` (band, boolean mask) set to 250 in that band; its own georeferencing (2 cm)."""
    with rasterio.open(FOTOMAP) as ds:
        win = Window(400, 300, 320, 224)
        arr = (ds.read([1, 2, 3], window=win).astype(np.float64) * 0.4).astype(np.uint8)
        transform, crs = ds.window_transform(win), ds.crs.to_string()
    for band, mask in painted:
        arr[band][mask] = 250
    return write_raster(path, arr, transform=transform, crs=crs), transform


def _pixel_grid(shape=(224, 320)):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return cols + 0.5, rows + 0.5  # pixel centres


def _rectangle(cx, cy, length, width, degrees):
    x, y = _pixel_grid()
    t = math.radians(degrees)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def _ellipse(cx, cy, a, b, degrees):
    x, y = _pixel_grid()
    t = math.radians(degrees)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _band_masks(x):
    """Bright pixels of bands 1 and 2 (the objects of classes 0 and 1): float [B, 2, T, T], and their counts."""
    import torch
    m = (x[:, :2] > 0.5).float()
    return m, torch.clamp(m.sum(dim=(2, 3)), min=1.0), (m.sum(dim=(2, 3)) > 0).float()


def _obb_module():
    """YOLO OBB rows [B, 4 + 2 + 1, 4]: per band, the rectangle of its bright pixels (centre and axes from their
    moments, sides from their extents along the axes) with the band's class score; a third row describing the
    first rectangle short side first (w and h swapped, angle + 90 degrees) at a lower score, which rotated NMS
    removes; a fourth row below the score threshold."""
    import torch

    class Obb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = torch.arange(TILE, dtype=torch.float32) + 0.5
            self.register_buffer("xs", c[None, None, None, :].expand(1, 1, TILE, TILE).contiguous())
            self.register_buffer("ys", c[None, None, :, None].expand(1, 1, TILE, TILE).contiguous())

        def forward(self, x):
            m, n, present = _band_masks(x)
            mean = lambda v: (m * v).sum(dim=(2, 3)) / n  # noqa: E731
            cx, cy = mean(self.xs), mean(self.ys)
            dx, dy = self.xs - cx[:, :, None, None], self.ys - cy[:, :, None, None]
            phi = 0.5 * torch.atan2(2 * mean(dx * dy), mean(dx * dx) - mean(dy * dy))
            cos, sin = torch.cos(phi)[:, :, None, None], torch.sin(phi)[:, :, None, None]
            pu, pv = dx * cos + dy * sin, -dx * sin + dy * cos
            big = torch.full_like(pu, 1e6)
            on = m > 0
            umax, umin = torch.where(on, pu, -big).amax(dim=(2, 3)), torch.where(on, pu, big).amin(dim=(2, 3))
            vmax, vmin = torch.where(on, pv, -big).amax(dim=(2, 3)), torch.where(on, pv, big).amin(dim=(2, 3))
            cu, cv = (umax + umin) / 2, (vmax + vmin) / 2
            c, s = torch.cos(phi), torch.sin(phi)
            ccx, ccy = cx + cu * c - cv * s, cy + cu * s + cv * c
            w, h = umax - umin + 0.5, vmax - vmin + 0.5  # pixel centres: + half a pixel
            zero = torch.zeros_like(cx[:, 0])
            rows = []
            for k in range(2):
                scores = [present[:, k] * SCORES[k] if j == k else zero for j in range(2)]
                rows.append(torch.stack([ccx[:, k], ccy[:, k], w[:, k], h[:, k], *scores, phi[:, k]], dim=1))
            rows.append(torch.stack([ccx[:, 0], ccy[:, 0], h[:, 0], w[:, 0], present[:, 0] * 0.6, zero,
                                     phi[:, 0] + math.pi / 2], dim=1))
            rows.append(torch.stack([zero + 30, zero + 30, zero + 10, zero + 5, zero + 0.2, zero, zero], dim=1))
            return torch.stack(rows, dim=2)  # [B, 7, 4]

    return Obb()


def _seg_module():
    """YOLO segmentation outputs: rows [B, 4 + 2 + 32, 4] (per band, the box of its bright pixels, its class score
    and mask coefficients selecting prototype k; a copy of the first shifted by 1 px at a lower score, removed by
    NMS; a row below the score threshold) and prototypes [B, 32, T / 4, T / 4]: prototype k is the logit of the
    share of bright pixels of band k in each 4 x 4 cell, the others zero."""
    import torch

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("idx", torch.arange(TILE, dtype=torch.float32))

        def forward(self, x):
            m, _, present = _band_masks(x)
            cols, rows_ = m.amax(dim=2), m.amax(dim=3)  # [B, 2, T]
            big = torch.full_like(cols, 1e6)
            x0 = torch.where(cols > 0, self.idx, big).amin(dim=2)
            x1 = torch.where(cols > 0, self.idx, -big).amax(dim=2) + 1
            y0 = torch.where(rows_ > 0, self.idx, big).amin(dim=2)
            y1 = torch.where(rows_ > 0, self.idx, -big).amax(dim=2) + 1
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            zero = torch.zeros_like(cx[:, 0])
            eye = torch.eye(32, dtype=x.dtype)
            out = []
            for k, (dx, score) in enumerate(((0.0, None), (0.0, None), (1.0, 0.6))):
                j = min(k, 1) if k < 2 else 0
                s = present[:, j] * (SCORES[j] if score is None else score)
                cls = [s if i == j else zero for i in range(2)]
                coef = eye[j][None, :].expand(x.shape[0], 32)
                out.append(torch.cat([torch.stack([cx[:, j] + dx, cy[:, j], w[:, j], h[:, j], *cls], dim=1), coef],
                                     dim=1))
            out.append(torch.cat([torch.stack([zero + 30, zero + 30, zero + 10, zero + 10, zero + 0.2, zero], dim=1),
                                  eye[1][None, :].expand(x.shape[0], 32)], dim=1))
            share = torch.nn.functional.avg_pool2d(m, 4)  # [B, 2, T / 4, T / 4]
            protos = torch.cat([12.0 * (share - 0.5), torch.zeros_like(share[:, :1]).expand(-1, 30, -1, -1)], dim=1)
            return torch.stack(out, dim=2), protos

    return Seg()


def _export_seg(path):
    """Like test_onnx.make_onnx, with the two outputs of a YOLO segmentation model."""
    import io
    import warnings
    import onnx
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_seg_module().eval(), torch.zeros(1, 3, TILE, TILE), buf, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0", "output1"],
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}, "output1": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    meta = dict(META, det_type='"YOLO_Ultralytics_segmentation"', class_names='{"0": "tree", "1": "bush"}')
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def obb_model(tmp_path_factory):
    meta = dict(META, det_type='"YOLO_Ultralytics_obb"', class_names='{"0": "ship", "1": "car"}')
    return make_onnx(tmp_path_factory.mktemp("obb") / "obb.onnx", _obb_module(), (1, 3, TILE, TILE), meta)


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    return _export_seg(tmp_path_factory.mktemp("seg") / "seg.onnx")


@pytest.fixture(scope="module")
def obb_raster(tmp_path_factory):
    painted = [(k, _rectangle(*o)) for k, o in enumerate(OBB_OBJECTS)]
    return _base(tmp_path_factory.mktemp("obb_raster") / "ships.tif", painted)


#: (centre x, centre y, semi-axes a, b, angle in degrees): an ellipse in one tile, a disk across the tile border
SEG_OBJECTS = [(60.3, 70.6, 18.0, 11.0, 30.0), (124.0, 150.2, 12.0, 12.0, 0.0)]


@pytest.fixture(scope="module")
def seg_raster(tmp_path_factory):
    painted = [(k, _ellipse(*o)) for k, o in enumerate(SEG_OBJECTS)]
    path, transform = _base(tmp_path_factory.mktemp("seg_raster") / "trees.tif", painted)
    return path, transform, [m for _, m in painted]


def _azimuth(degrees):
    """The map direction (degrees clockwise from grid north, 0..180) of a pixel direction clockwise from +x."""
    t = math.radians(degrees)
    return math.degrees(math.atan2(math.cos(t), -math.sin(t))) % 180.0


def _angle_diff(a, b):
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


# --------------------------------------------------------------------------------------------
# decoding


def test_decode_yolo_obb_normalises_thresholds_and_suppresses():
    # cx, cy, w, h, 2 class scores, angle: a box given short side first is the same rectangle turned 90 degrees
    rows = np.array([[50, 50, 10, 30, 0.2, 0.9, 0.0],  # class 1, long side along y: theta 90 degrees
                     [50, 50, 30, 10, 0.1, 0.7, math.pi / 2],  # the same rectangle described long side first
                     [50, 50, 30, 10, 0.8, 0.1, math.pi / 2],  # same place, class 0: kept (class-wise NMS)
                     [90, 20, 8, 4, 0.3, 0.2, 0.3]]).T  # below the score threshold
    rb, labels, scores = decode_yolo_obb(rows, 0.5, 0.5, 100, 2)
    assert labels.tolist() == [1, 0] and scores.tolist() == [0.9, 0.8]
    assert rb[0] == pytest.approx([50, 50, 30, 10, math.pi / 2])
    rb, _, _ = decode_yolo_obb(np.array([[5, 5, 4, 2, 0.9, -0.5]]).T, 0.5, 0.5, 100, 1)
    assert rb[0] == pytest.approx([5, 5, 4, 2, math.pi - 0.5])  # the angle modulo 180 degrees, in [0, pi)
    with pytest.raises(ModelPackageError, match="4 \\+ 3 classes"):
        decode_yolo_obb(rows, 0.5, 0.5, 100, 3)


def test_decode_yolo_seg_masks_are_the_prototypes_cut_to_the_box():
    protos = np.full((2, 8, 8), -10.0, np.float32)
    protos[0, 2:6, 2:6] = 10.0  # a square of 16 x 16 px at the tile's 32 px
    protos[1] = 10.0  # everywhere
    rows = np.array([[16, 16, 16, 16, 0.9, 1.0, 0.0],  # prototype 0
                     [8, 24, 6, 4, 0.7, 0.0, 1.0],  # prototype 1 cut to its box: 6 x 4 px
                     [16, 17, 16, 16, 0.6, 1.0, 0.0]]).T  # the first again, lower: NMS
    boxes, labels, scores, masks = decode_yolo_seg(rows, protos, 32, 0.5, 0.5, 100, 1)
    assert labels.tolist() == [0, 0] and scores.tolist() == [0.9, 0.7] and masks.shape == (2, 32, 32)
    # 16 x 16 px but its 4 corner pixels, where the bilinear probability of the square falls to 0.625 ** 2 < 0.5
    assert masks[0].sum() == 16 * 16 - 4 and masks[0][8:24, 9:23].all() and masks[0][9:23, 8:24].all()
    assert not masks[0][:8].any() and not masks[0][24:].any()
    assert masks[1].sum() == 6 * 4 and masks[1][22:26, 5:11].all()
    assert boxes[1].tolist() == [5, 22, 11, 26]


def test_decode_yolo_seg_box_masks_are_those_of_the_whole_tile_recipe():
    """The masks computed inside their boxes only are, pixel for pixel, sigmoid(coefficients @ prototypes) resized
    to the whole tile, cut to the box and thresholded (Deepness/Ultralytics), for boxes partly off the tile too."""
    from rs_deep.rs_deep_plugin.engine.models.postprocess import resize_bilinear
    rng = np.random.default_rng(3)
    t, mh, n, m = 96, 24, 30, 32
    raw = np.concatenate([rng.uniform(-8, t + 8, (2, n)), rng.uniform(1, t / 2, (2, n)), np.full((1, n), 0.9),
                          rng.normal(0, 1, (m, n))])
    protos = rng.normal(0, 1, (m, mh, mh)).astype(np.float32)
    boxes, _, _, masks = decode_yolo_seg(raw, protos, t, 0.5, 1.0, 100, 1)  # IoU 1: NMS keeps every box
    assert len(boxes) == n and np.asarray(masks).shape == (n, t, t)
    idx = np.arange(t)
    for k in range(n):
        j = int(np.flatnonzero(np.isclose(raw[0] - raw[2] / 2, boxes[k, 0]))[0])
        p = resize_bilinear(1 / (1 + np.exp(-(raw[5:, j].astype(np.float32) @ protos.reshape(m, -1)))).reshape(mh, mh),
                            (t, t))
        inside = ((idx >= boxes[k, 1]) & (idx < boxes[k, 3]))[:, None] & ((idx >= boxes[k, 0]) & (idx < boxes[k, 2]))
        assert np.array_equal(masks[k], (p >= 0.5) & inside)


# --------------------------------------------------------------------------------------------
# packages


def test_packages_read_as_oriented_detection_and_instance_segmentation(obb_model, seg_model):
    obb = load_package(obb_model)
    assert obb.task == "detection" and obb.oriented and [c.name for c in obb.classes] == ["ship", "car"]
    assert (obb.tile_size, obb.overlap, obb.gsd) == (TILE, 32, GSD)
    seg = load_package(seg_model)
    assert seg.task == "instance_segmentation" and not seg.oriented
    assert [c.name for c in seg.classes] == ["tree", "bush"]


def test_wrong_class_count_and_missing_prototypes_are_refused(tmp_path):
    meta = dict(META, det_type='"YOLO_Ultralytics_obb"', class_names='{"0": "a", "1": "b", "2": "c"}')
    path = make_onnx(tmp_path / "obb3.onnx", _obb_module(), (1, 3, TILE, TILE), meta)
    with pytest.raises(ModelPackageError, match="lists 3 classes but the YOLO_Ultralytics_obb output has 2"):
        load_package(path)
    meta = dict(META, det_type='"YOLO_Ultralytics_segmentation"')
    path = make_onnx(tmp_path / "seg1.onnx", _obb_module(), (1, 3, TILE, TILE), meta)
    with pytest.raises(ModelPackageError, match="has two outputs.*mask prototypes"):
        load_package(path)


# --------------------------------------------------------------------------------------------
# oriented boxes through rs_deep:detect


def _check_obb(detections, transform):
    assert [(d.class_id, d.class_name) for d in detections] == [(0, "ship"), (1, "car")]
    assert [d.score for d in detections] == pytest.approx(list(SCORES), abs=1e-6)
    for d, (cx, cy, length, width, degrees) in zip(detections, OBB_OBJECTS):
        mx, my = transform * (cx, cy)
        assert d.centroid == pytest.approx((mx, my), abs=GSD)  # within a pixel
        assert d.length == pytest.approx(length * GSD, abs=GSD) and d.width == pytest.approx(width * GSD, abs=GSD)
        assert _angle_diff(d.angle, _azimuth(degrees)) < 1.0


def test_obb_model_gives_rotated_boxes_once_across_tiles(obb_model, obb_raster):
    raster, transform = obb_raster
    res = detect(raster, obb_model, device="cpu", batch_size=4)
    assert (res.score_threshold, res.iou_threshold) == (0.5, 0.4)  # det_conf, det_iou_thresh
    assert res.tiles == 6 and res.raw_detections == 3  # the car: whole in one tile, cut in its neighbour
    _check_obb(res.detections, transform)
    assert all(d.polygon is not None and len(d.polygon) == 4 for d in res.detections)


def test_obb_model_through_processing(obb_model, obb_raster, provider, tmp_path):
    raster, transform = obb_raster
    out = tmp_path / "ships.gpkg"
    r = _run("rs_deep:detect", {"INPUT": str(raster), "MODEL": str(obb_model), "OUTPUT": str(out)})
    layer = QgsVectorLayer(r["OUTPUT"], "ships")
    assert layer.isValid() and layer.featureCount() == 2
    feats = sorted(layer.getFeatures(), key=lambda f: f["class_id"])
    for f, (cx, cy, length, width, degrees) in zip(feats, OBB_OBJECTS):
        assert f["class_name"] == ("ship", "car")[f["class_id"]]
        assert abs(f["length"] - length * GSD) <= GSD and abs(f["width"] - width * GSD) <= GSD
        assert _angle_diff(f["angle"], _azimuth(degrees)) < 1.0
        c = f.geometry().centroid().asPoint()
        mx, my = transform * (cx, cy)
        assert abs(c.x() - mx) <= GSD and abs(c.y() - my) <= GSD
        assert f.geometry().area() == pytest.approx(f["length"] * f["width"], rel=1e-3)  # the rotated rectangle
    with pytest.raises(QgsProcessingException, match=r"rs_deep:detect"):
        _run("rs_deep:segment_instances", {"INPUT": str(raster), "MODEL": str(obb_model),
                                           "OUTPUT": str(tmp_path / "no.gpkg")})


# --------------------------------------------------------------------------------------------
# instance masks through rs_deep:segment_instances


def _truth_polygons(transform, masks):
    from rs_deep.rs_deep_plugin.engine.geo.vectorize import mask_polygon
    return [mask_polygon(m, transform) for m in masks]


def _check_instances(instances, transform, masks):
    assert [(d.class_id, d.class_name) for d in instances] == [(0, "tree"), (1, "bush")]
    assert [d.score for d in instances] == pytest.approx(list(SCORES), abs=1e-6)
    for d, truth, m in zip(instances, _truth_polygons(transform, masks), masks):
        assert d.polygon.area == pytest.approx(m.sum() * GSD ** 2, rel=0.08)
        assert d.area_m2 == pytest.approx(d.polygon.area, rel=1e-3)
        assert d.polygon.centroid.distance(truth.centroid) < 1.5 * GSD
        assert d.polygon.intersection(truth).area / d.polygon.union(truth).area > 0.85


def test_seg_model_gives_one_polygon_per_object_across_tiles(seg_model, seg_raster):
    raster, transform, masks = seg_raster
    res = segment_instances(raster, seg_model, device="cpu", batch_size=4)
    assert res.tiles == 6 and res.raw_instances == 2  # the bush cut by a tile edge: only its whole view is kept
    _check_instances(res.instances, transform, masks)


def test_seg_model_through_processing_and_refused_by_detect(seg_model, seg_raster, provider, tmp_path):
    raster, transform, masks = seg_raster
    out = tmp_path / "trees.gpkg"
    r = _run("rs_deep:segment_instances", {"INPUT": str(raster), "MODEL": str(seg_model), "OUTPUT": str(out)})
    layer = QgsVectorLayer(r["OUTPUT"], "trees")
    assert layer.isValid() and layer.featureCount() == 2
    feats = sorted(layer.getFeatures(), key=lambda f: f["class_id"])
    assert [f["class"] for f in feats] == ["tree", "bush"]
    for f, m in zip(feats, masks):
        assert f.geometry().area() == pytest.approx(m.sum() * GSD ** 2, rel=0.08)
    message = (r"this is an instance_segmentation model; this tool needs a detection model \(instance segmentation "
               r"models run with rs_deep:segment_instances\)")
    with pytest.raises(QgsProcessingException, match=message):
        _run("rs_deep:detect", {"INPUT": str(raster), "MODEL": str(seg_model), "OUTPUT": str(tmp_path / "no.gpkg")})
    with pytest.raises((InputError, ModelPackageError), match="rs_deep:segment_instances"):
        detect(raster, seg_model, device="cpu")
    assert not (tmp_path / "no.gpkg").exists()
