"""The networks the trainers build (QGIS-free).

* :data:`DEFAULT_BUILDERS`: the network each trainer builds when the caller names none, one per task;
* :func:`resolve_builder`: a builder completed for the training data (bands, classes, no pretrained weights);
* :func:`toolbox_builder`: the architecture choices of the toolbox (rs_deep:train's ARCHITECTURE and ENCODER),
  whose lists (:data:`SEGMENTATION_ARCHITECTURES`, :data:`DETECTION_ARCHITECTURES`) are the allow-lists of
  :mod:`.architectures` and :mod:`.arch_torchvision`, plus RS Deep's CenterNet.

The toolbox's "auto" is not always the engine's default: for detection it is CenterNet on the ENCODER (trains
from scratch in CPU minutes, as the bundled trees model), while ``train_detection(builder=None)`` builds the
Faster R-CNN of :data:`DEFAULT_BUILDERS`; for segmentation it is a U-Net on the ENCODER (resnet18 unless
chosen), while the engine's default is a lighter U-Net on MobileNetV2.
"""
import copy

from ..errors import InputError
from ..models.arch_centernet import ARCHITECTURE as CENTERNET, ORIENTED_ARCHITECTURE as CENTERNET_OBB
from ..models.arch_torchvision import ARCHITECTURES as TORCHVISION_ARCHITECTURES
from ..models.arch_torchvision import INSTANCE_ARCHITECTURES, is_instance_builder
from ..tasks import OBJECT_TASKS
from ..models.arch_smp import SMP_ARCHITECTURES

DEFAULT_BUILDERS = {
    # a light U-Net: MobileNetV2 encoder, small decoder
    "segmentation": {"library": "smp", "architecture": "Unet", "encoder": "mobilenet_v2", "encoder_weights": None,
                     "params": {"decoder_channels": [128, 64, 32, 16, 8]}},
    # Faster R-CNN MobileNetV3-FPN sized for small objects
    "detection": {"library": "torchvision", "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
                  "encoder_weights": None,
                  "params": {"fpn_channels": 128, "representation_size": 256, "returned_layers": [3, 4],
                             "anchor_sizes": [16, 32, 64, 128]}},
    # Mask R-CNN: the detection default's Faster R-CNN MobileNetV3-FPN plus a light mask head
    "instance_segmentation": {"library": "torchvision", "architecture": "maskrcnn_mobilenet_v3_large_fpn",
                              "encoder_weights": None,
                              "params": {"fpn_channels": 128, "representation_size": 256, "returned_layers": [3, 4],
                                         "anchor_sizes": [16, 32, 64, 128], "mask_channels": 64}},
    # a Siamese U-Net: shared ResNet-18 features of both dates, their absolute difference decoded
    "change": {"library": "rs_deep", "architecture": "SiameseUnet", "encoder": "resnet18", "encoder_weights": None,
               "params": {"encoder_depth": 4, "decoder_channels": [128, 64, 32, 16], "fusion": "absdiff"}},
    # regression: the segmentation U-Net with one output channel per target band and no activation
    "regression": {"library": "smp", "architecture": "Unet", "encoder": "mobilenet_v2", "encoder_weights": None,
                   "params": {"decoder_channels": [128, 64, 32, 16, 8]}},
    # a timm ResNet-18 keeping some spatial resolution for small patches
    "patch_classification": {"library": "timm", "architecture": "resnet18", "encoder_weights": None,
                             "params": {"output_stride": 8, "drop_rate": 0.2}},
}

#: the toolbox's ARCHITECTURE choices per task, in its order
SEGMENTATION_ARCHITECTURES = list(SMP_ARCHITECTURES)
# CenterNetOBB (rotated boxes) last: the earlier choices keep their ARCHITECTURE numbers
DETECTION_ARCHITECTURES = [CENTERNET] + [a for a in TORCHVISION_ARCHITECTURES if a not in INSTANCE_ARCHITECTURES] \
    + [CENTERNET_OBB]
DEFAULT_ENCODER = "resnet18"
#: the toolbox's encoder per task where it is not DEFAULT_ENCODER: segmentation's U-Net on MobileNetV2, measured
#: better than on ResNet-18 on both held-out areas of the Atlanta buildings in less time (README, "Training that
#: generalises": building IoU 0.33 vs 0.28 and 0.21 vs 0.14) and 3 times smaller
TASK_ENCODERS = {"segmentation": "mobilenet_v2"}


def default_encoder(task):
    """The toolbox's encoder for ``task`` when ENCODER is not given."""
    return TASK_ENCODERS.get(task, DEFAULT_ENCODER)
#: rs_deep:train's defaults per task (what TILE_SIZE 0, BATCH_SIZE 0 and the learning rate give), as trainer keyword
#: arguments; measured on unseen areas of ../shared/data (tools/compare_rf.py, tools/eval_trees.py)
TOOLBOX_DEFAULTS = {
    "segmentation": {"tile_size": 256, "batch_size": 4, "lr": 3e-3},
    "detection": {"tile_size": 256, "batch_size": 4, "lr": 2e-3},
    "instance_segmentation": {"tile_size": 128, "batch_size": 4, "lr": 2e-3},
    "patch_classification": {"tile_size": 16, "batch_size": 64, "lr": 2e-3},
    "change": {"tile_size": 128, "batch_size": 8, "lr": 2e-3},
    "regression": {"tile_size": 128, "batch_size": 16, "lr": 2e-3},
    "super_resolution": {"tile_size": 64, "batch_size": 16, "lr": 1e-3},
}
#: training crop (patch) size in px of each task when TILE_SIZE is not given
DEFAULT_TILE = {task: d["tile_size"] for task, d in TOOLBOX_DEFAULTS.items()}
#: CenterNet as the bundled trees_demo is built (tools/make_trees_model.py): a light decoder, heatmap at 1/2
CENTERNET_PARAMS = {"base": "Unet", "encoder_depth": 3, "output_stride": 2, "decoder_channels": [64, 32],
                    "head_channels": 64}


def resolve_builder(task, builder, in_channels, n_classes):
    """The builder of the network to train: ``builder`` (or the task's default) with ``in_channels`` and
    ``classes`` filled in (refused when they disagree with the data) and ``encoder_weights`` None; a builder
    without ``library`` gets the library of the task's default. Detection builders are validated here (their
    training sizes are set before the first step); the others when the network is built."""
    default = DEFAULT_BUILDERS[task]
    b = copy.deepcopy(builder or default)
    if task not in OBJECT_TASKS:
        b["params"] = dict(b.get("params") or {})
    b.setdefault("library", default["library"])
    b["encoder_weights"] = None
    for key, value in (("in_channels", in_channels), ("classes", n_classes)):
        if b.get(key) is None:
            b[key] = value
        elif b[key] != value:
            raise InputError(f"builder.{key} is {b[key]} but the training data need {value}")
    if task in OBJECT_TASKS:
        from ..models.architectures import validate_builder
        b = validate_builder(b, "builder")
        if is_instance_builder(b) != (task == "instance_segmentation"):
            raise InputError(f"builder: {b['architecture']} is no {task} network; "
                             + (f"instance segmentation trains {', '.join(INSTANCE_ARCHITECTURES)}"
                                if task == "instance_segmentation" else "it gives masks: train it with task "
                                                                        "instance_segmentation"))
    return b


def toolbox_builder(task, architecture=None, encoder=None):
    """The builder of the toolbox's choice: ``architecture`` (None: auto) and ``encoder`` for ``task``, or an
    :class:`InputError` naming the parameters (ARCHITECTURE, ENCODER) to change.

    Auto: a U-Net (segmentation), CenterNet (detection), the encoder network itself (patch classification, a
    timm classifier), a Siamese U-Net (change; a segmentation architecture there means early fusion of both
    dates). None is returned for the Faster R-CNN MobileNetV3-FPN: the trainer's default, sized for small
    objects."""
    encoder = encoder or default_encoder(task)
    if task in ("segmentation", "regression"):
        if architecture is not None and architecture not in SEGMENTATION_ARCHITECTURES:
            raise InputError(f"ARCHITECTURE {architecture} is a detection network; for {task} choose "
                             f"one of {', '.join(SEGMENTATION_ARCHITECTURES)} (or auto)")
        return {"library": "smp", "architecture": architecture or "Unet", "encoder": encoder,
                "encoder_weights": None, "params": {}}
    if task == "detection":
        if architecture is not None and architecture not in DETECTION_ARCHITECTURES:
            raise InputError(f"ARCHITECTURE {architecture} is a segmentation network; for detection choose "
                             f"one of {', '.join(DETECTION_ARCHITECTURES)} (or auto)")
        if architecture in (None, CENTERNET, CENTERNET_OBB):  # CenterNetOBB: rotated boxes, the same network
            return {"library": "rs_deep", "architecture": architecture or CENTERNET, "encoder": encoder,
                    "encoder_weights": None, "params": dict(CENTERNET_PARAMS)}
        if architecture == DEFAULT_BUILDERS["detection"]["architecture"]:
            return None
        return {"library": "torchvision", "architecture": architecture, "encoder_weights": None, "params": {}}
    if task == "instance_segmentation":
        if architecture not in (None,) + INSTANCE_ARCHITECTURES:
            raise InputError(f"ARCHITECTURE {architecture} gives no masks; for instance segmentation choose auto (a "
                             f"Mask R-CNN: {', '.join(INSTANCE_ARCHITECTURES)})")
        return None  # the trainer's default Mask R-CNN, sized for small objects
    if task == "change":
        if architecture is None:
            default = DEFAULT_BUILDERS["change"]
            return dict(default, encoder=encoder, params=dict(default["params"]))
        if architecture not in SEGMENTATION_ARCHITECTURES:
            raise InputError(f"ARCHITECTURE {architecture} is a detection network; for change choose auto "
                             "(a Siamese U-Net) or a segmentation network (early fusion of both "
                             f"dates): {', '.join(SEGMENTATION_ARCHITECTURES)}")
        return {"library": "rs_deep", "architecture": "EarlyFusion", "encoder": encoder, "encoder_weights": None,
                "params": {"base": architecture}}
    if task == "super_resolution":
        if architecture is not None:
            raise InputError("For super-resolution the network is RS Deep's ESPCN; set ARCHITECTURE to auto")
        return {"library": "rs_deep", "architecture": "ESPCN", "encoder_weights": None, "params": {}}
    if task != "patch_classification":
        raise InputError(f"task must be one of {', '.join(DEFAULT_BUILDERS)}; got {task!r}")
    if architecture is not None:
        raise InputError("For patch classification the network is the ENCODER (a timm classifier "
                         "such as resnet18); set ARCHITECTURE to auto")
    params = {"drop_rate": 0.2}
    if encoder.startswith("resnet"):
        params["output_stride"] = 8  # small patches: keep some spatial resolution before pooling
    return {"library": "timm", "architecture": encoder, "encoder_weights": None, "params": params}


__all__ = ["DEFAULT_BUILDERS", "TOOLBOX_DEFAULTS", "DEFAULT_TILE", "SEGMENTATION_ARCHITECTURES", "DETECTION_ARCHITECTURES",
           "DEFAULT_ENCODER", "TASK_ENCODERS", "default_encoder",
           "CENTERNET_PARAMS", "resolve_builder", "toolbox_builder"]
