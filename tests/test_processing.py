"""The rs_deep provider inside QGIS: processing.run, the model builder, qgis_process, the installed zip,
and QGIS + rasterio in one process."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import rasterio
from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsPointXY,
                       QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback,
                       QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                       QgsProcessingModelChildParameterSource, QgsProcessingModelOutput, QgsProcessingModelParameter,
                       QgsProcessingParameterFile, QgsProcessingParameterRasterLayer, QgsProject, QgsRasterLayer,
                       QgsVectorLayer)

from conftest import DATA, ROOT, SAMPLE, model_output


def _run(params, feedback=None):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run("rs_deep:segment", params, context=context, feedback=feedback or QgsProcessingFeedback())


def test_provider_and_algorithm_are_registered(provider):
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:segment")
    assert alg is not None and provider.name() == "RS Deep"
    names = [p.name() for p in alg.parameterDefinitions()]
    for n in ("INPUT", "MODEL", "BANDS", "EXTENT", "MASK", "OUTPUT", "OUTPUT_VECTOR", "PROBABILITIES",
              "TILE_SIZE", "OVERLAP", "BATCH_SIZE", "DEVICE", "MIN_AREA", "SIMPLIFY"):
        assert n in names
    assert all(p.description() for p in alg.parameterDefinitions())
    assert "Model package" in alg.shortHelpString()


def test_the_task_table_names_the_algorithms_and_the_model_format(provider):
    """engine/tasks.py: each task's algorithm is registered under its label (regression and super-resolution share
    rs_deep:predict_raster, whose name says both); its MLM name is the package format's (recognition: ONNX only)."""
    from rs_deep.rs_deep_plugin.engine.models.package import TASKS as PACKAGE_TASKS
    from rs_deep.rs_deep_plugin.engine.tasks import ONNX_ONLY_TASKS, RASTER_TASKS, TASKS, is_background
    assert list(TASKS) == ["segmentation", "detection", "patch_classification", "change", "regression",
                           "super_resolution", "instance_segmentation", "recognition"]
    for task in TASKS.values():
        alg = QgsApplication.processingRegistry().algorithmById(task.algorithm)
        assert alg is not None, task
        if task.name in RASTER_TASKS:
            assert task.short in alg.displayName().lower(), task
        else:
            assert alg.displayName() == task.label, task
        if task.name in ONNX_ONLY_TASKS:  # Deepness ONNX models only: no model.json package of this task
            assert task.name not in PACKAGE_TASKS, task
        else:
            assert PACKAGE_TASKS[task.name] == task.mlm, task
    assert is_background(" Background") and is_background("no change") and not is_background("building")


def test_segment_through_processing_run(provider, rgb_package, rgb_raster, tmp_path):
    out, gpkg, probs = tmp_path / "c.tif", tmp_path / "c.gpkg", tmp_path / "p.tif"
    res = _run({"INPUT": str(rgb_raster), "MODEL": str(rgb_package), "OUTPUT": str(out),
                "OUTPUT_VECTOR": str(gpkg), "PROBABILITIES": str(probs), "MIN_AREA": 0, "SIMPLIFY": 0})
    assert res["OUTPUT"] == str(out) and os.path.exists(res["PROBABILITIES"])
    layer = QgsRasterLayer(str(out), "c")  # picks up the .qml written beside it
    assert layer.isValid() and layer.renderer().type() == "paletted"
    labels = {c.value: c.label for c in layer.renderer().classes()}
    assert labels == {0: "background", 1: "building"}
    vec = QgsVectorLayer(res["OUTPUT_VECTOR"], "v")
    assert vec.isValid() and vec.crs().authid() == "EPSG:32618"
    assert [f.name() for f in vec.fields()][-4:] == ["class_id", "class_name", "area_m2", "mean_prob"]
    feats = list(vec.getFeatures())
    with rasterio.open(out) as ds:
        building_px = int((ds.read(1) == 1).sum())
        px_area = abs(ds.transform.a * ds.transform.e)
    assert all(f["class_name"] == "building" for f in feats)  # background is not vectorised
    total = sum(f["area_m2"] for f in feats)
    assert total == pytest.approx(building_px * px_area, rel=1e-6)
    assert all(0.5 <= f["mean_prob"] <= 1.0 for f in feats)


def test_bad_model_and_band_errors_are_clear(provider, gray_package, rgb_raster, tmp_path):
    with pytest.raises(QgsProcessingException, match="not found"):
        _run({"INPUT": str(rgb_raster), "MODEL": "no_such_model", "OUTPUT": str(tmp_path / "o.tif")})
    with pytest.raises(QgsProcessingException, match="BANDS"):
        _run({"INPUT": str(rgb_raster), "MODEL": str(gray_package), "OUTPUT": str(tmp_path / "o.tif")})
    res = _run({"INPUT": str(rgb_raster), "MODEL": str(gray_package), "BANDS": [3],
                "OUTPUT": str(tmp_path / "o.tif")})
    assert os.path.exists(res["OUTPUT"])


def test_cancel_leaves_no_partial_layer(provider, rgb_package, rgb_raster, tmp_path):
    feedback = QgsProcessingFeedback()
    feedback.progressChanged.connect(lambda p: feedback.cancel() if p > 5 else None)
    with pytest.raises(QgsProcessingException, match="cancelled"):
        _run({"INPUT": str(rgb_raster), "MODEL": str(rgb_package), "OUTPUT": str(tmp_path / "o.tif"),
              "OUTPUT_VECTOR": str(tmp_path / "o.gpkg")}, feedback)
    assert sorted(os.listdir(tmp_path)) == ["rgb.tif"]


def test_extent_in_another_crs_and_mask(provider, rgb_package, rgb_raster, tmp_path):
    with rasterio.open(rgb_raster) as ds:
        left, bottom, right, top = ds.bounds
    src, dst = QgsCoordinateReferenceSystem("EPSG:32618"), QgsCoordinateReferenceSystem("EPSG:4326")
    xf = QgsCoordinateTransform(src, dst, QgsProject.instance())
    p0 = xf.transform(QgsPointXY(left + 3000, bottom + 3000))
    p1 = xf.transform(QgsPointXY(left + 30000, bottom + 30000))
    extent = f"{p0.x()},{p1.x()},{p0.y()},{p1.y()} [EPSG:4326]"
    res = _run({"INPUT": str(rgb_raster), "MODEL": str(rgb_package), "EXTENT": extent,
                "OUTPUT": str(tmp_path / "o.tif")})
    with rasterio.open(res["OUTPUT"]) as ds:
        assert 80 < ds.width < 120 and 80 < ds.height < 120  # ~27 km at 300 m, grown to cover the box


def test_model_builder_chain_with_native_algorithm(provider, rgb_package, rgb_raster, tmp_path):
    model = QgsProcessingModelAlgorithm("segment then dissolve", "rs_deep tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "raster"),
                            QgsProcessingModelParameter("raster"))
    model.addModelParameter(QgsProcessingParameterFile("model", "model", behavior=QgsProcessingParameterFile.Folder),
                            QgsProcessingModelParameter("model"))
    seg = QgsProcessingModelChildAlgorithm("rs_deep:segment")
    seg.setChildId("seg")
    seg.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    seg.addParameterSources("MODEL", [QgsProcessingModelChildParameterSource.fromModelParameter("model")])
    seg.addParameterSources("MIN_AREA", [QgsProcessingModelChildParameterSource.fromStaticValue(0)])
    model.addChildAlgorithm(seg)
    dis = QgsProcessingModelChildAlgorithm("native:dissolve")
    dis.setChildId("dissolve")
    dis.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromChildOutput("seg", "OUTPUT_VECTOR")])
    dis.addParameterSources("FIELD", [QgsProcessingModelChildParameterSource.fromStaticValue(["class_name"])])
    out = QgsProcessingModelOutput("dissolved", "dissolved")
    out.setChildOutputName("OUTPUT")
    dis.setModelOutputs({"dissolved": out})
    model.addChildAlgorithm(dis)
    import processing
    res = processing.run(model, {"raster": str(rgb_raster), "model": str(rgb_package),
                                 model_output(model, "dissolved"): str(tmp_path / "dissolved.gpkg")},
                         feedback=QgsProcessingFeedback())
    vec = QgsVectorLayer(res[model_output(model, "dissolved")], "d")
    assert vec.isValid() and vec.featureCount() == 1
    assert next(vec.getFeatures())["class_name"] == "building"


def test_qgis_process_subprocess(rgb_package, rgb_raster, tmp_path):
    from qgis_env import run_qgis_process
    out, gpkg = tmp_path / "q.tif", tmp_path / "q.gpkg"
    proc = run_qgis_process(["run", "rs_deep:segment", "--json", "--", f"INPUT={rgb_raster}",
                             f"MODEL={rgb_package}", f"OUTPUT={out}", f"OUTPUT_VECTOR={gpkg}", "MIN_AREA=0"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT"] == str(out)
    with rasterio.open(out) as ds, rasterio.open(rgb_raster) as src:
        assert ds.transform == src.transform
    con = sqlite3.connect(gpkg)
    assert con.execute("select count(*) from gpkg_contents where data_type='features'").fetchone()[0] == 1
    con.close()
    bad = run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={rgb_raster}", "MODEL=/nope",
                            f"OUTPUT={tmp_path / 'bad.tif'}"], check=False)
    assert bad.returncode != 0 and "not found" in (bad.stdout + bad.stderr)


def test_zip_installs_into_a_clean_profile_and_runs(gray_package, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import package as packager
    z = packager.main(str(tmp_path / "rs_deep.zip"))
    names = zipfile.ZipFile(z).namelist()
    assert "rs_deep/metadata.txt" in names and "rs_deep/__init__.py" in names
    assert "rs_deep/resources/models/buildings_demo/model.safetensors" in names
    assert not [n for n in names if n.startswith(("rs_deep/tests/", "rs_deep/tools/", "rs_deep/.ci/"))]
    plugins = tmp_path / "plugins"
    zipfile.ZipFile(z).extractall(plugins)
    from qgis_env import run_qgis_process
    out = tmp_path / "z.tif"
    proc = run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={SAMPLE}", "MODEL=buildings_demo",
                             f"OUTPUT={out}"], plugin_path=str(plugins), profile=str(tmp_path / "profile"))
    assert "plugins" in proc.stdout or out.exists()
    assert out.exists()


def test_qgis_and_rasterio_agree_in_one_process(tmp_path):
    """CRS transforms and pixel values are the same through QGIS and rasterio (same GDAL/PROJ)."""
    from rasterio.warp import transform as rio_transform
    path = tmp_path / "atlanta.tif"  # a copy: QGIS writes band statistics beside the file a layer is made from
    shutil.copy(SAMPLE, path)
    layer = QgsRasterLayer(str(path), "atlanta")
    assert layer.isValid()
    with rasterio.open(path) as ds:
        arr = ds.read(1)
        xs = [ds.bounds.left, ds.bounds.right, (ds.bounds.left + ds.bounds.right) / 2]
        ys = [ds.bounds.bottom, ds.bounds.top, (ds.bounds.bottom + ds.bounds.top) / 2]
        lon, lat = rio_transform(ds.crs, "EPSG:4326", xs, ys)
        assert layer.crs().authid() == ds.crs.to_string()
        ext = layer.extent()
        assert ext.xMinimum() == pytest.approx(ds.bounds.left) and ext.yMaximum() == pytest.approx(ds.bounds.top)
    xf = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    for x, y, lo, la in zip(xs, ys, lon, lat):
        p = xf.transform(QgsPointXY(x, y))
        assert p.x() == pytest.approx(lo, abs=1e-9) and p.y() == pytest.approx(la, abs=1e-9)
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    q = np.frombuffer(bytes(block.data()), dtype=np.uint16).reshape(layer.height(), layer.width())
    np.testing.assert_array_equal(q, arr)


def test_shapely_uses_the_geos_that_qgis_uses():
    """Two GEOS libraries in one process crash QGIS: shapely must be built against QGIS's GEOS."""
    import shapely
    from qgis.core import Qgis
    qgis_geos = Qgis.geosVersion() if hasattr(Qgis, "geosVersion") else None
    assert shapely.geos_version_string.split("-")[0] == str(qgis_geos).split("-")[0] or qgis_geos is None
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(shapely.__file__), "..", "shapely.libs", "libgeos*"))
    assert not libs, f"shapely bundles its own GEOS: {libs}"


@pytest.fixture(scope="module")
def xyz_tiles(tmp_path_factory):
    """Local XYZ tiles of the Landsat sample (read by QGIS's WMS provider, not by GDAL)."""
    import shutil
    d = tmp_path_factory.mktemp("xyz")
    merc = d / "merc.tif"
    subprocess.run(["gdalwarp", "-q", "-t_srs", "EPSG:3857", "-dstalpha", str(DATA / "landsat_smoke" / "RGB.byte.tif"),
                    str(merc)], check=True)
    subprocess.run([shutil.which("gdal2tiles.py"), "-q", "--xyz", "-z", "7-9", "-w", "none", str(merc),
                    str(d / "tiles")], check=True)
    return d / "tiles"


def test_xyz_layer_is_read_through_qgis_at_the_model_gsd(provider, xyz_tiles, tmp_path):
    from conftest import make_package
    pkg = make_package(tmp_path / "m300", gsd=300.0, tile=64, overlap=8)
    layer = QgsRasterLayer(f"type=xyz&url=file://{xyz_tiles}/{{z}}/{{x}}/{{y}}.png&zmax=9&zmin=7", "xyz", "wms")
    assert layer.isValid() and layer.providerType() == "wms"
    QgsProject.instance().addMapLayer(layer)
    try:
        res = _run({"INPUT": layer.id(), "MODEL": str(pkg), "OUTPUT": str(tmp_path / "xyz.tif"),
                    "EXTENT": "-8600000,-8500000,2700000,2800000 [EPSG:3857]"})
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
    with rasterio.open(res["OUTPUT"]) as ds:
        assert ds.crs.to_epsg() == 3857
        ground = ds.res[0] * np.cos(np.radians(24.5))  # ~300 m on the ground at the scene's latitude
        assert 280 < ground < 320
        cls = ds.read(1)
        assert 0.1 < np.mean(cls != 255) < 0.9  # the scene is valid, transparent tiles are nodata
