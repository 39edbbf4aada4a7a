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


# -- our own regression package, trained here on real data ------------------------------------------------------------
# The target: building cover, the share of each 8 m cell (16 x 16 px) of the Atlanta sample (SpaceNet, 0.5 m) that the
# 32 footprints of tests/data/buildings_atlanta cover, rasterised at the image's 0.5 m and averaged per cell.

def building_cover(path):
    """The building-cover target raster (37 x 56 cells of 8 m, float32, nodata -1) written to ``path``."""
    from conftest import ATLANTA_IMAGE, ATLANTA_LABELS
    from eval_raster_tasks import building_cover as cover
    return cover(ATLANTA_IMAGE, ATLANTA_LABELS, path)


@pytest.fixture(scope="module")
def cover_package(provider, tmp_path_factory):
    from conftest import ATLANTA_IMAGE
    folder = tmp_path_factory.mktemp("cover")
    target = building_cover(folder / "building_cover.tif")
    res = _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "TARGET": str(target), "TASK": "regression",
                                 "ENCODER": "resnet18", "EPOCHS": 2, "STEPS_PER_EPOCH": 4, "BATCH_SIZE": 4,
                                 "TILE_SIZE": 64, "VALIDATION": 0.2, "LOSS": "mse", "DEVICE": "cpu",
                                 "OUTPUT": str(folder / "cover_model")})
    return res


def test_regression_training_writes_a_regression_package(cover_package):
    import json
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    pkg = load_package(cover_package["OUTPUT"])
    assert (pkg.task, pkg.activation, [c.name for c in pkg.classes]) == ("regression", "none", ["building_cover"])
    report = json.loads(open(cover_package["REPORT"]).read())
    best = report["best"]["metrics"]
    assert report["monitor"] == {"metric": "rmse", "mode": "min", "keep": "best"}
    assert set(best) >= {"rmse", "mae", "r2", "baseline_rmse"} and best["pixels"] > 50_000
    # the network learns the standardised cover: the package maps it back (mean and spread of the training rows)
    training = report["best"] and json.loads(open(cover_package["OUTPUT"] + "/model.json").read())["properties"][
        "rs_deep:training"]
    assert (pkg.value_offset, pkg.value_scale) == (training["target_mean"], training["target_std"])
    assert 0.02 < pkg.value_offset < 0.1 and 0.05 < pkg.value_scale < 0.3
    assert json.loads((open(cover_package["OUTPUT"] + "/model.json").read()))["properties"]["mlm:tasks"] == [
        "regression"]


def _crop_with_nodata(path):
    """A 256 x 320 px crop of the Atlanta image (nodata 0) with a 40 x 40 px block of nodata."""
    from rasterio.windows import Window
    from conftest import ATLANTA_IMAGE
    with rasterio.open(ATLANTA_IMAGE) as src:
        data = src.read(window=Window(100, 200, 320, 256))
        profile = dict(src.profile, width=320, height=256, transform=src.window_transform(Window(100, 200, 320, 256)))
    data[:, 100:140, 150:190] = 0
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
    return path


def test_regression_package_runs_back(cover_package, tmp_path):
    import torch
    from rs_deep.rs_deep_plugin.engine.geo.raster import apply_scaling
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    pkg = load_package(cover_package["OUTPUT"])
    crop = _crop_with_nodata(tmp_path / "crop.tif")
    res = _run("rs_deep:predict_raster", {"INPUT": str(crop), "MODEL": cover_package["OUTPUT"],
                                          "TILE_SIZE": 256, "OUTPUT": str(tmp_path / "cover.tif")})
    with rasterio.open(res["OUTPUT"]) as ds, rasterio.open(crop) as src:
        assert ds.transform == src.transform and (ds.width, ds.height) == (320, 256)
        assert ds.dtypes == ("float32",) and ds.nodata == VALUE_NODATA and ds.descriptions == ("building_cover",)
        ours = ds.read(1)
        raw = src.read().astype(np.float32)
    assert (ours[100:140, 150:190] == VALUE_NODATA).all()  # nodata kept
    assert (ours != VALUE_NODATA).sum() == 320 * 256 - 40 * 40
    # the model's own forward pass on the first tile (256 x 256 px at the top left), in the target's units
    tile = apply_scaling(raw[:, :256, :256].copy(), pkg.value_scaling)
    tile[:, 100:140, 150:190] = 0  # nodata is read as 0, as the reader fills it
    model = pkg.load_model().eval()
    with torch.no_grad():
        direct = model(torch.from_numpy(tile)[None])[0, 0].numpy() * pkg.value_scale + pkg.value_offset
    first = ours[:, :64]  # columns no other tile reaches (the second tile starts at column 64)
    ok = first != VALUE_NODATA
    np.testing.assert_allclose(first[ok], direct[:, :64][ok], atol=1e-4)


def test_regression_seams_are_blended(cover_package, tmp_path):
    # tiles of 256 px (overlap 64) against one tile over the whole area: the same values away from the raster's edge
    # (a network sees more context in a larger tile, so not identical; a seam would show as a jump between tiles)
    from conftest import ATLANTA_IMAGE
    bounds = (733651.0, 3724889.0, 733843.0, 3725081.0)  # 384 x 384 px inside the image
    small = predict_raster(ATLANTA_IMAGE, cover_package["OUTPUT"], tmp_path / "small.tif", bounds=bounds,
                           tile_size=256, overlap=64)
    big = predict_raster(ATLANTA_IMAGE, cover_package["OUTPUT"], tmp_path / "big.tif", bounds=bounds,
                         tile_size=384, overlap=0)
    assert (small.tiles, big.tiles) == (4, 1)
    with rasterio.open(small.output) as a, rasterio.open(big.output) as b:
        sa, sb = a.read(1)[48:-48, 48:-48], b.read(1)[48:-48, 48:-48]
    assert np.abs(sa - sb).mean() < 0.3 * sb.std()
    assert np.corrcoef(sa.ravel(), sb.ravel())[0, 1] > 0.95
    # across the seam (tiles at 0 and 128 blend over columns 128..255): no jump that the one tile has not. The image's
    # own edges step as much in both runs (the largest step, at column 317, is a roof edge in both), so a seam is
    # what the tiled run steps more than the one tile at the same column.
    step_small, step_one = (np.abs(np.diff(v, axis=1)).mean(axis=0) for v in (sa, sb))
    typical = np.median(step_one)
    assert (step_small - step_one).max() < 2 * typical
    # and a cut without blending would break that: the tiles differ from the one tile by far more in the seam zone
    assert np.abs(sa - sb)[:, 128 - 48:256 - 48].mean() > 2 * (2 * typical)


def test_qgis_process_predict_raster(cover_package, tmp_path):
    import json
    from qgis_env import run_qgis_process
    from conftest import ATLANTA_IMAGE
    out = tmp_path / "q.tif"
    proc = run_qgis_process(["run", "rs_deep:predict_raster", "--json", "--", f"INPUT={ATLANTA_IMAGE}",
                             f"MODEL={cover_package['OUTPUT']}", f"OUTPUT={out}",
                             "EXTENT=733651,733779,3724889,3725017 [EPSG:32616]"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT"] == str(out)
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.dtypes) == (256, 256, ("float32",))
        assert ds.bounds == pytest.approx((733651.0, 3724889.0, 733779.0, 3725017.0))


# -- our own super-resolution package, trained here self-supervised on the Atlanta sample --------------------------

@pytest.fixture(scope="module")
def sr_package(provider, tmp_path_factory):
    from conftest import ATLANTA_IMAGE
    folder = tmp_path_factory.mktemp("sr")
    return _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "TASK": "super_resolution", "SCALE": 2, "EPOCHS": 1,
                                  "STEPS_PER_EPOCH": 4, "BATCH_SIZE": 4, "TILE_SIZE": 64, "VALIDATION": 0.1,
                                  "DEVICE": "cpu", "OUTPUT": str(folder / "sr_model")})


def test_super_resolution_package_grid_and_values(sr_package, tmp_path):
    import json
    import torch
    from conftest import ATLANTA_IMAGE
    from rs_deep.rs_deep_plugin.engine.geo.raster import apply_scaling
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    pkg = load_package(sr_package["OUTPUT"])
    assert (pkg.task, pkg.scale, pkg.output_dtype, pkg.gsd) == ("super_resolution", 2, "uint16", None)
    best = json.loads(open(sr_package["REPORT"]).read())["best"]["metrics"]
    assert best["psnr"] > 20 and best["psnr_bicubic"] > 20  # dB, on the held-back rows
    bounds = (733651.0, 3724889.0, 733715.0, 3724953.0)  # 128 x 128 px: one 128 px tile
    res = _run("rs_deep:predict_raster", {"INPUT": str(ATLANTA_IMAGE), "MODEL": sr_package["OUTPUT"],
                                          "EXTENT": "733651,733715,3724889,3724953 [EPSG:32616]",
                                          "OUTPUT": str(tmp_path / "sr.tif")})
    with rasterio.open(res["OUTPUT"]) as ds, rasterio.open(ATLANTA_IMAGE) as src:
        assert (ds.width, ds.height, ds.dtypes, ds.nodata) == (256, 256, ("uint16",), 0)
        assert ds.bounds == pytest.approx(bounds) and ds.crs == src.crs
        assert (ds.transform.a, ds.transform.e) == (0.25, -0.25)  # 2 x finer than the 0.5 m raster
        ours = ds.read(1).astype(np.float32)
        window = src.window(*bounds)
        raw = src.read(window=window).astype(np.float32)
    with torch.no_grad():
        direct = pkg.load_model().eval()(torch.from_numpy(apply_scaling(raw, pkg.value_scaling))[None])[0, 0]
    direct = np.clip(np.rint(direct.numpy() * pkg.value_scale + pkg.value_offset), 1, 65535)
    assert np.abs(ours - direct).max() <= 1  # the model's own output, rounded to the image's 16 bits


def test_package_refusals(cover_package, sr_package, tmp_path):
    import json
    import shutil
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package

    def edited(src, name, **props):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        meta = json.loads((dst / "model.json").read_text())
        meta["properties"].update(props)
        (dst / "model.json").write_text(json.dumps(meta))
        return dst

    with pytest.raises(ModelPackageError, match="a regression model returns raw values: expected 'none', got "
                                                "'softmax'"):
        load_package(edited(cover_package["OUTPUT"], "soft", **{"rs_deep:activation": "softmax"}))
    with pytest.raises(ModelPackageError, match=r"rs_deep:scale is 3 but the network \(rs_deep:builder.params.scale\) "
                                                "upscales 2 times"):
        load_package(edited(sr_package["OUTPUT"], "x3", **{"rs_deep:scale": 3}))
    with pytest.raises(ModelPackageError, match="rs_deep:output_dtype: expected one of float32, got 'uint8'"):
        load_package(edited(cover_package["OUTPUT"], "u8", **{"rs_deep:output_dtype": "uint8"}))


def test_dock_runs_a_regression_model_with_predict_raster(cover_package, qgis_iface):
    from rs_deep.rs_deep_plugin.gui.dock import RSDeepDock
    dock = RSDeepDock(qgis_iface)
    try:
        dock.set_model(cover_package["OUTPUT"])
        assert dock.algorithm_id == "rs_deep:predict_raster"
        assert "Regression" in dock.card.text() and "cannot run" not in dock.card.text()
        assert {"OUTPUT_SCALING", "BATCH_SIZE"} <= set(dock.option_widgets)
    finally:
        dock.deleteLater()
