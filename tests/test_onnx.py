"""The optional ONNX backend: export of our packages (round trip, same probabilities as PyTorch), Deepness-style
segmentation and YOLO detection models built here with metadata_props, through the engine, processing.run and
qgis_process, and the errors for bad or unsupported files."""
import builtins
import io
import json
import os
import sqlite3
import warnings

import numpy as np
import onnx  # optional for users; pinned in requirements.txt, so the tests always have it (and onnxruntime)
import pytest
import rasterio
from rasterio.transform import from_origin

from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProject, QgsRasterLayer, QgsVectorLayer)

from rs_deep.rs_deep_plugin.engine.inference.detect import detect
from rs_deep.rs_deep_plugin.engine.errors import InputError, MissingDependency, ModelPackageError
from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
from rs_deep.rs_deep_plugin.engine.models.onnx.package import MODEL_JSON_KEY, load_onnx_package
from rs_deep.rs_deep_plugin.engine.models.onnx.runners import decode_yolo
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.inference.segment import segment

from conftest import DEMO_MODEL, ROOT, SAMPLE, make_package, write_raster

TREES_DEMO = ROOT / "resources" / "models" / "trees_demo"


def _run(alg, params):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())


def _metadata_props(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def make_onnx(path, module, shape, meta, dynamic_batch=True):
    """Export ``module`` with torch's exporter and set ``meta`` (key -> string) as metadata_props."""
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(*shape), buf, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(path))
    return path


def _water_module():
    """2 classes: 'water' where the mean of the (standardized) bands is above 0, as softmax probabilities."""
    import torch

    class Water(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=1, keepdim=True) * 10.0
            return torch.softmax(torch.cat([-m, m], dim=1), dim=1)

    return Water()


def _bright_box_module():
    """A YOLOv5-style detector: [B, 2, 6] rows (cx, cy, w, h, objectness, class score): the bounding box of
    the bright pixels (mean of the bands > 0.5), objectness 1 when there are any, and a decoy row at
    objectness 0.1 that the score threshold must drop."""
    import torch

    class BrightBox(torch.nn.Module):
        def forward(self, x):
            mask = (x.mean(dim=1) > 0.5).float()  # [B, H, W]
            cols, rows = mask.amax(dim=1), mask.amax(dim=2)  # [B, W], [B, H]
            w, h = cols.shape[1], rows.shape[1]
            x0 = torch.argmax(cols, dim=1).float()
            x1 = w - torch.argmax(torch.flip(cols, [1]), dim=1).float()
            y0 = torch.argmax(rows, dim=1).float()
            y1 = h - torch.argmax(torch.flip(rows, [1]), dim=1).float()
            obj = cols.amax(dim=1)
            one = torch.ones_like(obj)
            real = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, obj, one], dim=1)
            decoy = torch.stack([one * 10, one * 10, one * 8, one * 8, one * 0.1, one], dim=1)
            return torch.stack([real, decoy], dim=1)

    return BrightBox()


DEEPNESS_DET_META = {"model_type": '"Detector"', "class_names": "{0: 'car'}", "resolution": "50",
                     "tiles_overlap": "25", "det_conf": "0.5", "det_iou_thresh": "0.4",
                     "det_type": '"YOLO_v5_or_v7_default"'}


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory):
    return make_onnx(tmp_path_factory.mktemp("yolo") / "cars.onnx", _bright_box_module(), (1, 3, 64, 64),
                     DEEPNESS_DET_META)


@pytest.fixture
def square_raster(tmp_path):
    """200 x 150 px, 3 bands, dark (20) with one bright (200) square at columns 90..99, rows 40..49."""
    arr = np.full((3, 150, 200), 20, np.uint8)
    arr[:, 40:50, 90:100] = 200
    return write_raster(tmp_path / "square.tif", arr, transform=from_origin(500000.0, 4100000.0, 0.5, 0.5))


# --------------------------------------------------------------------------------------------
# export of our packages


def _compare(path_a, path_b, cls_a, cls_b, atol=1e-4):
    with rasterio.open(path_a) as a, rasterio.open(path_b) as b:
        pa, pb = a.read(), b.read()
    assert pa.shape == pb.shape
    assert np.abs(pa - pb).max() < atol
    with rasterio.open(cls_a) as a, rasterio.open(cls_b) as b:
        ca, cb = a.read(1), b.read(1)
    assert (ca == cb).mean() > 0.999


def test_export_unet_package_round_trip_and_same_probabilities(rgb_package, rgb_raster, tmp_path):
    out = export_onnx(rgb_package, tmp_path / "rgb.onnx")
    props = _metadata_props(out)
    assert json.loads(props["model_type"]) == "Segmentor"
    assert json.loads(props["class_names"]) == {"0": "background", "1": "building"}
    assert json.loads(props["tile_size"]) == 64 and json.loads(props["tiles_overlap"]) == 25
    assert json.loads(props["standardization_mean"]) == [0.0] * 3
    assert json.loads(props["standardization_std"]) == [1.0] * 3
    assert "resolution" not in props  # the package has no GSD
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp file left
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    torch_pkg, onnx_pkg = load_package(rgb_package), load_package(out, task="segmentation")
    assert onnx_pkg.backend == "onnx" and onnx_pkg.metadata == torch_pkg.metadata
    for attr in ("name", "task", "bands", "value_scaling", "classes", "tile_size", "overlap", "gsd", "builder",
                 "activation", "weights_sha256"):
        assert getattr(onnx_pkg, attr) == getattr(torch_pkg, attr), attr
    # the same raster through PyTorch and onnxruntime (batch 3: the dynamic batch axis)
    a = segment(rgb_raster, out, tmp_path / "o.tif", probabilities=tmp_path / "po.tif", batch_size=3, device="cpu")
    b = segment(rgb_raster, rgb_package, tmp_path / "t.tif", probabilities=tmp_path / "pt.tif", batch_size=3,
                device="cpu")
    assert a.tiles_run == b.tiles_run > 1 and a.class_pixels == pytest.approx(b.class_pixels, rel=1e-3)
    _compare(tmp_path / "po.tif", tmp_path / "pt.tif", tmp_path / "o.tif", tmp_path / "t.tif")
    # a fixed-size model refuses another tile size, clearly
    with pytest.raises(InputError, match="exactly 64 px"):
        segment(rgb_raster, out, tmp_path / "x.tif", tile_size=96, overlap=0, device="cpu")
    assert not (tmp_path / "x.tif").exists()


def test_export_buildings_demo_matches_pytorch(tmp_path):
    out = export_onnx(DEMO_MODEL, tmp_path / "buildings.onnx")
    props = _metadata_props(out)
    assert json.loads(props["resolution"]) == pytest.approx(50.0)  # 0.5 m in cm
    scaling = json.loads((DEMO_MODEL / "model.json").read_text())["properties"]["mlm:input"][0]["value_scaling"][0]
    lo, hi = scaling["minimum"], scaling["maximum"]  # the package's min-max scaling, as Deepness reads it
    assert json.loads(props["standardization_mean"])[0] == pytest.approx(lo / 255)
    assert json.loads(props["standardization_std"])[0] == pytest.approx((hi - lo) / 255)
    assert json.loads(props[MODEL_JSON_KEY])["properties"]["mlm:name"] == "buildings_demo"
    # the decoder's upsampling as constant scales (the U-Net's skip sizes, fixed by the tile size), so onnxruntime
    # keeps it in its blocked layout; nothing is left of the shape arithmetic torch exported for it
    graph = onnx.load(str(out)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 5 and all(constants[n.input[2]].tolist() == [1, 1, 2, 2] for n in resizes)
    assert not [n for n in graph.node if n.op_type in ("Shape", "Gather")]
    a = segment(SAMPLE, out, tmp_path / "o.tif", probabilities=tmp_path / "po.tif", device="cpu")
    b = segment(SAMPLE, DEMO_MODEL, tmp_path / "t.tif", probabilities=tmp_path / "pt.tif", device="cpu")
    assert a.class_pixels[1] > 1000  # buildings found
    _compare(tmp_path / "po.tif", tmp_path / "pt.tif", tmp_path / "o.tif", tmp_path / "t.tif")


def test_exported_file_reads_like_deepness_would(rgb_package, tmp_path):
    """Without rs_deep:model_json, the Deepness keys alone give the same package settings."""
    out = export_onnx(rgb_package, tmp_path / "rgb.onnx")
    proto = onnx.load(str(out))
    keep = [p for p in proto.metadata_props if not p.key.startswith("rs_deep:")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    pkg = load_onnx_package(tmp_path / "plain.onnx")
    ours = load_package(rgb_package)
    assert pkg.task == "segmentation" and pkg.tile_size == 64 and pkg.overlap == 16 and pkg.gsd is None
    assert [c.name for c in pkg.classes] == ["background", "building"]
    assert pkg.value_scaling == [{"type": "z-score", "mean": 0.0, "stddev": 255.0}] * 3
    assert pkg.output_kind == "auto"
    data = np.random.default_rng(0).integers(0, 255, (2, 3, 64, 64)).astype(np.float32) / 255
    from rs_deep.rs_deep_plugin.engine.models.runners import ModelRunner, select_device
    expected = ModelRunner(ours.load_model(), select_device("cpu"), ours.activation)(data)
    got = pkg.make_runner(select_device("cpu"))(data)
    assert np.abs(got - expected).max() < 1e-4


def test_export_errors(tmp_path, provider):
    import torch
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.package import ModelClass, save_package
    builder = dict(library="rs_deep", architecture="SiameseUnet", encoder="resnet18", in_channels=3, classes=2,
                   encoder_weights=None, params={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    torch.manual_seed(0)
    save_package(build_model(builder), tmp_path / "chg", name="chg", task="change", bands=["r", "g", "b"],
                 classes=[ModelClass(0, "no change", "000000"), ModelClass(1, "change", "E31A1C")], builder=builder,
                 tile_size=64, overlap=16, gsd=None, description="test change model",
                 value_scaling=[{"type": "min-max", "minimum": 0, "maximum": 255}], extra={"rs_deep:dates": 2})
    with pytest.raises(InputError, match="segmentation and detection packages"):
        export_onnx(tmp_path / "chg", tmp_path / "chg.onnx")
    with pytest.raises(InputError, match=r"\.onnx"):
        export_onnx(DEMO_MODEL, tmp_path / "model.bin")
    export_onnx(DEMO_MODEL, tmp_path / "b.onnx")
    with pytest.raises(QgsProcessingException, match="already an ONNX model"):
        _run("rs_deep:export_onnx", {"INPUT": str(tmp_path / "b.onnx"), "OUTPUT": str(tmp_path / "t.onnx")})
    assert not (tmp_path / "chg.onnx").exists() and not (tmp_path / "t.onnx").exists()


def test_export_tree_detector_gives_the_same_boxes(provider, tmp_path):
    """The bundled CenterNet tree detector through ONNX (YOLO v5-style rows) finds the same trees on real NEON
    imagery as PyTorch: same count, each box within 0.05 px and its score within 1e-4."""
    from conftest import TREES_IMAGE
    image = TREES_IMAGE
    res = _run("rs_deep:export_onnx", {"INPUT": "trees_demo", "OUTPUT": str(tmp_path / "trees.onnx")})
    props = _metadata_props(res["OUTPUT"])
    assert json.loads(props["model_type"]) == "Detector" and json.loads(props["det_type"]) == "YOLO_v5_or_v7_default"
    assert json.loads(props["class_names"]) == {"0": "tree"}
    assert json.loads(props["resolution"]) == pytest.approx(20.0)  # 0.2 m in cm
    ours = load_package(TREES_DEMO)
    assert json.loads(props["det_conf"]) == pytest.approx(ours.metadata["properties"]["rs_deep:score_threshold"])
    a = detect(image, res["OUTPUT"], device="cpu")
    b = detect(image, TREES_DEMO, device="cpu")
    assert len(b.detections) > 10 and len(a.detections) == len(b.detections)
    boxes_a = np.array([(d.xmin, d.ymin, d.xmax, d.ymax) for d in a.detections])
    for db in b.detections:
        gap = np.abs(boxes_a - np.array([db.xmin, db.ymin, db.xmax, db.ymax])).max(axis=1)
        da = a.detections[int(gap.argmin())]
        assert gap.min() < 0.05 * 0.2  # map units: 0.05 px of 0.2 m
        assert abs(da.score - db.score) < 1e-4 and da.class_name == db.class_name
    # and through rs_deep:detect: the same number of features
    out = _run("rs_deep:detect", {"INPUT": str(image), "MODEL": res["OUTPUT"], "OUTPUT": str(tmp_path / "o.gpkg"),
                                  "DEVICE": 1})
    layer = QgsVectorLayer(out["OUTPUT"], "o")
    assert layer.featureCount() == len(b.detections)
    del layer


def test_export_algorithm_processing_run(provider, tmp_path):
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:export_onnx")
    assert alg is not None and "ONNX" in alg.shortHelpString()
    assert all(p.help() and p.description() for p in alg.parameterDefinitions())
    res = _run("rs_deep:export_onnx", {"INPUT": "buildings_demo", "OUTPUT": str(tmp_path / "b.onnx")})
    assert res["OUTPUT"] == str(tmp_path / "b.onnx")
    pkg = load_package(res["OUTPUT"], task="segmentation")
    assert pkg.name == "buildings_demo" and pkg.tile_size == 512


def test_export_algorithm_qgis_process(rgb_package, tmp_path):
    from qgis_env import run_qgis_process
    out = tmp_path / "q.onnx"
    proc = run_qgis_process(["run", "rs_deep:export_onnx", "--json", "--", f"INPUT={rgb_package}", f"OUTPUT={out}"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT"] == str(out)
    assert json.loads(_metadata_props(out)["model_type"]) == "Segmentor"
    assert load_package(out).metadata == load_package(rgb_package).metadata


# --------------------------------------------------------------------------------------------
# Deepness-style models made here


def test_deepness_segmentor_through_processing(provider, rgb_raster, tmp_path):
    with rasterio.open(rgb_raster) as ds:
        arr = ds.read().astype(np.float64)
        gsd_cm = ds.transform.a * 100
    path = make_onnx(tmp_path / "water.onnx", _water_module(), (1, 3, 64, 64),
                     {"model_type": '"Segmentor"', "class_names": "{0: 'background', 1: 'water'}",
                      "resolution": json.dumps(gsd_cm), "tiles_overlap": "25",
                      "standardization_mean": "[0.5, 0.5, 0.5]", "standardization_std": "[0.25, 0.25, 0.25]"},
                     dynamic_batch=False)  # batch fixed at 1, as many Deepness models are
    pkg = load_package(path, task="segmentation")
    assert pkg.fixed_batch == 1 and pkg.tile_size == 64 and pkg.overlap == 16
    assert pkg.gsd == pytest.approx(gsd_cm / 100)
    assert pkg.value_scaling[0] == {"type": "z-score", "mean": 127.5, "stddev": 63.75}
    out, probs = tmp_path / "w.tif", tmp_path / "wp.tif"
    res = _run("rs_deep:segment", {"INPUT": str(rgb_raster), "MODEL": str(path), "OUTPUT": str(out),
                                   "PROBABILITIES": str(probs), "BATCH_SIZE": 3})
    assert res["OUTPUT"] == str(out)
    layer = QgsRasterLayer(str(out), "w")
    assert layer.isValid() and {c.value: c.label for c in layer.renderer().classes()} == \
        {0: "background", 1: "water"}
    with rasterio.open(out) as ds:
        cls = ds.read(1)
    valid = (arr != 0).any(axis=0)  # nodata is 0 in every band
    expected = (arr.mean(axis=0) > 127.5).astype(np.uint8)
    assert (cls[~valid] == 255).all()
    assert (cls[valid] == expected[valid]).mean() > 0.999
    assert 0 < expected[valid].mean() < 1  # both classes present


def test_yolo_detector_engine_and_processing(yolo_onnx, square_raster, provider, tmp_path):
    pkg = load_package(yolo_onnx, task="detection")
    assert pkg.det_type == "YOLO_v5_or_v7_default" and [c.name for c in pkg.classes] == ["car"]
    assert pkg.tile_size == 64 and pkg.overlap == 16 and pkg.gsd == 0.5
    res = detect(square_raster, yolo_onnx, device="cpu", batch_size=4)
    assert res.score_threshold == 0.5 and res.iou_threshold == 0.4  # det_conf, det_iou_thresh
    assert res.tiles_run > 4 and res.raw_detections > 1  # several tiles saw (part of) the square
    assert len(res) == 1
    d = res.detections[0]
    assert (d.class_id, d.class_name, d.score) == (0, "car", 1.0)
    assert d.box == pytest.approx((500045.0, 4099975.0, 500050.0, 4099980.0))
    out = tmp_path / "cars.gpkg"
    r = _run("rs_deep:detect", {"INPUT": str(square_raster), "MODEL": str(yolo_onnx), "OUTPUT": str(out)})
    layer = QgsVectorLayer(r["OUTPUT"], "cars")
    assert layer.isValid() and layer.featureCount() == 1
    f = next(layer.getFeatures())
    assert f["class_name"] == "car"
    bb = f.geometry().boundingBox()
    assert (bb.xMinimum(), bb.yMinimum(), bb.xMaximum(), bb.yMaximum()) == \
        pytest.approx((500045.0, 4099975.0, 500050.0, 4099980.0))
    # the same model on an image without a bright square finds nothing
    dark = write_raster(tmp_path / "dark.tif", np.full((3, 100, 100), 20, np.uint8))
    assert len(detect(dark, yolo_onnx, device="cpu")) == 0


def test_decode_yolo_layouts():
    # v5/v7: objectness is the score; v6: the best class score; Ultralytics: [4 + C, N], no objectness
    rows = np.array([[10, 10, 4, 4, 0.9, 0.2, 0.8],  # class 1
                     [11, 10, 4, 4, 0.8, 0.1, 0.9],  # overlaps the first, same class -> suppressed
                     [11, 10, 4, 4, 0.7, 0.9, 0.1],  # same place, other class -> kept (class-wise NMS)
                     [30, 30, 2, 6, 0.2, 0.9, 0.1]])  # below the score threshold for v5
    boxes, labels, scores = decode_yolo(rows, "YOLO_v5_or_v7_default", 0.5, 0.3, 100)
    assert labels.tolist() == [1, 0] and scores.tolist() == [0.9, 0.7]
    assert boxes[0].tolist() == [8, 8, 12, 12]
    boxes, labels, scores = decode_yolo(rows, "YOLO_v6", 0.5, 0.3, 100)
    assert scores.tolist() == [0.9, 0.9, 0.9] and sorted(labels.tolist()) == [0, 0, 1]
    ultra = np.array([[10, 30], [10, 30], [4, 2], [6, 6], [0.1, 0.7], [0.6, 0.2]])  # [4 + 2, N = 2]
    boxes, labels, scores = decode_yolo(ultra, "YOLO_Ultralytics", 0.5, 0.5, 100)
    assert labels.tolist() == [0, 1] and scores.tolist() == [0.7, 0.6]
    assert boxes.tolist() == [[29, 27, 31, 33], [8, 7, 12, 13]]
    boxes, labels, scores = decode_yolo(rows, "YOLO_v5_or_v7_default", 0.0, 0.3, 1)  # max_detections
    assert len(boxes) == 1


# --------------------------------------------------------------------------------------------
# bad input


def test_corrupt_onnx(tmp_path, provider, rgb_raster):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ModelPackageError, match="not a valid ONNX"):
        load_package(bad)
    with pytest.raises(QgsProcessingException, match="not a valid ONNX"):
        _run("rs_deep:segment", {"INPUT": str(rgb_raster), "MODEL": str(bad), "OUTPUT": str(tmp_path / "c.tif")})
    with pytest.raises(ModelPackageError, match="not found"):
        load_package(tmp_path / "missing.onnx")


def test_external_data_is_refused(tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data
    src = make_onnx(tmp_path / "m.onnx", _bright_box_module(), (1, 3, 64, 64), DEEPNESS_DET_META)
    import torch
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    make_onnx(src, torch.nn.Sequential(conv, torch.nn.Softmax(dim=1)), (1, 3, 64, 64),
              {"model_type": '"Segmentor"'})
    proto = onnx.load(str(src))
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    onnx.save(proto, str(ext_dir / "m.onnx"))
    assert (ext_dir / "weights.bin").exists()
    with pytest.raises(ModelPackageError, match="external-data"):
        load_package(ext_dir / "m.onnx")


def test_unknown_and_unsupported_model_types(tmp_path):
    import torch
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Softmax(dim=1))
    for model_type, message in (('"Classifier"', "runs 'Segmentor'"), ('"Recognition"', "Recognition model"),
                                ('"Superresolution"', "cannot tell how many times finer the super-resolution")):
        path = make_onnx(tmp_path / "m.onnx", net, (1, 3, 32, 32), {"model_type": model_type})
        with pytest.raises(ModelPackageError, match=message):
            load_package(path)
    # a regressor runs with rs_deep:predict_raster (tests/test_predict_raster.py), not as a segmentation model
    path = make_onnx(tmp_path / "r.onnx", net, (1, 3, 32, 32), {"model_type": '"Regressor"'})
    assert load_package(path).task == "regression"
    with pytest.raises(ModelPackageError, match=r"this is a regression model; this tool needs a segmentation model "
                                                r"\(regression models run with rs_deep:predict_raster\)"):
        load_package(path, task="segmentation")
    # a YOLO segmentation model has a second output, the mask prototypes (tests/test_yolo_seg_obb.py runs them)
    path = make_onnx(tmp_path / "seg.onnx", _bright_box_module(), (1, 3, 64, 64),
                     dict(DEEPNESS_DET_META, det_type='"YOLO_Ultralytics_segmentation"'))
    with pytest.raises(ModelPackageError, match="YOLO_Ultralytics_segmentation model has two outputs"):
        load_package(path)
    path = make_onnx(tmp_path / "det.onnx", _bright_box_module(), (1, 3, 64, 64),
                     dict(DEEPNESS_DET_META, det_type='"YOLO_v12"'))
    with pytest.raises(ModelPackageError, match="'det_type' 'YOLO_v12' is unknown"):
        load_package(path)
    path = make_onnx(tmp_path / "names.onnx", net, (1, 3, 32, 32),
                     {"model_type": '"Segmentor"', "class_names": "{0: 'a', 1: 'b', 2: 'c'}"})
    with pytest.raises(ModelPackageError, match="3 classes but the model outputs 2"):
        load_package(path)
    path = make_onnx(tmp_path / "seg2.onnx", net, (1, 3, 32, 32), {"model_type": '"Segmentor"'})
    with pytest.raises(ModelPackageError, match="this tool needs a detection model"):
        load_package(path, task="detection")


def test_missing_onnxruntime_gives_a_clear_message(yolo_onnx, square_raster, provider, monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(MissingDependency, match=r"pip install onnxruntime==1\.32\.0"):
        load_package(yolo_onnx)
    with pytest.raises(QgsProcessingException, match="onnxruntime"):
        _run("rs_deep:detect", {"INPUT": str(square_raster), "MODEL": str(yolo_onnx),
                                "OUTPUT": str(tmp_path / "x.gpkg")})
    # packages keep working without it
    pkg = load_package(DEMO_MODEL)
    assert pkg.task == "segmentation"


def test_export_encoder_as_embedding_model_finds_buildings_on_an_unseen_area(provider, tmp_path):
    """rs_deep:export_onnx EMBEDDING: buildings_demo's encoder as a Deepness 'Recognition' model (the mean features
    of its three deepest stages, each of length 1, side by side, as PyTorch computes them). On the right 35 % of the sample, which the package never saw,
    rs_deep:find_similar with each building patch as the query ranks building patches first far more often than the
    same network with random weights, and more than a random ranking (tools/eval_similar.py, 64-px patches)."""
    import torch
    import eval_similar
    out = tmp_path / "emb.onnx"
    res = _run("rs_deep:export_onnx", {"INPUT": "buildings_demo", "OUTPUT": str(out), "EMBEDDING": True,
                                       "PATCH_SIZE": 64})
    pkg = load_package(res["OUTPUT"], task="recognition")
    assert (pkg.tile_size, pkg.gsd, pkg.builder["classes"], pkg.overlap) == (64, 0.5, 1280 + 96 + 32, 0)
    assert MODEL_JSON_KEY not in pkg.onnx_metadata
    demo = load_package(str(DEMO_MODEL))
    with rasterio.open(SAMPLE) as ds:
        tile = ds.read(1, window=rasterio.windows.Window(420, 300, 64, 64)).astype(np.float32)
    s = demo.value_scaling[0]
    x = (tile - s["minimum"]) / (s["maximum"] - s["minimum"]) if s["type"] == "min-max" else \
        (tile - s["mean"]) / s["stddev"]
    with torch.no_grad():
        feats = demo.load_model().float().eval().encoder(torch.from_numpy(x[None, None]))
        want = torch.cat([f.mean(dim=(2, 3)) / f.mean(dim=(2, 3)).norm() for f in feats[:-4:-1]], dim=1)
    got = pkg.make_runner(None)(x[None, None])
    assert np.allclose(got, want.numpy(), atol=1e-4)
    with pytest.raises(InputError, match="multiple of 32"):
        export_onnx(str(DEMO_MODEL), tmp_path / "x.onnx", embedding=True, patch_size=50)
    with pytest.raises(InputError, match="detection model; an embedding model is exported from a segmentation"):
        export_onnx(str(TREES_DEMO), tmp_path / "x.onnx", embedding=True)
    assert not (tmp_path / "x.onnx").exists()
    region, bounds = eval_similar.held_out(str(SAMPLE))
    share = eval_similar.building_share(str(SAMPLE), region, 64)
    random = export_onnx(eval_similar.random_copy(str(DEMO_MODEL), tmp_path / "random"), tmp_path / "random.onnx",
                         embedding=True, patch_size=64)
    trained = eval_similar.score(str(out), str(SAMPLE), region, bounds, 64, share, 0.05)
    control = eval_similar.score(random, str(SAMPLE), region, bounds, 64, share, 0.05)
    assert trained["queries"] == control["queries"] >= 10
    assert trained["average_precision"] > control["average_precision"] + 0.1
    assert trained["average_precision"] > trained["base_rate"]
