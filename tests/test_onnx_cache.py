"""RS Deep packages on the CPU run from their cached onnxruntime graph (engine/models/onnx/cache.py): the same classes
and probabilities as PyTorch, exported once into the cache folder (never beside the package), a second run without
torch in memory, a damaged cache rebuilt, and PyTorch whenever the cache cannot be used."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.onnx import cache

from conftest import DEMO_MODEL, DEV_PLUGINS, SAMPLE
from test_lean import loaded


def folder_state(path):
    """{relative path: (size, mtime)} of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def run(tmp_path, name, **kw):
    lines = []
    res = segment(SAMPLE, DEMO_MODEL, tmp_path / f"{name}.tif", probabilities=tmp_path / f"{name}_p.tif",
                  device="cpu", log=lines.append, **kw)
    with rasterio.open(res.output) as c, rasterio.open(tmp_path / f"{name}_p.tif") as p:
        return res, c.read(1), p.read(), lines


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RS_DEEP_CACHE_DIR", str(folder))
    monkeypatch.delenv("RS_DEEP_ONNX_CACHE", raising=False)
    return folder / "onnx"


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """buildings_demo on the Atlanta sample with PyTorch (the cache off)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RS_DEEP_ONNX_CACHE", "0")
    try:
        return run(tmp_path_factory.mktemp("torch_run"), "torch")
    finally:
        mp.undo()


def test_cached_graph_gives_pytorchs_results(torch_run, cache_dir, tmp_path):
    before = folder_state(DEMO_MODEL)
    res_t, cls_t, prob_t, lines_t = torch_run
    assert res_t.device.startswith("CPU (") and "onnxruntime" not in res_t.device
    res, cls, prob, lines = run(tmp_path, "onnx")
    assert res.device == "CPU (onnxruntime)"
    assert any(line.startswith("Preparing buildings_demo for onnxruntime") for line in lines)
    assert (cls == cls_t).mean() >= 0.9999 and res.class_pixels == pytest.approx(res_t.class_pixels, abs=30)
    assert float(np.abs(prob - prob_t).max()) <= cache.TOLERANCE
    assert (cls == 1).sum() > 1000  # buildings found, not an empty raster equal to another
    # one graph and its record in the cache folder; nothing written beside the package
    files = sorted(os.listdir(cache_dir))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "onnx"]
    info = json.loads((cache_dir / files[0]).read_text())
    assert info["max_difference"] <= cache.TOLERANCE and info["tile_size"] == 512
    assert folder_state(DEMO_MODEL) == before
    # the second run uses the graph as it is
    res2, cls2, _, lines2 = run(tmp_path, "onnx2")
    assert not any("Preparing" in line for line in lines2) and (cls2 == cls).all()


ENGINE_RUN = """
import json, sys
sys.path.insert(0, {plugins!r})
from rs_deep.rs_deep_plugin.engine import segment
res = segment({raster!r}, {model!r}, {out!r}, log=print)
print(json.dumps({{"pixels": res.class_pixels, "device": res.device, "modules": sorted(sys.modules)}}))
"""


def test_a_cached_package_runs_without_torch(cache_dir, tmp_path):
    """Once cached, a run of the PyTorch package in a fresh Python (DEVICE auto, no GPU here) never loads torch."""
    code = ENGINE_RUN.format(plugins=str(DEV_PLUGINS), raster=str(SAMPLE), model=str(DEMO_MODEL),
                             out=str(tmp_path / "classes.tif"))
    results = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert results[-1]["device"] == "CPU (onnxruntime)"
    assert loaded(results[0]["modules"])  # the first run exported the package (PyTorch)
    assert loaded(results[1]["modules"]) == [], f"a cached run imported {loaded(results[1]['modules'])}"
    assert results[0]["pixels"] == results[1]["pixels"]


def test_a_damaged_graph_is_made_again(torch_run, cache_dir, tmp_path):
    run(tmp_path, "first")
    (graph,) = cache_dir.glob("*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # damaged weights: the checksum no longer matches
    graph.write_bytes(bytes(data))
    cache._READY.clear()  # as in a new process
    res, cls, _, lines = run(tmp_path, "again")
    assert any(line.startswith("Preparing") for line in lines) and res.device == "CPU (onnxruntime)"
    assert (cls == torch_run[1]).mean() >= 0.9999


def test_pytorch_runs_when_the_cache_cannot_be_used(torch_run, tmp_path, monkeypatch):
    # a cache folder that cannot be made (a file is in the way): PyTorch, with a line saying why
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("RS_DEEP_CACHE_DIR", str(blocker))
    res, cls, _, lines = run(tmp_path, "blocked")
    assert "onnxruntime" not in res.device and any("runs on PyTorch" in line for line in lines)
    assert (cls == torch_run[1]).all()
    # RS_DEEP_ONNX_CACHE=0, a GPU asked for, a graph refused before: PyTorch, without trying
    pkg = load_package(DEMO_MODEL)
    monkeypatch.setenv("RS_DEEP_CACHE_DIR", str(tmp_path / "c"))
    assert cache.eligible(pkg, "cpu") and not cache.eligible(pkg, "cuda") and not cache.eligible(pkg, "mps")
    monkeypatch.setenv("RS_DEEP_ONNX_CACHE", "0")
    assert not cache.eligible(pkg, "cpu")
    monkeypatch.delenv("RS_DEEP_ONNX_CACHE")
    folder = tmp_path / "c" / "onnx"
    folder.mkdir(parents=True)
    (folder / (cache.cache_key(pkg) + ".json")).write_text(json.dumps({"refused": "differs"}))
    assert cache.prepare(pkg) is None
    res, _, _, lines = run(tmp_path, "refused")
    assert "onnxruntime" not in res.device and not list(folder.glob("*.onnx"))


def test_the_cache_keeps_the_latest_models(cache_dir, monkeypatch):
    """Another tile size is another graph; the least recently used graphs beyond KEEP are removed."""
    monkeypatch.setattr(cache, "KEEP", 2)
    pkg = load_package(DEMO_MODEL)
    paths = [cache.prepare(pkg.with_tiling(t, 16)) for t in (128, 160, 192)]
    assert all(paths) and len(set(paths)) == 3
    left = sorted(p.name for p in cache_dir.glob("*.onnx"))
    assert left == sorted(os.path.basename(p) for p in paths[1:])
    assert len(list(cache_dir.glob("*.json"))) == 2
