"""Detection and instance segmentation networks from torchvision, built offline (``library: "torchvision"`` builders).

A package names one of :data:`ARCHITECTURES` plus a few plain parameters; the network is
built here with ``weights=None, weights_backbone=None`` (nothing is ever downloaded) and its
weights come from the package's safetensors. Differences from torchvision's own builders:

* ``classes`` is the number of *object* classes (classification:classes); torchvision's
  background class 0 is added here and never leaves :mod:`.detect`;
* any number of input bands: the first convolution is replaced when ``in_channels != 3``;
* no ImageNet normalisation and no resizing: the package's value scaling prepares the
  tiles, the network's transform has ``image_mean=[0]*C``, ``image_std=[1]*C`` and keeps
  every tile at its own size (see :class:`TileTransform`).
"""
import math

from ..errors import ModelPackageError, require

#: architecture -> (backbone name reported as ``encoder``, allowed params)
_MOBILENET_PARAMS = ("fpn_channels", "representation_size", "returned_layers", "anchor_sizes", "aspect_ratios",
                     "width_mult", "reduced_tail")
ARCHITECTURES = {
    "fasterrcnn_mobilenet_v3_large_fpn": ("mobilenet_v3_large", _MOBILENET_PARAMS),
    "fasterrcnn_resnet50_fpn": ("resnet50", ("representation_size",)),
    "retinanet_resnet50_fpn": ("resnet50", ()),
    "fcos_resnet50_fpn": ("resnet50", ()),
    # instance segmentation (task instance_segmentation): Faster R-CNN plus a mask head (Mask R-CNN)
    "maskrcnn_mobilenet_v3_large_fpn": ("mobilenet_v3_large", _MOBILENET_PARAMS + ("mask_channels",)),
}
#: the architectures that give a mask per object (instance segmentation); the others give boxes (detection)
INSTANCE_ARCHITECTURES = ("maskrcnn_mobilenet_v3_large_fpn",)

#: values used when a parameter is not given (torchvision's own)
DEFAULTS = {
    "fpn_channels": 256,
    "representation_size": 1024,
    "returned_layers": None,  # mobilenet stages 0..5 (strides 2, 4, 8, 16, 32, 32); None = torchvision's [4, 5]
    "anchor_sizes": [32, 64, 128, 256, 512],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "width_mult": 1.0,
    "reduced_tail": False,
    "mask_channels": 256,  # the four convolutions of the mask head
}


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_param(key, value, where):
    p = f"{where}.params.{key}"
    if key in ("fpn_channels", "representation_size", "mask_channels"):
        if not _positive_int(value) or value > 4096:
            raise ModelPackageError(f"{p}: expected an integer in 1..4096, got {value!r}")
        return value
    if key == "returned_layers":
        if value is None:
            return None
        if (not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value)
                or sorted(set(value)) != value or value[0] < 1 or value[-1] > 5):
            raise ModelPackageError(f"{p}: expected increasing MobileNetV3 stage numbers in 1..5 (strides 4, 8, "
                                    f"16, 32, 32), for example [3, 4, 5]; got {value!r}")
        return list(value)
    if key == "anchor_sizes":
        if not isinstance(value, list) or not value or not all(_positive_int(v) for v in value) \
                or sorted(set(value)) != value:
            raise ModelPackageError(f"{p}: expected increasing anchor sizes in pixels, for example [16, 32, 64, "
                                    f"128]; got {value!r}")
        return list(value)
    if key == "aspect_ratios":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value):
            raise ModelPackageError(f"{p}: expected positive height/width ratios, for example [0.5, 1.0, 2.0]; "
                                    f"got {value!r}")
        return [float(v) for v in value]
    if key == "width_mult":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.25 <= value <= 2.0:
            raise ModelPackageError(f"{p}: expected a number in 0.25..2.0, got {value!r}")
        return float(value)
    if key == "reduced_tail":
        if not isinstance(value, bool):
            raise ModelPackageError(f"{p}: expected true or false, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover


def validate(builder, where="rs_deep:builder", registries=True):
    """torchvision builders: an allow-listed detection architecture and allow-listed parameters.

    Returns a normalised copy: ``encoder`` is the architecture's backbone, ``encoder_weights``
    is None and ``params`` holds only the parameters that were given."""
    arch = builder.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelPackageError(f"{where}.architecture: {arch!r} is not on the allow-list of torchvision "
                                f"detection networks; valid names: {', '.join(ARCHITECTURES)}")
    encoder, allowed = ARCHITECTURES[arch]
    given = builder.get("encoder")
    if given not in (None, encoder):
        raise ModelPackageError(f"{where}.encoder: {arch} has the backbone {encoder!r}; got {given!r} (leave it "
                                "out or give that name)")
    for key in ("encoder_weights", "weights", "weights_backbone"):
        if builder.get(key) is not None:
            raise ModelPackageError(f"{where}.{key}: must be null (weights come from model.safetensors; nothing "
                                    f"is downloaded), got {builder.get(key)!r}")
    params = builder.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    out_params = {}
    for key, value in params.items():
        if key not in allowed:
            raise ModelPackageError(f"{where}.params.{key}: not an allowed parameter of {arch}; allowed: "
                                    f"{', '.join(allowed) if allowed else 'none'}")
        out_params[key] = _check_param(key, value, where)
    out = {k: v for k, v in builder.items() if k not in ("weights", "weights_backbone")}
    out.update(library="torchvision", architecture=arch, encoder=encoder, encoder_weights=None, params=out_params)
    return out


def _torchvision():
    return require("torchvision.models.detection.transform", "torchvision")


def _tile_transform_class():
    tv_transform = _torchvision()

    class TileTransform(tv_transform.GeneralizedRCNNTransform):
        """torchvision's detection transform without resizing: tiles keep their size (and boxes
        their pixel coordinates); the package's value scaling is the only normalisation."""

        def resize(self, image, target=None):
            return image, target

    return TileTransform


def _replace_first_conv(module, in_channels):
    """Swap the first Conv2d of ``module`` for one taking ``in_channels`` bands."""
    import torch.nn as nn
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            if child.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, child.out_channels, kernel_size=child.kernel_size, stride=child.stride,
                            padding=child.padding, dilation=child.dilation, groups=1,
                            bias=child.bias is not None, padding_mode=child.padding_mode)
            parent = module
            parts = name.split(".")
            for p in parts[:-1]:
                parent = getattr(parent, p)
            setattr(parent, parts[-1], new)
            return
    raise ModelPackageError("the backbone has no convolution to adapt to the band count")  # pragma: no cover


def _mobilenet_fpn_backbone(params, in_channels):
    import torch.nn as nn
    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    net = mobilenet_v3_large(weights=None, norm_layer=nn.BatchNorm2d,
                             width_mult=params.get("width_mult", DEFAULTS["width_mult"]),
                             reduced_tail=params.get("reduced_tail", DEFAULTS["reduced_tail"]))
    features = net.features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    returned = params.get("returned_layers") or [len(stage_indices) - 2, len(stage_indices) - 1]
    return_layers = {f"{stage_indices[k]}": str(v) for v, k in enumerate(returned)}
    in_channels_list = [features[stage_indices[i]].out_channels for i in returned]
    backbone = BackboneWithFPN(features, return_layers, in_channels_list,
                               params.get("fpn_channels", DEFAULTS["fpn_channels"]), extra_blocks=LastLevelMaxPool())
    if in_channels != 3:
        _replace_first_conv(backbone.body, in_channels)
    return backbone, len(returned) + 1


def build(builder, where="rs_deep:builder"):
    """Construct the (untrained) detection network of a validated builder."""
    _torchvision()
    from torchvision.models import detection as tvd
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    arch = builder["architecture"]
    params = builder.get("params") or {}
    c = builder["in_channels"]
    num_classes = builder["classes"] + 1  # torchvision's class 0 is the background
    sizes = tuple(params.get("anchor_sizes", DEFAULTS["anchor_sizes"]))
    ratios = tuple(params.get("aspect_ratios", DEFAULTS["aspect_ratios"]))
    rep = params.get("representation_size", DEFAULTS["representation_size"])
    if arch in ("fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_mobilenet_v3_large_fpn"):
        backbone, levels = _mobilenet_fpn_backbone(params, c)
        anchors = AnchorGenerator((sizes,) * levels, (ratios,) * levels)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, rep)  # the RoI pool is 7 x 7
        heads = dict(rpn_anchor_generator=anchors, box_head=box_head, box_predictor=FastRCNNPredictor(rep, num_classes))
        if arch in INSTANCE_ARCHITECTURES:
            from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
            mc = params.get("mask_channels", DEFAULTS["mask_channels"])
            model = tvd.MaskRCNN(backbone, None, mask_head=MaskRCNNHeads(backbone.out_channels, (mc,) * 4, 1),
                                 mask_predictor=MaskRCNNPredictor(mc, mc, num_classes), **heads)
        else:
            model = tvd.FasterRCNN(backbone, None, **heads)
    elif arch == "fasterrcnn_resnet50_fpn":
        model = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
        if rep != DEFAULTS["representation_size"]:
            model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * 7 * 7, rep)
            model.roi_heads.box_predictor = FastRCNNPredictor(rep, num_classes)
    elif arch == "retinanet_resnet50_fpn":
        model = tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    elif arch == "fcos_resnet50_fpn":
        model = tvd.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    else:  # pragma: no cover - validate() ran first
        raise ModelPackageError(f"{where}.architecture: {arch!r} is not supported")
    if c != 3 and not arch.endswith("mobilenet_v3_large_fpn"):
        _replace_first_conv(model.backbone.body, c)
    model.transform = _tile_transform_class()(min_size=32, max_size=1 << 16, image_mean=[0.0] * c,
                                              image_std=[1.0] * c)
    return model


def configure_inference(model, score_threshold, iou_threshold, max_detections):
    """Set the network's own post-processing: score cut, class-wise NMS and the per-tile cap.

    Works for every detector the engine builds: torchvision's (below) and those with their own
    ``configure_inference`` method (:mod:`.arch_centernet`)."""
    own = getattr(model, "configure_inference", None)
    if callable(own):
        own(score_threshold, iou_threshold, max_detections)
        return model
    heads = getattr(model, "roi_heads", None)
    if heads is not None:  # Faster R-CNN, Mask R-CNN
        # region proposals per tile: a few per object that may be kept (torchvision's 1000 at most)
        model.rpn._post_nms_top_n["testing"] = min(1000, max(100, 3 * int(max_detections)))
        heads.score_thresh = float(score_threshold)
        heads.nms_thresh = float(iou_threshold)
        heads.detections_per_img = int(max_detections)
    else:  # RetinaNet, FCOS
        model.score_thresh = float(score_threshold)
        model.nms_thresh = float(iou_threshold)
        model.detections_per_img = int(max_detections)
        model.topk_candidates = max(int(getattr(model, "topk_candidates", 1000)), int(max_detections))
    return model


def is_instance_builder(builder):
    """Whether a builder names an instance segmentation network (:data:`INSTANCE_ARCHITECTURES`)."""
    return isinstance(builder, dict) and builder.get("architecture") in INSTANCE_ARCHITECTURES


__all__ = ["ARCHITECTURES", "INSTANCE_ARCHITECTURES", "is_instance_builder", "validate", "build", "configure_inference"]
