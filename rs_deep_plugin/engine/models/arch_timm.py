"""Patch (scene) classifiers from timm (builder library ``timm``).

``architecture`` names a timm model from :data:`TIMM_MODELS`; the network is created with
``pretrained=False`` (nothing is downloaded), ``in_chans=in_channels`` and ``num_classes=classes``,
plus allow-listed keyword arguments from ``params``. The model pools globally, so it takes
patches of any size; it returns class logits ``[B, K]``.
"""
from ..errors import ModelPackageError, require

#: timm models a package may name: small CNNs that run well on a CPU
TIMM_MODELS = (
    "resnet10t", "resnet14t", "resnet18", "resnet18d", "resnet34", "resnet50",
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_small_050", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0", "regnetx_002", "regnety_002",
    "convnext_atto", "convnext_femto", "lcnet_050", "lcnet_100", "ghostnet_100",
)

#: keyword arguments a package may pass to timm.create_model, with their JSON types
TIMM_PARAMS = {
    "drop_rate": (float, int),
    "drop_path_rate": (float, int),
    "global_pool": str,
    "output_stride": int,
}
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax")


def validate(builder, where="rs_deep:builder", registries=True):
    arch = builder.get("architecture")
    if arch not in TIMM_MODELS:
        raise ModelPackageError(f"{where}.architecture: {arch!r} is not on the allow-list of timm classifiers; "
                                f"valid names: {', '.join(TIMM_MODELS)}")
    for key in ("encoder_weights", "pretrained"):
        if builder.get(key) not in (None, False):
            raise ModelPackageError(f"{where}.{key}: must be null (weights come from model.safetensors; nothing "
                                    f"is downloaded), got {builder.get(key)!r}")
    params = builder.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in TIMM_PARAMS:
            raise ModelPackageError(f"{where}.params.{key}: not an allowed parameter; allowed: "
                                    f"{', '.join(sorted(TIMM_PARAMS))}")
        if isinstance(value, bool) or not isinstance(value, TIMM_PARAMS[key]):
            raise ModelPackageError(f"{where}.params.{key}: expected {TIMM_PARAMS[key]}, got {value!r}")
    if params.get("global_pool", "avg") not in GLOBAL_POOLS:
        raise ModelPackageError(f"{where}.params.global_pool: expected one of {', '.join(GLOBAL_POOLS)}, "
                                f"got {params['global_pool']!r}")
    if params.get("output_stride", 32) not in (8, 16, 32):
        raise ModelPackageError(f"{where}.params.output_stride: expected 8, 16 or 32, got {params['output_stride']!r}")
    for key in ("drop_rate", "drop_path_rate"):
        if not 0 <= params.get(key, 0) < 1:
            raise ModelPackageError(f"{where}.params.{key}: expected a value in [0, 1), got {params[key]!r}")
    out = dict(builder)
    out["params"] = dict(params)
    out["encoder"] = arch  # the network is its own encoder (model cards show builder['encoder'])
    out["encoder_weights"] = None
    out.pop("pretrained", None)
    return out


def build(builder, where="rs_deep:builder"):
    timm = require("timm")
    try:
        return timm.create_model(builder["architecture"], pretrained=False, in_chans=builder["in_channels"],
                                 num_classes=builder["classes"], **builder["params"])
    except Exception as exc:  # timm raises many types for bad combinations
        raise ModelPackageError(f"{where}: cannot build the timm model {builder['architecture']!r} with params "
                                f"{builder['params']}: {exc}") from exc
