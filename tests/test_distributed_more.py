"""The Dask backend for rs_deep:predict_raster (regression, super-resolution) and rs_deep:segment_instances, on a
real LocalCluster of 2 worker processes: the same values (float32, exactly) and the same polygons, scores and
classes as one process; cancel; rs_deep:predict_raster through Processing with CLUSTER=local:2."""
import os

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import Cancelled
from rs_deep.rs_deep_plugin.engine.inference.instances import segment_instances
from rs_deep.rs_deep_plugin.engine.inference.predict import predict_raster
from rs_deep.rs_deep_plugin.engine.inference.tiling import TileGrid

from conftest import ATLANTA_IMAGE
from test_distributed import cluster  # noqa: F401 (a fixture: a LocalCluster of 2 worker processes)
from test_instances import trained_on_atlanta  # noqa: F401 (a fixture: a Mask R-CNN trained through Processing)
from test_predict_raster import FOTOMAP, REG, SR, cover_package  # noqa: F401 (a fixture: a regression package)
from test_yolo_seg_obb import obb_model, obb_raster, seg_model, seg_raster  # noqa: F401 (fixtures: YOLO ONNX models)

REGRESSION = REG / "dummy_regression_model.onnx"  # Deepness's: a vegetation index per pixel, 512 px tiles
# the top-left 300 x ~260 px of the Deepness test raster (2 cm, EPSG:32633)
SR_BOUNDS = (638838.70, 5802599.73, 638844.70, 5802604.93)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile


def _top_left(size):
    """The map bounds of the top-left ``size`` x ``size`` px of the Atlanta sample."""
    with rasterio.open(ATLANTA_IMAGE) as ds:
        (x0, y1), (x1, y0) = ds.xy(0, 0, offset="ul"), ds.xy(size, size, offset="ul")
    return x0, y0, x1, y1


def _same_raster(a, b):
    (va, pa), (vb, pb) = _read(a), _read(b)
    assert va.dtype == vb.dtype and va.shape == vb.shape
    assert (va == vb).all()  # value for value: the same tiles blended in the same order with the same weights
    for key in ("transform", "crs", "nodata", "dtype", "width", "height", "count"):
        assert pa[key] == pb[key], key
    return va


def _same_prediction(one, many):
    assert (many.width, many.height, many.scale, many.dtype) == (one.width, one.height, one.scale, one.dtype)
    assert many.valid_pixels == one.valid_pixels and many.tiles == one.tiles
    for a, b in zip(many.statistics, one.statistics):
        assert (a["min"], a["max"]) == (b["min"], b["max"])
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-12)  # float64 sums of the same values, other grouping


def test_regression_equals_one_process(cluster, tmp_path):  # noqa: F811 (fixture)
    kw = dict(gsd=0.02, overlap=128, value_scale=2.0)  # 1243 x 841 px in 6 tiles of 512 px (2 rows), 2 blocks
    one = predict_raster(FOTOMAP, REGRESSION, tmp_path / "one.tif", **kw)
    many = predict_raster(FOTOMAP, REGRESSION, tmp_path / "many.tif", cluster=cluster, block_size=300, **kw)
    assert one.tiles == 6 and many.tiles_run == one.tiles_run  # 2 blocks of one tile row: each tile run once
    values = _same_raster(one.output, many.output)
    _same_prediction(one, many)
    assert (values != one.nodata).mean() > 0.9 and np.nanstd(values[values != one.nodata]) > 0
    assert sorted(os.listdir(tmp_path)) == ["many.tif", "one.tif"]


def test_torch_regression_package_equals_one_process(cluster, cover_package, tmp_path):  # noqa: F811 (fixture)
    """Our own package (a network trained through rs_deep:train): its value scale and offset applied here. torch's
    CPU convolution rounds a batch of one tile differently from a batch of several, and a block batches its own
    tiles (a tile alone in its batch in one run may share one in the other): the values agree to that rounding, the
    one a run in one process shows between two batch sizes."""
    kw = dict(bounds=_top_left(320), tile_size=128, overlap=32, batch_size=4)
    one = predict_raster(ATLANTA_IMAGE, cover_package["OUTPUT"], tmp_path / "one.tif", **kw)
    many = predict_raster(ATLANTA_IMAGE, cover_package["OUTPUT"], tmp_path / "many.tif", cluster=cluster,
                          block_size=128, **kw)
    alone = predict_raster(ATLANTA_IMAGE, cover_package["OUTPUT"], tmp_path / "alone.tif", **dict(kw, batch_size=1))
    assert (one.width, one.height) == (320, 320) and many.tiles_run == one.tiles_run
    (v1, p1), (vm, pm), (va, _) = _read(one.output), _read(many.output), _read(alone.output)
    assert pm == p1 and (vm == one.nodata).sum() == (v1 == one.nodata).sum() == 0
    rounding = np.abs(va - v1).max()  # one process, batches of 1 against batches of 4
    assert 0 < rounding < 1e-4 * np.abs(v1).max()
    np.testing.assert_allclose(vm, v1, rtol=0, atol=2 * rounding)
    assert many.valid_pixels == one.valid_pixels == 320 * 320


def test_super_resolution_equals_one_process(cluster, tmp_path):  # noqa: F811 (fixture)
    kw = dict(bounds=SR_BOUNDS, tile_size=64, overlap=16)
    one = predict_raster(FOTOMAP, SR, tmp_path / "one.tif", **kw)
    many = predict_raster(FOTOMAP, SR, tmp_path / "many.tif", cluster=cluster, block_size=100, **kw)
    assert (one.scale, one.width) == (2, 600) and many.tiles_run == one.tiles_run
    values = _same_raster(one.output, many.output)
    _same_prediction(one, many)
    assert values.std() > 0


def test_predict_raster_cancel_leaves_nothing(cluster, tmp_path):  # noqa: F811 (fixture)
    seen = []
    with pytest.raises(Cancelled):
        predict_raster(FOTOMAP, SR, tmp_path / "sr.tif", bounds=SR_BOUNDS, tile_size=64, overlap=16,
                       cluster=cluster, block_size=100, progress=lambda f, m=None: seen.append(f or 0),
                       is_cancelled=lambda: any(f > 0 for f in seen))
    assert os.listdir(tmp_path) == []


def test_predict_raster_through_processing_with_local_cluster(provider, tmp_path):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    xmin, ymin, _, ymax = SR_BOUNDS
    params = {"INPUT": str(FOTOMAP), "MODEL": str(SR), "TILE_SIZE": 64, "OVERLAP": 16,  # 600 x 260 px: 2 blocks
              "EXTENT": f"{xmin},{xmin + 12},{ymin},{ymax} [EPSG:32633]"}
    one = processing.run("rs_deep:predict_raster", dict(params, OUTPUT=str(tmp_path / "one.tif")), context=context,
                         feedback=QgsProcessingFeedback())
    logs = []
    feedback = QgsProcessingFeedback()
    feedback.pushInfo = logs.append
    many = processing.run("rs_deep:predict_raster", dict(params, OUTPUT=str(tmp_path / "many.tif"),
                                                         CLUSTER="local:2", CLUSTER_BLOCK=256),
                          context=context, feedback=feedback)
    assert any("LocalCluster of 2 processes" in m for m in logs), logs
    assert _same_raster(one["OUTPUT"], many["OUTPUT"]).shape == (3, 522, 1200)


# -- instance segmentation -------------------------------------------------------------------------------------------

def test_instances_equal_one_process(cluster, trained_on_atlanta):  # noqa: F811 (fixture)
    model = trained_on_atlanta["OUTPUT"]
    kw = dict(bounds=_top_left(320), tile_size=128, overlap=32, score_threshold=0.0, max_detections=20)
    one = segment_instances(ATLANTA_IMAGE, model, **kw)
    many = segment_instances(ATLANTA_IMAGE, model, cluster=cluster, block_size=128, **kw)
    assert one.region == many.region == (0, 0, 320, 320)
    assert len(TileGrid(0, 0, 320, 320, 128, 32).blocks(128)) == 4  # each tile in one block: run once
    assert len(one) > 5 and one.raw_instances > len(one)  # objects on the tiles' borders were merged
    assert (many.tiles, many.tiles_run, many.raw_instances) == (one.tiles, one.tiles_run, one.raw_instances)
    assert [(d.class_id, d.class_name) for d in many] == [(d.class_id, d.class_name) for d in one]
    # torch's CPU convolution rounds a tile alone in its batch, or on another thread count, a little differently
    # (the workers batch their own block's tiles, on 1 thread): the same objects to float rounding
    np.testing.assert_allclose([d.score for d in many], [d.score for d in one], rtol=0, atol=1e-5)
    for a, b in zip(many, one):
        assert a.polygon.symmetric_difference(b.polygon).area <= 0.02 * b.polygon.area
    np.testing.assert_allclose([d.area_m2 for d in many], [d.area_m2 for d in one], rtol=0.02)
    assert many.device.startswith("Dask cluster")


def test_instances_cancel(cluster, trained_on_atlanta):  # noqa: F811 (fixture)
    seen = []
    with pytest.raises(Cancelled):
        segment_instances(ATLANTA_IMAGE, trained_on_atlanta["OUTPUT"], bounds=_top_left(320), tile_size=128,
                          overlap=32, cluster=cluster, block_size=128, progress=lambda f, m=None: seen.append(f or 0),
                          is_cancelled=lambda: any(f > 0 for f in seen))
    assert 0 < max(seen) < 0.97  # stopped while blocks were running


def test_yolo_onnx_models_on_the_cluster_equal_one_process(cluster, obb_model, obb_raster, seg_model,  # noqa: F811
                                                           seg_raster):
    """Deepness YOLO OBB (rotated boxes, rs_deep:detect) and YOLO-seg (polygons, rs_deep:segment_instances) ONNX
    models: the workers run onnxruntime, the client merges: the same objects as one process."""
    from rs_deep.rs_deep_plugin.engine.inference.detect import detect
    raster, _ = obb_raster
    one = detect(raster, obb_model, device="cpu", batch_size=4)
    many = detect(raster, obb_model, device="cpu", batch_size=4, cluster=cluster, block_size=128)
    assert len(one) == len(many) == 2 and many.raw_detections == one.raw_detections == 3
    assert [d.class_id for d in many] == [d.class_id for d in one]
    np.testing.assert_allclose([d.polygon for d in many], [d.polygon for d in one], atol=1e-6)
    raster, _, _ = seg_raster
    one = segment_instances(raster, seg_model, device="cpu", batch_size=4)
    many = segment_instances(raster, seg_model, device="cpu", batch_size=4, cluster=cluster, block_size=128)
    assert len(one) == len(many) == 2 and many.device.startswith("Dask cluster")
    assert [(d.class_id, d.score) for d in many] == [(d.class_id, d.score) for d in one]
    assert [d.polygon.wkb for d in many] == [d.polygon.wkb for d in one]
