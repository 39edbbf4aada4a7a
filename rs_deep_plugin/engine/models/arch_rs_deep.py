"""RS Deep's own network compositions (builder library ``rs_deep``): bi-temporal change networks
and an anchor-free object detector.

The change networks take the two dates stacked on the channel axis, ``[B, 2 x C, H, W]`` (before bands, then after
bands, as :class:`.change.PairReader` reads them), and return change logits ``[B, K, H, W]``.
``in_channels`` in the builder is the number of bands **per date** (``C``).

* ``EarlyFusion``: an allow-listed smp segmentation network (``params.base``, default Unet) on the
  2 x C stacked bands. Its weights are the smp network's under the prefix ``net.``.
* ``SiameseUnet``: one smp encoder shared by both dates, the per-level absolute feature
  difference (``params.fusion`` "absdiff", or "concat" of both feature maps), an smp U-Net decoder
  and a segmentation head.

* ``ESPCN`` (super-resolution): a small sub-pixel network with residual blocks; :mod:`.arch_superres`.
* ``CenterNet`` (object detection): an smp encoder-decoder with a heatmap of object centres and a
  box regression head, with the interface of torchvision's detectors; validated and built by
  :mod:`.arch_centernet` (see there for its params).
* ``CenterNetOBB`` (oriented object detection): CenterNet predicting rotated boxes (centre, length, width and
  the angle of the long side as (sin 2 theta, cos 2 theta)); same params, :mod:`.arch_centernet`.

Nothing is downloaded: encoder weights are always ``None``.
"""
from ..errors import ModelPackageError, require

ARCHITECTURES = ("EarlyFusion", "SiameseUnet", "CenterNet", "ESPCN", "CenterNetOBB")
FUSIONS = ("absdiff", "concat")

#: params per architecture, with their JSON types (EarlyFusion also takes every smp parameter)
SIAMESE_PARAMS = {
    "encoder_depth": int,
    "decoder_channels": list,
    "decoder_attention_type": (str, type(None)),
    "decoder_use_norm": (str, bool),
    "decoder_interpolation": str,
    "fusion": str,
}


def _smp_builder(builder):
    """The smp builder an EarlyFusion network wraps (2 x C input channels)."""
    params = dict(builder.get("params") or {})
    base = params.pop("base", "Unet")
    return {"library": "smp", "architecture": base, "encoder": builder.get("encoder"),
            "in_channels": builder["in_channels"] * 2, "classes": builder["classes"],
            "encoder_weights": None, "params": params}


def validate(builder, where="rs_deep:builder", registries=True):
    arch = builder.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelPackageError(f"{where}.architecture: {arch!r} is not on the allow-list of the rs_deep library; "
                                f"valid names: {', '.join(ARCHITECTURES)}")
    if arch in ("CenterNet", "CenterNetOBB"):
        from .arch_centernet import validate as validate_centernet
        return validate_centernet(builder, where, registries)
    if arch == "ESPCN":
        from .arch_superres import validate as validate_superres
        return validate_superres(builder, where, registries)
    if builder.get("encoder_weights") is not None:
        raise ModelPackageError(f"{where}.encoder_weights: must be null (weights come from model.safetensors; "
                                f"nothing is downloaded), got {builder.get('encoder_weights')!r}")
    encoder = builder.get("encoder")
    if not isinstance(encoder, str) or not encoder:
        raise ModelPackageError(f"{where}.encoder: expected an smp encoder name such as 'resnet18', got {encoder!r}")
    params = builder.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    if arch == "EarlyFusion":
        from .arch_smp import SMP_ARCHITECTURES
        from .arch_smp import validate as validate_smp
        base = params.get("base", "Unet")
        if base not in SMP_ARCHITECTURES:
            raise ModelPackageError(f"{where}.params.base: {base!r} is not on the allow-list; valid names: "
                                    f"{', '.join(SMP_ARCHITECTURES)}")
        validate_smp(_smp_builder(dict(builder, params=params)), where)
    else:
        for key, value in params.items():
            if key not in SIAMESE_PARAMS:
                raise ModelPackageError(f"{where}.params.{key}: not an allowed parameter of SiameseUnet; allowed: "
                                        f"{', '.join(sorted(SIAMESE_PARAMS))}")
            if not isinstance(value, SIAMESE_PARAMS[key]) or isinstance(value, bool) and key == "encoder_depth":
                raise ModelPackageError(f"{where}.params.{key}: expected {SIAMESE_PARAMS[key]}, got {value!r}")
        if params.get("fusion", "absdiff") not in FUSIONS:
            raise ModelPackageError(f"{where}.params.fusion: {params['fusion']!r} unknown; valid: {', '.join(FUSIONS)}")
        depth = params.get("encoder_depth", 5)
        if not 3 <= depth <= 5:
            raise ModelPackageError(f"{where}.params.encoder_depth: expected 3, 4 or 5, got {depth}")
        channels = params.get("decoder_channels", [256, 128, 64, 32, 16][:depth])
        if len(channels) != depth or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                             for c in channels):
            raise ModelPackageError(f"{where}.params.decoder_channels: expected {depth} positive integers (one per "
                                    f"encoder level), got {channels!r}")
    out = dict(builder)
    out["params"] = dict(params)
    out["encoder_weights"] = None
    return out


def build(builder, where="rs_deep:builder"):
    import torch
    from .arch_smp import build as build_smp

    if builder["architecture"] in ("CenterNet", "CenterNetOBB"):
        from .arch_centernet import build as build_centernet
        return build_centernet(builder, where)
    if builder["architecture"] == "ESPCN":
        from .arch_superres import build as build_superres
        return build_superres(builder, where)
    if builder["architecture"] == "EarlyFusion":
        net = build_smp(_smp_builder(builder), where)

        class EarlyFusion(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)

        return EarlyFusion()
    return _build_siamese(builder, where)


def _build_siamese(builder, where):
    import torch
    from .arch_smp import check_encoder

    smp = require("segmentation_models_pytorch", "segmentation-models-pytorch")
    check_encoder(builder["encoder"], where, "smp encoder")
    from segmentation_models_pytorch.base import SegmentationHead
    from segmentation_models_pytorch.base import initialization as init
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    params = builder.get("params") or {}
    depth = params.get("encoder_depth", 5)
    channels = list(params.get("decoder_channels", [256, 128, 64, 32, 16][:depth]))
    fusion = params.get("fusion", "absdiff")
    c_in = builder["in_channels"]
    try:
        encoder = smp.encoders.get_encoder(builder["encoder"], in_channels=c_in, depth=depth, weights=None)
    except Exception as exc:
        raise ModelPackageError(f"{where}.encoder: cannot build the smp encoder {builder['encoder']!r} ({exc}); "
                                "use an smp encoder name such as resnet18, resnet34, mobilenet_v2, "
                                "efficientnet-b0") from exc
    enc_channels = list(encoder.out_channels)
    if fusion == "concat":
        enc_channels = [2 * c for c in enc_channels]
    try:
        decoder = UnetDecoder(encoder_channels=enc_channels, decoder_channels=channels, n_blocks=depth,
                              use_norm=params.get("decoder_use_norm", "batchnorm"),
                              attention_type=params.get("decoder_attention_type"),
                              interpolation_mode=params.get("decoder_interpolation", "nearest"))
    except Exception as exc:
        raise ModelPackageError(f"{where}.params: cannot build the SiameseUnet decoder with {params} ({exc})") from exc

    class SiameseUnet(torch.nn.Module):
        """Shared encoder on both dates, fused features per level, U-Net decoder."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.decoder = decoder
            self.segmentation_head = SegmentationHead(channels[-1], builder["classes"], kernel_size=3)
            init.initialize_decoder(self.decoder)
            init.initialize_head(self.segmentation_head)

        def forward(self, x):
            n = x.shape[0]
            # both dates through the encoder in one batch: same weights, one pass
            feats = self.encoder(torch.cat([x[:, :c_in], x[:, c_in:]], dim=0))
            if fusion == "absdiff":
                fused = [torch.abs(f[:n] - f[n:]) for f in feats]
            else:
                fused = [torch.cat([f[:n], f[n:]], dim=1) for f in feats]
            return self.segmentation_head(self.decoder(fused))

    return SiameseUnet()
