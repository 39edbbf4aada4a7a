"""Hostile model files are refused with a message naming the file, the limit and the fix, never with a traceback,
never by taking the machine's memory, and never by touching the network (issue "Nothing lost, nothing silent",
reliability sweep cases 27, 33, 34, 35, 41, 43, 45, 46, 47, 50, 51, 52, 54, 86).

Every bad file is built for real here. The cases that could take memory run in a child process whose peak
resident memory (VmHWM) is read back: it must stay under PEAK_MB (a bound, not a timing)."""
import hashlib
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import numpy as np
import pytest

from rs_deep.rs_deep_plugin.engine.training.chips import load_manifest
from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.limits import (MAX_CLASSES, MAX_JSON_DEPTH, MAX_ONNX_WORKING_BYTES,
                                                  MAX_PARAMETERS, MAX_TILE_SIZE, MAX_WEIGHTS_BYTES, MAX_ZIP_RATIO)
from rs_deep.rs_deep_plugin.engine.models.loading import load_package

from conftest import DEMO_MODEL, DEV_PLUGINS, SAMPLE

PEAK_MB = 1500
GIB4 = (4 << 30) - 1  # the sweep's files: 4 GiB - 1 byte, just under the 4 GiB weights limit

# ---------------------------------------------------------------------------------------------------------------
# helpers

CHILD = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
out = {"error": None}
try:
    exec(compile(sys.argv[2], "case", "exec"), {"out": out})
except BaseException as exc:
    out.update(error=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
peak = None
if os.path.exists("/proc/self/status"):
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024.0
if peak is None:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)
out["peak_mb"] = peak
print("RESULT " + json.dumps(out))
"""


def run_case(code, env=None):
    """Run ``code`` in a fresh Python (environment ``env``, default ours); returns {error (class name or None),
    message, traceback, peak_mb, what the code put in ``out``}."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(DEV_PLUGINS), code], capture_output=True, text=True,
                          env=env, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_refused(res, error, *fragments, peak=True):
    assert res["error"] == error, res.get("traceback") or res
    for f in fragments:
        assert f in res["message"], (f, res["message"])
    if peak:
        assert res["peak_mb"] < PEAK_MB, f"peak memory {res['peak_mb']:.0f} MB for a refused file"


def edit_package(src, dst, fn=None):
    """A copy of the package ``src`` at ``dst`` with ``fn(properties)`` applied to its model.json."""
    shutil.copytree(src, dst)
    if fn is not None:
        meta = json.loads((dst / "model.json").read_text())
        fn(meta["properties"])
        (dst / "model.json").write_text(json.dumps(meta))
    return dst


def set_sha(pkg_dir, sha):
    meta = json.loads((pkg_dir / "model.json").read_text())
    meta["properties"]["rs_deep:weights_sha256"] = sha
    (pkg_dir / "model.json").write_text(json.dumps(meta))


def zeros_sha256(n):
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(n >> 20):
        h.update(block)
    h.update(bytes(n & ((1 << 20) - 1)))
    return h.hexdigest()


def onnx_segmentor(path, classes=2, metadata=None, bomb_shape=None):
    """A real ONNX segmentor (1 x 1 convolution, dynamic batch and size) built with onnx.helper; ``bomb_shape``
    adds ConstantOfShape(bomb_shape) -> ReduceSum added to the output, as the sweep's 361-byte graph."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.full((classes, 3, 1, 1), 0.1, np.float32), "w")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["conv" if bomb_shape else "output"])]
    if bomb_shape:
        inits.append(numpy_helper.from_array(np.array(bomb_shape, dtype=np.int64), "shape"))
        nodes += [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                   value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
                  helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                  helper.make_node("Add", ["conv", "s"], ["output"])]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                             ["batch", classes, "h", "w"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in dict({"model_type": '"Segmentor"', "tile_size": "64"}, **(metadata or {})).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------------------------------------------
# 27, 51: deeply nested JSON


def test_deeply_nested_model_json_is_refused(rgb_package, tmp_path):
    d = edit_package(rgb_package, tmp_path / "p")
    (d / "model.json").write_text("[" * 300_000)  # 300 KB, under the 1 MiB limit
    with pytest.raises(ModelPackageError) as err:
        load_package(d)
    msg = str(err.value)
    assert "model.json" in msg and f"nested more than {MAX_JSON_DEPTH} levels" in msg and "re-export" in msg
    # nested deep but within the parser's recursion (closed, valid JSON): refused by the same limit
    (d / "model.json").write_text("[" * 500 + "]" * 500)
    with pytest.raises(ModelPackageError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
        load_package(d)
    # the same model.json in a zip
    z = tmp_path / "p.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("p/model.json", "[" * 300_000)
        zf.write(rgb_package / "model.safetensors", "p/model.safetensors")
    with pytest.raises(ModelPackageError, match="p.zip: model.json is not valid JSON for RS Deep"):
        load_package(z)


def test_deeply_nested_onnx_metadata_is_refused(tmp_path):
    path = onnx_segmentor(tmp_path / "nested.onnx", metadata={"class_names": "[" * 90_000})
    with pytest.raises(ModelPackageError) as err:
        load_package(path)
    msg = str(err.value)
    assert str(path) in msg and "'class_names'" in msg and f"more than {MAX_JSON_DEPTH} levels" in msg
    assert "remove it or re-export the model" in msg


# ---------------------------------------------------------------------------------------------------------------
# 33: a model file never causes network traffic


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests = []

    def _answer(self):
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


def test_hub_encoder_is_refused_by_name_without_any_request(rgb_package, tmp_path):
    d = edit_package(rgb_package, tmp_path / "beacon", lambda p: p["rs_deep:builder"].update(
        encoder="tu-hf-hub:evil-org/beacon-model", params={"decoder_channels": [128, 64, 32, 16, 8]}))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env = {k: v for k, v in dict(os.environ, **env).items()
               if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
        res = run_case(f"""
import os
import timm
def hub(name):
    try:
        timm.create_model("hf-hub:evil-org/" + name, pretrained=False)
    except Exception as exc:
        return type(exc).__name__
out["control"] = hub("control-model")  # before the engine: the hub is reachable (the recorder sees it)
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
try:
    load_package({str(d)!r}).load_model()
finally:
    out["offline"] = os.environ.get("HF_HUB_OFFLINE")
    out["after"] = hub("after-model")  # after the engine loaded a model: offline for the whole process
""", env=env)
    finally:
        server.shutdown()
        server.server_close()
    requests = list(_Recorder.requests)
    assert any("control-model" in r for r in requests), requests  # the recorder works
    assert not [r for r in requests if "beacon-model" in r or "after-model" in r], requests
    assert res.get("offline") == "1" and res.get("after"), res
    assert_refused(res, "ModelPackageError", "unknown encoder 'tu-hf-hub:evil-org/beacon-model'",
                   "hub names such as 'tu-hf-hub:...' are never accepted", str(d), peak=False)


def test_encoders_are_allow_listed_by_exact_name(rgb_package, tmp_path):
    # a timm model by exact name still works; hub prefixes and pretrained tags are refused
    ok = edit_package(rgb_package, tmp_path / "ok", lambda p: p["rs_deep:builder"].update(encoder="tu-resnet18"))
    with pytest.raises(ModelPackageError, match="weights do not match"):  # built (on meta), weights are resnet18's
        load_package(ok).load_model()
    for bad in ("tu-local-dir:/tmp/x", "tu-resnet18.a1_in1k", "tu-timm/resnet18", "hf-hub:evil-org/beacon"):
        d = edit_package(rgb_package, tmp_path / f"bad{len(os.listdir(tmp_path))}",
                         lambda p: p["rs_deep:builder"].update(encoder=bad))
        with pytest.raises(ModelPackageError, match=re.escape(f"unknown encoder {bad!r}")):
            load_package(d).load_model()
    # the rs_deep builders check their encoders against the same list
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    for arch in ("SiameseUnet", "EarlyFusion", "CenterNet"):
        with pytest.raises(ModelPackageError, match="unknown (smp )?encoder 'tu-hf-hub:evil-org/beacon-model'"):
            build_model({"library": "rs_deep", "architecture": arch, "encoder": "tu-hf-hub:evil-org/beacon-model",
                         "in_channels": 3, "classes": 2})


# ---------------------------------------------------------------------------------------------------------------
# 34, 35, 52: tile sizes


def test_package_tile_size_too_large_is_refused(rgb_package, tmp_path, rgb_raster):
    d = edit_package(rgb_package, tmp_path / "huge_tile", lambda p: p.update({"rs_deep:tile_size": 65536}))
    out = tmp_path / "out"
    out.mkdir()
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
segment({str(rgb_raster)!r}, {str(d)!r}, {str(out / 'o.tif')!r}, device="cpu")
""")
    assert_refused(res, "ModelPackageError", f"{d}: the package's tile size is 65536 px",
                   f"largest tile RS Deep runs ({MAX_TILE_SIZE} px, the limit)", f"Set TILE_SIZE to {MAX_TILE_SIZE}")
    assert os.listdir(out) == []  # nothing written, no temp file left


def test_tile_size_parameter_too_large_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
segment({str(SAMPLE)!r}, {str(DEMO_MODEL)!r}, {str(out / 'o.tif')!r}, tile_size=65536, device="cpu")
""")
    assert_refused(res, "InputError", "TILE_SIZE is 65536 px", f"({MAX_TILE_SIZE} px, the limit)",
                   f"Set TILE_SIZE to {MAX_TILE_SIZE} or less")
    assert os.listdir(out) == []


def test_tile_and_batch_memory_is_checked_before_allocating(rgb_package, rgb_raster, tmp_path):
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    # 4096 px tiles are allowed, but not 64 of them at once (64 x 4096^2 x (3 bands + 2 classes) x 4 bytes = 20 GiB)
    with pytest.raises(InputError, match=r"TILE_SIZE 4096 px with BATCH_SIZE 64: .* needs 20 GiB, more than the "
                                         r"limit of 4 GiB\. Set BATCH_SIZE to 12 or less"):
        segment(rgb_raster, rgb_package, tmp_path / "o.tif", tile_size=4096, batch_size=64, device="cpu")
    assert not os.path.exists(tmp_path / "o.tif")


def test_onnx_tile_size_too_large_is_refused(tmp_path, rgb_raster):
    path = onnx_segmentor(tmp_path / "huge_tile.onnx", metadata={"tile_size": "1048576"})
    out = tmp_path / "out"
    out.mkdir()
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
segment({str(rgb_raster)!r}, {str(path)!r}, {str(out / 'o.tif')!r}, device="cpu")
""")
    assert_refused(res, "ModelPackageError", f"{path}: the package's tile size is 1048576 px",
                   f"Set TILE_SIZE to {MAX_TILE_SIZE} or less")
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------------------
# 41: a 2 KB model.json describing a ~50 GB network


def test_huge_network_is_refused_before_it_is_built(rgb_package, tmp_path):
    d = edit_package(rgb_package, tmp_path / "decoder", lambda p: p["rs_deep:builder"].update(
        params={"encoder_depth": 5, "decoder_channels": [16384] * 5}))
    assert (d / "model.json").stat().st_size < 4096
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
load_package({str(d)!r}).load_model()
""")
    assert_refused(res, "ModelPackageError", str(d), "the network described in rs_deep:builder",
                   f"more than the limit of {MAX_PARAMETERS // 1_000_000:,} M".replace(",", " "),
                   "it is not built", "decoder_channels")
    # under the limit but not the network of the weights: refused by name, also before building
    d2 = edit_package(rgb_package, tmp_path / "decoder2", lambda p: p["rs_deep:builder"].update(
        params={"encoder_depth": 3, "decoder_channels": [64, 32, 16]}))
    with pytest.raises(ModelPackageError, match="weights do not match the network.*wrong shape"):
        load_package(d2).load_model()


# ---------------------------------------------------------------------------------------------------------------
# 43: a 4 GiB sparse weights file


def test_sparse_4gib_weights_are_refused_in_small_memory(rgb_package, tmp_path):
    # the sweep's file: 4 GiB - 1 of zeros (a sparse file: no disk used)
    d = edit_package(rgb_package, tmp_path / "zeros")
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(GIB4)
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
load_package({str(d)!r})
""")
    assert_refused(res, "ModelPackageError", f"{d / 'model.safetensors'} is not a valid safetensors file",
                   "header length is 0 bytes", "Re-export the weights")
    # a valid header declaring one float64 tensor over the whole 4 GiB: the checksum is streamed, and refused
    d2 = edit_package(rgb_package, tmp_path / "header")
    n = 256
    data = GIB4 - 8 - n
    data -= data % 8
    header = json.dumps({"big": {"dtype": "F64", "shape": [data // 8], "data_offsets": [0, data]}}).encode()
    header += b" " * (n - len(header))
    with open(d2 / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", n) + header)
        f.truncate(8 + n + data)
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
load_package({str(d2)!r})
""")
    assert_refused(res, "ModelPackageError", str(d2), "model.safetensors does not match its checksum",
                   "re-export the package")
    # above the weights limit: refused by its size alone
    with open(d2 / "model.safetensors", "r+b") as f:
        f.truncate(MAX_WEIGHTS_BYTES + 1)
    with pytest.raises(ModelPackageError, match="larger than the limit of 4 GiB for the weights"):
        load_package(d2)


# ---------------------------------------------------------------------------------------------------------------
# 45, 46, 47: zips


def test_zip_bomb_is_refused_without_inflating_it(rgb_package, tmp_path):
    d = edit_package(rgb_package, tmp_path / "pkg")
    set_sha(d, zeros_sha256(GIB4))  # the checksum is right: only the sizes tell
    z = tmp_path / "zipbomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(d / "model.json", "pkg/model.json")
        with zf.open("pkg/model.safetensors", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(GIB4 >> 20):
                f.write(block)
            f.write(bytes(GIB4 & ((1 << 20) - 1)))
    assert z.stat().st_size < 8 << 20
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
load_package({str(z)!r})
""")
    assert_refused(res, "ModelPackageError", f"{z}: model.safetensors inflates from", "to 4 GiB",
                   f"more than {MAX_ZIP_RATIO} times (the limit", "zip bomb", "Zip the package folder again")


def test_zip_with_a_bad_crc_is_refused_cleanly(rgb_package, tmp_path):
    weights = (rgb_package / "model.safetensors").read_bytes()
    z = tmp_path / "bad_crc.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.write(rgb_package / "model.json", "pkg/model.json")
        zf.writestr("pkg/model.safetensors", weights)
    raw = bytearray(z.read_bytes())
    at = raw.find(weights)
    raw[at + len(weights) - 1] ^= 0xFF  # the last byte of the data: the header is intact, the CRC is not
    z.write_bytes(bytes(raw))
    with pytest.raises(ModelPackageError) as err:
        load_package(z)
    msg = str(err.value)
    assert f"{z}: the zip is damaged" in msg and "Bad CRC-32" in msg and "zip the package folder again" in msg
    # a zip cut in half
    cut = tmp_path / "cut.zip"
    cut.write_bytes(z.read_bytes()[: len(raw) // 2])
    with pytest.raises(ModelPackageError, match="not a model package|the zip is damaged"):
        load_package(cut)


def _zipcrypto(data, password):
    """``data`` encrypted with the traditional PKWARE cipher (ZipCrypto), with its 12-byte header."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def crc(c, b):
        return zlib.crc32(bytes([b]), c ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def update(b):
        keys[0] = crc(keys[0], b)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = crc(keys[2], keys[1] >> 24)

    for b in password:
        update(b)
    plain = bytes(range(11)) + bytes([zlib.crc32(data) >> 24]) + data
    out = bytearray()
    for b in plain:
        t = (keys[2] | 2) & 0xFFFF
        out.append(b ^ (((t * (t ^ 1)) >> 8) & 0xFF))
        update(b)
    return bytes(out)


def _encrypted_zip(path, files, password):
    """A real password-protected zip (ZipCrypto, stored members), written byte by byte."""
    local, central = bytearray(), bytearray()
    for name, data in files.items():
        enc, n, crc = _zipcrypto(data, password), name.encode(), zlib.crc32(data)
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 1, 0, 0, 0x21, crc, len(enc), len(data), len(n), 0)
        local += n + enc
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 1, 0, 0, 0x21, crc, len(enc), len(data),
                               len(n), 0, 0, 0, 0, 0o644 << 16, offset) + n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def test_encrypted_zip_is_refused_cleanly(rgb_package, tmp_path):
    files = {f"pkg/{n}": (rgb_package / n).read_bytes() for n in ("model.json", "model.safetensors")}
    z = _encrypted_zip(tmp_path / "secret.zip", files, b"secret")
    with zipfile.ZipFile(z) as zf:  # a real encrypted zip: it opens with its password, and only with it
        assert zf.read("pkg/model.json", pwd=b"secret") == files["pkg/model.json"]
        with pytest.raises(RuntimeError, match="password required"):
            zf.read("pkg/model.json")
    with pytest.raises(ModelPackageError) as err:
        load_package(z)
    msg = str(err.value)
    assert f"{z}: model.json is encrypted (the zip is password-protected)" in msg
    assert "unzip it with its password and give the folder" in msg


# ---------------------------------------------------------------------------------------------------------------
# 50, 54: ONNX


def test_onnx_segmentor_with_300_classes_is_refused(tmp_path):
    path = onnx_segmentor(tmp_path / "c300.onnx", classes=300)
    with pytest.raises(ModelPackageError) as err:
        load_package(path)
    msg = str(err.value)
    assert str(path) in msg and f"300 classes; at most {MAX_CLASSES}" in msg and "class raster is Byte" in msg
    names = json.dumps({str(i): f"c{i}" for i in range(300)})
    path = onnx_segmentor(tmp_path / "c300b.onnx", classes=300, metadata={"class_names": names})
    with pytest.raises(ModelPackageError, match=f"300 classes; at most {MAX_CLASSES}"):
        load_package(path)
    # 254 classes are fine
    assert len(load_package(onnx_segmentor(tmp_path / "c254.onnx", classes=254)).classes) == 254


def test_onnx_graph_memory_bomb_is_refused_in_bounded_memory(tmp_path, rgb_raster):
    path = onnx_segmentor(tmp_path / "bomb.onnx", bomb_shape=[30000, 30000])  # a 3.4 GiB tensor
    assert path.stat().st_size < 1024
    out = tmp_path / "out"
    out.mkdir()
    res = run_case(f"""
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
segment({str(rgb_raster)!r}, {str(path)!r}, {str(out / 'o.tif')!r}, device="cpu")
""")
    limit = f"{MAX_ONNX_WORKING_BYTES >> 30} GiB"
    assert_refused(res, "ModelPackageError", str(path), f"needs more working memory than the limit of {limit}",
                   "its ConstantOfShape node asks for 3.4 GiB at once",
                   "Use BATCH_SIZE 1 or a smaller TILE_SIZE")
    assert os.listdir(out) == []
    # the same graph with a small constant runs
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    small = onnx_segmentor(tmp_path / "small.onnx", bomb_shape=[100, 100])
    res = segment(rgb_raster, small, tmp_path / "small.tif", device="cpu")
    assert os.path.exists(res.output)


# ---------------------------------------------------------------------------------------------------------------
# 86: a chip manifest with the wrong types


def _chip_folder(tmp_path, manifest):
    d = tmp_path / f"chips{len(os.listdir(tmp_path))}"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(manifest) if not isinstance(manifest, str) else manifest)
    return d


def test_bad_chip_manifest_is_refused_cleanly(tmp_path):
    base = {"format": "rs_deep-chips", "version": 1, "task": "segmentation",
            "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "building"}], "bands": [1],
            "source": {}, "split": {"train_chips": 1, "val_chips": 0}, "chips": []}
    d = _chip_folder(tmp_path, dict(base, version="abc", chips="abc"))
    with pytest.raises(InputError) as err:
        load_manifest(d, "segmentation")
    msg = str(err.value)
    assert str(d / "manifest.json") in msg and "version is 'abc'; expected a whole number" in msg
    assert "Export the chips again with rs_deep:export_training_data" in msg
    cases = [
        (dict(base, chips="abc"), "chips is 'abc'; expected a list"),
        (dict(base, classes="x"), "classes is 'x'; expected a non-empty list"),
        (dict(base, bands=[1, "a"]), "bands is"),
        (dict(base, split=[]), "split is []; expected an object"),
        (dict(base, chips=[{"image": 3}]), "chip entry 0 is"),
        (dict(base, task="detection", chips=[{"image": "a.tif", "boxes": "x"}]), "boxes"),
        (dict(base, version=True), "version is True"),
        ("[" * 100_000, "nested more than"),
        ("{", "is not valid JSON"),
    ]
    for manifest, fragment in cases:
        with pytest.raises(InputError, match="manifest") as err:
            load_manifest(_chip_folder(tmp_path, manifest))
        assert fragment in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# through QGIS Processing: clean QgsProcessingException messages


def test_processing_reports_the_refusals_cleanly(provider, rgb_package, rgb_raster, tmp_path):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject

    def run(alg, params):
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())

    with pytest.raises(QgsProcessingException, match=f"TILE_SIZE is 65536 px.*Set TILE_SIZE to {MAX_TILE_SIZE}"):
        run("rs_deep:segment", {"INPUT": str(rgb_raster), "MODEL": str(rgb_package), "TILE_SIZE": 65536,
                                "OUTPUT": str(tmp_path / "o.tif")})
    z = _encrypted_zip(tmp_path / "secret.zip", {f"pkg/{n}": (rgb_package / n).read_bytes()
                                                 for n in ("model.json", "model.safetensors")}, b"pw")
    with pytest.raises(QgsProcessingException, match="is encrypted"):
        run("rs_deep:segment", {"INPUT": str(rgb_raster), "MODEL": str(z), "OUTPUT": str(tmp_path / "o.tif")})
    (tmp_path / "chips").mkdir()
    chips = _chip_folder(tmp_path / "chips", {"format": "rs_deep-chips", "version": "abc", "chips": "abc"})
    with pytest.raises(QgsProcessingException, match="version is 'abc'; expected a whole number"):
        run("rs_deep:train", {"TASK": 0, "CHIPS": str(chips), "ARCHITECTURE": 1, "ENCODER": "resnet18",
                              "EPOCHS": 1, "TILE_SIZE": 64, "DEVICE": 1, "OUTPUT": str(tmp_path / "m")})
    assert not os.path.exists(tmp_path / "o.tif") and not os.path.exists(tmp_path / "m")
