"""A full disk fails the run with a message about disk space, leaves the earlier output byte for byte, and leaves no
temporary file behind: the engine's rasters (whatever GDAL says or keeps quiet about) and the vector outputs of the
Processing algorithms (a GeoPackage through qgis_process).

The disk is made full per file with RLIMIT_FSIZE in a subprocess: no file may grow past the limit, and with SIGXFSZ
ignored a write past it fails with EFBIG ("File too large"), as ENOSPC does on a full disk. GDAL reports such a
failure only as a logged error (rasterio's write() and close() return normally: on GDAL 3.10 / rasterio 1.4 even
the logged error may never reach Python), so these runs used to succeed and rename a truncated file over the earlier
result.
"""
import os
import subprocess
import sys

import pytest
import rasterio

from conftest import DEV_PLUGINS, LANDSAT, write_raster

# The prologue of every full-disk subprocess (``python -c SCRIPT LIMIT ...``): a disk with LIMIT bytes free per file.
FULL_DISK = r"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""

# engine segmentation: PLUGINS INPUT MODEL OUTPUT [PROBABILITIES]
SEGMENT = FULL_DISK + r"""
sys.path.insert(0, sys.argv[1])
from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
try:
    segment(sys.argv[2], sys.argv[3], sys.argv[4], probabilities=sys.argv[5] if len(sys.argv) > 5 else None)
    print("SUCCEEDED")
except InputError as exc:
    print("INPUTERROR", exc)
"""

# any program under the limit: PROGRAM ARGS...
EXEC = FULL_DISK + "os.execv(sys.argv[1], sys.argv[1:])\n"


def _landsat_crop(path, width, height):
    from rasterio.windows import Window
    with rasterio.open(LANDSAT) as src:
        win = Window(0, 0, width, height)
        return write_raster(path, src.read(window=win), transform=src.window_transform(win), crs=src.crs, nodata=0)


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("size, limit, probabilities, lost", [
    # 300 x 260: the class raster (8 kB) fits, the probabilities overflow while GDAL flushes them at close(); their
    # overviews come after (the old code failed here only because GDAL 3.6 cannot reopen the file for them)
    ((300, 260), 60_000, True, "p.tif"),
    # 256 x 256: one tile, no overview step at all; close() is the last thing GDAL does with the file
    ((256, 256), 2_000, False, "o.tif"),  # the class raster itself overflows (its directory is lost)
    ((256, 256), 30_000, True, "p.tif"),  # the probability tile is cut, GDAL keeps going and rewrites the directory
], ids=["probabilities-with-overviews", "class-raster-no-overviews", "probabilities-no-overviews"])
def test_engine_raster_on_a_full_disk(rgb_package, tmp_path, size, limit, probabilities, lost):
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    image = _landsat_crop(tmp_path / "in.tif", *size)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, probs = out_dir / "o.tif", out_dir / "p.tif"
    segment(str(image), str(rgb_package), str(out), probabilities=str(probs) if probabilities else None)
    earlier = _snapshot(out_dir)  # the earlier results, complete
    args = [sys.executable, "-c", SEGMENT, str(limit), str(DEV_PLUGINS), str(image), str(rgb_package), str(out)]
    proc = subprocess.run(args + ([str(probs)] if probabilities else []), capture_output=True, text=True, timeout=300)
    assert "INPUTERROR" in proc.stdout, proc.stdout + proc.stderr
    assert f"Writing {out_dir / lost} failed" in proc.stdout and "disk full" in proc.stdout, proc.stdout
    assert _snapshot(out_dir) == earlier  # byte for byte, and no temporary file left


def test_verify_raster_finds_blocks_past_the_end_of_the_file(tmp_path):
    """The cheap check behind every engine raster: a GeoTIFF whose last bytes never reached the disk is refused."""
    import numpy as np
    from rs_deep.rs_deep_plugin.engine.errors import InputError
    from rs_deep.rs_deep_plugin.engine.geo.writer import tiff_problem, verify_raster
    path = write_raster(tmp_path / "r.tif", np.arange(2 * 300 * 300, dtype=np.float32).reshape(2, 300, 300))
    verify_raster(str(path))  # whole: passes
    assert tiff_problem(str(path)) is None
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    assert "past the end of the file" in tiff_problem(str(path))
    with pytest.raises(InputError, match="disk full"):
        verify_raster(str(path), "final.tif")


def test_small_files_on_a_full_disk(tmp_path):
    """write_atomic (reports, packages, GeoJSON detections, chip manifests): Python raises on EFBIG / ENOSPC; the run
    gets the disk-full InputError, the earlier file stays and the temporary file goes."""
    target = tmp_path / "report.json"
    target.write_text('{"earlier": true}')
    script = FULL_DISK + r"""
sys.path.insert(0, sys.argv[1])
from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.files import write_atomic
try:
    write_atomic(sys.argv[2], "x" * 100_000)
    print("SUCCEEDED")
except InputError as exc:
    print("INPUTERROR", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script, "10000", str(DEV_PLUGINS), str(target)], capture_output=True,
                          text=True, timeout=120)
    assert f"INPUTERROR Writing {target} failed" in proc.stdout, proc.stdout + proc.stderr
    assert "disk full" in proc.stdout
    assert target.read_text() == '{"earlier": true}' and os.listdir(tmp_path) == ["report.json"]


def test_geopackage_of_qgis_process_on_a_full_disk(rgb_package, rgb_raster, tmp_path):
    """rs_deep:segment through qgis_process: the class raster fits, the GeoPackage of class polygons does not. QGIS's
    writer ignores a failed commit ("sqlite3_exec(COMMIT) failed: disk I/O error") and used to replace the earlier
    GeoPackage as soon as the sink was created."""
    from qgis_env import run_qgis_process
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gpkg = out_dir / "v.gpkg"
    args = ["run", "rs_deep:segment", "--", f"INPUT={rgb_raster}", f"MODEL={rgb_package}",
            f"OUTPUT={out_dir / 'o.tif'}", f"OUTPUT_VECTOR={gpkg}", "MIN_AREA=0"]
    profile = str(tmp_path / "profile")
    run_qgis_process(args, profile=profile)  # the earlier results
    earlier = _snapshot(out_dir)
    # one page (4 kB) less than the GeoPackage needs, far more than the class raster and its confidence raster
    limit = len(earlier["v.gpkg"]) - 4096
    assert limit > 2 * len(earlier["o.tif"])
    proc = run_qgis_process(args, profile=profile, check=False, wrapper=[sys.executable, "-c", EXEC, str(limit)])
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert f"Writing {gpkg} failed" in log or f"Cannot create {gpkg}" in log, log
    assert "disk full" in log, log
    assert (out_dir / "v.gpkg").read_bytes() == earlier["v.gpkg"]
    assert sorted(os.listdir(out_dir)) == sorted(earlier)  # no temporary file (.v.rsdeep-*.gpkg, -journal) left


@pytest.mark.parametrize("ext", ["gpkg", "shp"])
def test_vector_output_replaces_the_earlier_one_and_is_loaded_from_its_final_path(provider, rgb_package, rgb_raster,
                                                                                  tmp_path, ext):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProcessingOutputLayerDefinition, QgsProject
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / f"v.{ext}"
    for min_area in (0, 1e12):  # an earlier result, then one without polygons
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        res = processing.run("rs_deep:segment", {
            "INPUT": str(rgb_raster), "MODEL": str(rgb_package), "OUTPUT": str(out_dir / "o.tif"),
            "OUTPUT_VECTOR": QgsProcessingOutputLayerDefinition(str(dest), QgsProject.instance()),
            "MIN_AREA": min_area}, context=context, feedback=QgsProcessingFeedback())
        assert res["OUTPUT_VECTOR"] == str(dest)
        loads = context.layersToLoadOnCompletion()
        assert str(dest) in loads and not [k for k in loads if ".rsdeep-" in k]
        assert loads[str(dest)].postProcessor() is not None  # the class colours
        assert not [n for n in os.listdir(out_dir) if n.startswith(".")]
    from qgis.core import QgsVectorLayer
    layer = QgsVectorLayer(str(dest), "v")
    assert layer.isValid() and layer.featureCount() == 0
    assert layer.fields().indexOf("class_name") >= 0
