"""ONNX models: run Deepness/GeoDeep-style ``.onnx`` files through the engine, export packages to ONNX.

QGIS-free. ``onnxruntime`` (running) and ``onnx`` (export, and an early check for external data)
are optional dependencies: without them an ONNX model gets a :class:`MissingDependency` error
naming the package to install; everything else in RS Deep works as before.

Metadata is read from the ONNX ``metadata_props`` (values are JSON text, as Deepness writes
them; Python literals and plain strings are accepted too):

* ``rs_deep:model_json``: our full ``model.json`` (written by :func:`export_onnx`); when present it
  is used entirely (exact round trip) and the keys below are ignored;
* otherwise the Deepness keys: ``model_type`` (``Segmentor`` or ``Detector``), ``class_names``
  (``{0: 'name', ...}``), ``resolution`` (cm per pixel), ``tile_size``, ``tiles_overlap`` (percent
  of the tile), ``standardization_mean``/``standardization_std`` (applied after dividing the
  pixel values by 255, as Deepness does), ``det_conf``, ``det_iou_thresh``, ``det_type``
  (``YOLO_v5_or_v7_default``, ``YOLO_v6``, ``YOLO_v9``, ``YOLO_Ultralytics``).

Only single-file models are accepted (no external data), and nothing is ever unpickled: an ONNX
file is a protobuf graph run by onnxruntime.
"""
import ast
import io
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, MissingDependency, ModelPackageError
from ..files import write_atomic
from ..limits import (MAX_CLASSES, MAX_DETECTION_CLASSES, MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_ONNX_WORKING_BYTES,
                     json_depth, loads_json, size_text)
from .package import DEFAULT_COLORS, METADATA_NAME, ModelClass, ModelPackage, load_package, parse_metadata

ONNXRUNTIME_PIN = "onnxruntime==1.32.0"
ONNX_PIN = "onnx==1.23.2"
MAX_ONNX_BYTES = 2 << 30  # protobuf's limit: larger models need external data, which we refuse
MODEL_JSON_KEY = "rs_deep:model_json"
OUTPUT_KEY = "rs_deep:output"
#: Deepness model types -> our tasks (None: known but not supported here)
MODEL_TYPES = {"segmentor": "segmentation", "detector": "detection", "regressor": None, "recognition": None,
               "superresolution": None}
DET_TYPES = ("YOLO_v5_or_v7_default", "YOLO_v6", "YOLO_v9", "YOLO_Ultralytics")
UNSUPPORTED_DET_TYPES = ("YOLO_Ultralytics_segmentation", "YOLO_Ultralytics_obb")
DEFAULT_TILE = 512
DEFAULT_OVERLAP_PCT = 10.0
#: graph optimisers never run: constant folding would compute (and keep) tensors the graph declares, at any
#: size, while the session is created, outside the working-memory limit
DISABLED_OPTIMIZERS = ("ConstantFolding",)
_ARENA = {}  # "registered": whether the process-wide CPU arena with the working-memory limit is in place


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency(
            f"This is an ONNX model: running it needs the optional package onnxruntime, which is not installed "
            f"({exc}). Install it into the plugin's Python: pip install {ONNXRUNTIME_PIN}") from exc
    return onnxruntime


def _onnx(required=True):
    try:
        import onnx
    except ImportError as exc:
        if not required:
            return None
        raise MissingDependency(f"Exporting to ONNX needs the optional package onnx, which is not installed ({exc}). "
                                f"Install it into the plugin's Python: pip install {ONNX_PIN} {ONNXRUNTIME_PIN}") \
            from exc
    return onnx


def is_onnx_path(path):
    return path is not None and not isinstance(path, ModelPackage) and os.fspath(path).lower().endswith(".onnx")


def _value(text):
    """A metadata_props value: JSON (Deepness), else a Python literal, else the plain string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        pass
    if len(text) < 100_000:
        try:
            return ast.literal_eval(text)  # literals only: never evaluates code
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def _number(meta, key, source, kind=float):
    if key not in meta:
        return None
    v = _value(meta[key])
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            v = None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ModelPackageError(f"{source}: metadata_props {key!r}: expected a number, got {meta[key]!r}")
    return kind(v)


def _dim(d):
    return d if isinstance(d, int) and d > 0 else None


# --------------------------------------------------------------------------------------------
# the package object


@dataclass
class OnnxPackage(ModelPackage):
    """A ModelPackage read from a single-file ONNX model; ``backend`` is ``"onnx"``."""

    backend: str = "onnx"
    output_kind: str = "auto"  # probabilities | logits | auto (segmentation)
    det_type: str = "YOLO_v5_or_v7_default"
    input_name: str = "input"
    fixed_size: tuple = None  # (height, width) when the model's input size is fixed
    fixed_batch: int = None
    onnx_metadata: dict = field(default_factory=dict, repr=False)
    _model_bytes: bytes = field(default=None, repr=False)

    def session(self, device=None):
        ort = _ort()
        opts = _session_options(ort)
        threads = int(os.environ.get("RS_DEEP_THREADS", "0") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device is not None and getattr(device, "type", "cpu") == "cuda" and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        return _session(ort, self._model_bytes, self.source, opts, providers)

    def load_model(self):
        return self.session()

    def make_runner(self, device=None):
        """The segmentation runner (same call as :class:`.device.ModelRunner`)."""
        return OnnxSegmentationRunner(self, device)

    def make_detection_runner(self, device, score_threshold, iou_threshold, max_detections):
        """The detection runner (same call as :class:`.detect.DetectionRunner`)."""
        return OnnxDetectionRunner(self, device, score_threshold, iou_threshold, max_detections)


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


def _session_options(ort):
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


def _session(ort, data, source, opts=None, providers=("CPUExecutionProvider",)):
    try:
        # from bytes: external data files can never be resolved (and are refused)
        return ort.InferenceSession(data, sess_options=opts or _session_options(ort), providers=list(providers),
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as exc:
        msg = str(exc)
        if "xternal data" in msg:
            raise ModelPackageError(_external_msg(source)) from exc
        raise ModelPackageError(f"{source}: not a valid ONNX model that onnxruntime can run ({msg.strip()[:300]})") \
            from exc


def _external_msg(source):
    return (f"{source}: this ONNX model keeps its weights in separate external-data files; only single-file "
            "ONNX models are supported. Save it as one file, e.g. onnx.save(onnx.load(path), out, "
            "save_as_external_data=False) (models under 2 GB)")


def _check_single_file(data, source):
    onnx = _onnx(required=False)
    if onnx is None:
        return  # onnxruntime refuses external data from bytes anyway (see _session)
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:
        raise ModelPackageError(f"{source}: not a valid ONNX file (the protobuf cannot be parsed: {exc})") from exc
    from onnx.external_data_helper import uses_external_data
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                tensors.append(a.t)
    if any(uses_external_data(t) for t in tensors):
        raise ModelPackageError(_external_msg(source))


def load_onnx_package(path, task=None):
    """Read a single-file ONNX model and its metadata_props into an :class:`OnnxPackage`."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ModelPackageError(f"ONNX model not found: {source}")
    if os.path.getsize(source) > MAX_ONNX_BYTES:
        raise ModelPackageError(f"{source}: larger than 2 GB; an ONNX file this large keeps its weights as external "
                                "data, which is not supported")
    ort = _ort()  # early, so a missing onnxruntime is reported before anything else
    with open(source, "rb") as fh:
        data = fh.read()
    _check_single_file(data, source)
    sess = _session(ort, data, source)
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ModelPackageError(f"{source}: the model has {len(inputs)} inputs; RS Deep runs models with one image "
                                "input [batch, channels, height, width]")
    shape = list(inputs[0].shape)
    if len(shape) != 4:
        raise ModelPackageError(f"{source}: input {inputs[0].name!r} has shape {shape}; expected 4 dimensions "
                                "[batch, channels, height, width]")
    if _dim(shape[1]) is None:
        raise ModelPackageError(f"{source}: the input's channel count (dimension 1 of {shape}) is not fixed")
    fixed = (_dim(shape[2]), _dim(shape[3]))
    fixed = fixed if all(fixed) else None
    if fixed and fixed[0] != fixed[1]:
        raise ModelPackageError(f"{source}: the model takes {fixed[1]} x {fixed[0]} px inputs; only square tiles "
                                "are supported")
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    for key, value in meta.items():
        _check_metadata_value(key, value, source)
    common = dict(source=source, input_name=inputs[0].name, fixed_size=fixed, fixed_batch=_dim(shape[0]),
                  onnx_metadata=meta, _model_bytes=data, _weights=None)
    if MODEL_JSON_KEY in meta:
        pkg = _from_model_json(meta, source, common)
    else:
        pkg = _from_deepness(meta, source, shape, outputs, common)
    if fixed and pkg.tile_size != fixed[0]:
        raise ModelPackageError(f"{source}: the metadata says tile size {pkg.tile_size} but the model takes "
                                f"{fixed[0]} px inputs")
    if task is not None and pkg.task != task:
        raise ModelPackageError(f"{source}: this is a {pkg.task} model; this tool needs a {task} model")
    return pkg


def _check_metadata_value(key, value, source):
    """A metadata_props value is at most :data:`.limits.MAX_JSON_BYTES` long and, when it is JSON, nested at
    most :data:`.limits.MAX_JSON_DEPTH` levels deep (deeper JSON exhausts the parser's recursion)."""
    if isinstance(value, str) and len(value) > MAX_JSON_BYTES:
        raise ModelPackageError(f"{source}: metadata_props {key!r} is {size_text(len(value))} long, more than the "
                                f"limit of {size_text(MAX_JSON_BYTES)}; this is not metadata RS Deep can use: remove "
                                "it or re-export the model")
    try:
        depth = json_depth(json.loads(value))
    except RecursionError:
        depth = None
    except (TypeError, ValueError):
        return  # not JSON: a Python literal (parsed with a bounded depth) or a plain string
    if depth is None or depth > MAX_JSON_DEPTH:
        raise ModelPackageError(f"{source}: metadata_props {key!r} is not valid JSON for RS Deep: arrays or objects "
                                f"are nested more than {MAX_JSON_DEPTH} levels deep (the limit); remove it or "
                                "re-export the model")


def _from_model_json(meta, source, common):
    model_json = loads_json(meta[MODEL_JSON_KEY], f"{source}: metadata_props {MODEL_JSON_KEY!r}",
                            fix="re-export the model")
    fields = parse_metadata(model_json, source=f"{source} ({MODEL_JSON_KEY})")
    kind = _value(meta.get(OUTPUT_KEY, '"auto"'))
    det = _value(meta.get("det_type", '"YOLO_v5_or_v7_default"'))
    return OnnxPackage(metadata=model_json, output_kind=kind if kind in ("probabilities", "logits") else "auto",
                       det_type=det, **fields, **common)


def _class_names(meta, source):
    for key in ("class_names", "names"):
        if key in meta:
            v = _value(meta[key])
            if isinstance(v, (list, tuple)):
                v = dict(enumerate(v))
            if not isinstance(v, dict):
                raise ModelPackageError(f"{source}: metadata_props {key!r}: expected a dict {{0: 'name', ...}}, got "
                                        f"{meta[key]!r}")
            try:
                items = sorted(((int(k), str(n)) for k, n in v.items()), key=lambda kv: kv[0])
            except (TypeError, ValueError) as exc:
                raise ModelPackageError(f"{source}: metadata_props {key!r}: keys must be class numbers") from exc
            if [k for k, _ in items] != list(range(len(items))):
                raise ModelPackageError(f"{source}: metadata_props {key!r}: classes must be numbered 0, 1, 2... "
                                        f"without gaps, got {[k for k, _ in items]}")
            return [n for _, n in items]
    return None


def _from_deepness(meta, source, shape, outputs, common):
    raw_type = meta.get("model_type")
    out_shape = list(outputs[0].shape) if outputs else []
    if raw_type is None:  # like GeoDeep: infer from the output
        model_type = "segmentor" if len(out_shape) == 4 else "detector"
    else:
        model_type = str(_value(raw_type)).strip().lower()
    if model_type not in MODEL_TYPES:
        raise ModelPackageError(f"{source}: metadata_props 'model_type' is {raw_type!r}; RS Deep runs 'Segmentor' "
                                "and 'Detector' models")
    task = MODEL_TYPES[model_type]
    if task is None:
        raise ModelPackageError(f"{source}: a {model_type.capitalize()} model (metadata_props 'model_type'); RS Deep "
                                "runs ONNX 'Segmentor' and 'Detector' models only")
    channels = shape[1]
    fixed = common["fixed_size"]
    tile = fixed[0] if fixed else (_number(meta, "tile_size", source, int) or DEFAULT_TILE)
    pct = _number(meta, "tiles_overlap", source)
    pct = DEFAULT_OVERLAP_PCT if pct is None else pct
    if not 0 <= pct < 100:
        raise ModelPackageError(f"{source}: metadata_props 'tiles_overlap': expected a percentage 0..100, got {pct}")
    overlap = min(int(round(tile * pct / 100.0)), max(0, (tile - 1) // 2))
    res = _number(meta, "resolution", source)
    gsd = res / 100.0 if res and res > 0 else None
    mean, std = (_value(meta[k]) if k in meta else None for k in ("standardization_mean", "standardization_std"))
    scaling = []
    for i in range(channels):
        m = _pick(mean, i, 0.0, source, "standardization_mean")
        s = _pick(std, i, 1.0, source, "standardization_std")
        if s <= 0:
            raise ModelPackageError(f"{source}: metadata_props 'standardization_std' must be positive, got {s}")
        scaling.append({"type": "z-score", "mean": 255.0 * m, "stddev": 255.0 * s})
    names = _class_names(meta, source)
    props = {}
    det_type = "YOLO_v5_or_v7_default"
    if task == "segmentation":
        if len(outputs) != 1 or len(out_shape) != 4:
            raise ModelPackageError(f"{source}: a segmentation model needs one output [batch, classes, height, "
                                    f"width]; this one has {len(outputs)} output(s), the first {out_shape}")
        k = _dim(out_shape[1]) or (len(names) if names else None)
        if k is None:
            raise ModelPackageError(f"{source}: the number of output channels is not fixed and no class_names given")
        n_classes = 2 if k == 1 else k
        if n_classes > MAX_CLASSES:
            raise ModelPackageError(f"{source}: the segmentation model has {n_classes} classes; at most {MAX_CLASSES} "
                                    "are supported (the class raster is Byte, 255 is nodata). Use a model with "
                                    f"{MAX_CLASSES} classes or fewer")
        if names is None:
            names = ["background", "foreground"] if k == 1 else [f"class_{i}" for i in range(k)]
        elif k == 1 and len(names) == 1:
            names = ["background"] + names
        if len(names) != n_classes:
            raise ModelPackageError(f"{source}: metadata_props 'class_names' lists {len(names)} classes but the model "
                                    f"outputs {k} channel(s)")
    else:
        det_type = str(_value(meta.get("det_type", '"YOLO_v5_or_v7_default"')))
        if det_type in UNSUPPORTED_DET_TYPES:
            raise ModelPackageError(f"{source}: det_type {det_type!r} is not supported; RS Deep decodes "
                                    f"{', '.join(DET_TYPES)} outputs")
        if det_type not in DET_TYPES:
            raise ModelPackageError(f"{source}: metadata_props 'det_type' {det_type!r} is unknown; use one of "
                                    f"{', '.join(DET_TYPES)}")
        if len(out_shape) != 3:
            raise ModelPackageError(f"{source}: a YOLO detector needs an output [batch, boxes, values] (or [batch, "
                                    f"values, boxes] for {det_type}); the first output is {out_shape}")
        width = _dim(out_shape[1] if det_type in ("YOLO_Ultralytics", "YOLO_v9") else out_shape[2])
        k = None if width is None else width - (4 if det_type in ("YOLO_Ultralytics", "YOLO_v9") else 5)
        n = k if names is None else len(names)
        if n is not None and n > MAX_DETECTION_CLASSES:
            raise ModelPackageError(f"{source}: the detector has {n} classes, more than the limit of "
                                    f"{MAX_DETECTION_CLASSES}; this is not a model RS Deep can run")
        if names is None:
            if not k or k < 1:
                raise ModelPackageError(f"{source}: cannot tell the number of classes; add class_names to the "
                                        "metadata_props")
            names = [f"class_{i}" for i in range(k)]
        elif k is not None and k != len(names):
            raise ModelPackageError(f"{source}: metadata_props 'class_names' lists {len(names)} classes but the "
                                    f"{det_type} output has {k}")
        n_classes = len(names)
        conf = _number(meta, "det_conf", source)
        iou = _number(meta, "det_iou_thresh", source)
        if conf is not None:
            props["rs_deep:score_threshold"] = conf
        if iou is not None:
            props["rs_deep:iou_threshold"] = iou
    classes = [ModelClass(i, n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, n in enumerate(names)]
    name = os.path.splitext(os.path.basename(source))[0]
    builder = {"library": "onnx", "architecture": f"ONNX {model_type.capitalize()}", "encoder": "onnx",
               "in_channels": channels, "classes": n_classes}
    return OnnxPackage(name=name, task=task, bands=[f"b{i + 1}" for i in range(channels)], value_scaling=scaling,
                       classes=classes, tile_size=tile, overlap=overlap, gsd=gsd, builder=builder,
                       activation="softmax", weights_sha256="", description=str(_value(meta.get("description", '""'))),
                       metadata={"properties": props}, output_kind="auto", det_type=det_type, **common)


def _pick(values, i, default, source, key):
    if values is None:
        return default
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return float(values)
    if isinstance(values, (list, tuple)) and values:
        v = values[i] if len(values) > i else values[-1] if len(values) == 1 else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    raise ModelPackageError(f"{source}: metadata_props {key!r}: expected a number or one number per input channel, "
                            f"got {values!r}")


# --------------------------------------------------------------------------------------------
# runners


class _OnnxRunner:
    def __init__(self, pkg, device):
        self.pkg = pkg
        self.session = pkg.session(device)
        self.input_name = pkg.input_name
        self.run_options = run_options(_ort())

    def _run_session(self, batch):
        try:
            return self.session.run(None, {self.input_name: batch}, self.run_options)[0]
        except Exception as exc:
            msg = str(exc).strip()
            if any(s in msg for s in ("Available memory of", "Failed to allocate", "bad_alloc")):
                asked = re.search(r"requested bytes of (\d+)", msg)
                node = re.search(r"while running (\w+) node", msg)
                what = f" (its {node.group(1)} node asks for {size_text(int(asked.group(1)))} at once)" \
                    if asked and node else ""
                raise ModelPackageError(
                    f"{self.pkg.source}: running the ONNX model on {len(batch)} tile(s) of {batch.shape[-1]} px needs "
                    f"more working memory than the limit of {size_text(MAX_ONNX_WORKING_BYTES)}{what}. Use "
                    "BATCH_SIZE 1 or a smaller TILE_SIZE; a graph that needs more at its own tile size is "
                    "refused") from exc
            raise ModelPackageError(f"{self.pkg.source}: onnxruntime cannot run the model on tiles of "
                                    f"{list(batch.shape)} ({msg[-300:]})") from exc

    def _run(self, batch):
        """Raw first output for batch [B, C, T, T] (chunks of the model's fixed batch size)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        fixed = self.pkg.fixed_size
        if fixed and tuple(batch.shape[2:]) != tuple(fixed):
            raise InputError(f"This ONNX model takes tiles of exactly {fixed[0]} px; leave TILE_SIZE at the "
                             f"package's value (0), got {batch.shape[2]}")
        fb = self.pkg.fixed_batch
        if not fb or fb == len(batch):
            return self._run_session(batch)
        outs = []
        for i in range(0, len(batch), fb):
            chunk = batch[i:i + fb]
            n = len(chunk)
            if n < fb:
                chunk = np.concatenate([chunk, np.zeros((fb - n,) + chunk.shape[1:], np.float32)])
            outs.append(self._run_session(chunk)[:n])
        return np.concatenate(outs)


class OnnxSegmentationRunner(_OnnxRunner):
    """batch float32 [B, C, T, T] -> class probabilities float32 [B, K, T, T] (like ModelRunner)."""

    def __init__(self, pkg, device=None):
        super().__init__(pkg, device)
        self.kind = pkg.output_kind
        self.activation = pkg.activation

    def __call__(self, batch):
        out = np.asarray(self._run(batch), dtype=np.float32)
        k = len(self.pkg.classes)
        if out.ndim != 4 or out.shape[1] not in (k, 1) or (out.shape[1] == 1 and k != 2):
            raise ModelPackageError(f"{self.pkg.source}: the model returned shape {list(out.shape)}; expected "
                                    f"[batch, {k}, height, width] for its {k} classes")
        t = batch.shape[2:]
        if tuple(out.shape[2:]) != tuple(t):  # a model predicting at a coarser resolution
            import torch
            import torch.nn.functional as F
            out = F.interpolate(torch.from_numpy(out), size=tuple(t), mode="bilinear", align_corners=False).numpy()
        kind = self.kind
        if kind == "auto":
            lo, hi = float(out.min()), float(out.max())
            probs = lo >= -1e-4 and hi <= 1 + 1e-4 and (
                out.shape[1] == 1 or bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3)))
            kind = "probabilities" if probs else "logits"
        if kind == "logits":
            if out.shape[1] == 1 or self.activation == "sigmoid":
                out = 1.0 / (1.0 + np.exp(-out))
            else:
                out = out - out.max(axis=1, keepdims=True)
                np.exp(out, out=out)
                out /= out.sum(axis=1, keepdims=True)
        if out.shape[1] == 1:
            p = np.clip(out, 0.0, 1.0)
            out = np.concatenate([1.0 - p, p], axis=1)
        return np.ascontiguousarray(out, dtype=np.float32)


def decode_yolo(raw, det_type, score_threshold, iou_threshold, max_detections, n_classes=None):
    """One image's raw YOLO output -> (boxes [n, 4] x0, y0, x1, y1 float64, labels [n] 0-based, scores [n]).

    * ``YOLO_v5_or_v7_default``: [N, 5 + C] (cx, cy, w, h, objectness, class scores); the score is the
      objectness and the class the best class score (as Deepness decodes it);
    * ``YOLO_v6``: [N, 5 + C]; the score is the best class score (the objectness slot is ignored);
    * ``YOLO_Ultralytics`` / ``YOLO_v9`` (v8+): [4 + C, N] (cx, cy, w, h, class scores; no objectness).

    Boxes scoring at least ``score_threshold`` go through class-wise NMS (``batched_nms``); the
    ``max_detections`` best are kept.
    """
    import torch
    from torchvision.ops import batched_nms
    a = np.asarray(raw, dtype=np.float64)
    if det_type in ("YOLO_Ultralytics", "YOLO_v9"):
        a = a.T
        cls = a[:, 4:]
        scores = cls.max(axis=1) if cls.shape[1] else np.zeros(len(a))
    elif det_type == "YOLO_v6":
        cls = a[:, 5:]
        scores = cls.max(axis=1) if cls.shape[1] else a[:, 4]
    else:
        cls = a[:, 5:]
        scores = a[:, 4]
    labels = cls.argmax(axis=1) if cls.shape[1] else np.zeros(len(a), dtype=np.int64)
    keep = scores >= score_threshold
    if n_classes:
        keep &= labels < n_classes
    a, scores, labels = a[keep], scores[keep], labels[keep].astype(np.int64)
    boxes = np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2],
                     axis=1) if len(a) else np.zeros((0, 4))
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(axis=1)
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    if len(boxes):
        k = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels),
                        float(iou_threshold)).numpy()[:int(max_detections)]
        boxes, scores, labels = boxes[k], scores[k], labels[k]
    return boxes.reshape(-1, 4), labels, scores


class OnnxDetectionRunner(_OnnxRunner):
    """batch float32 [B, C, T, T] -> per tile (boxes [n, 4] tile pixels, labels 0-based, scores), like
    :class:`.detect.DetectionRunner`."""

    def __init__(self, pkg, device, score_threshold, iou_threshold, max_detections):
        super().__init__(pkg, device)
        self.score, self.iou, self.maxd = score_threshold, iou_threshold, max_detections

    def __call__(self, batch):
        out = np.asarray(self._run(batch))
        if out.ndim != 3 or len(out) != len(batch):
            raise ModelPackageError(f"{self.pkg.source}: the detector returned shape {list(out.shape)}; expected "
                                    f"[batch, boxes, values] ({self.pkg.det_type})")
        return [decode_yolo(o, self.pkg.det_type, self.score, self.iou, self.maxd, len(self.pkg.classes))
                for o in out]


# --------------------------------------------------------------------------------------------
# export


def deepness_standardization(value_scaling):
    """(mean, std) lists such that Deepness's ``(x / 255 - mean) / std`` equals our value scaling, or None
    when a band's scaling cannot be written so (clipping, several steps)."""
    mean, std = [], []
    for s in value_scaling:
        if s is None:
            m, d = 0.0, 1.0
        elif s["type"] == "min-max":
            m, d = s["minimum"], s["maximum"] - s["minimum"]
        elif s["type"] == "z-score":
            m, d = s["mean"], s["stddev"]
        elif s["type"] == "scale":
            m, d = 0.0, s["value"]
        elif s["type"] == "offset":
            m, d = s["value"], 1.0
        else:
            return None
        mean.append(float(m) / 255.0)
        std.append(float(d) / 255.0)
    return mean, std


def deepness_metadata(pkg):
    """The Deepness/GeoDeep metadata_props (JSON-encoded values) for a segmentation or detection package."""
    props = {
        "model_type": json.dumps("Detector" if pkg.task == "detection" else "Segmentor"),
        "class_names": json.dumps({str(c.value): c.name for c in pkg.classes}),
        "tile_size": json.dumps(int(pkg.tile_size)),
        "tiles_overlap": json.dumps(int(round(100.0 * pkg.overlap / pkg.tile_size))),
    }
    if pkg.gsd:
        props["resolution"] = json.dumps(round(pkg.gsd * 100.0, 6))
    if pkg.task == "detection":
        meta = pkg.metadata.get("properties", {})
        props["det_type"] = json.dumps("YOLO_v5_or_v7_default")
        props["det_conf"] = json.dumps(float(meta.get("rs_deep:score_threshold", 0.3)))
        props["det_iou_thresh"] = json.dumps(float(meta.get("rs_deep:iou_threshold", 0.5)))
    std = deepness_standardization(pkg.value_scaling)
    if std is not None:
        props["standardization_mean"] = json.dumps(std[0])
        props["standardization_std"] = json.dumps(std[1])
    return props


def _centernet_as_yolo(net, tile):
    """A module: CenterNet -> YOLO v5-style output [batch, cells, 5 + classes] (cx, cy, w, h, score, class scores).

    Every heatmap cell is a row; its score is the class peak (sigmoid of the heatmap where it is the
    3 x 3 maximum, else 0), so a YOLO decoder (score cut, class-wise NMS) finds exactly the peaks
    that :meth:`CenterNet.decode` finds, with the same boxes, clamped to the tile."""
    import torch
    import torch.nn.functional as F

    class CenterNetYolo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            heat, box = self.net.forward_maps(x)
            prob = torch.sigmoid(heat)
            peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob).to(prob.dtype)
            b, k, h, w = prob.shape
            s = float(self.net.stride)
            xs = (torch.arange(w, dtype=prob.dtype, device=x.device) + 0.5).view(1, 1, w)
            ys = (torch.arange(h, dtype=prob.dtype, device=x.device) + 0.5).view(1, h, 1)
            cx = (xs + box[:, 0]) * s
            cy = (ys + box[:, 1]) * s
            wh = torch.exp(box[:, 2:4].clamp(-2.0, 9.0))
            x0 = (cx - wh[:, 0] / 2).clamp(0.0, float(tile))
            y0 = (cy - wh[:, 1] / 2).clamp(0.0, float(tile))
            x1 = (cx + wh[:, 0] / 2).clamp(0.0, float(tile))
            y1 = (cy + wh[:, 1] / 2).clamp(0.0, float(tile))
            score = peaks.max(dim=1, keepdim=True).values
            rows = torch.cat([((x0 + x1) / 2)[:, None], ((y0 + y1) / 2)[:, None], (x1 - x0)[:, None],
                              (y1 - y0)[:, None], score, peaks], dim=1)
            return rows.reshape(b, 5 + k, h * w).transpose(1, 2)

    return CenterNetYolo()


def export_onnx(package_path, out_path, opset=17, log=None):
    """Export a segmentation or CenterNet detection package (folder, zip or ModelPackage) to one ONNX file.

    The graph takes float32 [batch, channels, tile, tile] (dynamic batch) scaled like the package's
    value scaling. Segmentation returns class probabilities [batch, classes, tile, tile] (softmax,
    or sigmoid for a 1-channel model); detection returns YOLO v5-style rows [batch, cells, 5 +
    classes] (``det_type`` ``YOLO_v5_or_v7_default``, see :func:`_centernet_as_yolo`), which RS Deep,
    Deepness and GeoDeep decode alike. ``metadata_props`` carry our model.json
    (``rs_deep:model_json``) and the Deepness keys. Written to a temp file, then renamed. Returns
    the output path.
    """
    log = log or (lambda msg: None)
    pkg = package_path if isinstance(package_path, ModelPackage) else load_package(package_path)
    if getattr(pkg, "backend", "torch") == "onnx":
        raise InputError(f"{pkg.source} is already an ONNX model")
    if pkg.task not in ("segmentation", "detection"):
        raise InputError(f"'{pkg.name}' is a {pkg.task} model; ONNX export supports segmentation and detection "
                         "packages (change and patch classification packages cannot be exported yet)")
    if pkg.task == "detection" and (pkg.builder.get("library"), pkg.builder.get("architecture")) != \
            ("rs_deep", "CenterNet"):
        raise InputError(f"'{pkg.name}' is a {pkg.builder.get('architecture')} detector; ONNX export supports "
                         "RS Deep's CenterNet detectors (the default of rs_deep:train)")
    out_path = os.fspath(out_path)
    if not out_path.lower().endswith(".onnx"):
        raise InputError(f"OUTPUT must be a .onnx file; got {out_path}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"OUTPUT folder does not exist: {out_dir}")
    onnx = _onnx()
    import torch

    model = pkg.load_model().float().eval()
    activation = pkg.activation

    class WithActivation(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            return torch.sigmoid(y) if activation == "sigmoid" else torch.softmax(y, dim=1)

    wrapped = (_centernet_as_yolo(model, pkg.tile_size) if pkg.task == "detection" else WithActivation(model)).eval()
    dummy = torch.zeros(1, pkg.in_channels, pkg.tile_size, pkg.tile_size, dtype=torch.float32)
    buf = io.BytesIO()
    log(f"Exporting {pkg.name} to ONNX (opset {opset})")
    import warnings
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, dummy, buf, dynamo=False, opset_version=int(opset), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    props = deepness_metadata(pkg)
    props[MODEL_JSON_KEY] = json.dumps(pkg.metadata, separators=(",", ":"))
    if pkg.task == "segmentation":
        props[OUTPUT_KEY] = json.dumps("probabilities")
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "rs_deep"
    proto.doc_string = f"RS Deep package {pkg.name} ({pkg.task}); {METADATA_NAME} in metadata_props {MODEL_JSON_KEY}"
    data = proto.SerializeToString()
    write_atomic(out_path, data)
    log(f"Wrote {out_path} ({len(data) / 1e6:.1f} MB)")
    return out_path


__all__ = ["OnnxPackage", "load_onnx_package", "export_onnx", "decode_yolo", "OnnxSegmentationRunner",
           "OnnxDetectionRunner", "deepness_metadata", "deepness_standardization", "is_onnx_path"]
