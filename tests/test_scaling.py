"""Per-input value scaling (a package's rs_deep:input_percentiles): every input scaled by its own 1st..99th
percentiles, on the real Atlanta sample made darker, on a change pair, on a Dask cluster, and in training."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.geo.pair import PairReader
from rs_deep.rs_deep_plugin.engine.geo.raster import (FULL_READ_PIXELS, RasterReader, input_value_scaling,
                                                      sample_windows)
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.training.data import compute_value_scaling, read_image

from conftest import ATLANTA_EAST, ROOT, SAMPLE
from test_change import scene  # noqa: F401 (fixture)

BUILDINGS = ROOT / "resources" / "models" / "buildings_demo"
TILING = dict(tile_size=128, overlap=32)


def per_input_copy(src, dst, percentiles=(1, 99)):
    """A copy of the package folder ``src`` whose model.json asks for per-input scaling (the weights unchanged)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    meta["properties"]["rs_deep:input_percentiles"] = list(percentiles) if percentiles is not None else None
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def scaled_copy(src, dst, factor):
    """``src`` with its values multiplied by ``factor`` (a darker or brighter scene; nodata 0 kept, valid >= 1)."""
    with rasterio.open(src) as ds:
        arr, profile = ds.read(), ds.profile
    out = np.where(arr > 0, np.clip(np.round(arr * factor), 1, np.iinfo(arr.dtype).max), 0).astype(arr.dtype)
    with rasterio.open(dst, "w", **profile) as ds:
        ds.write(out)
    return dst


def classes(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.fixture(scope="module")
def per_input(tmp_path_factory):
    return per_input_copy(BUILDINGS, tmp_path_factory.mktemp("pkg") / "buildings_per_input")


@pytest.fixture(scope="module")
def darker(tmp_path_factory):
    return scaled_copy(SAMPLE, tmp_path_factory.mktemp("dark") / "atlanta_x0.7.tif", 0.7)


def test_the_package_field_is_read_and_checked(per_input, tmp_path):
    pkg = load_package(per_input)
    assert pkg.input_percentiles == (1.0, 99.0)
    assert load_package(BUILDINGS).input_percentiles is None  # packages without it keep their stored scaling
    for bad in ([99, 1], [1], [-1, 99], [1, 101], "1-99", [True, 99]):
        folder = per_input_copy(BUILDINGS, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", bad)
        with pytest.raises(ModelPackageError, match=r"rs_deep:input_percentiles: expected \[low, high\]"):
            load_package(folder)


def test_a_small_raster_is_scaled_exactly_as_training_scales_its_image():
    ds, bands, data, valid = read_image(SAMPLE, None)
    try:
        own = input_value_scaling(ds, bands, (1, 99))
    finally:
        ds.close()
    assert own == compute_value_scaling(data, valid)  # the same pixels, the same function
    with rasterio.open(SAMPLE) as src:
        arr = src.read(1)
    vals = arr[arr > 0]  # nodata 0 left out
    assert own[0]["minimum"] == pytest.approx(np.percentile(vals, 1), rel=0.01)
    assert own[0]["maximum"] == pytest.approx(np.percentile(vals, 99), rel=0.01)


def test_a_large_raster_is_sampled_in_windows_close_to_its_full_percentiles(tmp_path):
    """A raster of more than FULL_READ_PIXELS (the sample tiled 3 x 3 with its mirror images) is read in a grid of
    small windows: bounded reading, the same figures every time, within 2 % of the percentiles of every pixel."""
    with rasterio.open(SAMPLE) as ds:
        arr, profile = ds.read(1), ds.profile
    row = np.concatenate([arr, arr[:, ::-1], arr], axis=1)
    big = np.concatenate([row, row[::-1], row], axis=0)
    big = np.concatenate([big, big[:, : 2400 - big.shape[1]]], axis=1) if big.shape[1] < 2400 else big
    assert big.size > FULL_READ_PIXELS
    profile.update(width=big.shape[1], height=big.shape[0], tiled=True, blockxsize=256, blockysize=256)
    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(big, 1)
    windows = sample_windows(big.shape[1], big.shape[0])
    assert len(windows) == 256 and sum(w * h for _, _, w, h in windows) < 0.3 * big.size
    with rasterio.open(path) as ds:
        first = input_value_scaling(ds, [1], (1, 99))
        again = input_value_scaling(ds, [1], (1, 99), path)
    assert first == again
    vals = big[big > 0]
    assert first[0]["minimum"] == pytest.approx(np.percentile(vals, 1), rel=0.02)
    assert first[0]["maximum"] == pytest.approx(np.percentile(vals, 99), rel=0.02)


def test_a_darker_scene_gives_the_same_buildings_with_per_input_scaling(per_input, darker, tmp_path):
    """The bundled building model on the sample and on the sample at 70 % brightness: with its stored scaling the
    darker scene loses buildings; scaled by its own percentiles it gives the same class raster (but for pixels at a
    tie that the rounding of the darker values tips)."""
    logs = []
    runs = {}
    for name, model in (("stored", BUILDINGS), ("own", per_input)):
        for scene, path in (("as is", SAMPLE), ("darker", darker)):
            res = segment(path, model, tmp_path / f"{name}_{scene.replace(' ', '_')}.tif", log=logs.append, **TILING)
            runs[name, scene] = classes(res.output)
    agree = {n: float((runs[n, "as is"] == runs[n, "darker"]).mean()) for n in ("stored", "own")}
    buildings = {k: int((v == 1).sum()) for k, v in runs.items()}
    assert agree["own"] >= 0.995, agree
    assert agree["stored"] < agree["own"] - 0.005, agree
    assert abs(buildings["own", "darker"] - buildings["own", "as is"]) < 0.05 * buildings["own", "as is"], buildings
    assert abs(buildings["stored", "darker"] - buildings["stored", "as is"]) > 0.1 * buildings["stored", "as is"], \
        buildings
    said = [m for m in logs if m.startswith("Value scaling: the input's own 1th-99th percentiles")]
    assert len(said) == 2 and "band 1 " in said[0]  # once per per-input run, with the range it found


def test_each_date_of_a_pair_is_scaled_by_its_own_percentiles(tmp_path):
    from test_change import make_change_package
    pkg_dir = tmp_path / "change_pkg"
    make_change_package(pkg_dir, in_channels=1)
    meta = json.loads((pkg_dir / "model.json").read_text())
    meta["properties"]["rs_deep:input_percentiles"] = [1, 99]
    (pkg_dir / "model.json").write_text(json.dumps(meta))
    pkg = load_package(pkg_dir)
    before, after = ATLANTA_EAST.before, ATLANTA_EAST.after
    brighter = scaled_copy(after, tmp_path / "after_x1.3.tif", 1.3)
    reader = PairReader(before, brighter, pkg)
    try:
        for r, path in ((reader.before, before), (reader.after, brighter)):
            with rasterio.open(path) as ds:
                assert r.scaling == input_value_scaling(ds, r.bands, (1, 99))
        hi_b = [s["maximum"] for s in reader.before.scaling]
        hi_a = [s["maximum"] for s in reader.after.scaling]
        assert all(a > 1.2 * b for a, b in zip(hi_a, hi_b))  # each its own range
    finally:
        reader.close()
    stored = RasterReader(brighter, dataclasses.replace(pkg, input_percentiles=None))
    try:
        assert stored.scaling == pkg.value_scaling  # without the field: the stored scaling
    finally:
        stored.close()


def test_a_dask_cluster_gives_the_same_pixels_with_per_input_scaling(per_input, darker, tmp_path):
    res = segment(darker, per_input, tmp_path / "one.tif", **TILING)
    dask = segment(darker, per_input, tmp_path / "dask.tif", cluster="local:2", block_size=256, **TILING)
    assert (classes(dask.output) == classes(res.output)).all()


def test_training_records_the_choice(tmp_path):
    """rs_deep:train's INPUT_SCALING: segmentation packages keep the training data's scaling by default (since
    0.18.0), as with "training"; "input" scales each input by its own percentiles; a super-resolution model refuses
    per-input scaling."""
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
    from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation
    from rs_deep.rs_deep_plugin.engine.training.superres import train_super_resolution
    from conftest import ATLANTA_LABELS
    labels = read_vector_labels(ATLANTA_LABELS, class_value=1)
    tiny = dict(class_names=["background", "building"], tile_size=64, batch_size=2, steps_per_epoch=1, epochs=1,
                num_threads=2, package_tile_size=128, package_overlap=16)
    reports = {}
    for choice in (None, False, True):
        out = tmp_path / f"pkg_{choice}"
        reports[choice] = train_segmentation(SAMPLE, labels, out, input_scaling=choice, **tiny)
        meta = json.loads((out / "model.json").read_text())["properties"]
        assert meta.get("rs_deep:input_percentiles") == ([1.0, 99.0] if choice else None)
        assert load_package(out).input_percentiles == ((1.0, 99.0) if choice else None)
    assert reports[None]["input_percentiles"] is None and reports[False]["input_percentiles"] is None
    assert reports[True]["input_percentiles"] == [1.0, 99.0]
    with pytest.raises(InputError, match="super-resolution model .* cannot scale each input by its own"):
        train_super_resolution(SAMPLE, tmp_path / "sr", input_scaling=True, epochs=1, steps_per_epoch=1)
    assert not (tmp_path / "sr").exists()


def test_a_default_package_gives_the_same_values_beside_a_brighter_part_of_the_scene(provider, tmp_path):
    """rs_deep:train with its defaults on the real crop parcels of fields_denmark (Sentinel-2, 10 m): the package keeps
    its training data's scaling, so the scene with its right third brighter (as a town, bare soil or a cloud makes
    part of a scene) gives the same class probabilities on the left as the scene as it is. A copy of the package
    that scales each input by its own percentiles gives other probabilities everywhere: the brighter part moves the
    scene's 99th percentiles (what cost the held-out fields their classes with 0.14-0.17's default, README)."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    from conftest import DATA
    fields = DATA / "fields_denmark"
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    pkg = tmp_path / "crops"
    processing.run("rs_deep:train", {"INPUT": str(fields / "image.tif"), "LABELS": str(fields / "fields.gpkg"),
                                     "CLASS_FIELD": "Afgroede", "EPOCHS": 1, "STEPS_PER_EPOCH": 30, "TILE_SIZE": 64,
                                     "BATCH_SIZE": 2, "OUTPUT": str(pkg)},
                   context=context, feedback=QgsProcessingFeedback())
    assert "rs_deep:input_percentiles" not in json.loads((pkg / "model.json").read_text())["properties"]
    assert load_package(pkg).input_percentiles is None
    with rasterio.open(fields / "image.tif") as ds:
        arr, profile = ds.read(), ds.profile
    cut = arr.shape[2] * 2 // 3
    bright = arr.copy()
    bright[:, :, cut:] = np.clip(bright[:, :, cut:].astype(np.float64) * 1.6, 1, 65535).astype(arr.dtype)
    with rasterio.open(tmp_path / "brighter_right.tif", "w", **profile) as ds:
        ds.write(bright)
    left = np.s_[:, :, : cut - 128]  # no tile of 128 px that reaches the brighter part
    probs = {}
    for name, package in (("default", pkg), ("per input", per_input_copy(pkg, tmp_path / "crops_per_input"))):
        for scene in ("image", "brighter_right"):
            path = fields / "image.tif" if scene == "image" else tmp_path / "brighter_right.tif"
            out = tmp_path / f"{name.replace(' ', '_')}_{scene}.tif"
            segment(str(path), load_package(package), str(out), probabilities=str(out) + ".p.tif", **TILING)
            with rasterio.open(str(out) + ".p.tif") as ds:
                probs[name, scene] = ds.read()[left]
    assert np.array_equal(probs["default", "image"], probs["default", "brighter_right"])
    moved = np.abs(probs["per input", "image"] - probs["per input", "brighter_right"])
    assert (moved > 1e-4).mean() > 0.9 and moved.max() > 0.05, (float((moved > 1e-4).mean()), float(moved.max()))


def test_value_scaling_parameter_of_the_algorithms(provider, darker, tmp_path):
    """rs_deep:segment's VALUE_SCALING: 'input' gives the bundled building model its buildings back on the darker
    scene (as on the scene as it is), 'model' keeps the package's stored scaling; every inference algorithm has it."""
    import processing
    from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingFeedback, QgsProject
    from rs_deep.rs_deep_plugin.engine.tasks import TASKS
    for alg_id in sorted({t.algorithm for t in TASKS.values()}):
        alg = QgsApplication.processingRegistry().algorithmById(alg_id)
        assert alg is not None and alg.parameterDefinition("VALUE_SCALING") is not None, alg_id
        assert "Value scaling of the input" in alg.shortHelpString(), alg_id
    counts = {}
    for name, path, choice in (("as is", SAMPLE, "model"), ("dark model", darker, "model"),
                               ("dark input", darker, "input")):
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        feedback = QgsProcessingFeedback()
        out = tmp_path / f"{name.replace(' ', '_')}.tif"
        processing.run("rs_deep:segment", {"INPUT": str(path), "MODEL": str(BUILDINGS), "OUTPUT": str(out),
                                           "VALUE_SCALING": choice, "TILE_SIZE": 128, "OVERLAP": 32},
                       context=context, feedback=feedback)
        counts[name] = int((classes(out) == 1).sum())
    assert abs(counts["dark input"] - counts["as is"]) < 0.1 * counts["as is"], counts
    assert counts["dark model"] < 0.9 * counts["as is"], counts


def test_an_exported_model_keeps_per_input_scaling_in_rs_deep_and_says_what_other_tools_do(per_input, darker,
                                                                                           tmp_path):
    """The ONNX export of a per-input package: RS Deep reads the choice back (the same class raster on the darker
    scene as the package gives); Deepness's standardization keys hold the training data's scaling, and the export
    log says so."""
    from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
    logs = []
    path = export_onnx(per_input, tmp_path / "buildings.onnx", log=logs.append)
    onnx_pkg = load_package(path)
    assert onnx_pkg.backend == "onnx" and onnx_pkg.input_percentiles == (1.0, 99.0)
    assert onnx_pkg.value_scaling == load_package(per_input).value_scaling  # the stored one, for other tools
    assert any(m.startswith("Warning:") and "Deepness and GeoDeep apply the training data's scaling" in m
               for m in logs)
    a = segment(darker, per_input, tmp_path / "pkg.tif")  # the exported graph takes the package's 512-px tiles
    b = segment(darker, onnx_pkg, tmp_path / "onnx.tif")
    assert float((classes(a.output) == classes(b.output)).mean()) > 0.999


def test_detection_and_change_training_with_per_input_scaling(tmp_path, scene):  # noqa: F811 (fixture)
    """Detection (each image by its own percentiles) and change (each date by its own) train with input_scaling and
    their packages say so; detection refuses a given value_scaling with it."""
    from test_change import CHANGED, write_raster
    from test_detect import SMALL_BUILDER, squares_raster
    from rs_deep.rs_deep_plugin.engine.training.change import train_change
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    raster, boxes = squares_raster(tmp_path / "train.tif", size=(200, 160), n=10)
    brighter = scaled_copy(raster, tmp_path / "train_x1.4.tif", 1.4)
    samples = [DetectionSample(str(p), [b + ("car",) for b in boxes]) for p in (raster, brighter)]
    tiny = dict(class_names=["car"], builder=SMALL_BUILDER, tile_size=64, epochs=1, steps_per_epoch=1, batch_size=2,
                package_tile_size=64, package_overlap=16, num_threads=2)
    report = train_detection(samples, tmp_path / "det", input_scaling=True, **tiny)
    assert report["input_percentiles"] == [1.0, 99.0]
    assert load_package(tmp_path / "det").input_percentiles == (1.0, 99.0)
    with pytest.raises(InputError, match="value_scaling is given, but the package is to scale each input"):
        train_detection(samples, tmp_path / "det2", input_scaling=True,
                        value_scaling=[{"type": "scale", "value": 255}] * 3, **tiny)
    assert not (tmp_path / "det2").exists()
    assert train_detection(samples, tmp_path / "det3", **tiny)["input_percentiles"] is None  # detection's default

    arr, t, crs = scene
    after = (arr.astype(np.float32) * 1.3).clip(1, 255).astype(arr.dtype)  # a brighter second date
    after[:, CHANGED[0], CHANGED[1]] = 240
    label = np.zeros(arr.shape[1:], np.uint8)
    label[CHANGED] = 255
    pairs = [(str(write_raster(tmp_path / "b.tif", arr, transform=t, crs=crs)),
              str(write_raster(tmp_path / "a.tif", after, transform=t, crs=crs)),
              str(write_raster(tmp_path / "l.tif", label, transform=t, crs=crs)))]
    builder = {"library": "rs_deep", "architecture": "SiameseUnet", "encoder": "resnet18",
               "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}
    report = train_change(pairs, tmp_path / "chg", builder=builder, tile_size=64, epochs=1, steps_per_epoch=1,
                          batch_size=2, package_tile_size=64, package_overlap=8, input_scaling=True)
    assert report["input_percentiles"] == [1.0, 99.0]
    assert load_package(tmp_path / "chg", task="change").input_percentiles == (1.0, 99.0)
