"""Engine segmentation on real rasters: georeferencing, nodata, extents, bad input, cancel, GSD, memory bands."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from rs_deep.rs_deep_plugin.engine.errors import Cancelled, InputError
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.inference.segment import segment

from conftest import LANDSAT, make_package, write_raster


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_output_keeps_the_input_grid_classes_and_nodata(rgb_package, rgb_raster, tmp_path):
    before = _sha(rgb_raster)
    out, probs = tmp_path / "cls.tif", tmp_path / "p.tif"
    res = segment(str(rgb_raster), str(rgb_package), str(out), probabilities=str(probs))
    assert _sha(rgb_raster) == before  # input untouched
    with rasterio.open(rgb_raster) as src, rasterio.open(out) as ds, rasterio.open(probs) as pds:
        assert (ds.width, ds.height) == (src.width, src.height)
        assert ds.transform == src.transform  # to the last decimal
        assert ds.crs == src.crs
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
        assert ds.colormap(1)[1][:3] == (0xE3, 0x1A, 0x1C)
        assert ds.overviews(1)  # pyramid for fast display
        cls = ds.read(1)
        nodata_in = np.all(src.read() == 0, axis=0)
        assert nodata_in.any() and (~nodata_in).any()
        np.testing.assert_array_equal(cls == 255, nodata_in)  # nodata in, nodata out
        p = pds.read()
        assert p.shape[0] == 2 and pds.dtypes[0] == "float32"
        valid = ~nodata_in
        np.testing.assert_allclose(p[:, valid].sum(axis=0), 1.0, atol=1e-4)
        assert np.all(p[:, nodata_in] == -1)
        np.testing.assert_array_equal(np.argmax(p, axis=0)[valid], cls[valid])
    names = open(str(out) + ".aux.xml").read()
    assert "<Category>background</Category>" in names and "<Category>building</Category>" in names
    assert sum(res.class_pixels.values()) == int((~nodata_in).sum())
    assert res.pixel_area_m2 == pytest.approx(abs(src.transform.a * src.transform.e))
    assert not [f for f in os.listdir(tmp_path) if "rsdeep" in f]  # no temp files left


def test_extent_is_snapped_to_the_raster_grid(rgb_package, rgb_raster, tmp_path):
    with rasterio.open(rgb_raster) as src:
        t = src.transform
        left, top = t * (40.3, 30.7)
        right, bottom = t * (140.2, 130.1)
    out = tmp_path / "cls.tif"
    segment(str(rgb_raster), str(rgb_package), str(out), bounds=(left, bottom, right, top))
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height) == (101, 101)
        assert ds.transform.c == pytest.approx(t.c + 40 * t.a, abs=1e-9)
        assert ds.transform.f == pytest.approx(t.f + 30 * t.e, abs=1e-9)


def test_extent_outside_the_raster(rgb_package, rgb_raster, tmp_path):
    with pytest.raises(InputError, match="does not overlap"):
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), bounds=(0, 0, 10, 10))
    assert os.listdir(tmp_path) == ["rgb.tif"]


def test_wrong_band_count_says_what_the_model_needs(gray_package, rgb_raster, tmp_path):
    with pytest.raises(InputError, match=r"takes 1 band\(s\) \(b1\) but the raster has 3.*BANDS"):
        segment(str(rgb_raster), str(gray_package), str(tmp_path / "o.tif"))
    res = segment(str(rgb_raster), str(gray_package), str(tmp_path / "o.tif"), bands=[2])
    assert res.tiles_run > 0
    with pytest.raises(InputError, match="do not exist"):
        segment(str(rgb_raster), str(gray_package), str(tmp_path / "o2.tif"), bands=[7])


def test_raster_without_crs_runs_and_says_so(rgb_package, tmp_path):
    arr = np.random.default_rng(0).integers(1, 255, (3, 50, 70), dtype=np.uint8)
    src = write_raster(tmp_path / "nocrs.tif", arr, crs=None)
    res = segment(str(src), str(rgb_package), str(tmp_path / "o.tif"))
    assert any("no CRS" in w for w in res.warnings)
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.crs is None and ds.width == 70


def test_one_pixel_raster(rgb_package, tmp_path):
    src = write_raster(tmp_path / "one.tif", np.full((3, 1, 1), 120, np.uint8))
    segment(str(src), str(rgb_package), str(tmp_path / "o.tif"))
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.shape == (1, 1) and ds.read(1)[0, 0] in (0, 1)


def test_all_nodata_raster_gives_all_nodata(rgb_package, tmp_path):
    src = write_raster(tmp_path / "empty.tif", np.zeros((3, 90, 90), np.uint8), nodata=0)
    res = segment(str(src), str(rgb_package), str(tmp_path / "o.tif"))
    assert res.tiles_run == 0
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert np.all(ds.read(1) == 255)


def test_unwritable_output(rgb_package, rgb_raster, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "missing" / "o.tif"))
    with pytest.raises(InputError, match="is a folder"):
        segment(str(rgb_raster), str(rgb_package), str(tmp_path))
    with pytest.raises(InputError, match="input raster"):
        segment(str(rgb_raster), str(rgb_package), str(rgb_raster))


def test_cancel_leaves_nothing_and_keeps_the_old_result(rgb_package, rgb_raster, tmp_path):
    out = tmp_path / "o.tif"
    segment(str(rgb_raster), str(rgb_package), str(out))
    old = _sha(out)
    calls = {"n": 0}

    def cancel_after_some_progress():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        segment(str(rgb_raster), str(rgb_package), str(out), probabilities=str(tmp_path / "p.tif"),
                is_cancelled=cancel_after_some_progress)
    assert _sha(out) == old
    assert sorted(os.listdir(tmp_path)) == ["o.tif", "o.tif.aux.xml", "rgb.tif"]
    segment(str(rgb_raster), str(rgb_package), str(out))  # rerun works
    assert _sha(out) == old  # and is deterministic


def test_a_stopped_run_leaves_no_reader_or_model_thread(rgb_package, rgb_raster, tmp_path):
    """A cancel stops the read-ahead and the forward pass before the raster is closed, even while the exception (and
    with it the run's frames) is still held: a read left running on the closed dataset would crash GDAL."""
    import threading
    calls = {"n": 0}

    def cancel_after_some_progress():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled) as info:
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), tile_size=32, overlap=8,
                is_cancelled=cancel_after_some_progress)
    assert info.value is not None  # the traceback, and the run's frames, are alive here
    running = [t.name for t in threading.enumerate() if t.name.startswith(("rs_deep-reader", "rs_deep-forward"))]
    assert running == []


def test_gsd_mismatch_resamples_and_maps_back_to_the_input_grid(tmp_path, rgb_raster):
    pkg = make_package(tmp_path / "coarse", gsd=600.0)  # the raster is 300 m
    res = segment(str(rgb_raster), str(pkg), str(tmp_path / "o.tif"))
    assert res.gsd_scale == pytest.approx(2.0, rel=1e-3)
    assert any("resampled" in w for w in res.warnings)
    with rasterio.open(rgb_raster) as src, rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.shape == src.shape and ds.transform == src.transform
        nodata_in = np.all(src.read() == 0, axis=0)
        cls = ds.read(1)
        inner = ~nodata_in
        assert np.mean(cls[inner] != 255) > 0.97  # borders of nodata may shift by a pixel after resampling


def test_column_bands_give_the_same_result_as_one_band(rgb_package, rgb_raster, tmp_path):
    segment(str(rgb_raster), str(rgb_package), str(tmp_path / "a.tif"), probabilities=str(tmp_path / "pa.tif"))
    segment(str(rgb_raster), str(rgb_package), str(tmp_path / "b.tif"), probabilities=str(tmp_path / "pb.tif"),
            max_band_width=256)
    with rasterio.open(tmp_path / "pa.tif") as a, rasterio.open(tmp_path / "pb.tif") as b:
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-6)


def test_mask_polygons_limit_the_output(rgb_package, rgb_raster, tmp_path):
    with rasterio.open(rgb_raster) as src:
        t = src.transform
        x0, y0 = t * (150, 100)
        x1, y1 = t * (250, 200)
    segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"),
            mask_geometries=[box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))])
    with rasterio.open(tmp_path / "o.tif") as ds:
        cls = ds.read(1)
        assert np.all(cls[:100] == 255) and np.all(cls[:, :150] == 255)
        assert np.all(cls[100:200, 150:250] != 255)


def test_batch_and_tile_overrides_do_not_change_the_grid(rgb_package, rgb_raster, tmp_path):
    res = segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), tile_size=96, overlap=8,
                  batch_size=5)
    assert res.tiles > 0
    with pytest.raises(InputError, match="multiple of 32"):
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), tile_size=100)
    with pytest.raises(InputError, match="OVERLAP"):
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), tile_size=64, overlap=40)


def test_task_mismatch_is_refused(rgb_package, rgb_raster, tmp_path):
    pkg = load_package(rgb_package)
    pkg.task = "detection"
    with pytest.raises(InputError, match="detection model"):
        segment(str(rgb_raster), pkg, str(tmp_path / "o.tif"))


def test_full_landsat_scene(rgb_package, tmp_path):
    res = segment(str(LANDSAT), str(rgb_package), str(tmp_path / "o.tif"), batch_size=4)
    with rasterio.open(LANDSAT) as src, rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.transform == src.transform and ds.crs == src.crs
    assert res.tiles_run <= res.tiles


def test_device_choice(rgb_package, rgb_raster, tmp_path):
    """auto picks the GPU when there is one; asking for a missing GPU is a clear error."""
    import torch
    from rs_deep.rs_deep_plugin.engine.models.runners import select_device
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown"):
        select_device("tpu")
    if torch.cuda.is_available():
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "gpu.tif"), probabilities=str(tmp_path / "pg.tif"),
                device="cuda")
        segment(str(rgb_raster), str(rgb_package), str(tmp_path / "cpu.tif"), probabilities=str(tmp_path / "pc.tif"),
                device="cpu")
        with rasterio.open(tmp_path / "pg.tif") as g, rasterio.open(tmp_path / "pc.tif") as c:
            np.testing.assert_allclose(g.read(), c.read(), atol=0.02)  # float16 autocast on the GPU
    else:
        with pytest.raises(InputError, match="no CUDA GPU"):
            segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), device="cuda")
        assert not (tmp_path / "o.tif").exists()


def test_colour_table_survives_a_raster_larger_than_gdals_cache(tmp_path):
    """With GDAL's block cache smaller than the class raster, blocks reach the disk before the file is closed;
    the colour table (a TIFF tag) must be set before that, or it is lost."""
    import subprocess
    import sys
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "build" / "dev-plugins")!r})
from rs_deep.rs_deep_plugin.engine.geo.writer import GeoTiffWriter
from rasterio.transform import from_origin
w = GeoTiffWriter({str(tmp_path / "big.tif")!r}, 2048, 2048, 1, "uint8", from_origin(0, 2048, 1, 1), "EPSG:32616", 255,
                  colormap={{0: (0, 0, 0, 255), 1: (227, 26, 28, 255)}})
rng = np.random.default_rng(0)
for y in range(0, 2048, 256):
    w.write(rng.integers(0, 2, (256, 2048), dtype=np.uint8), 0, y)
w.close()
"""
    env = dict(os.environ, GDAL_CACHEMAX="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Cannot modify tag" not in proc.stderr
    with rasterio.open(tmp_path / "big.tif") as ds:
        assert ds.colorinterp[0].name == "palette" and ds.colormap(1)[1] == (227, 26, 28, 255)


def test_runner_folds_batch_norm_into_the_convolutions(tmp_path):
    """The inference runner folds BatchNorm into the convolutions (the bundled buildings model and a Siamese change
    network): no BatchNorm left where tracing works, the same probabilities as the network as it was written."""
    import torch
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.runners import ModelRunner, fuse_for_inference, select_device
    from conftest import DEMO_MODEL
    pkg = load_package(DEMO_MODEL)
    x = np.random.default_rng(0).random((2, 1, 128, 128), np.float32)
    plain = ModelRunner(pkg.load_model(), select_device("cpu"), pkg.activation, fuse=False)
    fused = ModelRunner(pkg.load_model(), select_device("cpu"), pkg.activation)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.modules())
    assert np.abs(plain(x) - fused(x)).max() < 1e-5
    torch.manual_seed(0)
    siamese = build_model({"library": "rs_deep", "architecture": "SiameseUnet", "encoder": "resnet18",
                           "in_channels": 3, "classes": 2, "encoder_weights": None,
                           "params": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}).eval()
    for m in siamese.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded, n = fuse_for_inference(siamese)
    assert n >= 1 and any(isinstance(m, torch.nn.BatchNorm2d) for m in siamese.modules())  # the original is kept
    x6 = torch.from_numpy(np.random.default_rng(1).random((2, 6, 64, 64), np.float32))
    with torch.inference_mode():
        assert (siamese(x6) - folded(x6)).abs().max().item() < 1e-4
