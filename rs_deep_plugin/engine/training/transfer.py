"""Transfer learning for every trainer (QGIS-free): what a run starts from and how its encoder learns.

Four run settings of :class:`.loop.TrainParams` (so every trainer takes them), read by :class:`Transfer`, which
:func:`.loop.fit` calls at the same four points for every task: before the network is built (the builder), once
it is built (the weights), to make the optimiser (the encoder's learning rate) and at the start of each epoch
(the frozen encoder).

* ``init_from``: an RS Deep model package (folder, .zip or its model.json) of the same task, with PyTorch
  weights (an ONNX model is refused: it holds no weights RS Deep trains). Without a builder (the toolbox's
  ARCHITECTURE auto) the network is the package's (architecture, encoder, params) with the new data's bands and
  classes; an explicit builder of another architecture or encoder is refused. Every tensor whose name and shape
  fit is copied, encoder and decoder; the others (the head when the classes differ) keep their fresh
  initialisation and are logged; the first convolution is adapted to the bands (:data:`BAND_RULE`). A network
  of which fewer than half the tensors fit is refused.
* ``encoder_weights``: a local ``.safetensors`` file of the weights of the network's encoder, as timm and
  Hugging Face publish them (``conv1.weight``, ``layer1.0.conv1.weight``, ``bn1.running_mean``..., with or without
  a prefix such as ``encoder.`` or ``model.``; classifier tensors ``fc.*``, ``head.*``, ``classifier.*`` are
  ignored). The encoder (:func:`encoder_part`) is ``encoder`` of an smp network, of RS Deep's SiameseUnet and
  CenterNet, ``net.encoder`` of its EarlyFusion, a timm classifier but its classifier, a torchvision
  detector's ``backbone.body``. Each of its tensors must be in the file with its shape (the first convolution's
  bands are adapted: :data:`BAND_RULE`); the file's tensors for layers the network does not have (a shallower
  encoder) are left. Pickled checkpoints (``.pth``, ``.pt``, ``.ckpt``, ``.bin``, ``.pkl``, or pickle or zip
  bytes whatever the name) are never loaded: the message says how to convert one (:data:`CONVERT_COMMAND`).
* ``freeze_encoder_epochs`` (default 0): the encoder is not trained during the first N epochs (no gradient, its
  BatchNorm layers in eval mode so their statistics stay), then it is.
* ``encoder_lr_factor`` (default 1.0): the encoder's learning rate is the run's times this factor (its own
  ``base_lr`` param group, which :func:`.loop.fit` schedules as the others); 0.1 suits pretrained weights.

The package's ``rs_deep:training`` and the training report record the run's :meth:`Transfer.lineage`.
"""
import hashlib
import math
import os
import struct
from dataclasses import dataclass

from ..errors import InputError, ModelPackageError, require
from ..models.package import WeightsFile, describe_mismatch

#: the band-adaptation rule of the first convolution (docstrings, the algorithm's help, the README)
BAND_RULE = ("When the first convolution of the weights takes another number of bands than the data have, it is "
             "adapted: kept as it is when the counts are equal; otherwise new band i takes the mean of the weights' "
             "channels assigned to it, scaled by n_weights / n_bands: with more bands, the channel i mod n_weights; "
             "with fewer, the channels j with j mod n_bands = i (1 band from RGB: the sum of the three channels, "
             "i.e. their mean times 3). An early-fusion change network (both dates stacked) is adapted date by date; "
             "from the weights of a one-date encoder each date gets half.")

#: file endings of pickled checkpoints, refused by name (never opened)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl", ".pickle", ".tar", ".pth.tar")
#: how to turn a PyTorch checkpoint into safetensors, outside RS Deep
CONVERT_COMMAND = ("python -c \"import torch; from safetensors.torch import save_file; "
                   "sd = torch.load('w.pth', map_location='cpu', weights_only=True); "
                   "save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}, 'w.safetensors')\"")
#: top-level names of classifier tensors in a weights file (ignored unless the encoder has them)
CLASSIFIER_NAMES = ("fc", "head", "classifier", "last_linear", "head_dist")
#: encoders a mismatched weights file is compared with, to name the one it seems to be for
SMP_GUESSES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "efficientnet-b0", "efficientnet-b4",
               "timm-efficientnet-b0", "densenet121", "vgg16")
TIMM_GUESSES = ("resnet18", "resnet34", "resnet50", "mobilenetv2_100", "mobilenetv3_small_100",
                "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny")
#: the share of a network's tensors an INIT_FROM package must fill
MIN_INIT_SHARE = 0.5


def _torch():
    return require("torch", "PyTorch")


# --------------------------------------------------------------------------------------------------------------
# the first convolution


def adapt_bands(weight, bands):
    """A convolution weight ``[out, n, kh, kw]`` for ``bands`` input bands, by :data:`BAND_RULE` (one date)."""
    torch = _torch()
    n = int(weight.shape[1])
    w = weight.float()
    if bands == n:
        return w.clone()
    if bands > n:
        out = w[:, [i % n for i in range(bands)]]
    else:
        out = torch.stack([w[:, i::bands].mean(dim=1) for i in range(bands)], dim=1)
    return out * (n / bands)


def adapt_input_conv(weight, bands, dates=1, weight_dates=1):
    """The first convolution of a network taking ``dates`` x ``bands`` channels, from ``weight`` (``[out, C, kh,
    kw]``, ``weight_dates`` blocks of bands stacked on C), by :data:`BAND_RULE`: block by block when both have
    the dates, each date half (``1 / dates``) of a one-date weight otherwise."""
    torch = _torch()
    if weight_dates == dates:
        blocks = [adapt_bands(b, bands) for b in weight.chunk(dates, dim=1)]
    elif weight_dates == 1:
        blocks = [adapt_bands(weight, bands) / dates] * dates
    else:
        raise InputError(f"the first convolution holds {weight_dates} dates of bands but the network takes {dates}")
    return torch.cat(blocks, dim=1)


def first_conv(model, prefix=""):
    """(state-dict name of its weight, in_channels) of the first 2-D convolution of ``model`` whose name starts
    with ``prefix`` (module order: the stem of every network RS Deep builds), or (None, None)."""
    torch = _torch()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and (name + ".").startswith(prefix):
            return name + ".weight", module.in_channels
    return None, None


def _adaptable_shape(source, target):
    return len(source) == 4 == len(target) and source[0] == target[0] and tuple(source[2:]) == tuple(target[2:])


def _adaptable(source, target):
    """Whether convolution weight ``source`` can be adapted to ``target``'s shape (only the bands differ)."""
    return _adaptable_shape(tuple(source.shape), tuple(target.shape))


def _band_note(tensor, source, target, source_dates, dates):
    """The lineage's ``band_adaptation``: the tensor, the bands (per date) before and after, the dates."""
    return {"tensor": tensor, "from_bands": int(source.shape[1]) // source_dates,
            "to_bands": int(target.shape[1]) // dates, "dates": dates}


# --------------------------------------------------------------------------------------------------------------
# the encoder of a network


@dataclass
class EncoderPart:
    """The encoder of a network: its state-dict names start with ``prefix`` (empty: the whole network) and do not
    start with one of ``exclude`` (a timm classifier's head)."""

    prefix: str
    exclude: tuple = ()
    name: str = "encoder"  # for messages: the encoder's name (resnet18...)

    def owns(self, name):
        return name.startswith(self.prefix) and not name.startswith(self.exclude)

    def parameters(self, model):
        return [p for n, p in model.named_parameters() if self.owns(n)]

    def batch_norms(self, model):
        torch = _torch()
        return [m for n, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and self.owns(n + ".")]


def encoder_part(model, builder):
    """The :class:`EncoderPart` of a network built from ``builder``, or None when it has no separate encoder."""
    library, arch = builder.get("library"), builder.get("architecture")
    label = builder.get("encoder") or arch
    modules = dict(model.named_modules())
    if library == "timm":
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        names = tuple(n + "." for n, m in modules.items() if n and m is head)
        return EncoderPart("", names, label)
    if library == "rs_deep" and arch == "EarlyFusion":
        prefix = "net.encoder"
    elif library in ("smp", "rs_deep"):
        prefix = "encoder"
    elif library == "torchvision":
        prefix = "backbone.body" if "backbone.body" in modules else "backbone"
    else:
        return None
    return EncoderPart(prefix + ".", (), label) if prefix in modules else None


def _describe(builder):
    if builder.get("library") == "timm":
        return f"{builder['architecture']} (timm)"
    encoder = builder.get("encoder")
    base = (builder.get("params") or {}).get("base") if builder.get("architecture") == "EarlyFusion" else None
    return "/".join(str(x) for x in (builder.get("architecture"), base, encoder) if x)


# --------------------------------------------------------------------------------------------------------------
# reading what a run starts from


def _pickle_error(path, why):
    return InputError(
        f"ENCODER_WEIGHTS {path} {why}: RS Deep never unpickles a file (a pickle can run any code). Convert it to "
        f"safetensors once, in a Python where you trust it, e.g. {CONVERT_COMMAND} (for a timm model: "
        "save_file(timm.create_model(name, pretrained=True).state_dict(), 'w.safetensors')), and give the "
        ".safetensors file")


def check_encoder_weights_path(path):
    """Refuse, without reading it, a weights path RS Deep does not read: missing, a pickled checkpoint by name or by
    its first bytes (``\\x80`` + protocol, or a zip as torch.save writes), or not ``.safetensors``."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise _pickle_error(path, "is a PyTorch/pickle checkpoint")
    if not os.path.isfile(path):
        raise InputError(f"ENCODER_WEIGHTS {path} not found: give a local .safetensors file of encoder weights")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if not (len(head) == 9 and head[8:9] == b"{" and 2 <= n <= size - 8):
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise _pickle_error(path, "holds pickle bytes, whatever its name")
        if head[:4] == b"PK\x03\x04":
            raise _pickle_error(path, "is a zip (what torch.save writes), whatever its name")
        raise InputError(f"ENCODER_WEIGHTS {path} is not a safetensors file (it does not start with a safetensors "
                         "header); give weights saved with safetensors.torch.save_file")
    if not lower.endswith(".safetensors"):
        raise InputError(f"ENCODER_WEIGHTS {path}: name the file *.safetensors (it is read as safetensors only)")
    return path


def read_encoder_weights(path):
    """(state dict on the CPU, SHA-256) of a ``.safetensors`` weights file, checked first
    (:func:`check_encoder_weights_path`, then its header against the limits: :class:`.package.WeightsFile`)."""
    from ..limits import MAX_WEIGHTS_BYTES, size_text
    path = check_encoder_weights_path(path)
    size = os.path.getsize(path)
    if size > MAX_WEIGHTS_BYTES:
        raise InputError(f"ENCODER_WEIGHTS {path}: {size_text(size)}, more than the limit of "
                         f"{size_text(MAX_WEIGHTS_BYTES)} for weights")
    try:
        WeightsFile(path, size=size).check_header()
    except ModelPackageError as exc:
        raise InputError(f"ENCODER_WEIGHTS: {exc}") from exc
    from safetensors.torch import load as load_safetensors
    with open(path, "rb") as f:
        data = f.read(size + 1)
    try:
        state = load_safetensors(data)
    except Exception as exc:
        raise InputError(f"ENCODER_WEIGHTS {path} is not a valid safetensors file ({exc})") from exc
    return state, hashlib.sha256(data).hexdigest()


def read_init_package(path, task):
    """The model package ``path`` (folder, .zip or model.json) to start a ``task`` run from: an RS Deep package
    with PyTorch weights, of that task."""
    from ..models.loading import is_onnx_path, load_package
    from ..models.package import METADATA_NAME, WEIGHTS_NAME
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) == METADATA_NAME \
        else None
    onnx_only = folder is not None and not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and any(
        f.lower().endswith(".onnx") for f in os.listdir(folder))
    if is_onnx_path(path) or onnx_only:
        raise InputError(f"INIT_FROM {path} is an ONNX model: fine-tuning starts from PyTorch weights "
                         f"({WEIGHTS_NAME}), which an ONNX file does not hold in a form RS Deep trains. Give the "
                         "RS Deep package (folder with model.json and model.safetensors) it was exported from, or "
                         "ENCODER_WEIGHTS, or train from scratch")
    package = load_package(path)
    if package.backend != "torch":  # pragma: no cover - every non-torch package is ONNX, caught above
        raise InputError(f"INIT_FROM {path}: a {package.backend} model; give an RS Deep package with PyTorch weights")
    if package.task != task:
        raise InputError(f"INIT_FROM {package.name} ({path}) is a {package.task} model but this run trains a {task} "
                         f"model: give a {task} package as INIT_FROM (or set TASK to {package.task})")
    return package


# --------------------------------------------------------------------------------------------------------------
# copying weights


def _tensor_list(names, target, source, most=8):
    shown = [f"{k} {tuple(target[k].shape)}" + (f" (package {tuple(source[k].shape)})" if k in source else "")
             for k in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def init_from_package(model, builder, package, log=None):
    """Copy the weights of ``package`` into ``model`` (built from ``builder``) where name and shape fit, the first
    convolution adapted to the bands (:data:`BAND_RULE`); the others keep their initialisation and are logged.
    Refused (:class:`InputError`, nothing copied) when fewer than :data:`MIN_INIT_SHARE` of the tensors fit.
    Returns the lineage entry: name, task, architecture, encoder, sha256, tensors_copied, tensors_new,
    new_tensors, band_adaptation."""
    torch = _torch()
    log = log or (lambda message: None)
    source = package.load_model().state_dict()  # the package's own checks: checksum, strict shapes
    target = model.state_dict()
    conv, conv_in = first_conv(model)
    dates = max(1, conv_in // builder["in_channels"]) if conv else 1
    plan, new, band = {}, [], None
    for k, t in target.items():
        s = source.get(k)
        if s is not None and tuple(s.shape) == tuple(t.shape):
            plan[k] = s
        elif s is not None and k == conv and _adaptable(s, t) and s.shape[1] % dates == 0:
            plan[k] = adapt_input_conv(s, t.shape[1] // dates, dates, dates)
            band = _band_note(k, s, t, dates, dates)
        else:
            new.append(k)
    what = f"{package.name} ({_describe(package.builder)})"
    if len(plan) < MIN_INIT_SHARE * len(target):
        raise InputError(
            f"INIT_FROM {what} does not fit this network ({_describe(builder)}): {len(plan)} of {len(target)} "
            f"tensors match; choose ARCHITECTURE auto (the package's own network) or the package's architecture "
            f"and encoder, or train without INIT_FROM")
    with torch.no_grad():
        for k, value in plan.items():
            target[k].copy_(value)
    log(f"INIT_FROM {what}: {len(plan)} of {len(target)} tensors copied")
    if band:
        log(f"INIT_FROM: the first convolution {conv} adapted from {band['from_bands']} to {band['to_bands']} bands "
            f"(mean of the assigned channels x {band['from_bands']}/{band['to_bands']})")
    if new:
        log(f"INIT_FROM: {len(new)} tensors keep their fresh initialisation (not in the package, or another shape: "
            f"e.g. the head when the classes differ): {_tensor_list(new, target, source)}")
    b = package.builder
    return {"name": package.name, "task": package.task, "architecture": b.get("architecture"),
            "encoder": b.get("encoder"), "sha256": package.weights_sha256, "tensors_copied": len(plan),
            "tensors_new": len(new), "new_tensors": new[:50], "band_adaptation": band}


def _prefixes(keys, depth, share):
    """"" and the dotted prefixes (at most ``depth`` names) that at least ``share`` of ``keys`` start with."""
    counts = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(depth, len(parts) - 1) + 1):
            p = ".".join(parts[:i]) + "."
            counts[p] = counts.get(p, 0) + 1
    return [""] + sorted((p for p, n in counts.items() if n >= share * len(keys)), key=len)


def match_keys(file_keys, target_keys):
    """{target name: file name} under the prefixes (one stripped from the file's names, one from the target's)
    that pair the most names: ``encoder.conv1.weight`` or ``model.conv1.weight`` in the file for ``conv1.weight``
    in the network, ``features.0.0.weight`` for ``0.0.weight``, ``conv1.weight`` for a timm-universal encoder's
    ``model.conv1.weight``."""
    file_keys, target_keys = list(file_keys), list(target_keys)
    best = {}
    for tp in _prefixes(target_keys, 2, 0.9):
        stripped = {k[len(tp):]: k for k in target_keys if k.startswith(tp)}
        for fp in _prefixes(file_keys, 3, 0.25):
            pairs = {stripped[k[len(fp):]]: k for k in file_keys if k.startswith(fp) and k[len(fp):] in stripped}
            if len(pairs) > len(best):
                best = pairs
    return best


def _is_classifier(name):
    return any(part in CLASSIFIER_NAMES for part in name.split(".")[:-1])


def _meta_encoder_shapes(library, name):
    """{name: shape} of the encoder ``name`` (3 bands) built on torch's meta device, or None when it cannot be built."""
    torch = _torch()
    from ..models.architectures import force_offline
    force_offline()
    try:
        with torch.device("meta"):
            if library == "timm":
                import timm
                net = timm.create_model(name, pretrained=False)
                head = net.get_classifier()
                skip = tuple(n + "." for n, m in net.named_modules() if n and m is head)
                return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith(skip)}
            import segmentation_models_pytorch as smp
            net = smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=None)
            return {k: tuple(v.shape) for k, v in net.state_dict().items()}
    except Exception:
        return None


def guess_encoder(state, library):
    """The name of the encoder (from :data:`SMP_GUESSES` or :data:`TIMM_GUESSES`) whose tensors ``state`` (a weights
    file's) holds best, when it holds at least nine in ten of them; else None."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if not _is_classifier(k)}
    best, score = None, 0.0
    for name in (TIMM_GUESSES if library == "timm" else SMP_GUESSES):
        candidate = _meta_encoder_shapes(library, name)
        if not candidate:
            continue
        pairs = match_keys(shapes, candidate)
        fit = sum(1 for t, f in pairs.items() if shapes[f] == candidate[t] or _adaptable_shape(shapes[f], candidate[t]))
        s = fit / max(len(candidate), len(shapes), 1)
        if s > score:
            best, score = name, s
    return best if score >= 0.9 else None


def load_encoder_weights(model, builder, state, label, log=None):
    """Copy the encoder tensors of ``state`` (a weights file's, :func:`read_encoder_weights`) into the encoder of
    ``model`` (built from ``builder``; :func:`encoder_part`): every encoder tensor must be in the file, by
    :func:`match_keys`, with its shape (the first convolution adapted: :data:`BAND_RULE`); classifier tensors and
    layers the network does not have are left. Returns the lineage entry's counts: tensors_copied,
    tensors_unused, band_adaptation."""
    torch = _torch()
    log = log or (lambda message: None)
    part = encoder_part(model, builder)
    if part is None:
        raise InputError(f"ENCODER_WEIGHTS: the network {_describe(builder)} has no separate encoder to load weights "
                         "into; leave ENCODER_WEIGHTS empty")
    target = {k: v for k, v in model.state_dict().items() if part.owns(k)}
    short = {k[len(part.prefix):]: k for k in target}
    pairs = match_keys(state, short)
    conv, conv_in = first_conv(model, part.prefix)
    conv_short = conv[len(part.prefix):] if conv else None
    dates = max(1, conv_in // builder["in_channels"]) if conv else 1
    missing = [k for k in short if k not in pairs and not k.endswith("num_batches_tracked")]
    wrong = [k for k, f in pairs.items() if tuple(state[f].shape) != tuple(target[short[k]].shape)
             and not (k == conv_short and _adaptable(state[f], target[short[k]]))]
    used = set(pairs.values())
    unused = [k for k in state if k not in used]
    unexpected = [k for k in unused if not _is_classifier(k)]
    # every encoder tensor found; tensors left over (not a classifier's) are layers this network does not have,
    # unless the file is of another encoder that holds this one's names and more (a ResNet-34 for a ResNet-18)
    guess = guess_encoder(state, builder.get("library")) if missing or wrong or unexpected else None
    other = guess is not None and guess not in (part.name, part.name[3:] if part.name.startswith("tu-") else None)
    if missing or wrong or other:
        seems = f"; the file seems to hold a {guess} encoder (choose ENCODER {guess})" if other else ""
        parts = [f"{len(pairs)} of {len(short)} encoder tensors found by name",
                 describe_mismatch(missing, unexpected, wrong, {k: state[pairs[k]].shape for k in wrong},
                                   {k: target[short[k]].shape for k in wrong}, examples=3)]
        raise InputError(f"ENCODER_WEIGHTS {label} does not fit the {part.name} encoder of this network "
                         f"({_describe(builder)}): " + "; ".join(parts) + seems
                         + f". Give the weights of a {part.name} encoder, or the ENCODER the file is for")
    band = None
    with torch.no_grad():
        for k, f in pairs.items():
            t, s = target[short[k]], state[f]
            if tuple(s.shape) != tuple(t.shape):
                s = adapt_input_conv(s, t.shape[1] // dates, dates, 1)
                band = _band_note(short[k], state[f], t, 1, dates)
            t.copy_(s)
    log(f"ENCODER_WEIGHTS {label}: {len(pairs)} tensors loaded into the {part.name} encoder"
        + (f"; {len(unused)} tensors of the file are not used (classifier, or layers this network does not have)"
           if unused else ""))
    if band:
        log(f"ENCODER_WEIGHTS: the first convolution {band['tensor']} adapted from {band['from_bands']} to "
            f"{band['to_bands']} bands" + (f" per date ({dates} dates)" if dates > 1 else ""))
    return {"tensors_copied": len(pairs), "tensors_unused": len(unused), "band_adaptation": band}


# --------------------------------------------------------------------------------------------------------------
# the run


def check_transfer_options(params):
    """Refuse transfer settings that cannot work, before any data is read (:meth:`.loop.TrainParams.of`)."""
    freeze = params.freeze_encoder_epochs
    if not isinstance(freeze, int) or isinstance(freeze, bool) or freeze < 0:
        raise InputError(f"freeze_encoder_epochs must be a whole number of epochs, 0 or more; got {freeze!r}")
    factor = params.encoder_lr_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise InputError(f"encoder_lr_factor must be above 0 (1: the run's learning rate; to keep the encoder fixed "
                         f"use freeze_encoder_epochs); got {factor!r}")
    if params.init_from and params.encoder_weights:
        raise InputError("Give INIT_FROM or ENCODER_WEIGHTS, not both: an INIT_FROM package holds its encoder's "
                         "weights already")
    if params.init_from and not os.path.exists(os.fspath(params.init_from)):
        raise InputError(f"INIT_FROM {os.fspath(params.init_from)} not found: give a model package (its folder, .zip "
                         "or model.json)")
    if params.encoder_weights:
        check_encoder_weights_path(params.encoder_weights)


class Transfer:
    """What a run starts from and how its encoder learns (the transfer settings of ``params``, a
    :class:`.loop.TrainParams`) for a ``task`` run; see the module's description. The package or weights file is
    read when the object is made."""

    def __init__(self, params, task):
        self.freeze = int(params.freeze_encoder_epochs or 0)
        self.lr_factor = float(params.encoder_lr_factor)
        self.package = read_init_package(params.init_from, task) if params.init_from else None
        self.weights_path = os.fspath(params.encoder_weights) if params.encoder_weights else None
        self.weights, self.weights_sha256 = (read_encoder_weights(self.weights_path) if self.weights_path
                                             else (None, None))
        self.part = None
        self.frozen = []  # the parameters frozen here (to unfreeze)
        self.lineage = {"init_from": None, "encoder_weights": None, "freeze_encoder_epochs": self.freeze,
                        "encoder_lr_factor": self.lr_factor}

    def prepare(self, task, log):
        """Before the network is built: without a builder, ``task`` builds the package's network (its bands and
        classes left to the data); an explicit builder of another network than the package's is refused."""
        if self.package is None:
            return
        own = dict(self.package.builder)
        if task.builder is None:
            own.update(in_channels=None, classes=None, encoder_weights=None)
            task.builder = own
            log(f"INIT_FROM {self.package.name}: the network is the package's, {_describe(own)}")
            return
        chosen = task.builder
        keys = ("library", "architecture", "encoder")
        differs = [k for k in keys if chosen.get(k, own.get(k)) != own.get(k)]
        if own.get("architecture") == "EarlyFusion" and \
                (chosen.get("params") or {}).get("base", "Unet") != (own.get("params") or {}).get("base", "Unet"):
            differs.append("params.base")
        if differs:
            raise InputError(f"INIT_FROM {self.package.name} is a {_describe(own)} network but the run asks for "
                             f"{_describe(chosen)}: choose ARCHITECTURE auto to fine-tune the package's own network "
                             f"(builder None), or leave INIT_FROM empty to train {_describe(chosen)} from scratch")

    def initialise(self, model, builder, log):
        """Once the network is built from ``builder``: its weights (package, weights file) and its encoder."""
        if self.package is not None:
            self.lineage["init_from"] = init_from_package(model, builder, self.package, log)
        if self.weights is not None:
            name = os.path.basename(self.weights_path)
            entry = load_encoder_weights(model, builder, self.weights, name, log)
            self.lineage["encoder_weights"] = dict(file=name, sha256=self.weights_sha256, **entry)
            self.weights = None  # the network holds them now
        if self.freeze or self.lr_factor != 1.0:
            self.part = encoder_part(model, builder)
            if self.part is None:
                raise InputError(f"FREEZE_ENCODER and ENCODER_LR need a network with an encoder; "
                                 f"{_describe(builder)} has none: leave them at 0 and 1")

    def param_groups(self, model, trained, lr):
        """What the optimiser gets from the trained parameters ``trained``: the list itself, or (ENCODER_LR) a
        group of the others then one of the encoder's with ``base_lr`` = ``lr`` x the factor."""
        trained = list(trained)
        if self.lr_factor == 1.0 or self.part is None:
            return trained
        mine = {id(p) for p in self.part.parameters(model)}
        rest = [p for p in trained if id(p) not in mine]
        encoder = [p for p in trained if id(p) in mine]
        groups = [{"params": rest}] if rest else []
        if encoder:
            groups.append({"params": encoder, "base_lr": lr * self.lr_factor, "lr": lr * self.lr_factor})
        return groups

    def start_epoch(self, model, epoch, log):
        """At the start of ``epoch`` (1-based, after ``model.train()``): the encoder frozen during the first
        ``freeze`` epochs (no gradient, BatchNorm in eval mode), trained after."""
        if not self.freeze or self.part is None:
            return
        if epoch <= self.freeze:
            if epoch == 1:
                self.frozen = [p for p in self.part.parameters(model) if p.requires_grad]
                for p in self.frozen:
                    p.requires_grad_(False)
                log(f"The {self.part.name} encoder is frozen for {self.freeze} epoch(s) ({len(self.frozen)} "
                    "parameter tensors, BatchNorm statistics kept)")
            for m in self.part.batch_norms(model):
                m.eval()
        elif self.frozen:
            for p in self.frozen:
                p.requires_grad_(True)
            self.frozen = []
            log(f"Epoch {epoch}: the encoder is trained from now on")

    def package_metadata(self):
        """MLM ``mlm:pretrained`` and ``mlm:pretrained_source`` of the package written."""
        source = None
        if self.lineage["init_from"]:
            e = self.lineage["init_from"]
            source = f"RS Deep model package {e['name']} (weights sha256 {e['sha256']})"
        elif self.lineage["encoder_weights"]:
            e = self.lineage["encoder_weights"]
            source = f"encoder weights {e['file']} (sha256 {e['sha256']})"
        return {"mlm:pretrained": source is not None, "mlm:pretrained_source": source}


__all__ = ["Transfer", "BAND_RULE", "CONVERT_COMMAND", "adapt_bands", "adapt_input_conv", "first_conv", "EncoderPart",
           "encoder_part", "check_encoder_weights_path", "read_encoder_weights", "read_init_package",
           "init_from_package", "match_keys", "guess_encoder", "load_encoder_weights", "check_transfer_options"]
