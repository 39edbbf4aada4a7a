"""Patch classification: engine on real files (the Sentinel-2 fields sample and the Landsat sample, both may
ship), GSD, extents, nodata, cancel, packages, reading the field register, training for seconds, and the
rs_deep:classify_patches algorithm through processing.run, the model builder and qgis_process."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import Cancelled, InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.package import ModelClass, parse_metadata, save_package
from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches

from conftest import DATA, model_output, write_raster

FIELDS = DATA / "fields_denmark"
IMAGE = FIELDS / "image.tif"  # 452 x 276 px, 10 m, EPSG:32632, UInt16
CLASSES = [ModelClass(0, "cereals", "E6C229"), ModelClass(1, "grass", "4DAF4A"), ModelClass(2, "maize", "FF7F00"),
           ModelClass(3, "other", "A6A6A6")]


def make_patch_package(path, patch=16, gsd=10.0, in_channels=3, classes=CLASSES, architecture="resnet10t",
                       scaling=None, seed=0):
    """A small untrained timm classifier package (real weights, real format)."""
    import torch
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    torch.manual_seed(seed)
    builder = dict(library="timm", architecture=architecture, in_channels=in_channels, classes=len(classes),
                   encoder_weights=None, params={})
    save_package(build_model(builder), path, name=Path(path).name, task="patch_classification",
                 bands=[f"b{i + 1}" for i in range(in_channels)], classes=classes, builder=builder, tile_size=patch,
                 overlap=0, gsd=gsd, value_scaling=scaling or [{"type": "min-max", "minimum": 300, "maximum": 2500}],
                 description="test patch classifier")
    return Path(path)


@pytest.fixture(scope="module")
def patch_package(tmp_path_factory):
    return make_patch_package(tmp_path_factory.mktemp("pc") / "patch_test")


# --------------------------------------------------------------------------------------------
# engine


def test_patches_are_squares_on_a_regular_grid(patch_package):
    res = classify_patches(str(IMAGE), str(patch_package))
    with rasterio.open(IMAGE) as ds:
        t, crs = ds.transform, ds.crs
    # 16 px patches side by side; a patch needs half of its pixels inside the raster
    assert res.patches == math.ceil(452 / 16) * math.ceil(276 / 16)
    assert len(res) == res.patches_run == 28 * 17  # 452 = 28 x 16 + 4, 276 = 17 x 16 + 4
    assert res.crs == crs and res.native_patch == 16 and res.gsd_scale == 1.0
    names = {c.name for c in CLASSES}
    for f in res:
        assert f["class_name"] in names and f["class_id"] == [c.value for c in CLASSES
                                                              if c.name == f["class_name"]][0]
        assert len(f["top"]) == 3 and f["top"][0][2] == f["score"]
        assert f["top"][0][2] >= f["top"][1][2] >= f["top"][2][2] and sum(s for _, _, s in f["top"]) <= 1 + 1e-6
    first = res.features[0]
    assert first["geometry"].bounds == pytest.approx((t.c, t.f - 160, t.c + 160, t.f))
    areas = {round(f["geometry"].area) for f in res}
    assert areas == {160 * 160}
    assert sum(res.class_counts().values()) == len(res)


def test_stride_extent_and_clipping(patch_package):
    with rasterio.open(IMAGE) as ds:
        t = ds.transform
    x0, y0 = t * (100, 50)
    x1, y1 = t * (180, 110)  # 80 x 60 px
    res = classify_patches(str(IMAGE), str(patch_package), bounds=(x0, y1, x1, y0), stride=8)
    assert res.native_stride == 8 and (res.width, res.height) == (80, 60)
    for f in res:
        minx, miny, maxx, maxy = f["geometry"].bounds
        assert x0 - 1e-6 <= minx and maxx <= x1 + 1e-6 and y1 - 1e-6 <= miny and maxy <= y0 + 1e-6
    # rows 50, 58, ...: a patch starting at row 98 keeps 12 of 16 rows inside (kept), at 106 only 4 (dropped)
    starts = sorted({f["window"][1] for f in res})
    assert starts == list(range(50, 99, 8))
    clipped = [f for f in res if f["window"][1] == 98]
    assert clipped and all(f["window"][3] == 12 for f in clipped)
    assert {round(f["geometry"].area) for f in clipped} == {160 * 120}


def test_gsd_mismatch_resamples_patches(tmp_path):
    pkg = make_patch_package(tmp_path / "p20", gsd=20.0)  # the image is 10 m
    res = classify_patches(str(IMAGE), str(pkg))
    assert res.gsd_scale == pytest.approx(2.0) and res.native_patch == 32
    assert any("resampled" in w for w in res.warnings)
    assert {round(f["geometry"].area) for f in res if f["window"][2:] == (32, 32)} == {320 * 320}


def test_raster_smaller_than_a_patch_and_nodata(patch_package, tmp_path):
    with rasterio.open(IMAGE) as ds:
        arr, t, crs = ds.read(window=rasterio.windows.Window(0, 0, 11, 9)), ds.transform, ds.crs
    small = write_raster(tmp_path / "small.tif", arr, transform=t, crs=crs)
    res = classify_patches(str(small), str(patch_package))
    assert len(res) == 1 and res.features[0]["geometry"].bounds == pytest.approx((t.c, t.f - 90, t.c + 110, t.f))
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 40, 40), np.uint16), transform=t, crs=crs, nodata=0)
    res = classify_patches(str(empty), str(patch_package))
    assert res.patches == 9 and len(res) == 0
    half = np.full((3, 32, 64), 900, np.uint16)
    half[:, :, :32] = 0
    res = classify_patches(str(write_raster(tmp_path / "half.tif", half, transform=t, crs=crs, nodata=0)),
                           str(patch_package))
    assert sorted(f["window"][0] for f in res) == [32, 32, 48, 48]


def test_band_choice_and_bad_options(patch_package, tmp_path):
    with pytest.raises(InputError, match=r"takes 3 band\(s\).*BANDS"):
        classify_patches(str(write_raster(tmp_path / "one.tif", np.ones((1, 20, 20), np.uint16) * 900)),
                         str(patch_package))
    with pytest.raises(InputError, match="PATCH_SIZE must be at least 8"):
        classify_patches(str(IMAGE), str(patch_package), patch_size=4)
    res = classify_patches(str(IMAGE), str(patch_package), bands=[3, 2, 1], patch_size=64, top_k=2)
    assert all(len(f["top"]) == 2 for f in res) and res.native_patch == 64
    with pytest.raises(InputError, match="does not overlap"):
        classify_patches(str(IMAGE), str(patch_package), bounds=(0, 0, 10, 10))


def test_cancel_raises_and_returns_nothing(patch_package):
    calls = {"n": 0}

    def cancel_soon():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        classify_patches(str(IMAGE), str(patch_package), batch_size=8, is_cancelled=cancel_soon)


def test_task_mismatch_is_refused_both_ways(patch_package, rgb_package, rgb_raster, tmp_path):
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    with pytest.raises(InputError, match="is a segmentation model; patch classification needs a "
                                         "patch_classification model"):
        classify_patches(str(rgb_raster), str(rgb_package))
    with pytest.raises(InputError, match="is a patch_classification model; segmentation needs a segmentation"):
        segment(str(IMAGE), str(patch_package), str(tmp_path / "o.tif"))
    assert not (tmp_path / "o.tif").exists()


def test_package_validation_names_the_field(patch_package):
    meta = json.loads((patch_package / "model.json").read_text())
    props = meta["properties"]
    assert props["rs_deep:task"] == "patch_classification" and props["rs_deep:tile_size"] == 16

    def with_builder(**changes):
        m = json.loads(json.dumps(meta))
        m["properties"]["rs_deep:builder"].update(changes)
        return m

    with pytest.raises(ModelPackageError, match="architecture: 'vit_huge' is not on the allow-list.*resnet18"):
        parse_metadata(with_builder(architecture="vit_huge"))
    with pytest.raises(ModelPackageError, match="params.pretrained_cfg: not an allowed parameter"):
        parse_metadata(with_builder(params={"pretrained_cfg": "x"}))
    with pytest.raises(ModelPackageError, match="params.output_stride: expected 8, 16 or 32"):
        parse_metadata(with_builder(params={"output_stride": 4}))
    with pytest.raises(ModelPackageError, match="encoder_weights: must be null"):
        parse_metadata(with_builder(encoder_weights="imagenet"))
    m = json.loads(json.dumps(meta))
    m["properties"]["rs_deep:tile_size"] = 4
    with pytest.raises(ModelPackageError, match="rs_deep:tile_size: expected a patch size of at least 8 px"):
        parse_metadata(m)
    pkg = load_package(patch_package)
    pkg.builder = dict(pkg.builder, classes=5)
    with pytest.raises(ModelPackageError, match="builder.classes is 5 but classification:classes lists 4"):
        classify_patches(str(IMAGE), pkg)


def test_field_register_is_read_without_qgis():
    from osgeo import ogr
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_gpkg_polygons
    fields = read_gpkg_polygons(str(FIELDS / "fields.gpkg"), "fields", "Afgroede", dst_crs="EPSG:32632")
    ds = ogr.Open(str(FIELDS / "fields.gpkg"))
    lyr = ds.GetLayer("fields")
    ref = [(f.GetField("Afgroede"), f.GetGeometryRef().GetArea()) for f in lyr]
    assert len(fields) == len(ref) == 174
    assert [v for _, v in fields] == [v for v, _ in ref]
    np.testing.assert_allclose([g.area for g, _ in fields], [a for _, a in ref], rtol=1e-9)
    with pytest.raises(InputError, match="no field 'crop'.*Afgroede"):
        read_gpkg_polygons(str(FIELDS / "fields.gpkg"), "fields", "crop")


def test_training_for_seconds_writes_a_patch_package(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_eval_models import CROP_CLASSES, OTHER, crop_group
    from rs_deep.rs_deep_plugin.engine.evaluation.baselines import evaluate_patches
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_gpkg_polygons
    from rs_deep.rs_deep_plugin.engine.training.patches import train_patches
    fields = [(g, crop_group(v)) for g, v in read_gpkg_polygons(str(FIELDS / "fields.gpkg"), "fields", "Afgroede")]
    assert {crop_group("Vårbyg"), crop_group("Silomajs"), crop_group("Græs med kløver/lucerne"),
            crop_group("Kartofler, stivelses-")} == {0, 2, 1, 3}
    report = train_patches(str(IMAGE), fields, tmp_path / "model", class_names=CROP_CLASSES, background_class=OTHER,
                           builder={"library": "timm", "architecture": "resnet10t", "params": {}}, patch_size=16,
                           epochs=1, steps_per_epoch=2, batch_size=16)
    pkg = load_package(tmp_path / "model", task="patch_classification")
    assert pkg.tile_size == 16 and pkg.gsd == pytest.approx(10.0) and [c.name for c in pkg.classes] == CROP_CLASSES
    assert pkg.metadata["properties"]["mlm:output"][0]["result"]["shape"] == [-1, 4]
    assert report["data"]["validation"]["window"]["col_off"] == 452 - 113
    assert report["history"][0]["val"]["accuracy"] is not None
    with rasterio.open(IMAGE) as ds:
        b = ds.bounds
    ev = evaluate_patches(pkg, str(IMAGE), fields, bounds=(b.left + 3390, b.bottom, b.right, b.top),
                          background_class=OTHER)
    assert ev["grid"]["patches"] > 50 and 0 <= ev["grid"]["accuracy"] <= 1 and ev["fields"]["patches"] > 5


# --------------------------------------------------------------------------------------------
# QGIS


def _run(params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run("rs_deep:classify_patches", params, context=context,
                          feedback=feedback or QgsProcessingFeedback())


FIELD_NAMES = ["class_id", "class_name", "score", "class_2", "score_2", "class_3", "score_3"]


def test_algorithm_is_registered_with_help(provider):
    from qgis.core import QgsApplication, QgsProcessingParameterDefinition
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:classify_patches")
    assert alg is not None and alg.group() == "Apply models"
    params = {p.name(): p for p in alg.parameterDefinitions()}
    for n in ("INPUT", "MODEL", "BANDS", "EXTENT", "PATCH_SIZE", "STRIDE", "OUTPUT", "BATCH_SIZE", "DEVICE"):
        assert n in params and params[n].description()
    for n in ("BATCH_SIZE", "DEVICE"):
        assert params[n].flags() & QgsProcessingParameterDefinition.FlagAdvanced
    for words in ("Input raster", "Model package", "Bands", "Extent", "Patch size", "Stride", "Patches",
                  "Batch size", "Device"):
        assert words in alg.shortHelpString()


def test_classify_patches_through_processing_run(provider, patch_package, tmp_path):
    from qgis.core import QgsProcessingException, QgsVectorLayer
    out = tmp_path / "patches.gpkg"
    res = _run({"INPUT": str(IMAGE), "MODEL": str(patch_package), "STRIDE": 0, "OUTPUT": str(out)})
    vec = QgsVectorLayer(res["OUTPUT"], "p")
    assert vec.isValid() and vec.crs().authid() == "EPSG:32632"
    assert [f.name() for f in vec.fields()][-7:] == FIELD_NAMES
    engine = classify_patches(str(IMAGE), str(patch_package))
    feats = list(vec.getFeatures())
    assert len(feats) == len(engine)
    by_cell = {tuple(round(v) for v in f["geometry"].bounds): f for f in engine}
    for feat in feats[:50]:
        bb = feat.geometry().boundingBox()
        ref = by_cell[(round(bb.xMinimum()), round(bb.yMinimum()), round(bb.xMaximum()), round(bb.yMaximum()))]
        assert feat["class_name"] == ref["class_name"] and feat["score"] == pytest.approx(ref["score"], abs=1e-4)
        assert feat["class_2"] == ref["top"][1][1] and feat["score"] >= feat["score_2"] >= feat["score_3"]
    with pytest.raises(QgsProcessingException, match="patch classification needs|this tool needs a "
                                                     "patch_classification model"):
        from conftest import make_package
        _run({"INPUT": str(IMAGE), "MODEL": str(make_package(tmp_path / "seg")), "OUTPUT": str(tmp_path / "x.gpkg")})


def test_cancel_in_qgis_leaves_no_layer(provider, patch_package, tmp_path):
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda p: feedback.cancel() if p > 1 else None)
    with pytest.raises(QgsProcessingException, match="cancelled"):
        _run({"INPUT": str(IMAGE), "MODEL": str(patch_package), "BATCH_SIZE": 8, "OUTPUT": str(tmp_path / "o.gpkg")},
             feedback)
    assert os.listdir(tmp_path) == []


def test_model_builder_chain_with_native_algorithm(provider, patch_package, tmp_path):
    import processing
    from qgis.core import (QgsProcessingFeedback, QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput,
                           QgsProcessingModelParameter, QgsProcessingParameterFile,
                           QgsProcessingParameterRasterLayer, QgsVectorLayer)
    model = QgsProcessingModelAlgorithm("patches then dissolve", "rs_deep tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "raster"),
                            QgsProcessingModelParameter("raster"))
    model.addModelParameter(QgsProcessingParameterFile("model", "model", behavior=QgsProcessingParameterFile.Folder),
                            QgsProcessingModelParameter("model"))
    pc = QgsProcessingModelChildAlgorithm("rs_deep:classify_patches")
    pc.setChildId("patches")
    pc.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    pc.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromModelParameter("model")])
    model.addChildAlgorithm(pc)
    dis = QgsProcessingModelChildAlgorithm("native:dissolve")
    dis.setChildId("dissolve")
    dis.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromChildOutput("patches", "OUTPUT")])
    dis.addParameterSources("FIELD", [QgsProcessingModelChildParameterSource.fromStaticValue(["class_name"])])
    out = QgsProcessingModelOutput("dissolved", "dissolved")
    out.setChildOutputName("OUTPUT")
    dis.setModelOutputs({"dissolved": out})
    model.addChildAlgorithm(dis)
    raster = tmp_path / "image.tif"  # a copy: the model's raster-layer input is loaded as a QGIS layer by Processing
    shutil.copy(IMAGE, raster)  # itself, and QGIS writes band statistics beside the file it loads
    res = processing.run(model, {"raster": str(raster), "model": str(patch_package),
                                 model_output(model, "dissolved"): str(tmp_path / "dissolved.gpkg")},
                         feedback=QgsProcessingFeedback())
    vec = QgsVectorLayer(res[model_output(model, "dissolved")], "d")
    engine = classify_patches(str(IMAGE), str(patch_package))
    assert vec.isValid() and vec.featureCount() == len(engine.class_counts())
    total = sum(f.geometry().area() for f in vec.getFeatures())
    assert total == pytest.approx(sum(f["geometry"].area for f in engine), rel=1e-6)


def test_qgis_process_subprocess(patch_package, tmp_path):
    import sqlite3
    from qgis_env import run_qgis_process
    out = tmp_path / "q.gpkg"
    proc = run_qgis_process(["run", "rs_deep:classify_patches", "--json", "--", f"INPUT={IMAGE}",
                             f"MODEL={patch_package}", "PATCH_SIZE=32", "BANDS=1", "BANDS=2", "BANDS=3",
                             f"OUTPUT={out}"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT"].startswith(str(out))
    con = sqlite3.connect(out)
    table = con.execute("select table_name from gpkg_contents where data_type='features'").fetchone()[0]
    n = con.execute(f'select count(*) from "{table}"').fetchone()[0]
    con.close()
    assert n == len(classify_patches(str(IMAGE), str(patch_package), patch_size=32))
    bad = run_qgis_process(["run", "rs_deep:classify_patches", "--", f"INPUT={IMAGE}", "MODEL=/nope",
                            f"OUTPUT={tmp_path / 'bad.gpkg'}"], check=False)
    assert bad.returncode != 0 and "not found" in (bad.stdout + bad.stderr)
