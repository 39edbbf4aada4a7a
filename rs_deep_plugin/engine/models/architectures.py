"""The allow-list of network architectures a model package may name.

A package never carries code: it names a builder from this list plus a few
plain parameters, and we construct the network here. Weights come separately
from safetensors. Nothing is downloaded: encoder weights are always ``None``.
"""
import os
import sys

from ..errors import ModelPackageError

#: environment variables that keep the Hugging Face hub (used by timm) and friends offline; set for the
#: whole process as soon as the engine loads or builds a model (:func:`force_offline`)
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

#: builder libraries -> module implementing ``validate(builder, where, registries=True)`` and ``build(builder, where)``.
#: Each module keeps its own allow-list; a package can only name what is listed there.
LIBRARY_MODULES = {
    "smp": ".arch_smp",                   # segmentation-models-pytorch encoder-decoders
    "torchvision": ".arch_torchvision",   # detection networks (issue: detection)
    "timm": ".arch_timm",                 # patch classifiers
    "rs_deep": ".arch_rs_deep",           # our own compositions (e.g. Siamese change networks)
}
LIBRARIES = tuple(LIBRARY_MODULES)


def force_offline():
    """No model file may cause network traffic: put the Hugging Face hub (timm's ``hf-hub:`` models,
    transformers, datasets) in offline mode for the whole process, also when it was imported already.
    The builders never ask for pretrained weights and take encoder names from exact allow-lists
    (:func:`.arch_smp.check_encoder`), so nothing should try; this makes sure nothing can."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def _library_module(library, where):
    import importlib
    if library not in LIBRARY_MODULES:
        raise ModelPackageError(f"{where}.library: expected one of {', '.join(LIBRARIES)}, got {library!r}")
    try:
        return importlib.import_module(LIBRARY_MODULES[library], __package__)
    except ModuleNotFoundError as exc:
        raise ModelPackageError(f"{where}.library: {library!r} models are not supported by this version of "
                                f"RS Deep ({exc})") from exc


def _check_common(builder, where):
    if not isinstance(builder, dict):
        raise ModelPackageError(f"{where}: expected an object with library, architecture, in_channels and "
                                f"classes, got {type(builder).__name__}")
    for key in ("in_channels", "classes"):
        value = builder.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelPackageError(f"{where}.{key}: expected a positive integer, got {value!r}")


def validate_builder(builder, where="rs_deep:builder", registries=True):
    """Check a builder block without building anything; returns a normalised copy. ``registries`` False leaves out
    the checks of names against a library's own registry (smp's encoder names), which import that library and
    torch: for the builder an ONNX model carries, which describes its network but is never built."""
    _check_common(builder, where)
    module = _library_module(builder.get("library"), where)
    return module.validate(builder, where, registries=registries)


def build_model(builder, where="rs_deep:builder"):
    """Construct the (untrained) network a builder block describes, from the allow-lists only."""
    force_offline()
    builder = validate_builder(builder, where)
    return _library_module(builder["library"], where).build(builder, where)


def _small_on_cpu():
    """A torch function mode that creates small 1-D schedules (linspace, logspace, arange: e.g. the
    drop-path rates of a transformer encoder, read back with ``.item()``) on the CPU while a network is
    built on the ``meta`` device; everything else stays on ``meta``."""
    import torch
    from torch.overrides import TorchFunctionMode

    schedules = (torch.linspace, torch.logspace, torch.arange)

    class SmallOnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in schedules and kwargs.get("device") is None:
                probe = func(*args, **dict(kwargs, device="meta"))
                if probe.numel() <= 1_000_000:
                    kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    return SmallOnCpu()


def network_tensors(builder, where="rs_deep:builder"):
    """``{name: shape}`` of the state dict of the network a builder describes, without allocating it:
    the network is built on torch's ``meta`` device (shapes only, no memory), so its size can be
    checked against the limits and the weights file before it is built for real."""
    import torch
    force_offline()
    builder = validate_builder(builder, where)
    module = _library_module(builder["library"], where)
    with torch.device("meta"), _small_on_cpu():
        model = module.build(builder, where)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
