"""segmentation-models-pytorch encoder-decoders (U-Net, FPN, DeepLabV3+ ...): the allow-listed architectures,
parameters and encoders, and the builder (no pretrained weights: nothing is downloaded)."""
from ..errors import ModelPackageError, require

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
    smp = require("segmentation_models_pytorch", "segmentation-models-pytorch")
    names = smp.encoders.get_encoder_names()
    if isinstance(encoder, str) and (encoder in names or (encoder.startswith("tu-")
                                                          and encoder[3:] in timm_model_names())):
        return encoder
    raise ModelPackageError(
        f"{where}.encoder: unknown {label} {encoder!r}; valid names include: "
        f"{', '.join(sorted(n for n in names if not n.startswith('timm-'))[:40])} ... "
        "(or a timm model as 'tu-NAME', NAME exactly as timm.list_models() gives it; hub names such as "
        "'tu-hf-hub:...' are never accepted: nothing is downloaded)")


def validate(builder, where="rs_deep:builder", registries=True):
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
    smp = require("segmentation_models_pytorch", "segmentation-models-pytorch")
    encoder = check_encoder(builder["encoder"], where)
    cls = getattr(smp, builder["architecture"])
    try:
        return cls(encoder_name=encoder, encoder_weights=None, in_channels=builder["in_channels"],
                   classes=builder["classes"], **builder["params"])
    except Exception as exc:  # smp raises many types for bad combinations
        raise ModelPackageError(f"{where}: cannot build {builder['architecture']} with encoder {encoder!r} "
                                f"and params {builder['params']}: {exc}") from exc
