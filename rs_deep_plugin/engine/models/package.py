"""Model packages: one format for every task.

A package is a folder (or a ``.zip`` of one) holding

* ``model.json``: a STAC Item using the MLM extension (``mlm:*`` fields in
  ``properties``) plus our ``rs_deep:*`` fields (builder, tile size, overlap,
  ground sampling distance, task, weights checksum);
* ``model.safetensors``: the weights. Never a pickle, never TorchScript.

See docs/model_package.md for the full description.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field

from .architectures import validate_builder
from .detection_options import validate_detection_metadata
from ..errors import InputError, MissingDependency, ModelPackageError
from ..files import write_atomic
from ..tasks import ONNX_ONLY_TASKS, OBJECT_TASKS, TASKS as TASK_TABLE
from .arch_torchvision import INSTANCE_ARCHITECTURES, is_instance_builder
from ..tasks import wrong_task
from ..limits import (CHUNK_BYTES, MAX_CLASSES, MAX_JSON_BYTES, MAX_PARAMETERS, MAX_SAFETENSORS_HEADER_BYTES,
                     MAX_WEIGHTS_BYTES, MAX_ZIP_RATIO, ZIP_RATIO_MIN_BYTES, count_text, loads_json, size_text)

FORMAT_VERSION = 1
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "model.json"

#: our task names -> MLM task names
TASKS = {name: task.mlm for name, task in TASK_TABLE.items()  # rs_deep:task -> MLM task
         if name not in ONNX_ONLY_TASKS}
ACTIVATIONS = ("softmax", "sigmoid", "none")  # none: raw values (regression, super-resolution)
#: the data types a raster-to-raster package may write (rs_deep:output_dtype)
OUTPUT_DTYPES = ("float32", "uint8", "uint16")
MAX_SR_SCALE = 8
SCALING_TYPES = ("min-max", "z-score", "clip", "clip-min", "clip-max", "offset", "scale")
#: safetensors dtypes -> bytes per element
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: zip compression methods Python reads (others, e.g. deflate64 or AES, are refused by name)
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma"}


@dataclass
class ModelClass:
    value: int
    name: str
    color: str  # RRGGBB

    @property
    def rgb(self):
        return tuple(int(self.color[i:i + 2], 16) for i in (0, 2, 4))


@dataclass
class ModelPackage:
    """A validated model package. ``weights`` are loaded lazily by :meth:`load_model`."""

    source: str
    name: str
    task: str
    bands: list
    value_scaling: list  # one dict per input band
    classes: list  # list[ModelClass]
    tile_size: int
    overlap: int
    gsd: float  # metres per pixel, or None when the model does not care
    builder: dict
    activation: str
    weights_sha256: str
    description: str = ""
    #: patch classification only: several classes per patch (sigmoid scores), each class kept when its score
    #: reaches its threshold (``class_thresholds``, one per class; rs_deep:multi_label, rs_deep:class_thresholds)
    multi_label: bool = False
    class_thresholds: list = None
    metadata: dict = field(default_factory=dict, repr=False)
    _weights: object = field(default=None, repr=False)  # a WeightsFile (read when the model is loaded)
    # raster to raster (regression, super-resolution): output value = raw * value_scale + value_offset, in ``units``
    # (the classes name the output channels); super-resolution: ``scale`` times finer, written as ``output_dtype``
    scale: int = 1
    output_dtype: str = "float32"
    value_scale: float = 1.0
    value_offset: float = 0.0
    units: str = ""
    #: (low, high): every input is scaled by its own percentiles (min-max of its low..high percentiles, per band:
    #: :func:`..geo.raster.input_value_scaling`) instead of ``value_scaling`` (its training data's, which other
    #: tools and the ONNX export use); rs_deep:input_percentiles. None: ``value_scaling``.
    input_percentiles: tuple = None
    backend = "torch"  # "onnx" for an :class:`.onnx.package.OnnxPackage`
    threshold = None  # the model's probability threshold (an ONNX model's seg_thresh); None: argmax only
    binary_output = False  # True: one sigmoid channel, expanded to (background, class) by the runner
    output_groups = None  # several outputs, each a set of classes: [(classes, binary)]; one class band per output
    #: processed as Deepness processes it (:class:`..geo.raster.RasterReader`, :func:`..inference.segment.tile_batches`):
    #: at another resolution than the raster's, tiles are read with bilinear resampling in the raster's own integer
    #: type (as QGIS hands them to Deepness) and the results go back to the raster's grid as they are (each pixel
    #: takes the value of the processing-resolution pixel it lies in). True for Deepness models
    #: (:class:`.onnx.package.OnnxPackage` without our model.json)
    deepness_style = False

    @property
    def in_channels(self):
        return len(self.bands)

    @property
    def num_classes(self):
        return len(self.classes)

    def class_names(self):
        return {c.value: c.name for c in self.classes}

    @property
    def oriented(self):
        """Whether this detector gives rotated boxes (:data:`.arch_centernet.ORIENTED_ARCHITECTURE`)."""
        from .arch_centernet import is_oriented
        return self.task == "detection" and is_oriented(self.builder)

    def with_tiling(self, tile_size, overlap):
        """This package with another tile size and overlap (model pixels); itself when they are unchanged."""
        if (tile_size, overlap) == (self.tile_size, self.overlap):
            return self
        return dataclasses.replace(self, tile_size=tile_size, overlap=overlap)

    def make_runner(self, device):
        """The runner of this segmentation-type network on ``device``: batches of tiles -> probabilities (on the CPU,
        inference runs the package's cached ONNX graph instead: :func:`.onnx.cache.make_runner`)."""
        from .runners import ModelRunner
        return ModelRunner(self.load_model(), device, self.activation)

    def make_detection_runner(self, device, score_threshold, iou_threshold, max_detections):
        """The runner of this detection network on ``device``: batches of tiles -> boxes, labels, scores (an
        instance segmentation network: also masks, :class:`.runners.InstanceRunner`)."""
        from .runners import DetectionRunner, InstanceRunner
        runner = InstanceRunner if self.task == "instance_segmentation" else DetectionRunner
        return runner(self.load_model(), device, score_threshold, iou_threshold, max_detections)

    def load_model(self):
        """Build the allow-listed network and load the weights (safetensors only).

        The network is first described on torch's ``meta`` device (shapes, no memory): it is refused
        when it has more than :data:`.limits.MAX_PARAMETERS` parameters or does not match the tensors
        the weights file declares, before anything is allocated; the weights are then read, checked
        against ``rs_deep:weights_sha256`` again, and loaded strictly."""
        from .architectures import build_model, network_tensors
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError as exc:  # pragma: no cover
            raise MissingDependency(f"safetensors is not installed ({exc}); run 'make setup'") from exc
        if self._weights is None:
            raise ModelPackageError(f"{self.source}: this package holds no weights; load it with load_package()")
        b = self.builder
        net = f"{b['architecture']}/{b['encoder']}, in_channels={b['in_channels']}, classes={b['classes']}"
        where = f"{self.source}: rs_deep:builder"
        shapes = network_tensors(b, where)
        n = sum(math.prod(s) for s in shapes.values())
        if n > MAX_PARAMETERS:
            raise ModelPackageError(
                f"{self.source}: the network described in rs_deep:builder ({net}, params {b.get('params')}) has "
                f"{count_text(n)} parameters, more than the limit of {count_text(MAX_PARAMETERS)}; it is not built. "
                "Check rs_deep:builder (e.g. params.decoder_channels) or re-export the package.")
        in_file = {k: tuple(shape) for k, (_, shape) in self._weights.tensors.items()}
        missing = sorted(set(shapes) - set(in_file))
        unexpected = sorted(set(in_file) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(in_file) if shapes[k] != in_file[k])
        if missing or unexpected or wrong:
            raise ModelPackageError(
                f"{self.source}: the weights do not match the network described in rs_deep:builder "
                f"({net}): " + describe_mismatch(missing, unexpected, wrong, in_file, shapes))
        data = self._weights.read(self.weights_sha256, self.source)
        model = build_model(b, where)
        try:
            state = load_safetensors(data)
        except Exception as exc:
            raise ModelPackageError(
                f"{self.source}: {WEIGHTS_NAME} is not a valid safetensors file ({exc}). "
                "Re-export the weights with safetensors.torch.save_file; pickled checkpoints "
                "(.pt/.pth/.ckpt) are never loaded.") from exc
        del data
        expected = model.state_dict()
        # weights may be stored in half precision to keep packages small
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        model.eval()
        return model


def describe_mismatch(missing, unexpected, wrong, in_file, expected, examples=1):
    """How a weights file differs from a network, for messages: the counts of the ``missing``, ``unexpected`` and
    ``wrong`` (shape) tensor names with ``examples`` of each (``in_file``, ``expected``: {name: shape})."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:examples])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:examples])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(in_file[k])} in the file, "
                     f"{tuple(expected[k])} expected)")
    return "; ".join(parts)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _not_safetensors(where, why):
    return ModelPackageError(
        f"{where} is not a valid safetensors file ({why}). Re-export the weights with "
        "safetensors.torch.save_file; pickled checkpoints (.pt/.pth/.ckpt) are never loaded.")


def _zip_damaged(path, exc):
    return ModelPackageError(f"{path}: the zip is damaged and cannot be read ({type(exc).__name__}: {exc}); "
                             "zip the package folder again (or give the folder)")


#: what reading a damaged zip member raises (bad CRC, truncated or corrupt data, unknown methods)
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError,
                   struct.error)
try:
    import lzma
    ZIP_READ_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover - Python built without lzma
    pass


@dataclass
class WeightsFile:
    """``model.safetensors`` of a package: a file, or a member of a zip. Its header is checked against
    the file size and the limits as soon as the package is loaded; its bytes are only ever streamed
    (checksum) or read whole once those checks passed, when the model is loaded."""

    path: str  # the file, or the zip holding it
    member: str = None  # the member of the zip
    size: int = 0
    tensors: dict = field(default_factory=dict, repr=False)  # name -> (dtype, shape), from the header

    @property
    def where(self):
        """The weights file, for messages: its path, or the zip and the member."""
        return self.path if self.member is None else f"{self.path} ({self.member})"

    def _open(self):
        if self.member is None:
            return open(self.path, "rb"), None
        zf = zipfile.ZipFile(self.path)
        try:
            return zf.open(self.member), zf
        except BaseException:
            zf.close()
            raise

    def _read_error(self, exc):
        if self.member is None:
            return ModelPackageError(f"{self.path}: cannot read {WEIGHTS_NAME} ({exc})")
        return _zip_damaged(self.path, exc)

    def _too_long(self):
        return ModelPackageError(f"{self.where} is longer than its declared size ({self.size} bytes): the "
                                 "package is damaged or was changed; re-export it")

    def chunks(self, first=None):
        """The bytes, in chunks of at most :data:`.limits.CHUNK_BYTES` (``first``: size of the first one)."""
        with self._stream() as stream:
            n = 0
            while True:
                chunk = stream.read(first or CHUNK_BYTES)
                first = None
                if not chunk:
                    break
                n += len(chunk)
                if n > self.size:
                    raise self._too_long()
                yield chunk

    @contextlib.contextmanager
    def _stream(self):
        """The open bytes (a file, or the zip member); read errors become a ModelPackageError."""
        try:
            stream, zf = self._open()
        except ZIP_READ_ERRORS as exc:
            raise self._read_error(exc) from exc
        try:
            yield stream
        except ZIP_READ_ERRORS as exc:
            raise self._read_error(exc) from exc
        finally:
            stream.close()
            if zf is not None:
                zf.close()

    def _prefix(self, n):
        """The first ``n`` bytes (fewer when the file is shorter)."""
        chunks = self.chunks(first=n)
        try:
            return next(chunks, b"")
        finally:
            chunks.close()

    def check_header(self):
        """Read and check the safetensors header: its length, every tensor's dtype, shape and byte range
        against the file size, and the parameter count; sets :attr:`tensors`. Nothing else is read."""
        where = self.where
        if self.size < 8:
            raise _not_safetensors(where, f"{self.size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", self._prefix(8))
        if n < 2 or n > MAX_SAFETENSORS_HEADER_BYTES or 8 + n > self.size:
            raise _not_safetensors(where, f"its header length is {n} bytes; it must be 2 bytes to "
                                   f"{size_text(MAX_SAFETENSORS_HEADER_BYTES)} (the limit) and fit in the file "
                                   f"({self.size} bytes)")
        text = self._prefix(8 + n)[8:]
        if len(text) != n:
            raise _not_safetensors(where, "the file ends inside its header")
        header = loads_json(text, f"{where}: the safetensors header", fix="re-export the weights")
        if not isinstance(header, dict):
            raise _not_safetensors(where, "its header is not a JSON object")
        data_len = self.size - 8 - n
        tensors, ranges, params = {}, [], 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(t, dict) or t.get("dtype") not in SAFETENSORS_DTYPES:
                dtype = t.get("dtype") if isinstance(t, dict) else t
                raise _not_safetensors(where, f"tensor {name!r}: dtype {dtype!r} unknown; expected one of "
                                       f"{', '.join(SAFETENSORS_DTYPES)}")
            shape, offsets = t.get("shape"), t.get("data_offsets")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise _not_safetensors(where, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                    isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
                raise _not_safetensors(where, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
            count = math.prod(shape)
            if count * SAFETENSORS_DTYPES[t["dtype"]] != offsets[1] - offsets[0]:
                raise _not_safetensors(where, f"tensor {name!r}: {t['dtype']} {shape} does not fill its "
                                       f"{offsets[1] - offsets[0]} bytes")
            params += count
            tensors[name] = (t["dtype"], tuple(shape))
            ranges.append(offsets)
        if params > MAX_PARAMETERS:
            raise ModelPackageError(f"{where} declares {count_text(params)} parameters, more than the limit of "
                                    f"{count_text(MAX_PARAMETERS)}; RS Deep does not load models this large")
        end = 0
        for begin, stop in sorted(ranges):
            if begin != end:
                raise _not_safetensors(where, "its tensors overlap or leave gaps in the data")
            end = stop
        if end != data_len:
            raise _not_safetensors(where, f"its tensors hold {end} bytes but the file has {data_len} bytes of data")
        self.tensors = tensors
        return tensors

    def sha256(self):
        """SHA-256 of the bytes, streamed: memory stays at one chunk whatever the size."""
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()

    def read(self, sha256, source):
        """All the bytes (at most the declared size, checked when the package was loaded), checked against
        ``sha256`` again: the file may have changed since."""
        with self._stream() as stream:
            data = stream.read(self.size + 1)
        if len(data) > self.size:
            raise self._too_long()
        actual = _sha256(data)
        if len(data) != self.size or actual != sha256:
            raise _checksum_error(source, sha256, actual)
        return data


def _checksum_error(source, expected, actual):
    return ModelPackageError(
        f"{source}: model.safetensors does not match its checksum (rs_deep:weights_sha256 is "
        f"{expected[:12]}..., the file hashes to {actual[:12]}...). The weights were "
        "changed or corrupted; re-export the package.")


def _check_zip_member(path, info, limit):
    """Refuse an encrypted member, an unknown method, or one inflating beyond ``limit`` or the zip-bomb ratio."""
    name = os.path.basename(info.filename)
    if info.flag_bits & 0x1:
        raise ModelPackageError(f"{path}: {name} is encrypted (the zip is password-protected); RS Deep reads "
                                "plain zips only: unzip it with its password and give the folder, or zip it "
                                "again without a password")
    if info.compress_type not in ZIP_METHODS:
        raise ModelPackageError(f"{path}: {name} is compressed with zip method {info.compress_type}, which RS Deep "
                                f"cannot read; zip the package again with one of: {', '.join(ZIP_METHODS.values())}")
    if info.file_size > limit:
        raise ModelPackageError(f"{path}: {name} inflates to {size_text(info.file_size)}, more than the limit of "
                                f"{size_text(limit)} for {name}; this is not a model package RS Deep can load")
    if info.file_size > ZIP_RATIO_MIN_BYTES and info.file_size > MAX_ZIP_RATIO * max(1, info.compress_size):
        raise ModelPackageError(f"{path}: {name} inflates from {size_text(info.compress_size)} to "
                                f"{size_text(info.file_size)}, more than {MAX_ZIP_RATIO} times (the limit; real "
                                "weights barely compress): refused as a zip bomb. Zip the package folder again "
                                "(or give the folder)")


def _read_zip_package(path):
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as exc:
        raise _zip_damaged(path, exc) from exc
    with zf:
        infos = {os.path.basename(i.filename): i for i in zf.infolist() if not i.is_dir()}
        for name in (METADATA_NAME, WEIGHTS_NAME):
            if name not in infos:
                raise ModelPackageError(f"{path}: the zip has no {name}; a model package holds "
                                        f"{METADATA_NAME} and {WEIGHTS_NAME}")
        _check_zip_member(path, infos[METADATA_NAME], MAX_JSON_BYTES)
        _check_zip_member(path, infos[WEIGHTS_NAME], MAX_WEIGHTS_BYTES)
        try:
            with zf.open(infos[METADATA_NAME]) as f:
                meta = f.read(MAX_JSON_BYTES + 1)
        except ZIP_READ_ERRORS as exc:
            raise _zip_damaged(path, exc) from exc
    if len(meta) > MAX_JSON_BYTES:  # pragma: no cover - the declared size was checked
        raise ModelPackageError(f"{path}: {METADATA_NAME} is larger than {size_text(MAX_JSON_BYTES)}; this is not "
                                "a model.json")
    info = infos[WEIGHTS_NAME]
    return meta, WeightsFile(path, member=info.filename, size=info.file_size)


def _read_package_files(path):
    """Return (metadata bytes, :class:`WeightsFile` with its header checked) from a folder or zip."""
    if path is None or str(path).strip() == "":
        raise ModelPackageError("No model package given: pass a folder or .zip containing model.json "
                                "and model.safetensors")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelPackageError(f"Model package not found: {path}. Give the folder (or .zip) that holds "
                                f"{METADATA_NAME} and {WEIGHTS_NAME}")
    if os.path.isfile(path) and os.path.basename(path) == METADATA_NAME:
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        meta_path = os.path.join(path, METADATA_NAME)
        weights_path = os.path.join(path, WEIGHTS_NAME)
        for p in (meta_path, weights_path):
            if not os.path.isfile(p):
                raise ModelPackageError(f"{path}: {os.path.basename(p)} is missing; a model package folder "
                                        f"holds {METADATA_NAME} and {WEIGHTS_NAME}")
        if os.path.getsize(meta_path) > MAX_JSON_BYTES:
            raise ModelPackageError(f"{meta_path}: larger than {size_text(MAX_JSON_BYTES)} (the limit); this is not "
                                    "a model.json")
        size = os.path.getsize(weights_path)
        if size > MAX_WEIGHTS_BYTES:
            raise ModelPackageError(f"{weights_path}: {size_text(size)}, larger than the limit of "
                                    f"{size_text(MAX_WEIGHTS_BYTES)} for the weights; RS Deep does not load models "
                                    "this large")
        with open(meta_path, "rb") as f:
            meta = f.read(MAX_JSON_BYTES + 1)
        weights = WeightsFile(weights_path, size=size)
    elif zipfile.is_zipfile(path):
        meta, weights = _read_zip_package(path)
    else:
        raise ModelPackageError(f"{path}: not a model package (expected a folder or .zip with {METADATA_NAME} "
                            f"and {WEIGHTS_NAME})")
    weights.check_header()
    return meta, weights


def _req(obj, key, where, kind=None):
    if not isinstance(obj, dict) or key not in obj:
        raise ModelPackageError(f"model.json: {where}.{key} is missing")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ModelPackageError(f"model.json: {where}.{key}: expected "
                                f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _parse_scaling(scaling, n_bands, where):
    if scaling is None or scaling == []:
        return [None] * n_bands
    if isinstance(scaling, dict):
        scaling = [scaling]
    if not isinstance(scaling, list):
        raise ModelPackageError(f"model.json: {where}: expected a list of value scaling objects")
    if len(scaling) == 1 and n_bands > 1:
        scaling = scaling * n_bands
    if len(scaling) != n_bands:
        raise ModelPackageError(f"model.json: {where}: {len(scaling)} entries for {n_bands} bands; give one "
                                "entry (used for every band) or one per band")
    out = []
    for i, s in enumerate(scaling):
        w = f"{where}[{i}]"
        if s is None:
            out.append(None)
            continue
        t = _req(s, "type", w, str)
        if t not in SCALING_TYPES:
            raise ModelPackageError(f"model.json: {w}.type: {t!r} unsupported; use one of {', '.join(SCALING_TYPES)}")
        need = {"min-max": ("minimum", "maximum"), "z-score": ("mean", "stddev"),
                "clip": ("minimum", "maximum"), "clip-min": ("minimum",), "clip-max": ("maximum",),
                "offset": ("value",), "scale": ("value",)}[t]
        for k in need:
            v = _req(s, k, w, (int, float))
            if isinstance(v, bool) or not math.isfinite(v):
                raise ModelPackageError(f"model.json: {w}.{k}: expected a finite number, got {v!r}")
        if t == "min-max" and s["maximum"] <= s["minimum"]:
            raise ModelPackageError(f"model.json: {w}: maximum must be greater than minimum")
        if t == "z-score" and s["stddev"] <= 0:
            raise ModelPackageError(f"model.json: {w}.stddev: must be positive")
        if t == "scale" and s["value"] == 0:
            raise ModelPackageError(f"model.json: {w}.value: scale must not be 0")
        out.append(dict(s))
    return out


def _parse_color(value, where):
    if isinstance(value, str):
        v = value.lstrip("#")
        if len(v) == 6 and all(c in "0123456789abcdefABCDEF" for c in v):
            return v.upper()
    raise ModelPackageError(f"model.json: {where}: expected a colour as 'RRGGBB' hex, got {value!r}")


DEFAULT_COLORS = ["000000", "E31A1C", "1F78B4", "33A02C", "FF7F00", "6A3D9A", "B15928", "A6CEE3",
                  "B2DF8A", "FB9A99", "FDBF6F", "CAB2D6", "FFFF99"]


def _parse_multi_label(props, task, activation, n_classes):
    """(multi_label, class_thresholds) of model.json: ``rs_deep:multi_label`` (a patch classifier whose classes
    are scored independently, sigmoid) and ``rs_deep:class_thresholds`` (one probability in (0, 1) per class;
    default 0.5 each)."""
    multi = props.get("rs_deep:multi_label", False)
    raw = props.get("rs_deep:class_thresholds")
    if not isinstance(multi, bool):
        raise ModelPackageError(f"model.json: properties.rs_deep:multi_label: expected true or false, got {multi!r}")
    if not multi:
        if raw is not None:
            raise ModelPackageError("model.json: properties.rs_deep:class_thresholds is only used with "
                                    "rs_deep:multi_label true (a single-label model takes the best class)")
        return False, None
    if task != "patch_classification":
        raise ModelPackageError(f"model.json: properties.rs_deep:multi_label: only patch_classification models "
                                f"can be multi-label; this is a {task} model")
    if activation != "sigmoid":
        raise ModelPackageError("model.json: properties.rs_deep:activation: a multi-label model scores each class "
                                f"on its own and needs 'sigmoid', got {activation!r}")
    if n_classes < 2:
        raise ModelPackageError("model.json: a multi-label model needs at least two classes")
    if raw is None:
        return True, [0.5] * n_classes
    if not isinstance(raw, list) or len(raw) != n_classes or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in raw):
        raise ModelPackageError(f"model.json: properties.rs_deep:class_thresholds: expected {n_classes} "
                                f"probabilities between 0 and 1 (one per class), got {raw!r}")
    return True, [float(t) for t in raw]


def parse_metadata(meta, source="model.json", registries=True):
    """Validate model.json (a dict) and return the pieces a ModelPackage needs (``registries``: see
    :func:`.architectures.validate_builder`)."""
    if not isinstance(meta, dict):
        raise ModelPackageError(f"{source}: expected a JSON object (a STAC Item with mlm:* properties)")
    props = meta.get("properties", meta)
    if not isinstance(props, dict):
        raise ModelPackageError("model.json: properties: expected an object")
    version = props.get("rs_deep:format_version")
    if version != FORMAT_VERSION:
        raise ModelPackageError(f"model.json: properties.rs_deep:format_version: expected {FORMAT_VERSION}, "
                                f"got {version!r}")
    name = _req(props, "mlm:name", "properties", str)
    _req(props, "mlm:architecture", "properties", str)
    framework = _req(props, "mlm:framework", "properties", str)
    if framework.lower() not in ("pytorch", "torch"):
        raise ModelPackageError(f"model.json: properties.mlm:framework: expected 'pytorch', got {framework!r}")
    tasks = _req(props, "mlm:tasks", "properties", list)
    task = _req(props, "rs_deep:task", "properties", str)
    if task not in TASKS:
        raise ModelPackageError(f"model.json: properties.rs_deep:task: expected one of {', '.join(TASKS)}, "
                                f"got {task!r}")
    if TASKS[task] not in tasks:
        raise ModelPackageError(f"model.json: properties.mlm:tasks: must include {TASKS[task]!r} for "
                                f"rs_deep:task {task!r}, got {tasks}")
    inputs = _req(props, "mlm:input", "properties", list)
    if len(inputs) != 1:
        raise ModelPackageError(f"model.json: properties.mlm:input: expected exactly one input, got {len(inputs)}")
    inp = inputs[0]
    bands_raw = _req(inp, "bands", "properties.mlm:input[0]", list)
    if not bands_raw:
        raise ModelPackageError("model.json: properties.mlm:input[0].bands: expected a non-empty list of band names")
    bands = [b["name"] if isinstance(b, dict) and "name" in b else b for b in bands_raw]
    if not all(isinstance(b, str) for b in bands):
        raise ModelPackageError("model.json: properties.mlm:input[0].bands: expected names (strings) or "
                                "objects with a name")
    shape = _req(_req(inp, "input", "properties.mlm:input[0]", dict), "shape",
                 "properties.mlm:input[0].input", list)
    if len(shape) != 4 or shape[1] != len(bands):
        raise ModelPackageError(f"model.json: properties.mlm:input[0].input.shape: expected "
                                f"[-1, {len(bands)}, height, width] (batch, channel, height, width), got {shape}")
    scaling = _parse_scaling(inp.get("value_scaling"), len(bands), "properties.mlm:input[0].value_scaling")
    outputs = _req(props, "mlm:output", "properties", list)
    if not outputs:
        raise ModelPackageError("model.json: properties.mlm:output: expected at least one output")
    out0 = outputs[0]
    raw_classes = _req(out0, "classification:classes", "properties.mlm:output[0]", list)
    if not raw_classes:
        raise ModelPackageError("model.json: properties.mlm:output[0].classification:classes: expected a list "
                                "of {value, name, color_hint}")
    classes = []
    for i, c in enumerate(raw_classes):
        w = f"properties.mlm:output[0].classification:classes[{i}]"
        value = _req(c, "value", w, int)
        if value != i:
            raise ModelPackageError(f"model.json: {w}.value: classes must be numbered 0, 1, 2... in order; "
                                    f"expected {i}, got {value}")
        cname = _req(c, "name", w, str)
        color = _parse_color(c.get("color_hint", DEFAULT_COLORS[i % len(DEFAULT_COLORS)]), w + ".color_hint")
        classes.append(ModelClass(value, cname, color))
    if len(classes) > MAX_CLASSES:
        raise ModelPackageError(f"model.json: at most {MAX_CLASSES} classes are supported (the class raster is "
                                "Byte, 255 is nodata)")
    builder = validate_builder(_req(props, "rs_deep:builder", "properties", dict),
                               "model.json: properties.rs_deep:builder", registries)
    if builder["in_channels"] != len(bands):
        raise ModelPackageError(f"model.json: properties.rs_deep:builder.in_channels is {builder['in_channels']} "
                                f"but mlm:input[0].bands lists {len(bands)} bands")
    activation = props.get("rs_deep:activation", "softmax")
    if activation not in ACTIVATIONS:
        raise ModelPackageError(f"model.json: properties.rs_deep:activation: expected one of "
                                f"{', '.join(ACTIVATIONS)}, got {activation!r}")
    multi_label, thresholds = _parse_multi_label(props, task, activation, len(classes))
    n_out = builder["classes"]
    raster_out = _raster_output(props, task, n_out, len(classes), activation, builder)
    percentiles = parse_input_percentiles(props.get("rs_deep:input_percentiles"))
    if task in ("segmentation", "change"):
        ok = n_out == len(classes) or (activation == "sigmoid" and n_out == 1 and len(classes) == 2)
        if not ok:
            raise ModelPackageError(f"model.json: properties.rs_deep:builder.classes is {n_out} but "
                                    f"classification:classes lists {len(classes)} classes")
    if task in OBJECT_TASKS:  # object classes only (no background) + rs_deep:score_threshold & co
        validate_detection_metadata(props, len(classes), n_out)
        if is_instance_builder(builder) != (task == "instance_segmentation"):
            raise ModelPackageError(f"model.json: properties.rs_deep:builder.architecture {builder['architecture']} "
                                    f"{'gives masks' if is_instance_builder(builder) else 'gives no masks'}: it is "
                                    f"no {task} network (instance segmentation: "
                                    f"{', '.join(INSTANCE_ARCHITECTURES)}; detection: the others)")
    tile = _req(props, "rs_deep:tile_size", "properties", int)
    if task == "patch_classification":  # a classifier pools globally: the patch size is free (>= 8 px)
        if tile < 8:
            raise ModelPackageError(f"model.json: properties.rs_deep:tile_size: expected a patch size of at least "
                                    f"8 px, got {tile}")
    elif tile < 32 or tile % 32:
        raise ModelPackageError(f"model.json: properties.rs_deep:tile_size: expected a multiple of 32, at least "
                                f"32, got {tile}")
    dates = props.get("rs_deep:dates", 1)
    if dates != (2 if task == "change" else 1):
        raise ModelPackageError(f"model.json: properties.rs_deep:dates: a {task} model takes "
                                f"{'2 (before, after)' if task == 'change' else '1'}, got {dates!r}")
    overlap = _req(props, "rs_deep:overlap", "properties", int)
    if overlap < 0 or overlap * 2 >= tile:
        raise ModelPackageError(f"model.json: properties.rs_deep:overlap: expected 0 <= overlap < tile_size/2 "
                                f"({tile // 2}), got {overlap}")
    gsd = props.get("rs_deep:gsd")
    if gsd is not None and (isinstance(gsd, bool) or not isinstance(gsd, (int, float)) or not gsd > 0):
        raise ModelPackageError(f"model.json: properties.rs_deep:gsd: expected metres per pixel (> 0) or null, "
                                f"got {gsd!r}")
    sha = _req(props, "rs_deep:weights_sha256", "properties", str)
    if len(sha) != 64:
        raise ModelPackageError("model.json: properties.rs_deep:weights_sha256: expected a 64-character "
                                "SHA-256 hex digest of model.safetensors")
    return dict(name=name, task=task, bands=bands, value_scaling=scaling, classes=classes, tile_size=tile,
                overlap=overlap, gsd=float(gsd) if gsd is not None else None, builder=builder,
                activation=activation, weights_sha256=sha.lower(), multi_label=multi_label,
                class_thresholds=thresholds, input_percentiles=percentiles,
                description=str(props.get("description", meta.get("description", ""))),
                **raster_out)


#: the percentiles of per-input value scaling (those of the training data's scaling: training/data.py)
INPUT_PERCENTILES = (1.0, 99.0)
#: a run's choice of value scaling (:func:`with_input_scaling`)
SCALING_CHOICES = ("model", "training", "input")


def with_input_scaling(pkg, choice):
    """``pkg`` with a run's value scaling: "model", as its package says; "training", its stored ``value_scaling``
    (its training data's); "input", each input's own 1st..99th percentiles (:data:`INPUT_PERCENTILES`). A
    super-resolution model writes values in its training image's range, so it keeps its stored scaling."""
    if choice not in SCALING_CHOICES:
        raise InputError(f"VALUE_SCALING must be one of {', '.join(SCALING_CHOICES)}; got {choice!r}")
    if choice == "model":
        return pkg
    if choice == "input" and pkg.task == "super_resolution":
        raise InputError("A super-resolution model writes values in its training image's range, so it cannot scale "
                         "each input by its own percentiles: leave VALUE_SCALING at 'model'")
    percentiles = INPUT_PERCENTILES if choice == "input" else None
    return pkg if pkg.input_percentiles == percentiles else dataclasses.replace(pkg, input_percentiles=percentiles)


def parse_input_percentiles(raw):
    """``rs_deep:input_percentiles`` -> (low, high) or None: two numbers, 0 <= low < high <= 100."""
    if raw is None:
        return None
    ok = isinstance(raw, (list, tuple)) and len(raw) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw)
    if not ok or not 0 <= raw[0] < raw[1] <= 100:
        raise ModelPackageError("model.json: properties.rs_deep:input_percentiles: expected [low, high], two "
                                f"percentiles with 0 <= low < high <= 100 (e.g. [1, 99]), or null; got {raw!r}")
    return (float(raw[0]), float(raw[1]))


def _raster_output(props, task, n_out, n_classes, activation, builder):
    """The raster-to-raster fields of a regression or super-resolution package (``rs_deep:scale``,
    ``rs_deep:output_dtype``, ``rs_deep:value_scale``, ``rs_deep:value_offset``, ``rs_deep:units``); {} for other
    tasks. The classes name the output channels, one each."""
    where = "model.json: properties"
    if task not in ("regression", "super_resolution"):
        if activation == "none":
            raise ModelPackageError(f"{where}.rs_deep:activation: 'none' (raw values) is for regression and "
                                    f"super-resolution models; a {task} model needs softmax or sigmoid")
        return {}
    if activation != "none":
        raise ModelPackageError(f"{where}.rs_deep:activation: a {task} model returns raw values: expected 'none', "
                                f"got {activation!r}")
    if n_out != n_classes:
        raise ModelPackageError(f"{where}.rs_deep:builder.classes is {n_out} but classification:classes names "
                                f"{n_classes} output channels")
    out = {}
    for key, default in (("value_scale", 1.0), ("value_offset", 0.0)):
        v = props.get(f"rs_deep:{key}", default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (key == "value_scale" and v == 0):
            raise ModelPackageError(f"{where}.rs_deep:{key}: expected a finite number (value_scale not 0), "
                                    f"got {v!r}")
        out[key] = float(v)
    units = props.get("rs_deep:units", "")
    if not isinstance(units, str):
        raise ModelPackageError(f"{where}.rs_deep:units: expected text, got {units!r}")
    out["units"] = units
    dtype = props.get("rs_deep:output_dtype", "float32")
    if dtype not in OUTPUT_DTYPES or (task == "regression" and dtype != "float32"):
        allowed = OUTPUT_DTYPES if task == "super_resolution" else ("float32",)
        raise ModelPackageError(f"{where}.rs_deep:output_dtype: expected one of {', '.join(allowed)}, got {dtype!r}")
    out["output_dtype"] = dtype
    scale = props.get("rs_deep:scale", 1)
    if task == "super_resolution":
        if isinstance(scale, bool) or not isinstance(scale, int) or not 2 <= scale <= MAX_SR_SCALE:
            raise ModelPackageError(f"{where}.rs_deep:scale: expected how many times finer the output is, an integer "
                                    f"2..{MAX_SR_SCALE}, got {scale!r}")
        net = (builder.get("params") or {}).get("scale", scale)
        if net != scale:
            raise ModelPackageError(f"{where}.rs_deep:scale is {scale} but the network (rs_deep:builder.params.scale) "
                                    f"upscales {net} times")
    elif scale != 1:
        raise ModelPackageError(f"{where}.rs_deep:scale: a regression model's output is on the input's grid (1), got "
                                f"{scale!r}")
    out["scale"] = scale
    return out


def read_package(path, task=None):
    """Read and validate a package folder or zip. ``task`` checks it is the right kind of model.
    (:func:`.loading.load_package` reads any model file: this, or an ONNX model.)"""
    meta_bytes, weights = _read_package_files(path)
    meta = loads_json(meta_bytes, f"{path}: model.json", fix="re-export the package")
    try:
        fields = parse_metadata(meta)
    except ModelPackageError as exc:
        if os.fspath(path) in str(exc):
            raise
        raise ModelPackageError(f"{path}: {exc}") from None  # every refusal names the file
    actual = weights.sha256()  # streamed: memory stays small whatever the size
    if actual != fields["weights_sha256"]:
        raise _checksum_error(path, fields["weights_sha256"], actual)
    if task is not None and fields["task"] not in ((task,) if isinstance(task, str) else task):
        raise ModelPackageError(f"{path}: {wrong_task(fields['task'], task)}")
    return ModelPackage(source=os.fspath(path), metadata=meta, _weights=weights, **fields)


def build_metadata(*, name, task, bands, classes, builder, tile_size, overlap, gsd, value_scaling,
                   weights_sha256, activation="softmax", description="", extra=None):
    """The model.json dict for a package (inverse of :func:`parse_metadata`)."""
    n = len(bands)
    props = {
        "datetime": None,
        "description": description,
        "mlm:name": name,
        "mlm:architecture": builder["architecture"],
        "mlm:tasks": [TASKS[task]],
        "mlm:framework": "pytorch",
        "mlm:framework_version": _torch_version(),
        "mlm:pretrained": False,
        "mlm:input": [{
            "name": "image",
            "bands": list(bands),
            "input": {"shape": [-1, n, tile_size, tile_size],
                      "dim_order": ["batch", "channel", "height", "width"], "data_type": "float32"},
            "value_scaling": value_scaling,
            "resize_type": None,
            "pre_processing_function": None,
        }],
        "mlm:output": [{
            "name": "classes",
            "tasks": [TASKS[task]],
            "result": {"shape": [-1, builder["classes"], tile_size * (extra or {}).get("rs_deep:scale", 1),
                                 tile_size * (extra or {}).get("rs_deep:scale", 1)],
                       "dim_order": ["batch", "channel", "height", "width"], "data_type": "float32"},
            "classification:classes": [
                {"value": c.value, "name": c.name, "color_hint": c.color} if isinstance(c, ModelClass) else c
                for c in classes],
            "post_processing_function": None,
        }],
        "rs_deep:format_version": FORMAT_VERSION,
        "rs_deep:task": task,
        "rs_deep:builder": dict(builder, encoder_weights=None),
        "rs_deep:activation": activation,
        "rs_deep:tile_size": tile_size,
        "rs_deep:overlap": overlap,
        "rs_deep:gsd": gsd,
        "rs_deep:weights_sha256": weights_sha256,
    }
    if extra:
        props.update(extra)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [MLM_SCHEMA, CLASSIFICATION_SCHEMA],
        "id": name,
        "geometry": None,
        "properties": props,
        "links": [],
        "assets": {
            "weights": {"href": WEIGHTS_NAME, "type": "application/octet-stream; application=safetensors",
                        "roles": ["mlm:model", "mlm:weights"], "title": "PyTorch weights (safetensors)"},
        },
    }


def _torch_version():
    try:
        import torch
        return torch.__version__.split("+")[0]
    except ImportError:  # pragma: no cover
        return None


def save_package(model, out_dir, weights_dtype=None, **metadata):
    """Write ``model`` (an nn.Module built by the builder) as a package folder, atomically.

    ``weights_dtype="float16"`` stores floating-point tensors in half precision (half the size);
    they are cast back to the network's dtype when loaded.
    """
    import torch
    from safetensors.torch import save as save_safetensors
    cast = {None: None, "float32": torch.float32, "float16": torch.float16}[weights_dtype]
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if cast is not None and v.is_floating_point():
            v = v.to(cast)
        state[k] = v.contiguous()
    weights = save_safetensors(state)
    meta = build_metadata(weights_sha256=_sha256(weights), **metadata)
    parse_metadata(meta)  # never write a package we could not read back
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for name, data in ((WEIGHTS_NAME, weights), (METADATA_NAME, json.dumps(meta, indent=2) + "\n")):
        write_atomic(os.path.join(out_dir, name), data)  # readable by all: a package is shared and shipped
    return out_dir


def package_summary(pkg):
    """A short human-readable model card (used in logs and the dock)."""
    classes = ", ".join(c.name for c in pkg.classes)
    gsd = f"{pkg.gsd:g} m" if pkg.gsd else "any"
    return (f"{pkg.name} ({pkg.task}; {pkg.builder['architecture']}/{pkg.builder['encoder']}; "
            f"bands: {', '.join(pkg.bands)}; GSD {gsd}; tile {pkg.tile_size} px, overlap {pkg.overlap}; "
            f"classes: {classes}{'; multi-label' if pkg.multi_label else ''})")


__all__ = ["ModelPackage", "ModelClass", "read_package", "save_package", "build_metadata", "parse_metadata",
           "package_summary", "describe_mismatch", "parse_input_percentiles", "with_input_scaling", "INPUT_PERCENTILES",
           "SCALING_CHOICES", "FORMAT_VERSION"]
