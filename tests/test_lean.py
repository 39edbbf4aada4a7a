"""Lean runs of ONNX models: segmenting or detecting with an ONNX model loads neither torch nor torchvision (through
the engine in a fresh Python, and through qgis_process), and what makes it so keeps torch's results: the numpy
bilinear resize (``F.interpolate``), the numpy class-wise NMS (``torchvision.ops.batched_nms``) and the device of
an ONNX model, chosen by onnxruntime's providers alone."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.inference.detect import merge_detections
from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
from rs_deep.rs_deep_plugin.engine.models.onnx.session import OnnxDevice, has_cuda_provider
from rs_deep.rs_deep_plugin.engine.models.postprocess import batched_nms, nms, resize_bilinear
from rs_deep.rs_deep_plugin.engine.models.runners import default_batch_size, device_description, select_device

from conftest import DEMO_MODEL, DEV_PLUGINS, ROOT, SAMPLE, TREES_IMAGE

TREES_DEMO = ROOT / "resources" / "models" / "trees_demo"
#: what an ONNX run must not load (torch, and what imports it)
TORCH_MODULES = ("torch", "torchvision", "segmentation_models_pytorch", "timm")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """The bundled buildings segmenter and tree detector, exported to ONNX here (rs_deep's own export)."""
    folder = tmp_path_factory.mktemp("lean_onnx")
    return export_onnx(DEMO_MODEL, folder / "buildings.onnx"), export_onnx(TREES_DEMO, folder / "trees.onnx")


@pytest.fixture(scope="module")
def tiny_pan(tmp_path_factory):
    """64 x 64 px of the bundled Atlanta image (real pixels, its CRS and 0.5 m grid)."""
    path = tmp_path_factory.mktemp("lean_raster") / "atlanta_64.tif"
    with rasterio.open(SAMPLE) as src:
        window = Window(200, 300, 64, 64)
        profile = dict(src.profile, width=64, height=64, transform=src.window_transform(window), tiled=False)
        for key in ("blockxsize", "blockysize"):
            profile.pop(key, None)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def loaded(modules):
    """Which of :data:`TORCH_MODULES` ``modules`` (names) holds, itself or one of its submodules (Python's import
    report may list torch's submodules without a line for torch itself)."""
    return sorted(m for m in TORCH_MODULES if any(n == m or n.startswith(m + ".") for n in modules))


# --------------------------------------------------------------------------------------------
# no torch in a run of an ONNX model


ENGINE_RUN = """
import json, sys
sys.path.insert(0, {plugins!r})
from rs_deep.rs_deep_plugin.engine import detect, segment
seg = segment({raster!r}, {seg_model!r}, {out!r}, probabilities={probs!r})
det = detect({image!r}, {det_model!r})
print(json.dumps({{"pixels": seg.class_pixels, "seg_device": seg.device, "boxes": len(det), "det_device": det.device,
                   "modules": sorted(sys.modules)}}))
"""


def test_engine_runs_onnx_models_without_torch(onnx_models, tiny_pan, tmp_path):
    """segment and detect with ONNX models, in a fresh Python (DEVICE auto): neither loads torch or torchvision."""
    seg_model, det_model = onnx_models
    code = ENGINE_RUN.format(plugins=str(DEV_PLUGINS), raster=str(tiny_pan), seg_model=str(seg_model),
                             out=str(tmp_path / "classes.tif"), probs=str(tmp_path / "probs.tif"),
                             image=str(TREES_IMAGE), det_model=str(det_model))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded(res["modules"]) == [], f"an ONNX run imported {loaded(res['modules'])}"
    assert "onnxruntime" in res["modules"]
    # the onnx package (protobuf parsing, ~0.1 s of start-up) is for exporting and for files with external data
    assert "onnx" not in res["modules"]
    assert sum(res["pixels"].values()) == 64 * 64
    assert res["boxes"] > 5  # trees on the NEON image
    expected = "CUDA GPU 0 (onnxruntime)" if has_cuda_provider() else "CPU (onnxruntime)"
    assert res["seg_device"] == res["det_device"] == expected


def imported_modules(stderr):
    """The modules a process imported, from its ``PYTHONPROFILEIMPORTTIME`` report (one line per import)."""
    return set(re.findall(r"^import time:\s*\d+ \|\s*\d+ \| *([\w.]+)\s*$", stderr, re.M))


def test_qgis_process_runs_onnx_models_without_torch(onnx_models, tiny_pan, tmp_path, monkeypatch):
    """rs_deep:segment (with polygons) and rs_deep:detect through qgis_process on ONNX models: Python's own import
    report (PYTHONPROFILEIMPORTTIME) names onnxruntime and the engine, and neither torch nor torchvision."""
    from qgis_env import run_qgis_process
    seg_model, det_model = onnx_models
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    runs = {
        "segment": ["run", "rs_deep:segment", "--json", "--", f"INPUT={tiny_pan}", f"MODEL={seg_model}",
                    f"OUTPUT={tmp_path / 'classes.tif'}", f"OUTPUT_VECTOR={tmp_path / 'classes.gpkg'}"],
        "detect": ["run", "rs_deep:detect", "--json", "--", f"INPUT={TREES_IMAGE}", f"MODEL={det_model}",
                   f"OUTPUT={tmp_path / 'trees.gpkg'}"],
    }
    for task, args in runs.items():
        proc = run_qgis_process(args)
        modules = imported_modules(proc.stderr)
        assert "onnxruntime" in modules and f"rs_deep.rs_deep_plugin.engine.inference.{task}" in modules, \
            proc.stderr[-2000:]
        assert loaded(modules) == [], f"rs_deep:{task} on an ONNX model imported {loaded(modules)}"
        res = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert res["results"]["OUTPUT"]
    assert (tmp_path / "classes.tif").exists() and (tmp_path / "trees.gpkg").exists()


# --------------------------------------------------------------------------------------------
# the device of an ONNX model


def test_onnx_device_is_chosen_by_onnxruntime(monkeypatch):
    cuda = has_cuda_provider()
    auto = select_device("auto", "onnx")
    assert isinstance(auto, OnnxDevice) and auto.type == ("cuda" if cuda else "cpu")
    cpu = select_device(" CPU ", "onnx")
    assert cpu == OnnxDevice("cpu") and str(cpu) == "cpu" and default_batch_size(cpu) == 2
    assert device_description(cpu) == "CPU (onnxruntime)"
    monkeypatch.setenv("RS_DEEP_THREADS", "3")
    assert device_description(cpu) == "CPU (3 threads, onnxruntime)"
    assert default_batch_size(OnnxDevice("cuda")) == 8
    if cuda:
        assert select_device("cuda:1", "onnx") == OnnxDevice("cuda", 1)
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(InputError, match="no CUDA provider.*onnxruntime-gpu"):
                select_device(name, "onnx")
    with pytest.raises(InputError, match="ONNX models run on the CPU or a CUDA GPU"):
        select_device("mps", "onnx")
    with pytest.raises(InputError, match="'cuda:x' is not a device name"):
        select_device("cuda:x", "onnx")
    for backend in ("onnx", "torch"):
        with pytest.raises(InputError, match="'tpu' is unknown"):
            select_device("tpu", backend)


# --------------------------------------------------------------------------------------------
# numpy post-processing = torch's


def test_resize_bilinear_is_torch_interpolate():
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    for shape, size in (((2, 2, 32, 32), (64, 64)), ((1, 3, 16, 16), (64, 64)), ((1, 3, 17, 23), (64, 48)),
                        ((2, 5, 128, 128), (512, 512)), ((1, 2, 100, 100), (37, 51)), ((1, 1, 1, 1), (8, 8)),
                        ((3, 24, 24), (96, 96))):
        x = (rng.standard_normal(shape) * 8).astype(np.float32)  # logits
        t = torch.from_numpy(x if x.ndim == 4 else x[None])
        ref = F.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy().reshape(x.shape[:-2] + size)
        got = resize_bilinear(x, size)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-5, (shape, size, np.abs(got - ref).max())
    same = rng.random((2, 8, 8)).astype(np.float32)
    assert resize_bilinear(same, (8, 8)) is same


def test_onnx_model_at_a_coarser_resolution_is_resized_as_torch_does(tmp_path):
    """An ONNX segmenter whose logits are at half the tile's resolution: the runner's probabilities are those of
    the network's logits upsampled by F.interpolate, then softmax (within 1e-5)."""
    import io
    import warnings

    import onnx
    import torch
    import torch.nn.functional as F
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package

    class Coarse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(F.avg_pool2d(x, 2)) * 4.0

    net = Coarse().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 64, 64), buf, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in {"model_type": '"Segmentor"', "class_names": "{0: 'a', 1: 'b', 2: 'c'}", "tile_size": "64",
                       "tiles_overlap": "0"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "coarse.onnx"))
    pkg = load_package(tmp_path / "coarse.onnx", task="segmentation")
    batch = np.random.default_rng(1).random((2, 3, 64, 64)).astype(np.float32)
    got = pkg.make_runner(select_device("cpu", "onnx"))(batch)
    with torch.inference_mode():
        logits = F.interpolate(net(torch.from_numpy(batch)), size=(64, 64), mode="bilinear", align_corners=False)
        ref = torch.softmax(logits, dim=1).numpy()
    assert got.shape == (2, 3, 64, 64) and np.abs(got - ref).max() < 1e-5


def test_onnx_lanes_open_with_the_first_batch_of_several_tiles(onnx_models, monkeypatch):
    """On the CPU an ONNX runner splits a batch between lanes (a session each); a run of single tiles creates only
    the first lane's session, and a batch of several tiles gives each tile what it gets on its own."""
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.onnx.runners import LANES
    monkeypatch.setenv("RS_DEEP_THREADS", str(LANES))
    pkg = load_package(onnx_models[0])
    runner = pkg.make_runner(OnnxDevice("cpu"))
    with rasterio.open(SAMPLE) as src:
        side = pkg.fixed_size[0] if pkg.fixed_size else 128
        pixels = src.read(window=Window(0, 0, side, side)).astype(np.float32) / 255.0
    tiles = np.stack([pixels, pixels[:, ::-1, :].copy(), pixels[:, :, ::-1].copy()])
    single = [runner(tiles[i:i + 1])[0] for i in range(len(tiles))]
    assert len(runner.sessions) == 1
    together = runner(tiles)
    assert len(runner.sessions) == LANES
    for i, probs in enumerate(single):
        assert np.abs(together[i] - probs).max() < 1e-5, i


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batches_run_at_once_on_the_lanes_give_the_same_pixels(onnx_models, tmp_path, monkeypatch, batch_size):
    """The segmentation pipeline runs as many batches at once as an ONNX runner has lanes (their parts queue for
    whichever lane is free); the probabilities written are those of one batch at a time, to the bit."""
    from rs_deep.rs_deep_plugin.engine import segment
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.onnx.runners import LANES, OnnxRunner
    monkeypatch.setenv("RS_DEEP_THREADS", str(LANES))
    pkg = load_package(onnx_models[0])
    assert pkg.make_runner(OnnxDevice("cpu")).concurrent_batches == LANES
    outs = {}
    for depth in (LANES, 1):
        with monkeypatch.context() as m:
            if depth == 1:
                m.setattr(OnnxRunner, "concurrent_batches", 1)
            res = segment(SAMPLE, onnx_models[0], tmp_path / f"classes_{depth}.tif", device="cpu",
                          probabilities=tmp_path / f"probs_{depth}.tif", batch_size=batch_size, overlap=192)
        assert res.tiles_run >= 3 * batch_size  # 3 batches or more (its 512 px tiles, 320 px apart)
        with rasterio.open(res.probabilities) as src:
            outs[depth] = src.read()
    assert np.array_equal(outs[LANES], outs[1])


def test_runs_of_an_onnx_model_leave_no_lanes_behind(onnx_models, tmp_path, monkeypatch):
    """Each run's ONNX runner, its lanes' threads and their sessions go when the run ends: until 0.20.1 the lanes'
    threads held their runner, so every run of several tiles in one QGIS session left two threads and their
    sessions in memory (an OOM after 170 runs of tools/epoch_choice.py)."""
    import gc
    import threading
    import weakref
    from rs_deep.rs_deep_plugin.engine import segment
    from rs_deep.rs_deep_plugin.engine.models.onnx.runners import LANES, OnnxRunner
    monkeypatch.setenv("RS_DEEP_THREADS", str(LANES))
    made = []
    init = OnnxRunner.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(OnnxRunner, "__init__", remember)
    before = {t.ident for t in threading.enumerate()}
    for i in range(3):
        res = segment(SAMPLE, onnx_models[0], tmp_path / f"classes_{i}.tif", device="cpu", overlap=192)
        assert res.tiles_run >= 3
    gc.collect()
    assert len(made) == 3 and all(ref() is None for ref in made)  # every runner went
    lanes = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("rs_deep-onnx")]
    for t in lanes:  # shut down without waiting: give them a moment to end
        t.join(timeout=10)
    assert not [t.name for t in lanes if t.is_alive()]


def random_boxes(rng, n, low=0.0, high=500.0, empty=0.05):
    xy = rng.uniform(low, high, (n, 2))
    wh = rng.uniform(1.0, 60.0, (n, 2))
    wh[rng.random(n) < empty] = 0.0  # empty boxes (IoU 0/0) suppress nothing
    return np.concatenate([xy, xy + wh], axis=1)


def test_numpy_nms_keeps_the_boxes_torchvision_keeps():
    """On random boxes (several classes, thresholds, tied scores; fewer and more than 1000 boxes: torchvision's two
    batched paths), the same indices in the same score order; equal scores are listed by index."""
    import torch
    from torchvision.ops import batched_nms as tv_batched_nms
    from torchvision.ops import nms as tv_nms
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n = int(rng.choice([1, 2, 7, 60, 400, 1500]))
        boxes = random_boxes(rng, n)
        scores = rng.random(n) if seed % 3 else rng.integers(0, 6, n) / 5.0  # every third: many ties
        labels = rng.integers(0, int(rng.choice([1, 3, 20])), n)
        iou = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.8, 1.0]))
        tb, ts, tl = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
        got = batched_nms(boxes, scores, labels, iou)
        ref = tv_batched_nms(tb, ts, tl, iou).numpy()
        assert sorted(got.tolist()) == sorted(ref.tolist()), (seed, n, iou)
        assert np.array_equal(scores[got], scores[ref])  # best first
        assert np.array_equal(got, got[np.lexsort((got, -scores[got]))])  # equal scores: by index
        assert nms(boxes, scores, iou).tolist() == tv_nms(tb, ts, iou).numpy().tolist(), (seed, n, iou)
    # negative coordinates (YOLO boxes across a tile's edge): class-wise, as torchvision's nms class by class
    # (its batched shortcut for small sets, which shifts each class by the largest coordinate, assumes none)
    rng = np.random.default_rng(99)
    boxes, scores, labels = random_boxes(rng, 300, -80.0, 100.0), rng.random(300), rng.integers(0, 3, 300)
    ref = []
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        ref += idx[tv_nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), 0.3).numpy()].tolist()
    assert sorted(batched_nms(boxes, scores, labels, 0.3).tolist()) == sorted(ref)
    assert batched_nms(np.zeros((0, 4)), [], [], 0.5).tolist() == []


def test_merge_of_dense_overlapping_boxes_is_torchvision_batched_nms():
    """Crowded boxes (long chains of overlaps, tied scores) from many tiles, none cut by an edge: the merge keeps
    what one global batched_nms keeps, best first."""
    import torch
    from torchvision.ops import batched_nms as tv_batched_nms
    for seed in range(5):
        rng = np.random.default_rng(seed)
        n = 2500
        boxes = random_boxes(rng, n, 0.0, 300.0, empty=0.0)
        scores = rng.integers(0, 50, n) / 50.0
        labels = rng.integers(0, 3, n)
        keep = merge_detections(boxes, scores, labels, rng.integers(0, 9, n), np.zeros(n, bool), 0.4)
        ref = tv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.4).numpy()
        assert sorted(keep.tolist()) == sorted(ref.tolist()) and 0 < len(keep) < n
        assert np.array_equal(scores[keep], scores[ref])
