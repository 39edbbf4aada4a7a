"""Bad inputs get a clear word, and inputs are never touched (reliability sweep 2026-12, rows 04, 06, 07, 10, 11,
12, 14, 15, 18, 19, 20, 22, 76, 78): NaN/Inf, all-nodata and out-of-range values, empty or non-polygon MASK,
zero-area EXTENT, damaged files, the MAX_PIXELS guard and the time estimate, PATCH_SIZE larger than the raster, and
the input folder unchanged after a qgis_process run. Real files made by each test; nothing mocked."""
import hashlib
import os
import shutil

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches
from rs_deep.rs_deep_plugin.engine.inference.segment import segment

from conftest import DATA, SAMPLE, write_raster
from test_patches import make_patch_package

FIELDS_IMAGE = DATA / "fields_denmark" / "image.tif"  # 452 x 276 px, 10 m, EPSG:32632, UInt16


def _values(shape=(128, 128), seed=0, lo=100, hi=1900):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype("float32")


def _run_segment(params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run("rs_deep:segment", params, context=context, feedback=feedback or QgsProcessingFeedback())


def _folder_state(folder):
    """The listing of ``folder`` and the sha256 of every file in it."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


# --------------------------------------------------------------------------------------------
# values: NaN/Inf, all nodata, far outside the model's range (rows 04, 18, 19, 20)


def test_nan_and_inf_are_nodata_and_warned(gray_package, tmp_path):
    arr = _values()
    arr[10:40, 10:40] = np.nan
    arr[60:70, :] = np.inf
    arr[:, 100:105] = -np.inf
    src = write_raster(tmp_path / "nan.tif", arr, dtype="float32")  # no nodata declared
    out = tmp_path / "o.tif"
    res = segment(src, gray_package, out, probabilities=tmp_path / "p.tif")
    bad = ~np.isfinite(arr)
    with rasterio.open(out) as ds:
        cls = ds.read(1)
    with rasterio.open(tmp_path / "p.tif") as ds:
        probs = ds.read()
    assert (cls[bad] == 255).all()  # NaN/Inf pixels are nodata
    assert np.isin(cls[~bad], [0, 1]).all()  # every finite pixel gets a class: the tiles were not poisoned
    assert np.isfinite(probs[:, ~bad]).all() and (probs[:, ~bad] >= 0).all()
    said = [w for w in res.warnings if "NaN or infinite" in w]
    assert len(said) == 1 and "treated as nodata" in said[0]
    share = float(said[0].split(" %")[0])
    assert abs(share - 100 * bad.mean()) < 3  # about the share of such pixels (tiles overlap)


def test_all_nodata_is_warned(gray_package, tmp_path):
    src = write_raster(tmp_path / "empty.tif", np.zeros((96, 96), dtype="uint16"), nodata=0)
    res = segment(src, gray_package, tmp_path / "o.tif")
    assert any("no valid pixel in the processed area" in w for w in res.warnings)
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert (ds.read(1) == 255).all()


@pytest.mark.parametrize("case", ["uint16_above", "int16_negative"])
def test_values_far_outside_the_model_range_are_warned(gray_package, tmp_path, case):
    base = _values()  # within the package's 0..2047 min-max scaling
    arr = (base * 30).astype("uint16") if case == "uint16_above" else (base - 3000).astype("int16")
    src = write_raster(tmp_path / f"{case}.tif", arr)
    res = segment(src, gray_package, tmp_path / "o.tif")
    said = [w for w in res.warnings if "outside the model's input range" in w]
    assert len(said) == 1 and "0..2047" in said[0] and "may be meaningless" in said[0]
    assert float(said[0].split(" %")[0]) > 50
    ok = segment(write_raster(tmp_path / "ok.tif", base.astype("uint16")), gray_package, tmp_path / "ok_o.tif")
    assert not [w for w in ok.warnings if "input range" in w or "NaN" in w or "no valid pixel" in w]


# --------------------------------------------------------------------------------------------
# MASK and EXTENT (rows 10, 11, 12)


def _vector(path, geometry, features):
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorFileWriter, QgsVectorLayer
    mem = QgsVectorLayer(f"{geometry}?crs=EPSG:32616", "m", "memory")
    feats = []
    for wkt in features:
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromWkt(wkt))
        feats.append(f)
    mem.dataProvider().addFeatures(feats)
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    from qgis.core import QgsCoordinateTransformContext
    err = QgsVectorFileWriter.writeAsVectorFormatV2(mem, str(path), QgsCoordinateTransformContext(), opts)
    assert err[0] == QgsVectorFileWriter.NoError
    return str(path)


def test_empty_mask_is_refused(provider, gray_package, tmp_path):
    from qgis.core import QgsProcessingException
    with pytest.raises(InputError, match="MASK has no polygons"):
        segment(write_raster(tmp_path / "in.tif", _values().astype("uint16")), gray_package, tmp_path / "e.tif",
                mask_geometries=[])
    mask = _vector(tmp_path / "empty.gpkg", "Polygon", [])
    with pytest.raises(QgsProcessingException, match="has no polygons"):
        _run_segment({"INPUT": str(SAMPLE), "MODEL": "buildings_demo", "MASK": mask, "OUTPUT": str(tmp_path / "o.tif"),
                      "OUTPUT_VECTOR": ""})
    assert not (tmp_path / "o.tif").exists()


def test_point_mask_is_refused(provider, tmp_path):
    from qgis.core import QgsProcessingException
    mask = _vector(tmp_path / "points.gpkg", "Point", ["POINT(733700 3724900)", "POINT(733800 3725000)"])
    with pytest.raises(QgsProcessingException, match="MASK must be a polygon layer"):
        _run_segment({"INPUT": str(SAMPLE), "MODEL": "buildings_demo", "MASK": mask, "OUTPUT": str(tmp_path / "o.tif"),
                      "OUTPUT_VECTOR": ""})
    assert not (tmp_path / "o.tif").exists()


def test_zero_area_and_outside_extents_are_refused(provider, tmp_path):
    from qgis.core import QgsProcessingException
    for extent, words in (("733700,733700,3724700,3724900 [EPSG:32616]", "EXTENT has zero width"),
                          ("733650,733750,3724800,3724800 [EPSG:32616]", "EXTENT has zero height"),
                          ("0,100,0,100 [EPSG:32616]", "does not overlap the raster")):
        with pytest.raises(QgsProcessingException, match=words):
            _run_segment({"INPUT": str(SAMPLE), "MODEL": "buildings_demo", "EXTENT": extent,
                          "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_VECTOR": ""})
        assert not (tmp_path / "o.tif").exists()


# --------------------------------------------------------------------------------------------
# damaged files (rows 14, 15, 22)


def _truncated(path, **layout):
    arr = _values((300, 300)).astype("uint16")
    from rasterio.transform import from_origin
    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint16", crs="EPSG:32616",
                       transform=from_origin(733601, 3725139, 0.5, 0.5), **layout) as ds:
        ds.write(arr[None])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def _missing_source_vrt(path):
    path.write_text('<VRTDataset rasterXSize="300" rasterYSize="300"><SRS>EPSG:32616</SRS>'
                    '<GeoTransform>733601, 0.5, 0, 3725139, 0, -0.5</GeoTransform>'
                    '<VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
                    '<SourceFilename relativeToVRT="1">does_not_exist.tif</SourceFilename><SourceBand>1</SourceBand>'
                    '<SrcRect xOff="0" yOff="0" xSize="300" ySize="300"/><DstRect xOff="0" yOff="0" xSize="300" '
                    'ySize="300"/></SimpleSource></VRTRasterBand></VRTDataset>')
    return path


@pytest.mark.parametrize("case", ["tiled", "striped", "vrt"])
def test_damaged_files_raise_input_error_naming_the_file(gray_package, tmp_path, case):
    if case == "tiled":
        src = _truncated(tmp_path / "tiled.tif", tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    elif case == "striped":
        src = _truncated(tmp_path / "striped.tif")
    else:
        src = _missing_source_vrt(tmp_path / "missing.vrt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as err:
        segment(src, gray_package, out / "o.tif")
    msg = str(err.value)
    assert str(src) in msg or "does_not_exist.tif" in msg
    assert "damaged or incomplete" in msg and "re-export or re-download" in msg and "pixels" in msg
    assert os.listdir(out) == []


def test_damaged_file_through_qgis_process_is_a_message_not_a_traceback(gray_package, tmp_path):
    from qgis_env import run_qgis_process
    src = _truncated(tmp_path / "cut.tif", tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    proc = run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={src}", f"MODEL={gray_package}",
                             f"OUTPUT={tmp_path / 'o.tif'}"], check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in text and "RasterioIOError" not in text
    assert str(src) in text and "damaged or incomplete" in text
    assert not (tmp_path / "o.tif").exists()


# --------------------------------------------------------------------------------------------
# size guard, estimate, PATCH_SIZE (rows 06, 76, 78)


def _huge_vrt(path, size=200000):
    """A VRT declaring ``size`` x ``size`` px over the 600 x 900 px sample (its top-left corner)."""
    with rasterio.open(SAMPLE) as ds:
        t = ds.transform
    path.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:32616</SRS>'
                    f'<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>'
                    '<VRTRasterBand dataType="UInt16" band="1"><NoDataValue>0</NoDataValue><SimpleSource>'
                    f'<SourceFilename relativeToVRT="0">{SAMPLE}</SourceFilename><SourceBand>1</SourceBand>'
                    '<SrcRect xOff="0" yOff="0" xSize="600" ySize="900"/>'
                    '<DstRect xOff="0" yOff="0" xSize="600" ySize="900"/></SimpleSource></VRTRasterBand></VRTDataset>')
    return path


def test_max_pixels_refuses_a_huge_raster_before_any_work(provider, gray_package, tmp_path):
    from qgis.core import QgsProcessingException
    vrt = _huge_vrt(tmp_path / "huge.vrt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"200,000 x 200,000 px .* more than MAX_PIXELS \(2,000,000,000\)"):
        segment(vrt, gray_package, out / "o.tif", max_pixels=2_000_000_000)
    with pytest.raises(QgsProcessingException, match="Set EXTENT to the area you need, or raise MAX_PIXELS"):
        _run_segment({"INPUT": str(vrt), "MODEL": "buildings_demo", "OUTPUT": str(out / "q.tif"),
                      "OUTPUT_VECTOR": str(out / "q.gpkg")})
    assert os.listdir(out) == []
    assert sorted(os.listdir(tmp_path)) == ["huge.vrt", "out"]
    # an EXTENT over the part with data runs, and so does MAX_PIXELS=0 (no limit) on a small raster
    res = _run_segment({"INPUT": str(vrt), "MODEL": "buildings_demo", "OUTPUT": str(out / "e.tif"),
                        "OUTPUT_VECTOR": "", "EXTENT": "733601,733701,3725039,3725139 [EPSG:32616]"})
    assert os.path.exists(res["OUTPUT"])


def test_the_run_says_how_many_tiles_and_about_how_long(gray_package, tmp_path):
    messages = []
    src = write_raster(tmp_path / "in.tif", _values((200, 200)).astype("uint16"))
    res = segment(src, gray_package, tmp_path / "o.tif", batch_size=2,
                  progress=lambda fraction, message=None: messages.append(message) if message else None)
    assert any(m.startswith(f"{res.tiles} tiles of") for m in messages)
    estimate = [m for m in messages if "will take about" in m]
    assert len(estimate) == 1 and f"the {res.tiles} tiles" in estimate[0] and "first 2 tiles" in estimate[0]


def test_patch_larger_than_the_raster_is_warned(tmp_path):
    pkg = make_patch_package(tmp_path / "pc")
    messages = []
    res = classify_patches(str(FIELDS_IMAGE), str(pkg), patch_size=1024, batch_size=1,
                           log=messages.append)
    said = [w for w in res.warnings if "is larger than the area classified" in w]
    assert len(said) == 1 and "PATCH_SIZE (1024 px" in said[0] and "452 x 276 px" in said[0]
    assert said[0] in messages
    small = classify_patches(str(FIELDS_IMAGE), str(pkg), patch_size=16, stride=8, batch_size=64,
                             progress=lambda f, m=None: messages.append(m) if m else None)
    assert not [w for w in small.warnings if "larger than the area" in w]
    assert any(f"the {small.patches:,} patches will take about" in m for m in messages)


# --------------------------------------------------------------------------------------------
# inputs never touched (rows 04..: in.tif.aux.xml beside every input; row 07: the .vrt rewritten)


def test_qgis_process_leaves_the_input_folder_unchanged(tmp_path):
    from osgeo import gdal
    from qgis_env import run_qgis_process
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "in.tif")
    gdal.Translate(str(folder / "in.vrt"), str(folder / "in.tif"), format="VRT")
    before = _folder_state(folder)
    assert sorted(before) == ["in.tif", "in.vrt"]
    for name in ("in.tif", "in.vrt"):
        out = tmp_path / f"{name}.o.tif"
        proc = run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={folder / name}", "MODEL=buildings_demo",
                                 f"OUTPUT={out}", "OUTPUT_VECTOR="])
        assert out.exists() and "tiles" in proc.stdout
        assert _folder_state(folder) == before, name  # no .aux.xml beside the input, the .vrt not rewritten


def test_training_export_and_assessment_leave_their_input_rasters_unchanged(provider, tmp_path):
    """rs_deep:export_training_data, rs_deep:train and rs_deep:assess_accuracy given raster paths (as qgis_process and
    models give them): the input, label and reference rasters are read by the engine, never loaded as QGIS layers,
    so QGIS writes no band statistics (.aux.xml) beside them."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    from conftest import ATLANTA_LABELS
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "image.tif")
    with rasterio.open(SAMPLE) as ds:
        labels = (ds.read(1) > np.percentile(ds.read(1), 90)).astype(np.uint8)
        write_raster(folder / "reference.tif", labels[None], transform=ds.transform, crs=ds.crs)
        write_raster(folder / "prediction.tif", np.roll(labels, 3, axis=1)[None], transform=ds.transform, crs=ds.crs)
    before = _folder_state(folder)

    def run(alg, params):
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())

    chips = run("rs_deep:export_training_data", {"INPUT": str(folder / "image.tif"),
                                                 "LABEL_RASTER": str(folder / "reference.tif"), "TASK": "segmentation",
                                                 "TILE_SIZE": 128, "OUTPUT": str(tmp_path / "chips")})
    assert chips["CHIPS"] > 0
    trained = run("rs_deep:train", {"INPUT": str(folder / "image.tif"), "LABELS": str(ATLANTA_LABELS),
                                    "TASK": "segmentation", "EPOCHS": 1, "STEPS_PER_EPOCH": 1, "TILE_SIZE": 64,
                                    "BATCH_SIZE": 2, "OUTPUT": str(tmp_path / "model")})
    assert os.path.exists(trained["OUTPUT"])
    scores = run("rs_deep:assess_accuracy", {"PREDICTION": str(folder / "prediction.tif"),
                                             "REFERENCE_RASTER": str(folder / "reference.tif"),
                                             "OUTPUT_HTML": str(tmp_path / "report.html")})
    assert 0 < scores["OVERALL_ACCURACY"] < 1
    assert _folder_state(folder) == before  # no .aux.xml beside any of them, every byte as it was
