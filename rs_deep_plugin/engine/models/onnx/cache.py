"""RS Deep's own segmentation packages run by onnxruntime on the CPU: exported to ONNX once per package and tile
size, checked against PyTorch, and cached in the user's cache folder (never beside the package: inputs are never
touched).

onnxruntime needs neither torch nor its CUDA libraries in memory, so a run whose model is cached starts in about a
third of the time and with half the memory, and its forward passes are as fast or faster than PyTorch's (``make
bench``). The cached graph is used only when its class probabilities equal PyTorch's within :data:`TOLERANCE` on a
fixed test batch; otherwise the package keeps running on PyTorch (and the refusal is cached too).

Used when (:func:`inference_backend`): the package is an RS Deep segmentation package (PyTorch weights), the run is on the
CPU (DEVICE ``cpu``, or ``auto`` on a machine without a CUDA or Apple GPU: :func:`gpu_possible`), onnx and
onnxruntime are installed, and ``RS_DEEP_ONNX_CACHE`` is not ``0``. The folder: ``RS_DEEP_CACHE_DIR``/onnx, else
the platform's cache folder (``~/.cache/rs_deep/onnx`` on Linux); at most :data:`KEEP` models are kept."""
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import sys

from ...errors import ModelPackageError
from ...files import write_json
from ..package import ModelPackage
from .session import OnnxDevice

#: bump when the export changes: older cached graphs are then exported again
EXPORT_VERSION = 3  # 2 (0.18.0): the softmax written out as element-wise ops; 3: constant Resize scales (export.py)
#: largest difference of a class probability between PyTorch and the cached graph on the test batch
TOLERANCE = 1e-4
KEEP = 8  # cached models kept (the least recently used are removed)
_READY = {}  # (cache folder, key) -> verified path, in this process


def enabled():
    return os.environ.get("RS_DEEP_ONNX_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir():
    """``RS_DEEP_CACHE_DIR``/onnx, else the platform's per-user cache folder + rs_deep/onnx."""
    base = os.environ.get("RS_DEEP_CACHE_DIR")
    if not base:
        if sys.platform.startswith("win"):
            root = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~")
        elif sys.platform == "darwin":
            root = os.path.expanduser("~/Library/Caches")
        else:
            root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        base = os.path.join(root, "rs_deep")
    return os.path.join(base, "onnx")


def gpu_possible():
    """Whether PyTorch may find a GPU here (DEVICE auto would take it), told without importing torch: torch loaded
    already says so itself; otherwise an NVIDIA (or ROCm) driver, or an Apple-silicon Mac (MPS)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        mps = getattr(torch.backends, "mps", None)
        return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if sys.platform.startswith("win"):
        return os.path.exists(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll"))
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd"))


def eligible(pkg, requested):
    """Whether ``pkg`` on DEVICE ``requested`` may run from the cache (everything but the cache's content)."""
    requested = (requested or "auto").strip().lower()
    return (enabled() and pkg.backend == "torch" and pkg.task == "segmentation" and not pkg.multi_label
            and (requested == "cpu" or (requested == "auto" and not gpu_possible()))
            and all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")))


def cache_key(pkg):
    """The network (weights, builder, activation) and the tile size the graph is exported for."""
    what = {"weights": pkg.weights_sha256, "builder": pkg.builder, "activation": pkg.activation,
            "tile": pkg.tile_size, "version": EXPORT_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prune(folder):
    """Remove the least recently used graphs beyond :data:`KEEP`."""
    models = sorted((e for e in os.scandir(folder) if e.name.endswith(".onnx")), key=lambda e: e.stat().st_mtime)
    for e in models[:-KEEP]:
        for p in (e.path, e.path[:-5] + ".json"):
            try:
                os.remove(p)
            except OSError:
                pass


def _difference(pkg, path):
    """The largest difference of the class probabilities of PyTorch and of the graph at ``path`` on a fixed batch."""
    import numpy as np
    from ..runners import ModelRunner, select_device
    from .package import load_onnx_package
    x = np.random.default_rng(0).random((2, pkg.in_channels, pkg.tile_size, pkg.tile_size), dtype=np.float32)
    ref = ModelRunner(pkg.load_model(), select_device("cpu"), pkg.activation)(x)
    got = with_package_fields(load_onnx_package(path), pkg).make_runner(None)(x)
    return float(np.max(np.abs(ref - got))) if ref.shape == got.shape and np.isfinite(got).all() else float("inf")


def prepare(pkg, log=None):
    """The path of ``pkg``'s verified graph in the cache, exported (and checked) now when missing; None when it
    cannot be (a failed export, a graph that does not match PyTorch, a cache folder that cannot be written): the
    package then runs on PyTorch. ``log`` gets one line when the graph is made, or why it is not used."""
    log = log or (lambda msg: None)
    key, folder = cache_key(pkg), cache_dir()
    if (folder, key) in _READY and os.path.isfile(_READY[folder, key]):
        return _READY[folder, key]
    path, info_path = os.path.join(folder, key + ".onnx"), os.path.join(folder, key + ".json")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    if info.get("refused"):
        return None
    try:
        if info.get("sha256") and os.path.isfile(path) and _sha256_file(path) == info["sha256"]:
            os.utime(path)  # recently used: kept by _prune
            _READY[folder, key] = path
            return path
        from .export import export_onnx
        os.makedirs(folder, exist_ok=True)
        log(f"Preparing {pkg.name} for onnxruntime (once per model and tile size; cached in {folder})")
        export_onnx(pkg, path)
        diff = _difference(pkg, path)
        if not diff <= TOLERANCE:
            os.remove(path)
            write_json(info_path, {"refused": f"probabilities differ from PyTorch's by {diff:.3g}"})
            log(f"{pkg.name}: the onnxruntime graph differs from PyTorch (by {diff:.3g}); running on PyTorch")
            return None
        write_json(info_path, {"sha256": _sha256_file(path), "max_difference": diff, "package": pkg.source,
                               "tile_size": pkg.tile_size})
        _prune(folder)
    except Exception as exc:  # no export for this network, or no cache folder: PyTorch runs it, as without a cache
        log(f"{pkg.name} runs on PyTorch: no onnxruntime version of it could be cached in {folder} "
            f"({type(exc).__name__}: {str(exc)[:200]})")
        return None
    _READY[folder, key] = path
    return path


def with_package_fields(onnx_pkg, pkg):
    """The cached graph's package with every field of the RS Deep package ``pkg`` (its source, name, tiling, GSD...
    as this run has them): only how the network runs changes."""
    fields = {f.name: getattr(pkg, f.name) for f in dataclasses.fields(ModelPackage) if f.init and f.name != "_weights"}
    return dataclasses.replace(onnx_pkg, **fields)


def inference_backend(pkg, requested="auto", log=None, prepare_now=True):
    """What runs ``pkg``'s network for inference on DEVICE ``requested``: "onnx" for an ONNX model, and for an RS Deep
    segmentation package on the CPU whose graph is in the cache (exported and checked now when ``prepare_now``; else
    only whether it may be: :func:`eligible`); "torch" otherwise. Pass it to :func:`..runners.select_device`, and
    the device to :func:`make_runner`."""
    if pkg.backend != "torch":
        return pkg.backend
    if not eligible(pkg, requested):
        return "torch"
    return "onnx" if not prepare_now or prepare(pkg, log) else "torch"


def make_runner(pkg, device):
    """``pkg``'s probability runner on ``device``: on an onnxruntime device (:func:`inference_backend` chose it for a
    PyTorch package), its cached graph; otherwise the package's own runner."""
    if pkg.backend != "torch" or not isinstance(device, OnnxDevice):
        return pkg.make_runner(device)
    from .package import load_onnx_package
    path = prepare(pkg)
    if path is None:
        raise ModelPackageError(f"{pkg.source}: no onnxruntime version of this model is cached; run it with "
                                "RS_DEEP_ONNX_CACHE=0")
    return with_package_fields(load_onnx_package(path), pkg).make_runner(device)
