"""The allow-list of network architectures a model package may name.

A package never carries code: it names a builder from this list plus a few
plain parameters, and we construct the network here. Weights come separately
from safetensors. Nothing is downloaded: encoder weights are always ``None``.
"""
import os
import sys

from ..errors import MissingDependency, ModelPackageError

#: environment variables that keep the Hugging Face hub (used by timm) and friends offline; set for the
#: whole process as soon as the engine loads or builds a model (:func:`force_offline`)
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

#: smp architectures a package may name (segmentation_models_pytorch class names).
SMP_ARCHITECTURES = (
    "Unet", "UnetPlusPlus", "FPN", "Linknet", "PSPNet", "PAN", "MAnet",
    "DeepLabV3", "DeepLabV3Plus", "Segformer", "UPerNet",
)

#: Extra keyword arguments a package may pass to an smp architecture, with their JSON types.
SMP_PARAMS = {
    "encoder_depth": int,
    "decoder_channels": list,
    "decoder_attention_type": (str, type(None)),
    "decoder_use_norm": (str, bool),
    "decoder_interpolation": str,
    "decoder_pyramid_channels": int,
    "decoder_segmentation_channels": int,
    "decoder_merge_policy": str,
    "decoder_dropout": float,
    "upsampling": int,
}

#: builder libraries -> module implementing ``validate(builder, where)`` and ``build(builder)``.
#: Each module keeps its own allow-list; a package can only name what is listed there.
LIBRARY_MODULES = {
    "smp": __name__,
    "torchvision": ".arch_torchvision",   # detection networks (issue: detection)
    "timm": ".arch_timm",                 # patch classifiers
    "rs_deep": ".arch_rs_deep",           # our own compositions (e.g. Siamese change networks)
}
LIBRARIES = tuple(LIBRARY_MODULES)


def _import_smp():
    try:
        import segmentation_models_pytorch as smp  # noqa: WPS433
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependency(
            "segmentation-models-pytorch is not installed: install the plugin's dependencies "
            f"(see README, 'make setup') ({exc})") from exc
    return smp


def smp_encoder_names():
    smp = _import_smp()
    return sorted(smp.encoders.get_encoder_names())


def force_offline():
    """No model file may cause network traffic: put the Hugging Face hub (timm's ``hf-hub:`` models,
    transformers, datasets) in offline mode for the whole process, also when it was imported already.
    The builders never ask for pretrained weights and take encoder names from exact allow-lists
    (:func:`check_encoder`), so nothing should try; this makes sure nothing can."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def timm_model_names():
    """The timm architectures an smp ``tu-`` encoder may name: timm's registry, exact names only (no
    ``hf-hub:``/``local-dir:`` prefixes, no pretrained tags)."""
    try:
        import timm
    except ImportError:  # pragma: no cover - depends on the install
        return frozenset()
    return frozenset(timm.list_models())


def check_encoder(encoder, where="rs_deep:builder", label="encoder"):
    """An smp encoder name, or ``tu-`` + the exact name of a timm architecture; anything else (hub
    prefixes included) is refused by name before any network is built (``label``: what the message calls it)."""
    smp = _import_smp()
    names = smp.encoders.get_encoder_names()
    if isinstance(encoder, str) and (encoder in names or (encoder.startswith("tu-")
                                                          and encoder[3:] in timm_model_names())):
        return encoder
    raise ModelPackageError(
        f"{where}.encoder: unknown {label} {encoder!r}; valid names include: "
        f"{', '.join(sorted(n for n in names if not n.startswith('timm-'))[:40])} ... "
        "(or a timm model as 'tu-NAME', NAME exactly as timm.list_models() gives it; hub names such as "
        "'tu-hf-hub:...' are never accepted: nothing is downloaded)")


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


def validate_builder(builder, where="rs_deep:builder"):
    """Check a builder block without building anything; returns a normalised copy."""
    _check_common(builder, where)
    module = _library_module(builder.get("library"), where)
    return module.validate(builder, where)


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


def validate(builder, where="rs_deep:builder"):
    """smp builders: an allow-listed architecture, an smp encoder, allow-listed parameters."""
    arch = builder.get("architecture")
    if arch not in SMP_ARCHITECTURES:
        raise ModelPackageError(
            f"{where}.architecture: {arch!r} is not on the allow-list; valid names: {', '.join(SMP_ARCHITECTURES)}")
    encoder = builder.get("encoder")
    if not isinstance(encoder, str) or not encoder:
        raise ModelPackageError(f"{where}.encoder: expected an encoder name such as 'resnet18', got {encoder!r}")
    if builder.get("encoder_weights") is not None:
        raise ModelPackageError(
            f"{where}.encoder_weights: must be null (weights come from model.safetensors; "
            f"nothing is downloaded), got {builder.get('encoder_weights')!r}")
    params = builder.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in SMP_PARAMS:
            raise ModelPackageError(
                f"{where}.params.{key}: not an allowed parameter; allowed: {', '.join(sorted(SMP_PARAMS))}")
        expected = SMP_PARAMS[key]
        if expected is float and isinstance(value, int):
            continue
        if not isinstance(value, expected):
            raise ModelPackageError(f"{where}.params.{key}: expected {expected}, got {value!r}")
    out = dict(builder)
    out["params"] = dict(params)
    out["encoder_weights"] = None
    return out


def build(builder, where="rs_deep:builder"):
    """Construct an smp network from a validated builder."""
    smp = _import_smp()
    encoder = check_encoder(builder["encoder"], where)
    cls = getattr(smp, builder["architecture"])
    try:
        return cls(encoder_name=encoder, encoder_weights=None, in_channels=builder["in_channels"],
                   classes=builder["classes"], **builder["params"])
    except Exception as exc:  # smp raises many types for bad combinations
        raise ModelPackageError(f"{where}: cannot build {builder['architecture']} with encoder {encoder!r} "
                                f"and params {builder['params']}: {exc}") from exc
