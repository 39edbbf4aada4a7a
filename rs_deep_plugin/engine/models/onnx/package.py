"""ONNX models: run Deepness/GeoDeep-style ``.onnx`` files through the engine, export packages to ONNX.

QGIS-free. ``onnxruntime`` (running) and ``onnx`` (export, and an early check for external data)
are optional dependencies: without them an ONNX model gets a :class:`MissingDependency` error
naming the package to install; everything else in RS Deep works as before.

Metadata is read from the ONNX ``metadata_props`` (values are JSON text, as Deepness writes
them; Python literals and plain strings are accepted too):

* ``rs_deep:model_json``: our full ``model.json`` (written by :func:`export_onnx`); when present it
  is used entirely (exact round trip) and the keys below are ignored;
* otherwise the Deepness keys: ``model_type`` (``Segmentor``, ``Detector``, ``Regressor``, ``Superresolution``,
  ``Recognition``: one embedding per image, compared with a query image by rs_deep:find_similar), ``class_names``
  (``{0: 'name', ...}``), ``resolution`` (cm per pixel), ``tile_size``, ``tiles_overlap`` (percent
  of the tile), ``standardization_mean``/``standardization_std`` (applied after dividing the
  pixel values by 255, as Deepness does), ``seg_thresh`` (probability threshold), ``det_conf``,
  ``det_iou_thresh``, ``det_type`` (``YOLO_v5_or_v7_default``, ``YOLO_v6``, ``YOLO_v9``, ``YOLO_Ultralytics``;
  ``YOLO_Ultralytics_obb``: oriented boxes, run by rs_deep:detect; ``YOLO_Ultralytics_segmentation``: instance
  masks, a model of task ``instance_segmentation`` run by rs_deep:segment_instances).

Only single-file models are accepted (no external data), and nothing is ever unpickled: an ONNX
file is a protobuf graph run by onnxruntime.
"""
import ast
import json
import math
import os
from dataclasses import dataclass, field

from ...errors import ModelPackageError
from ...tasks import RASTER_TASKS, wrong_task
from ...limits import (MAX_CLASSES, MAX_DETECTION_CLASSES, MAX_JSON_BYTES, MAX_JSON_DEPTH, json_depth, loads_json,
                      size_text)
from ..package import DEFAULT_COLORS, MAX_SR_SCALE, ModelClass, ModelPackage, parse_metadata
from .session import create_session, external_data_message, require_onnx, require_onnxruntime, session_options

MAX_ONNX_BYTES = 2 << 30  # protobuf's limit: larger models need external data, which we refuse
MODEL_JSON_KEY = "rs_deep:model_json"
OUTPUT_KEY = "rs_deep:output"
#: Deepness model types -> our tasks
MODEL_TYPES = {"segmentor": "segmentation", "detector": "detection", "regressor": "regression",
               "regression": "regression", "recognition": "recognition", "superresolution": "super_resolution"}
OBB_DET_TYPE = "YOLO_Ultralytics_obb"  # [B, 4 + C + 1, N]: cx, cy, w, h, class scores, angle (radians)
SEG_DET_TYPE = "YOLO_Ultralytics_segmentation"  # [B, 4 + C + M, N] and prototypes [B, M, H / 4, W / 4]
DET_TYPES = ("YOLO_v5_or_v7_default", "YOLO_v6", "YOLO_v9", "YOLO_Ultralytics", OBB_DET_TYPE, SEG_DET_TYPE)
#: det_type -> (rows are [values, boxes] (Ultralytics), values before the class scores, values after them)
DET_LAYOUTS = {"YOLO_v5_or_v7_default": (False, 5, 0), "YOLO_v6": (False, 5, 0), "YOLO_v9": (True, 4, 0),
               "YOLO_Ultralytics": (True, 4, 0), OBB_DET_TYPE: (True, 4, 1), SEG_DET_TYPE: (True, 4, None)}
DEFAULT_TILE = 512
DEFAULT_OVERLAP_PCT = 10.0


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


@dataclass
class OnnxPackage(ModelPackage):
    """A ModelPackage read from a single-file ONNX model; ``backend`` is ``"onnx"``."""

    backend: str = "onnx"
    output_kind: str = "auto"  # probabilities | logits | auto (segmentation)
    det_type: str = "YOLO_v5_or_v7_default"
    input_name: str = "input"
    fixed_size: tuple = None  # (height, width) when the model's input size is fixed
    fixed_batch: int = None
    threshold: float = None  # seg_thresh: a pixel whose winning probability is lower is class 0 (as in Deepness)
    binary_output: bool = False  # the segmentation output has one (sigmoid) channel
    #: models with several outputs (Deepness: one set of classes per output): [(classes, binary)] per output; the
    #: classes are numbered on after each other and the class raster has one band per output
    output_groups: tuple = None
    onnx_metadata: dict = field(default_factory=dict, repr=False)
    _model_bytes: bytes = field(default=None, repr=False)

    @property
    def deepness_style(self):
        """A Deepness model (no RS Deep model.json inside) is processed as Deepness processes it (see
        :attr:`..package.ModelPackage.deepness_style`)."""
        return MODEL_JSON_KEY not in self.onnx_metadata

    def session(self, device=None, threads=None):
        """An onnxruntime session on ``device`` (None: the CPU); ``threads``: its CPU threads (None:
        ``RS_DEEP_THREADS`` when set, else onnxruntime's choice, every core)."""
        ort = require_onnxruntime()
        opts = session_options(ort)
        threads = threads or int(os.environ.get("RS_DEEP_THREADS", "0") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device is not None and getattr(device, "type", "cpu") == "cuda" and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            index = getattr(device, "index", None)  # "cuda:N": GPU N
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": str(index)}) if index else
                             "CUDAExecutionProvider")
        return create_session(ort, self._model_bytes, self.source, opts, providers)

    def load_model(self):
        return self.session()

    def make_runner(self, device=None):
        """The segmentation runner (same call as :class:`..runners.ModelRunner`)."""
        from .runners import OnnxEmbeddingRunner, OnnxRasterRunner, OnnxSegmentationRunner
        if self.task == "recognition":
            return OnnxEmbeddingRunner(self, device)
        return (OnnxRasterRunner if self.task in RASTER_TASKS else OnnxSegmentationRunner)(self, device)

    @property
    def oriented(self):
        """Whether this detector gives rotated boxes: a YOLO OBB model (``det_type`` :data:`OBB_DET_TYPE`)."""
        return (self.task == "detection" and self.det_type == OBB_DET_TYPE) or super().oriented

    def make_detection_runner(self, device, score_threshold, iou_threshold, max_detections):
        """The detection runner (same call as :class:`..runners.DetectionRunner`); a YOLO segmentation model's
        gives masks too (same call as :class:`..runners.InstanceRunner`)."""
        from .runners import OnnxDetectionRunner, OnnxInstanceRunner
        runner = OnnxInstanceRunner if self.task == "instance_segmentation" else OnnxDetectionRunner
        return runner(self, device, score_threshold, iou_threshold, max_detections)


def check_single_file(data, source):
    """Refuse an ONNX file whose tensors keep their data in external files, with a message saying how to save it as
    one file. A tensor's external data is named by a ``location`` entry: a file without those bytes has none, and
    is not parsed here (which would import the onnx package, about a tenth of a second of every run's start-up)."""
    if b"location" not in data:
        return
    onnx = require_onnx(required=False)
    if onnx is None:
        return  # onnxruntime refuses external data from bytes anyway (see create_session)
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
        raise ModelPackageError(external_data_message(source))


def load_onnx_package(path, task=None):
    """Read a single-file ONNX model and its metadata_props into an :class:`OnnxPackage`."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ModelPackageError(f"ONNX model not found: {source}")
    if os.path.getsize(source) > MAX_ONNX_BYTES:
        raise ModelPackageError(f"{source}: larger than 2 GB; an ONNX file this large keeps its weights as external "
                                "data, which is not supported")
    ort = require_onnxruntime()  # early, so a missing onnxruntime is reported before anything else
    with open(source, "rb") as fh:
        data = fh.read()
    check_single_file(data, source)
    sess = create_session(ort, data, source, session_options(ort, optimize=False))  # inputs, outputs, metadata
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
    # the batch size the graph takes: the input's, or an output's when the graph fixes it inside (a Reshape)
    batch = _dim(shape[0]) or next((_dim(list(o.shape)[0]) for o in outputs if o.shape and _dim(list(o.shape)[0])),
                                   None)
    common = dict(source=source, input_name=inputs[0].name, fixed_size=fixed, fixed_batch=batch,
                  onnx_metadata=meta, _model_bytes=data, _weights=None)
    if MODEL_JSON_KEY in meta:
        pkg = _from_model_json(meta, source, common)
    else:
        pkg = _from_deepness(meta, source, shape, outputs, common, task)
    if fixed and pkg.tile_size != fixed[0]:
        raise ModelPackageError(f"{source}: the metadata says tile size {pkg.tile_size} but the model takes "
                                f"{fixed[0]} px inputs")
    if task is not None and pkg.task not in ((task,) if isinstance(task, str) else task):
        raise ModelPackageError(f"{source}: {wrong_task(pkg.task, task)}")
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
    # the builder describes the exported network, which is never built from it: no check that imports torch
    fields = parse_metadata(model_json, source=f"{source} ({MODEL_JSON_KEY})", registries=False)
    kind = _value(meta.get(OUTPUT_KEY, '"auto"'))
    det = _value(meta.get("det_type", '"YOLO_v5_or_v7_default"'))
    return OnnxPackage(metadata=model_json, output_kind=kind if kind in ("probabilities", "logits") else "auto",
                       det_type=det, **fields, **common)


def _class_names(meta, source):
    """The class names of the first output: ``class_names`` as ``{0: 'name', ...}`` (or a list), or in Deepness's
    one-dict-per-output form ``[{"0": "Coffee"}, {"0": "Juice"}]`` (see :func:`_output_class_names`)."""
    names = _output_class_names(meta, source)
    return None if names is None else names[0]


def _output_class_names(meta, source):
    """Class names per model output (a list of lists), or None when the metadata has none."""
    for key in ("class_names", "names"):
        if key in meta:
            v = _value(meta[key])
            if isinstance(v, (list, tuple)) and v and all(isinstance(d, dict) for d in v):
                return [_names_of(d, key, meta, source) for d in v]  # Deepness: one dict per output
            if isinstance(v, (list, tuple)):
                v = dict(enumerate(v))
            return [_names_of(v, key, meta, source)]
    return None


def _names_of(v, key, meta, source):
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


def _from_deepness(meta, source, shape, outputs, common, wanted=None):
    """An OnnxPackage of a Deepness/GeoDeep model. Without a ``model_type`` the output tells: an image larger than
    the input is super-resolution, a map of the input's size segmentation (regression when the tool asks for a
    regression model: ``wanted``, a task or several), rows of boxes detection."""
    raw_type = meta.get("model_type")
    out_shape = list(outputs[0].shape) if outputs else []
    if raw_type is None:  # like GeoDeep: infer from the output ([B, H, W] with H == W: a one-channel mask)
        square = len(out_shape) == 3 and _dim(out_shape[1]) and out_shape[1] == out_shape[2]
        model_type = "segmentor" if len(out_shape) == 4 or square or len(outputs) > 1 else "detector"
        if model_type == "segmentor" and wanted is not None and "regression" in \
                ((wanted,) if isinstance(wanted, str) else wanted):
            model_type = "regressor"
        larger = len(out_shape) == 4 and _dim(out_shape[2]) and _dim(shape[2]) and out_shape[2] > shape[2]
        if larger:  # an image larger than the input: super-resolution, not classes
            model_type = "superresolution"
    else:
        model_type = str(_value(raw_type)).strip().lower()
    if model_type not in MODEL_TYPES:
        raise ModelPackageError(f"{source}: metadata_props 'model_type' is {raw_type!r}; RS Deep runs 'Segmentor' "
                                "(rs_deep:segment), 'Detector' (rs_deep:detect), 'Regressor' and 'Superresolution' "
                                "(rs_deep:predict_raster) and 'Recognition' (rs_deep:find_similar) models")
    task = MODEL_TYPES[model_type]
    det_type = "YOLO_v5_or_v7_default"
    if task == "detection":
        det_type = str(_value(meta.get("det_type", '"YOLO_v5_or_v7_default"')))
        if det_type not in DET_TYPES:
            raise ModelPackageError(f"{source}: metadata_props 'det_type' {det_type!r} is unknown; use one of "
                                    f"{', '.join(DET_TYPES)}")
        if det_type == SEG_DET_TYPE:  # boxes and masks: one polygon per object
            task = "instance_segmentation"
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
    names = None if task == "segmentation" else _class_names(meta, source)
    props = {}
    extra = {}
    activation = "softmax"
    if task in RASTER_TASKS:
        names, extra = _raster_outputs(meta, source, shape, outputs, task)
        n_classes, activation = len(names), "none"
    elif task == "recognition":
        n_classes, activation, names = _embedding_size(source, outputs), "none", []
    elif task == "segmentation":
        names, groups = _segmentation_classes(meta, source, outputs)
        n_classes = len(names)
        thr = _number(meta, "seg_thresh", source)
        if thr is not None and not 0 <= thr <= 1:
            raise ModelPackageError(f"{source}: metadata_props 'seg_thresh': expected a probability 0..1, got {thr}")
        extra = {"threshold": thr, "binary_output": groups[0][1] and len(groups) == 1,
                 "output_groups": tuple(groups) if len(groups) > 1 else None}
    else:
        if len(out_shape) != 3:
            raise ModelPackageError(f"{source}: a YOLO detector needs an output [batch, boxes, values] (or [batch, "
                                    f"values, boxes] for {det_type}) of 3 dimensions; the first output is {out_shape} "
                                    f"({len(out_shape)} dimensions): not a detector RS Deep can decode")
        if _dim(out_shape[1]) and list(out_shape[1:]) == list(shape[2:]):
            raise ModelPackageError(f"{source}: the output {out_shape} is a map of the input's {shape[2]} x "
                                    f"{shape[3]} pixels, not YOLO rows [batch, boxes, values]: a per-pixel model "
                                    "(segmentation or regression), not a detector")
        inverted, before, after = DET_LAYOUTS[det_type]
        if det_type == SEG_DET_TYPE:
            after = _mask_coefficients(source, outputs)
        width = _dim(out_shape[1] if inverted else out_shape[2])
        k = None if width is None else width - before - after
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
                       activation=activation, weights_sha256="", description=str(_value(meta.get("description", '""'))),
                       metadata={"properties": props}, output_kind="auto", det_type=det_type, **extra, **common)


def _mask_coefficients(source, outputs):
    """The number of mask coefficients of a YOLO segmentation model (Deepness ``YOLO_Ultralytics_segmentation``):
    its second output holds the mask prototypes [batch, M, H / 4, W / 4], its first the rows [batch, 4 + C + M, N]."""
    protos = list(outputs[1].shape) if len(outputs) == 2 else None
    if protos is None or len(protos) != 4 or _dim(protos[1]) is None:
        shapes = ", ".join(str(list(o.shape)) for o in outputs)
        raise ModelPackageError(f"{source}: a {SEG_DET_TYPE} model has two outputs, the rows [batch, 4 + classes + "
                                f"M, boxes] and the mask prototypes [batch, M, height / 4, width / 4]; this one has "
                                f"{shapes}: export it with Ultralytics' ONNX export of a -seg model")
    return protos[1]


def _embedding_size(source, outputs):
    """The length of a recognition model's embedding: its one output is [batch, values] (Deepness's Recognition)."""
    o = list(outputs[0].shape) if len(outputs) == 1 else None
    if o is None or len(o) != 2 or _dim(o[1]) is None:
        shapes = ", ".join(str(list(out.shape)) for out in outputs)
        raise ModelPackageError(f"{source}: a Recognition model returns one embedding per image, a single output "
                                f"[batch, values] of fixed length; this one returns {shapes}")
    return o[1]


def _raster_outputs(meta, source, shape, outputs, task):
    """(output channel names, package fields) of a Deepness regressor or super-resolver. Every output is [B, K, H, W]
    or [B, H, W] (one channel), on the input's grid (regression) or ``scale`` times finer (super-resolution: the
    ratio of the output's size to the input's, else ``scale_factor`` in the metadata). Channel ``c`` of output ``j``
    is named as Deepness names it (``get_channel_name(j, c)``): ``class_names`` per output, else the output's name.
    Values are multiplied by ``reg_output_scaling`` (Deepness's output scaling; 1 without it)."""
    per_output = _output_class_names(meta, source)
    names, scales = [], set()
    for j, out in enumerate(outputs):
        o = list(out.shape)
        if len(o) not in (3, 4) or (len(o) == 3 and _dim(o[1]) and _dim(o[2]) and o[1] != o[2]):
            hint = "" if len(o) != 2 else (": a model that returns one vector per image is a Recognition (embedding) "
                                           "model, run by rs_deep:find_similar once its metadata_props say "
                                           "model_type \"Recognition\"")
            raise ModelPackageError(f"{source}: a {task.replace('_', '-')} model returns an image [batch, channels, "
                                    f"height, width] or [batch, height, width]; output {out.name!r} is {o}: not a "
                                    f"per-pixel output RS Deep can write as a raster{hint}")
        k = 1 if len(o) == 3 else _dim(o[1])
        if k is None:
            raise ModelPackageError(f"{source}: the number of channels of output {out.name!r} ({o}) is not fixed")
        h = _dim(o[-2])
        if h and _dim(shape[2]):
            scales.add(h / shape[2])
        given = per_output[j] if per_output and j < len(per_output) else []
        for c in range(k):
            name = given[c] if c < len(given) else (out.name if k == 1 else f"{out.name} {c + 1}")
            names.append(name if name not in names else f"{name} ({out.name})")
    if task == "super_resolution":
        given = _number(meta, "scale_factor", source)
        scale = round(given) if given else (round(scales.pop()) if len(scales) == 1 else None)
        if scale is None or not 2 <= scale <= MAX_SR_SCALE or (given and abs(given - scale) > 1e-6):
            raise ModelPackageError(f"{source}: cannot tell how many times finer the super-resolution output is (the "
                                    f"output size is not fixed, or not a whole 2..{MAX_SR_SCALE} times the input's); "
                                    "add scale_factor to the metadata_props")
        dtype = "float32"
    else:
        scale, dtype = 1, "float32"
        if scales and all(abs(v - 1) > 0.25 for v in scales):
            raise ModelPackageError(f"{source}: the outputs are {sorted(scales)} times the input's size; a "
                                    "regression model predicts on the input's grid (a larger image is "
                                    "super-resolution)")
    value_scale = _number(meta, "reg_output_scaling", source)
    if value_scale is None:
        value_scale = _number(meta, "output_scaling", source)
    return names, {"scale": scale, "output_dtype": dtype, "value_scale": 1.0 if value_scale is None else value_scale,
                   "units": str(_value(meta.get("units", '""')))}


def _segmentation_classes(meta, source, outputs):
    """(class names, [(classes, binary)] per output) of a segmentation model: each output [B, K, H, W] or [B, H, W]
    (one channel) is a set of classes, as in Deepness; one channel (sigmoid) is (background, class)."""
    per_output = _output_class_names(meta, source)
    if per_output is not None and len(per_output) != len(outputs):
        raise ModelPackageError(f"{source}: metadata_props 'class_names' gives {len(per_output)} set(s) of classes "
                                f"but the model has {len(outputs)} outputs")
    names, groups = [], []
    for i, out in enumerate(outputs):
        shape = list(out.shape)
        if len(shape) not in (3, 4):
            raise ModelPackageError(f"{source}: a segmentation model's outputs are [batch, classes, height, width] or "
                                    f"[batch, height, width]; output {out.name!r} is {shape}")
        given = per_output[i] if per_output else None
        k = 1 if len(shape) == 3 else _dim(shape[1]) or (len(given) if given else None)
        if k is None:
            raise ModelPackageError(f"{source}: the number of output channels is not fixed and no class_names given")
        own = given
        if own is None:
            own = ["background", "foreground"] if k == 1 else [f"class_{j}" for j in range(k)]
        elif k == 1 and len(own) == 1:
            own = ["background"] + own
        if len(own) != (2 if k == 1 else k):
            which = "the model outputs" if len(outputs) == 1 else f"output {out.name!r} has"
            raise ModelPackageError(f"{source}: metadata_props 'class_names' lists {len(own)} classes but {which} "
                                    f"{k} channel(s)")
        names += [n if n not in names else f"{n} ({out.name})" for n in own]
        groups.append((len(own), k == 1))
    if len(names) > MAX_CLASSES:
        raise ModelPackageError(f"{source}: the segmentation model has {len(names)} classes; at most {MAX_CLASSES} "
                                "are supported (the class raster is Byte, 255 is nodata). Use a model with "
                                f"{MAX_CLASSES} classes or fewer")
    return names, groups


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
