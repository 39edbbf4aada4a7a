"""rs_deep:predict_raster: regression and super-resolution models, Deepness's ONNX ones (its conformance cases, with
its expected values; tests/data/deepness, Apache-2.0, see ATTRIBUTION.md) and our own packages, trained here on
real data through rs_deep:train."""
import numpy as np
import pytest
import rasterio

from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.inference.predict import VALUE_NODATA, predict_raster
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.onnx.package import load_onnx_package

from conftest import DATA

DEEPNESS = DATA / "deepness"
FOTOMAP = DEEPNESS / "dummy_fotomap_small.tif"  # 1243 x 841 px at 2 cm, RGBA
REG = DEEPNESS / "regression"
SR = DEEPNESS / "dummy_superresolution_model.onnx"  # [1, 3, 64, 64] -> [1, 3, 128, 128], no metadata
DEEPNESS_GRID = (561, 829)  # the test raster on Deepness's 3 cm grid (resolution_cm_per_px=3 in its tests)


def _run(alg, params):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())


def _relabelled(src, dst, model_type):
    """A copy of the Deepness model ``src`` whose metadata_props model_type is ``model_type`` (JSON text)."""
    import onnx
    proto = onnx.load(str(src))
    for e in proto.metadata_props:
        if e.key == "model_type":
            e.value = model_type
    onnx.save(proto, str(dst))
    return dst


def _vegetation_index(shape=None):
    """What Deepness's dummy regression model computes, (2G - R - B) / (2G + R + B) of the pixels / 255, from the
    test raster (read on ``shape``, averaged, when given)."""
    from rasterio.enums import Resampling
    with rasterio.open(FOTOMAP) as ds:
        rgb = ds.read((1, 2, 3), out_shape=(3,) + shape if shape else None, resampling=Resampling.average,
                      out_dtype="float32") / 255
    r, g, b = rgb
    with np.errstate(invalid="ignore", divide="ignore"):
        return (2 * g - r - b) / (2 * g + r + b)


def _on_deepness_grid(path):
    """Band arrays of ``path`` read on Deepness's 3 cm grid (829 x 561 px)."""
    from rasterio.enums import Resampling
    with rasterio.open(path) as ds:
        return ds.read(out_shape=(ds.count,) + DEEPNESS_GRID, resampling=Resampling.bilinear)


# -- Deepness: test_map_processor_regression ------------------------------------------------------------------------
# Parameters of its tests: resolution_cm_per_px=3, tile = the model's input (512), overlap 20 %, batch 1 or 2,
# output_scaling=1.0; expected: result shape (561, 829). The dummy model computes a vegetation index per pixel.

@pytest.mark.parametrize("model, batch", [("dummy_regression_model.onnx", 1),
                                          ("dummy_regression_model_batched.onnx", 2)])
def test_deepness_regression(model, batch, provider, tmp_path):
    pkg = load_onnx_package(REG / model)
    assert pkg.task == "regression" and pkg.value_scale == 1.1  # its reg_output_scaling
    res = _run("rs_deep:predict_raster", {"INPUT": str(FOTOMAP), "MODEL": str(REG / model), "RESOLUTION": 3,
                                          "OVERLAP": 102, "BATCH_SIZE": batch, "OUTPUT_SCALING": 1.0,
                                          "OUTPUT": str(tmp_path / "vi.tif")})
    with rasterio.open(res["OUTPUT"]) as ds:
        assert (ds.count, ds.height, ds.width) == (1, 841, 1243)  # the raster's grid (Deepness: 829 x 561 at 3 cm)
        assert ds.dtypes == ("float32",)  # Deepness 0.6.5 stores 8-bit integers: every value here truncated to 0
        assert ds.nodata == VALUE_NODATA
    ours = _on_deepness_grid(res["OUTPUT"])
    assert ours.shape == (1,) + DEEPNESS_GRID  # Deepness's expected shape, read on its grid
    vi = _vegetation_index(DEEPNESS_GRID)
    ok = np.isfinite(vi)
    assert np.abs(ours[0][ok] - vi[ok]).mean() < 0.02  # the values: the index at 3 cm, mapped back to 2 cm
    assert -1.0 <= ours.min() and ours.max() <= 1.0


def test_regression_values_and_output_scaling(tmp_path):
    # at the raster's own resolution nothing is resampled: every pixel is the index, times reg_output_scaling
    out = tmp_path / "vi.tif"
    result = predict_raster(FOTOMAP, REG / "dummy_regression_model.onnx", out, gsd=0.02)
    with rasterio.open(out) as ds:
        values = ds.read(1)
    vi = _vegetation_index()
    ok = np.isfinite(vi)
    np.testing.assert_allclose(values[ok], 1.1 * vi[ok], atol=2e-5)
    assert result.statistics[0]["max"] == pytest.approx(1.1 * vi[ok].max(), abs=1e-4)
    predict_raster(FOTOMAP, REG / "dummy_regression_model.onnx", out, gsd=0.02, value_scale=1.0)
    with rasterio.open(out) as ds:
        np.testing.assert_allclose(ds.read(1)[ok], vi[ok], atol=2e-5)


# -- Deepness: test_map_processor_regression_many_output_types -------------------------------------------------------
# Expected: result shape (outputs, 561, 829) and the channel names. Two of its models say "Segmentor" in their
# metadata (its test builds a Regressor from them by hand): we relabel them "Regressor", as a user would, since
# RS Deep refuses a declared segmentation model in predict_raster. The two without metadata are taken as regressors
# because the tool asks for one.

@pytest.mark.parametrize("model, names, relabel", [
    ("one_output_sigmoid_bsx512x512.onnx", ["output"], False),
    ("one_output_sigmoid_bsx1x512x512.onnx", ["Happiness"], True),
    ("two_outputs_sigmoid_bsx512x512.onnx", ["output", "output2"], False),
    ("two_outputs_sigmoid_bsx1x512x512.onnx", ["Luck", "Failure"], True),
])
def test_deepness_regression_output_types(model, names, relabel, tmp_path):
    import onnxruntime as ort
    path = _relabelled(REG / model, tmp_path / model, '"Regressor"') if relabel else REG / model
    if relabel:  # as published: a declared segmentation model, refused
        with pytest.raises(ModelPackageError, match="this is a segmentation model"):
            load_onnx_package(REG / model, task=("regression", "super_resolution"))
    pkg = load_onnx_package(path, task=("regression", "super_resolution"))
    assert [c.name for c in pkg.classes] == names  # Deepness: get_channel_name(j, 0)
    out = tmp_path / "r.tif"
    predict_raster(FOTOMAP, pkg, out, gsd=0.03, overlap=102, batch_size=1)
    ours = _on_deepness_grid(out)
    assert ours.shape == (len(names),) + DEEPNESS_GRID
    # the first tile, at the raster's own resolution, against the model's own forward pass
    predict_raster(FOTOMAP, pkg, out, overlap=102, batch_size=1)
    with rasterio.open(FOTOMAP) as ds:
        tile = ds.read((1, 2, 3), window=((0, 512), (0, 512))).astype(np.float32)[None] / 255
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    direct = np.concatenate([o.reshape(1, -1, 512, 512)[0] for o in sess.run(None, {"input": tile})])
    with rasterio.open(out) as ds:
        assert ds.descriptions == tuple(names)
        first = ds.read(window=((0, 410), (0, 410)))  # covered by the first tile only (the next start at 410)
    np.testing.assert_allclose(first, direct[:, :410, :410], atol=1e-5)


# -- Deepness: test_map_processor_superresolution ---------------------------------------------------------------------
# Parameters: resolution_cm_per_px=3, tile 64 (the model's input), overlap 0 %, batch 1, scale_factor=2.0,
# output_scaling=1.0; expected: result shape (1120, 1656, 3), 2 x its 3 cm grid. RS Deep writes the raster's extent
# on a grid 2 x finer than the raster's own (1 cm: 2486 x 1682 px), georeferenced.

def test_deepness_superresolution(provider, tmp_path):
    pkg = load_onnx_package(SR)
    assert (pkg.task, pkg.scale, pkg.tile_size, len(pkg.classes)) == ("super_resolution", 2, 64, 3)
    res = _run("rs_deep:predict_raster", {"INPUT": str(FOTOMAP), "MODEL": str(SR), "RESOLUTION": 3, "OVERLAP": 0,
                                          "BATCH_SIZE": 1, "OUTPUT": str(tmp_path / "sr.tif")})
    with rasterio.open(FOTOMAP) as src, rasterio.open(res["OUTPUT"]) as ds:
        assert (ds.count, ds.height, ds.width) == (3, 2 * 841, 2 * 1243)
        assert ds.transform.a == pytest.approx(src.transform.a / 2) and ds.transform.e == pytest.approx(
            src.transform.e / 2)
        assert ds.bounds == pytest.approx(src.bounds) and ds.crs == src.crs
        assert ds.dtypes == ("float32",) * 3  # no data type in its metadata (Deepness 0.6.5: 8-bit, all zeros)
        sr = ds.read(out_shape=(3, 1120, 1656))  # Deepness's expected shape, read on its 1.5 cm grid
        assert sr.shape == (3, 1120, 1656) and np.isfinite(sr).all() and sr.std() > 0


def test_superresolution_tiles_are_the_models_output(tmp_path):
    # at the raster's resolution, without overlap, the output over a tile is the model's output for it
    import onnxruntime as ort
    out = tmp_path / "sr.tif"
    bounds = (638838.70, 5802602.0, 638841.26, 5802604.93)  # the top-left 128 x ~146 px
    result = predict_raster(FOTOMAP, SR, out, overlap=0, bounds=bounds)
    assert (result.width, result.scale) == (256, 2)
    with rasterio.open(FOTOMAP) as ds:
        tile = ds.read((1, 2, 3), window=((0, 64), (0, 64))).astype(np.float32)[None] / 255
    sess = ort.InferenceSession(str(SR), providers=["CPUExecutionProvider"])
    direct = sess.run(None, {"input.1": tile})[0][0]
    with rasterio.open(out) as ds:
        np.testing.assert_allclose(ds.read(window=((0, 128), (0, 128))), direct, atol=1e-5)
        assert ds.transform.c == pytest.approx(638838.70, abs=0.01)


# -- wrong task, wrong layout ------------------------------------------------------------------------------------

def test_wrong_task_is_refused(provider, rgb_package, tmp_path):
    reg = REG / "dummy_regression_model.onnx"
    with pytest.raises(InputError, match=r"is a regression model; segmentation needs a segmentation model "
                                         r"\(regression models run with rs_deep:predict_raster\)"):
        segment(FOTOMAP, reg, tmp_path / "x.tif")
    with pytest.raises(QgsProcessingException, match=r"this is a regression model; this tool needs a segmentation "
                                                     r"model \(regression models run with rs_deep:predict_raster\)"):
        _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(reg), "OUTPUT": str(tmp_path / "s.tif")})
    with pytest.raises(QgsProcessingException, match=r"this is a super_resolution model; this tool needs a detection"
                                                     r" model \(super-resolution models run with rs_deep:predict"):
        _run("rs_deep:detect", {"INPUT": str(FOTOMAP), "MODEL": str(SR), "OUTPUT": str(tmp_path / "b.gpkg")})
    seg = DEEPNESS / "segmentation" / "two_outputs_softmax_bsx2x512x512.onnx"
    for model in (seg, rgb_package):
        with pytest.raises(QgsProcessingException, match=r"this is a segmentation model; this tool needs a regression "
                                                         r"or super_resolution model \(segmentation models run with "
                                                         r"rs_deep:segment\)"):
            _run("rs_deep:predict_raster", {"INPUT": str(FOTOMAP), "MODEL": str(model),
                                            "OUTPUT": str(tmp_path / "p.tif")})
    with pytest.raises(InputError, match="is a segmentation model; regression needs a regression or super_resolution"):
        predict_raster(FOTOMAP, rgb_package, tmp_path / "p.tif")
    assert not list(tmp_path.glob("*.tif"))


def test_wrong_layout_is_refused(tmp_path):
    # a Deepness "Regression" model whose output is a vector [batch, 224] (its recognition dummy), not a map
    with pytest.raises(ModelPackageError, match=r"output 'output' is \['batch_size', 224\]: not a per-pixel output"):
        load_onnx_package(DEEPNESS / "dummy_recognition_model.onnx")
    # a super-resolution model declared as a regressor: its output is twice the input's size
    typed = _relabelled(SR, tmp_path / "sr.onnx", '"Regressor"')
    import onnx
    proto = onnx.load(str(typed))
    e = proto.metadata_props.add()
    e.key, e.value = "model_type", '"Regressor"'
    onnx.save(proto, str(typed))
    with pytest.raises(ModelPackageError, match=r"outputs are \[2.0\] times the input's size; a regression model "
                                                r"predicts on the input's grid"):
        load_onnx_package(typed)
