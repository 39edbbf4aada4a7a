"""The Dask backend (engine/inference/distributed.py) on a real LocalCluster of 2 worker processes: the same class
raster (pixel for pixel), probabilities, boxes, change raster and patch classes as one process; a worker killed in
the middle of a run; an unreachable scheduler; a block that fails on its data; cancel; qgis_process with
CLUSTER=local:2."""
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import Cancelled, InputError
from rs_deep.rs_deep_plugin.engine.inference.change import detect_change
from rs_deep.rs_deep_plugin.engine.inference.detect import detect
from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches
from rs_deep.rs_deep_plugin.engine.inference.segment import segment

from conftest import ROOT, SAMPLE
from test_change import make_change_package, pair, scene  # noqa: F401 (fixtures)
from test_patches import IMAGE, make_patch_package

BUILDINGS = ROOT / "resources" / "models" / "buildings_demo"
TREES = ROOT / "resources" / "models" / "trees_demo"
TREES_SAMPLE = ROOT / "resources" / "sample" / "osbs_029.tif"
# small tiles and blocks: a 600 x 900 px raster in 6 blocks with borders inside it
TILING = dict(tile_size=128, overlap=32)
BLOCK = 256


@pytest.fixture(scope="module")
def cluster():
    """The scheduler address of a LocalCluster of 2 worker processes, one thread each (as ``local:2`` starts)."""
    import distributed
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as lc:
        yield lc.scheduler_address


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process class and probability rasters of the sample."""
    folder = tmp_path_factory.mktemp("ref")
    res = segment(SAMPLE, BUILDINGS, folder / "cls.tif", probabilities=folder / "p.tif", **TILING)
    with rasterio.open(res.output) as ds, rasterio.open(res.probabilities) as dp:
        return res, ds.read(), dp.read(), ds.profile


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile


def test_segmentation_equals_one_process(cluster, reference, tmp_path):
    ref, cls, probs, profile = reference
    logs = []
    res = segment(SAMPLE, BUILDINGS, tmp_path / "cls.tif", probabilities=tmp_path / "p.tif", cluster=cluster,
                  block_size=BLOCK, log=logs.append, **TILING)
    got, got_profile = _read(res.output)
    assert (got == cls).all()  # pixel for pixel
    assert got_profile["transform"] == profile["transform"] and got_profile["crs"] == profile["crs"]
    np.testing.assert_allclose(_read(res.probabilities)[0], probs, atol=1e-5)
    assert res.class_pixels == ref.class_pixels
    assert res.tiles_run == ref.tiles_run  # each tile run once, by one block
    assert any("dashboard http" in m for m in logs)
    assert sorted(os.listdir(tmp_path)) == ["cls.tif", "cls.tif.aux.xml", "p.tif"]


def test_segmentation_in_column_bands_and_tile_rows_equals_one_process(cluster, tmp_path):
    """Narrow column bands (as a raster wider than 8192 px gets) cut into blocks of two tile rows, on tile rows spread
    evenly over the raster's height (each 85 or 86 px below the one before, so that the overlaps differ)."""
    from rs_deep.rs_deep_plugin.engine.inference.tiling import TileGrid, column_bands
    kw = dict(TILING, max_band_width=256)
    one = segment(SAMPLE, BUILDINGS, tmp_path / "one.tif", probabilities=tmp_path / "p1.tif", **kw)
    many = segment(SAMPLE, BUILDINGS, tmp_path / "many.tif", probabilities=tmp_path / "p2.tif", cluster=cluster,
                   block_size=200, **kw)
    grid = TileGrid(0, 0, 600, 900, 128, 32)
    blocks = grid.row_blocks(column_bands(0, 600, 256), 200)
    assert len({b[:2] for b in blocks}) == 3 and len(blocks) == 12 and grid.ys[-3:] == [600, 686, 772]
    assert (_read(many.output)[0] == _read(one.output)[0]).all()
    assert (_read(many.probabilities)[0] == _read(one.probabilities)[0]).all()  # bit for bit: the same sums
    assert many.tiles_run == one.tiles_run and many.class_pixels == one.class_pixels


def test_detection_same_boxes(cluster):
    kw = dict(tile_size=128, overlap=32)
    one = detect(TREES_SAMPLE, TREES, **kw)
    many = detect(TREES_SAMPLE, TREES, cluster=cluster, block_size=200, **kw)
    assert len(one) > 20 and len(many) == len(one) and many.raw_detections == one.raw_detections
    assert [d.class_id for d in many] == [d.class_id for d in one]
    # the workers' torch runs on 1 thread, this process's on several: the same boxes to float rounding
    np.testing.assert_allclose([d.pixel_box for d in many], [d.pixel_box for d in one], atol=1e-3)
    np.testing.assert_allclose([d.score for d in many], [d.score for d in one], atol=1e-5)


def test_change_equals_one_process(cluster, pair, tmp_path):  # noqa: F811 (fixture)
    before, after = pair
    pkg = make_change_package(tmp_path / "chg")
    one = detect_change(before, after, pkg, tmp_path / "one.tif", probabilities=tmp_path / "one_p.tif")
    many = detect_change(before, after, pkg, tmp_path / "many.tif", probabilities=tmp_path / "many_p.tif",
                         cluster=cluster, block_size=64)
    assert (_read(many.output)[0] == _read(one.output)[0]).all()
    np.testing.assert_allclose(_read(many.probabilities)[0], _read(one.probabilities)[0], atol=1e-5)
    assert many.class_pixels == one.class_pixels


def test_patches_equal_one_process(cluster, tmp_path):
    pkg = make_patch_package(tmp_path / "pc")
    one = classify_patches(IMAGE, pkg, bands=[1, 2, 3])
    many = classify_patches(IMAGE, pkg, bands=[1, 2, 3], cluster=cluster, block_size=64)
    assert len(many) == len(one) > 100
    assert [(f["row"], f["col"], f["class_id"], f["window"]) for f in many] == \
        [(f["row"], f["col"], f["class_id"], f["window"]) for f in one]
    np.testing.assert_allclose([f["score"] for f in many], [f["score"] for f in one], atol=1e-5)


def test_killed_worker_is_replaced_and_output_identical(cluster, reference, tmp_path):
    import distributed
    _, cls, _, _ = reference
    client = distributed.Client(cluster)
    try:
        pids = client.run(os.getpid)
        started = threading.Event()
        out = {}

        def run():
            try:
                out["res"] = segment(SAMPLE, BUILDINGS, tmp_path / "cls.tif", cluster=cluster, block_size=BLOCK,
                                     progress=lambda f, m=None: (f or 0) > 0 and started.set(), **TILING)
            except BaseException as exc:  # reported below
                out["error"] = exc
            started.set()

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(120)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)  # a worker dies while blocks are running
        t.join(300)
        assert "error" not in out, out.get("error")
        assert (_read(out["res"].output)[0] == cls).all()
        client.wait_for_workers(2, timeout=60)  # the nanny started a new one
        assert victim not in client.run(os.getpid).values()
    finally:
        client.close()


def test_unreachable_scheduler_fails_fast_naming_it(tmp_path):
    t0 = time.time()
    with pytest.raises(InputError, match=r"tcp://127\.0\.0\.1:1\b"):
        segment(SAMPLE, BUILDINGS, tmp_path / "cls.tif", cluster="tcp://127.0.0.1:1", **TILING)
    print(f"unreachable scheduler reported after {time.time() - t0:.1f} s")
    assert os.listdir(tmp_path) == []


def test_block_that_fails_on_its_data_fails_the_run_naming_its_window(cluster, tmp_path):
    """A GeoTIFF cut short: its header and first tiles are readable, its last tiles are not."""
    src = tmp_path / "tiled.tif"
    subprocess.run(["gdal_translate", "-q", "-co", "TILED=YES", "-co", "BLOCKXSIZE=128", "-co", "BLOCKYSIZE=128",
                    str(SAMPLE), str(src)], check=True)
    size = os.path.getsize(src)
    with open(src, "r+b") as f:
        f.truncate(int(size * 0.7))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"The block of columns \d+-\d+, rows \d+-\d+ \(window x="):
        segment(src, BUILDINGS, out / "cls.tif", cluster=cluster, block_size=BLOCK, **TILING)
    assert os.listdir(out) == []


def test_cancel_leaves_nothing(cluster, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference[0].output, out / "cls.tif")  # an earlier output stays as it was
    before = (out / "cls.tif").read_bytes()
    seen = []
    with pytest.raises(Cancelled):
        segment(SAMPLE, BUILDINGS, out / "cls.tif", probabilities=out / "p.tif", cluster=cluster, block_size=BLOCK,
                progress=lambda f, m=None: seen.append(f or 0), is_cancelled=lambda: any(f > 0 for f in seen),
                **TILING)
    assert sorted(os.listdir(out)) == ["cls.tif"] and (out / "cls.tif").read_bytes() == before


def test_missing_cluster_form_is_explained(tmp_path):
    with pytest.raises(InputError, match="local:N"):
        segment(SAMPLE, BUILDINGS, tmp_path / "cls.tif", cluster="local:zero", **TILING)


def test_qgis_process_with_local_cluster(reference, tmp_path):
    from qgis_env import run_qgis_process
    _, cls, _, _ = reference
    out = tmp_path / "q.tif"
    proc = run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={SAMPLE}", f"MODEL={BUILDINGS}",
                             f"OUTPUT={out}", "TILE_SIZE=128", "OVERLAP=32", "CLUSTER=local:2",
                             f"CLUSTER_BLOCK={BLOCK}"])
    assert "dashboard http" in proc.stdout + proc.stderr
    assert (_read(out)[0] == cls).all()


def test_a_local_cluster_leaves_this_process_environment_as_it_was(reference, tmp_path):
    """Dask's nanny puts OMP_NUM_THREADS=1 and its pre-spawn environment (RS_DEEP_THREADS) into the client's
    os.environ to spawn its workers: in QGIS, every later run in QGIS's own process would run on one thread."""
    before = dict(os.environ)
    res = segment(SAMPLE, BUILDINGS, tmp_path / "c.tif", cluster="local:2", block_size=BLOCK, **TILING)
    assert (_read(res.output)[0] == reference[1]).all()
    assert dict(os.environ) == before


def test_similarity_search_equals_one_process(cluster, tmp_path):
    """rs_deep:find_similar on the cluster (blocks of whole patch rows, the query embedded by the client): the same
    patches, similarities and ranks, the same similarity raster, as in one process."""
    from rs_deep.rs_deep_plugin.engine.inference.similar import find_similar
    from test_deepness import DEEPNESS, REC_QUERY, _metric_map, _relabelled
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    image = _metric_map(tmp_path)
    kw = dict(stride=112, gsd=0.5, batch_size=4)
    one = find_similar(image, model, REC_QUERY, raster_output=tmp_path / "one.tif", **kw)
    many = find_similar(image, model, REC_QUERY, raster_output=tmp_path / "many.tif", cluster=cluster,
                        block_size=100, **kw)
    assert many.device.startswith("Dask cluster") and len(many) == len(one) > 50
    assert [(f["row"], f["col"], f["rank"], f["window"]) for f in many] == \
        [(f["row"], f["col"], f["rank"], f["window"]) for f in one]
    np.testing.assert_allclose([f["similarity"] for f in many], [f["similarity"] for f in one], atol=1e-6)
    assert np.array_equal(_read(tmp_path / "many.tif")[0], _read(tmp_path / "one.tif")[0])
