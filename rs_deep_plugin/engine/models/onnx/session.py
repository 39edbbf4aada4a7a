"""onnxruntime and onnx, optional dependencies: importing them with a message naming the pip package, and the
sessions RS Deep creates (no constant folding, a CPU arena bounded by :data:`..limits.MAX_ONNX_WORKING_BYTES`)."""
from ...errors import MissingDependency, ModelPackageError
from ...limits import MAX_ONNX_WORKING_BYTES

ONNXRUNTIME_PIN = "onnxruntime==1.32.0"
ONNX_PIN = "onnx==1.23.2"
#: graph optimisers never run: constant folding would compute (and keep) tensors the graph declares, at any
#: size, while the session is created, outside the working-memory limit
DISABLED_OPTIMIZERS = ("ConstantFolding",)
_ARENA = {}  # "registered": whether the process-wide CPU arena with the working-memory limit is in place


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency(
            f"This is an ONNX model: running it needs the optional package onnxruntime, which is not installed "
            f"({exc}). Install it into the plugin's Python: pip install {ONNXRUNTIME_PIN}") from exc
    return onnxruntime


def require_onnx(required=True):
    try:
        import onnx
    except ImportError as exc:
        if not required:
            return None
        raise MissingDependency(f"Exporting to ONNX needs the optional package onnx, which is not installed ({exc}). "
                                f"Install it into the plugin's Python: pip install {ONNX_PIN} {ONNXRUNTIME_PIN}") \
            from exc
    return onnx


def bounded_arena(ort):
    """Register, once per process, onnxruntime's CPU arena allocator with a limit of
    :data:`.limits.MAX_ONNX_WORKING_BYTES` for the sessions of RS Deep (``session.use_env_allocators``):
    a graph that asks for more (e.g. ConstantOfShape [30000, 30000]) fails at that node instead of
    taking the machine's memory. Returns False when it cannot be registered (an allocator registered
    by other code in the process); the sessions then use onnxruntime's own, unbounded, arenas."""
    if "registered" not in _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # max_mem, extend strategy kSameAsRequested, default initial chunk and dead bytes per chunk
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(MAX_ONNX_WORKING_BYTES, 1, -1, -1))
            _ARENA["registered"] = True
        except Exception:  # pragma: no cover - registered already by other code, or an old onnxruntime
            _ARENA["registered"] = False
    return _ARENA["registered"]


def session_options(ort):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if bounded_arena(ort):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return opts


def run_options(ort):
    """Run options: the bounded arena hands its memory back after every run (nothing stays held); errors
    are reported by the runner's exception, not logged by onnxruntime as well."""
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    if bounded_arena(ort):
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def create_session(ort, data, source, opts=None, providers=("CPUExecutionProvider",)):
    try:
        # from bytes: external data files can never be resolved (and are refused)
        return ort.InferenceSession(data, sess_options=opts or session_options(ort), providers=list(providers),
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as exc:
        msg = str(exc)
        if "xternal data" in msg:
            raise ModelPackageError(external_data_message(source)) from exc
        raise ModelPackageError(f"{source}: not a valid ONNX model that onnxruntime can run ({msg.strip()[:300]})") \
            from exc


def external_data_message(source):
    return (f"{source}: this ONNX model keeps its weights in separate external-data files; only single-file "
            "ONNX models are supported. Save it as one file, e.g. onnx.save(onnx.load(path), out, "
            "save_as_external_data=False) (models under 2 GB)")
