"""onnxruntime and onnx, optional dependencies: importing them with a message naming the pip package, the device
an ONNX model runs on (:func:`select_onnx_device`, without torch), and the sessions RS Deep creates (no constant
folding, a CPU arena bounded by :data:`..limits.MAX_ONNX_WORKING_BYTES`)."""
import os
from dataclasses import dataclass

from ...errors import InputError, MissingDependency, ModelPackageError
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


@dataclass(frozen=True)
class OnnxDevice:
    """Where onnxruntime runs an ONNX model, chosen without torch (a run of an ONNX model never imports it):
    ``type`` "cpu" or "cuda" and the CUDA ``index`` (None: the first GPU), as a ``torch.device`` has them."""

    type: str = "cpu"
    index: int = None

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def description(self):
        if self.type == "cuda":
            return f"CUDA GPU {self.index or 0} (onnxruntime)"
        threads = int(os.environ.get("RS_DEEP_THREADS", "0") or 0)
        return f"CPU ({threads} threads, onnxruntime)" if threads > 0 else "CPU (onnxruntime)"


def has_cuda_provider():
    """Whether the installed onnxruntime can run on a CUDA GPU (onnxruntime-gpu, with its CUDA libraries)."""
    return "CUDAExecutionProvider" in require_onnxruntime().get_available_providers()


def select_onnx_device(requested="auto"):
    """The :class:`OnnxDevice` for DEVICE ``requested`` (a valid name: see :func:`..runners.select_device`): 'auto'
    is a CUDA GPU when onnxruntime has its CUDA provider, else the CPU; 'cuda' (or 'cuda:N') is refused without
    that provider, and 'mps' always (onnxruntime runs ONNX models on the CPU or a CUDA GPU here)."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return OnnxDevice("cuda") if has_cuda_provider() else OnnxDevice("cpu")
    if requested == "cpu":
        return OnnxDevice("cpu")
    if requested == "mps":
        raise InputError("DEVICE is 'mps', but ONNX models run on the CPU or a CUDA GPU (Apple Metal is used for "
                         "PyTorch models only); choose 'auto' or 'cpu'")
    index = requested[5:] if requested.startswith("cuda:") else ""
    if requested != "cuda" and not index.isdigit():
        raise InputError(f"DEVICE {requested!r} is not a device name; use 'cuda' or 'cuda:N' (N: the GPU's number)")
    if not has_cuda_provider():
        raise InputError("DEVICE is 'cuda' but the installed onnxruntime has no CUDA provider (the onnxruntime "
                         "package runs on the CPU only; onnxruntime-gpu runs ONNX models on NVIDIA GPUs); "
                         "choose 'auto' or 'cpu'")
    return OnnxDevice("cuda", int(index) if index else None)


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


def session_options(ort, optimize=True):
    """Options of RS Deep's sessions; without ``optimize``, the graph is not optimised (a session that only reads
    the model's inputs, outputs and metadata: about 3 times quicker to create)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if bounded_arena(ort):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return opts


#: a runner's first and every SHRINK_EVERY-th run hand the bounded arena's memory back (:func:`run_options`)
SHRINK_EVERY = 16


def run_options(ort, shrink=True):
    """Run options: with ``shrink``, the bounded arena hands its memory back after the run; errors are reported by
    the runner's exception, not logged by onnxruntime as well. Shrinking after every run costs about a quarter of a
    U-Net's CPU time (every run allocates its buffers again), so runners shrink after their first run and every
    :data:`SHRINK_EVERY`-th: the memory held between runs is at most that of a run, as during one. The first run
    grows the arena the most; kept until the 16th run, that was about 70 MB of the peak RSS of a 2048 x 2048 px
    run of ``make bench`` (25 tiles in 13 runs: it never shrank)."""
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    if shrink and bounded_arena(ort):
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
