"""rs_deep:train — train a segmentation, detection, patch classification or change model from a raster and
labels, or from the chips of rs_deep:export_training_data."""
import os
import re

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingOutputFile, QgsProcessingParameterBoolean,
                       QgsProcessingParameterDefinition,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterString)

from ..rs_deep_plugin.compat import push_warning
from ..rs_deep_plugin.engine.tasks import (INSTANCE_SEGMENTATION, OBJECT_TASKS, PATCH_CLASSIFICATION, REGRESSION,
                                           SUPER_RESOLUTION, TASKS as TASK_TABLE)
from .base import DEVICES, FeedbackBridge, NamedEnum, RSDeepAlgorithm, require_dependencies
from .labels import label_colors, map_classes, map_multilabel_classes, map_patch_classes
from .layers import check_overlap, raster_file, read_labelled_polygons
from .outputs import RunOutputs
from .params import RasterInput, number_or, read_raster_layer, resolve_model_path
from ..rs_deep_plugin.engine.training.builders import (DETECTION_ARCHITECTURES, TOOLBOX_DEFAULTS,
                                                      SEGMENTATION_ARCHITECTURES, default_encoder)
from ..rs_deep_plugin.engine.training.data import AUTO_SIDE
from ..rs_deep_plugin.engine.training.loop import EMA_DECAY, MIN_STEPS, PER_INPUT_TASKS, PRECISIONS
from ..rs_deep_plugin.engine.training.multilabel import COVER_DEFAULT
from ..rs_deep_plugin.engine.training.regression import LOSSES
from ..rs_deep_plugin.engine.training.samplers import COPY_PASTE, OBJECT_CROPS
from ..rs_deep_plugin.engine.training.transfer import BAND_RULE

# segmentation, detection, patch_classification, change, regression, super_resolution: the engine's task table
TASKS = [t for t in TASK_TABLE if t in TOOLBOX_DEFAULTS]
TASK_LABELS = [TASK_TABLE[t].label for t in TASKS]
#: LOSS choices (regression)
LOSS_LABELS = ["L1 (mean absolute error)", "MSE (mean squared error)"]
#: AUGMENT choices -> the trainers' augment switches
AUGMENTS = ["Flips", "90-degree rotations", "Brightness/contrast", "Copy-paste of labelled objects (segmentation)"]
AUGMENT_NAMES = ["flips", "rotations", "brightness", "copy_paste"]
AUTO = "auto (the task's default)"
#: INPUT_SCALING choices -> the trainers' input_scaling (None: the task's default)
INPUT_SCALINGS = [(f"auto (each input's own for {', '.join(t.replace('_', ' ') for t in PER_INPUT_TASKS)}; the "
                   "training data's for the other tasks)") if PER_INPUT_TASKS else
                  "auto (the training data's for every task: the values the model learnt from)",
                  "the training data's 1st-99th percentiles (stored in the package)",
                  "each input's own 1st-99th percentiles (robust to darker or brighter scenes of the same content)"]
INPUT_SCALING_NAMES = ["auto", "training", "input"]
PRECISION_LABELS = ["auto (bfloat16 where the device computes it natively, else float32)", "float32", "bfloat16"]
INPUT_SCALING_VALUES = {"auto": None, "training": False, "input": True}
TIME_BUDGET_DEFAULT = 10.0  # minutes (20 CPU-minutes on 2 cores)
EPOCHS_DEFAULT = 100
PATIENCE_DEFAULT = 10
DEFAULTS_TEXT = "; ".join(f"{t.replace('_', ' ')}: batch {d['batch_size']}, learning rate {d['lr']:g}, tile {d['tile_size']}"
                          for t, d in TOOLBOX_DEFAULTS.items())
# the engine's allow-lists (smp, torchvision) and its CenterNet, the detection default here
ARCHITECTURES = [AUTO] + SEGMENTATION_ARCHITECTURES + DETECTION_ARCHITECTURES


PACKAGE_FILES = ("model.json", "model.safetensors", "training_report.json", "training_curves.png")


def _rs_deep_package(path):
    """An earlier package written by RS Deep (before the folder marker): its model.json has rs_deep: keys."""
    p = os.path.join(path, "model.json")
    try:
        if os.path.getsize(p) > 16 << 20:
            return False
        with open(p, encoding="utf-8") as f:
            return '"rs_deep:' in f.read()
    except (OSError, UnicodeDecodeError):
        return False


class _Bridge(FeedbackBridge):
    """FeedbackBridge that does not repeat a message the trainer has just logged (epoch summaries)."""

    last = None

    def log(self, message):
        self.last = message
        super().log(message)

    def progress(self, fraction, message=None):
        if message is not None and message == self.last:
            message = None
        super().progress(fraction, message)


class TrainAlgorithm(RSDeepAlgorithm):
    GROUP_ID = "train"
    INPUT = "INPUT"
    LABELS = "LABELS"
    CLASS_FIELD = "CLASS_FIELD"
    TASK = "TASK"
    MULTI_LABEL = "MULTI_LABEL"
    LABEL_COVER = "LABEL_COVER"
    ARCHITECTURE = "ARCHITECTURE"
    ENCODER = "ENCODER"
    EPOCHS = "EPOCHS"
    TIME_BUDGET = "TIME_BUDGET"
    BATCH_SIZE = "BATCH_SIZE"
    LEARNING_RATE = "LEARNING_RATE"
    TILE_SIZE = "TILE_SIZE"
    STEPS_PER_EPOCH = "STEPS_PER_EPOCH"
    VALIDATION = "VALIDATION"
    DEVICE = "DEVICE"
    CHIPS = "CHIPS"
    INPUT_AFTER = "INPUT_AFTER"
    AUGMENT = "AUGMENT"
    PATIENCE = "PATIENCE"
    EMA = "EMA"
    INPUT_SCALING = "INPUT_SCALING"
    SEED = "SEED"
    PRECISION = "PRECISION"
    OBJECT_CROPS = "OBJECT_CROPS"
    INIT_FROM = "INIT_FROM"
    ENCODER_WEIGHTS = "ENCODER_WEIGHTS"
    FREEZE_ENCODER = "FREEZE_ENCODER"
    ENCODER_LR = "ENCODER_LR"
    TARGET = "TARGET"
    LOSS = "LOSS"
    SCALE = "SCALE"
    OUTPUT = "OUTPUT"
    REPORT = "REPORT"
    CURVES = "CURVES"

    def name(self):
        return "train"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Train a model"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return (
            "Trains a deep-learning model on your own labels and writes a model package that the RS Deep "
            "algorithms apply (Semantic segmentation, Object detection, Patch classification, Change detection). "
            "The loss and the validation metrics of every epoch appear in the log; the package keeps the best "
            "network by the validation metric (the last one without validation), with training_report.json and "
            "training_curves.png.<br><br>"
            "<b>Input raster</b>: a raster file (GeoTIFF...); it is read into memory, so use a scene or a clip of "
            "one. Web and database layers must be saved as a file first. Change detection: the before image.<br>"
            "<b>After raster</b>: change detection only: the after image (resampled onto the before grid if "
            "needed); LABELS are then the changed areas.<br>"
            "<b>Chips</b>: instead of INPUT and LABELS, a folder (or its manifest.json) written by 'Export "
            "training data (chips)': segmentation, detection or change; its classes and its spatial-block "
            "validation split are used.<br>"
            "<b>Labels</b>: polygons in any CRS (reprojected to the raster's). Segmentation: the objects' outlines; "
            "every pixel outside them is the background. Detection: each feature's bounding box is an object "
            "(CenterNetOBB: each polygon's minimum rotated rectangle, so the labels must be polygons). "
            "Patch classification: areas of each class; with one class, the pixels outside are a "
            "'background' class, with several they are not labelled.<br>"
            "<b>Class field</b>: optional; the class of each feature. Classes are the sorted unique values "
            "(segmentation: values 1..K, 0 is the background; a value named 'background' marks background). "
            "Without it: one class named after the labels layer.<br>"
            "<b>Multi-label</b> (MULTI_LABEL): patch classification only: every class present in a patch "
            "(BigEarthNet-style) instead of its one dominant class. A patch's labels are the classes whose polygons "
            f"cover at least LABEL_COVER (default {COVER_DEFAULT:g}) of it; pixels outside every polygon belong to "
            "no class, so a patch may have none; polygons may overlap. The network scores each class with a "
            "sigmoid (binary cross-entropy loss); a threshold per class is chosen on the validation rows (the best "
            "F1) and stored in the package, where Patch classification reads it (THRESHOLD overrides it). Needs "
            "CLASS_FIELD with at least two classes.<br>"
            "<b>Target raster</b>: regression only, instead of LABELS: the values to learn per pixel (any grid and "
            "CRS: resampled bilinearly onto the input's grid; its nodata, and pixels it does not cover, are left "
            "out of the loss). Its name becomes the output's name. The package turns the network's output back into "
            "the target's units; validation reports RMSE, MAE, R² and the RMSE of the training mean.<br>"
            "<b>Loss</b>: regression only: L1 (default) or MSE.<br>"
            "<b>Super-resolution</b> trains from INPUT alone, self-supervised: each training crop is restored from its "
            "SCALE x SCALE block average (the image as a sensor SCALE times coarser sees it); applied to the image, "
            "the model assumes the same detail one level finer. Validation reports the PSNR of the network and of "
            "bicubic interpolation on the held-back rows. The package writes the image's data type.<br>"
            "<b>Scale</b>: super-resolution only: how many times finer the output is (2..8; default 2).<br>"
            "<b>Task</b>: segmentation, detection, patch classification, change, regression, super-resolution or "
            "instance segmentation (one polygon per object: a Mask R-CNN from the LABELS polygons, each polygon one "
            "object; applied with rs_deep:segment_instances). "
            "From the command line by index or by name: <code>TASK=segmentation</code>, <code>detection</code>, "
            "<code>patch_classification</code>, <code>change</code>, <code>regression</code>, "
            "<code>super_resolution</code>, <code>instance_segmentation</code>; the other choices likewise, e.g. "
            "<code>DEVICE=cpu</code>, <code>AUGMENT=flips,rotations</code>.<br>"
            "<b>Architecture</b>: auto = Unet (segmentation), CenterNet (detection), the encoder "
            "network itself (patch classification), a Siamese U-Net (change; a segmentation network here means "
            "early fusion of both dates). Segmentation: Unet, FPN, DeepLabV3Plus... Detection: CenterNet "
            "(RS Deep's anchor-free detector on the ENCODER; trains from scratch in CPU minutes), CenterNetOBB (the same "
            "detector with rotated boxes: oriented objects such as buildings, ships, vehicles) or the "
            "torchvision detectors listed. With INIT_FROM, auto builds the package's own network (its architecture, "
            "encoder and parameters; ENCODER is not used).<br>"
            "<b>Encoder</b> (empty: mobilenet_v2 for segmentation, resnet18 for the other tasks): segmentation: an "
            "encoder of segmentation-models-pytorch (resnet18, resnet34, mobilenet_v2, efficientnet-b0...); patch "
            "classification: a timm classifier (resnet18, "
            "mobilenetv3_small_100, efficientnet_b0...); detection: CenterNet's encoder (an smp encoder), not "
            "used by the torchvision detectors (their backbone belongs to the architecture). Weights start from "
            "scratch unless INIT_FROM or ENCODER_WEIGHTS give them; nothing is downloaded.<br>"
            "<b>Initialise from a model package</b> (INIT_FROM): fine-tune an RS Deep package of the same task (its "
            "folder, .zip, model.json, or a bundled model's name); ONNX models hold no trainable weights and are "
            "refused. Every tensor whose name and shape fit is copied (encoder and decoder); the others, e.g. the "
            "head when the classes differ, start fresh and are listed in the log. An ARCHITECTURE other than auto "
            "must be the package's.<br>"
            "<b>Encoder weights</b> (ENCODER_WEIGHTS): a local .safetensors file of pretrained weights for the "
            "ENCODER (as timm or Hugging Face publish them: conv1.weight, layer1.0.conv1.weight..., with or without "
            "a prefix such as encoder. or model.; classifier tensors fc/head/classifier are ignored). Pickled "
            "checkpoints (.pth, .pt, .ckpt, .bin) are never loaded: convert one to .safetensors once, where you "
            "trust it; the error message gives the one-line command.<br>"
            f"<b>Bands</b>: {BAND_RULE}<br>"
            "<b>Freeze encoder</b> (FREEZE_ENCODER): the encoder is not trained during the first N epochs (its "
            "BatchNorm statistics kept), then it is; 0 = never frozen.<br>"
            "<b>Encoder learning rate factor</b> (ENCODER_LR): the encoder learns at the learning rate times this "
            "factor; 1 = the same; 0.1 is a good start from pretrained weights. The package's model.json "
            "(rs_deep:training lineage) and training_report.json record what the model started from.<br>"
            "<b>Time budget</b> (default 10 minutes) and <b>Epochs</b> (default 100): the run stops after the "
            "budget or the epochs, whichever comes first, with the learning rate annealed over that span, so a "
            "budgeted run ends as a full run does; time budget 0 = no limit (and the only way to train the same "
            "network again from the same SEED: under a budget the schedule depends on the machine's speed). The "
            "defaults were measured on areas "
            "the model never saw (README, 'Training that generalises').<br>"
            f"<b>Batch size, learning rate, tile size</b>: 0 = the task's default ({DEFAULTS_TEXT}). Tile size: "
            "training crops in pixels (segmentation, detection and change: a multiple of 32; patch "
            "classification: the patch size).<br>"
            f"<b>Steps per epoch</b>: batches per epoch (0 = enough to see the training area about twice, at least "
            f"{MIN_STEPS}).<br>"
            "<b>Validation</b>: the fraction of the raster's rows (at the bottom) held back to measure every "
            "epoch (change: the share of square blocks two chips wide, 512 px by default, so a pair needs "
            "at least two blocks to be validated); 0 = none. Not used with CHIPS (their split is).<br>"
            "<b>Augmentations</b>: random flips, 90-degree rotations and brightness/contrast jitter of the "
            "training crops, and for segmentation copy-paste: a share of the crops (" + f"{COPY_PASTE:g}" + ") get "
            "1-3 labelled objects of the training data pasted into them, turned and flipped (a roof in a forest), "
            "which few labels cannot show otherwise (all on by default; random rescaling is always on).<br>"
            "<b>Early stopping patience</b> (default 10): stop after that many epochs without a better validation "
            "metric (IoU, AP50 or accuracy), counted in the second half of the schedule (earlier, at the peak "
            "learning rate, the metric jumps); 0 = train every epoch. The best epoch by the validation metric is "
            "kept either way: on small labels later epochs overfit.<br>"
            "<b>Device</b>: auto picks a CUDA GPU, then Apple MPS, then the CPU.<br>"
            "<b>Precision</b> (advanced): auto trains in bfloat16 mixed precision where the device computes it "
            "natively (a CUDA GPU, a CPU with AVX512-BF16 or AMX: 1.6 times the crops per second of float32 there), "
            "else in float32; the weights and the package stay float32 and validation runs in float32. Detectors "
            "stay float32 under auto. float32: training as in RS Deep 0.15 and earlier.<br>"
            "<b>Model package</b>: the folder written (model.json, model.safetensors, training_report.json, "
            "training_curves.png). "
            "Cancelling keeps the best network trained so far, when an epoch has finished; the message says what "
            "was written."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self.addParameter(RasterInput(self.INPUT, "Input raster (before, for change)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, "Labels (polygons)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field", None, self.LABELS,
                                                      QgsProcessingParameterField.Any, optional=True))
        self.addParameter(NamedEnum(self.TASK, "Task", TASK_LABELS, TASKS, defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(self.MULTI_LABEL, "Multi-label (patch classification: every "
                                                        "class present in a patch)", False, optional=True))
        self.addParameter(RasterInput(self.TARGET, "Target raster (regression)", optional=True))
        self.addParameter(RasterInput(self.INPUT_AFTER, "After raster (change detection)", optional=True))
        self.addParameter(QgsProcessingParameterFile(self.CHIPS, "Chips (instead of raster + labels)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(NamedEnum(self.ARCHITECTURE, "Architecture", ARCHITECTURES, defaultValue=0))
        self.addParameter(QgsProcessingParameterString(self.ENCODER, "Encoder (empty = the task's default)", "",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.TIME_BUDGET, "Time budget (minutes; 0 = no limit)",
                                                       QgsProcessingParameterNumber.Double, TIME_BUDGET_DEFAULT,
                                                       optional=True, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, "Epochs (at most)",
                                                       QgsProcessingParameterNumber.Integer, EPOCHS_DEFAULT, minValue=1))
        self.addParameter(QgsProcessingParameterNumber(self.BATCH_SIZE, "Batch size (0 = the task's default)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.LEARNING_RATE, "Learning rate (0 = the task's default)",
                                                       QgsProcessingParameterNumber.Double, 0, optional=True,
                                                       minValue=0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size (px; 0 = the task's default)",
                                                       QgsProcessingParameterNumber.Integer, 0, optional=True,
                                                       minValue=0))
        advanced = [
            QgsProcessingParameterNumber(self.STEPS_PER_EPOCH, "Steps per epoch (0 = auto)",
                                         QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
            QgsProcessingParameterNumber(self.VALIDATION, "Validation fraction (an edge strip held back: for "
                                         "segmentation the strip whose classes are most like the whole image's, "
                                         "else the bottom rows; 0 = none)",
                                         QgsProcessingParameterNumber.Double, 0.2, optional=True, minValue=0.0,
                                         maxValue=0.5),
            NamedEnum(self.DEVICE, "Device", DEVICES, defaultValue=0),
            NamedEnum(self.PRECISION, "Precision of the training steps", PRECISION_LABELS, list(PRECISIONS),
                      defaultValue=0, optional=True),
            QgsProcessingParameterNumber(self.LABEL_COVER, "Label cover (multi-label: share of a patch a class must "
                                         "cover to be one of its labels)", QgsProcessingParameterNumber.Double,
                                         COVER_DEFAULT, optional=True, minValue=0.0, maxValue=1.0),
            NamedEnum(self.LOSS, "Loss (regression)", LOSS_LABELS, list(LOSSES), defaultValue=0, optional=True),
            QgsProcessingParameterNumber(self.SCALE, "Scale (super-resolution)", QgsProcessingParameterNumber.Integer,
                                         2, optional=True, minValue=2, maxValue=8),
            QgsProcessingParameterNumber(self.EMA, "Weight averaging: decay of the weights' moving average that is "
                                         "validated and packaged (0 = off, the last step's weights)",
                                         QgsProcessingParameterNumber.Double, EMA_DECAY, optional=True, minValue=0.0,
                                         maxValue=0.9999),
            NamedEnum(self.INPUT_SCALING, "Value scaling of the inputs the model will get", INPUT_SCALINGS,
                      INPUT_SCALING_NAMES, defaultValue=0, optional=True),
            QgsProcessingParameterNumber(self.OBJECT_CROPS, "Share of the training crops centred on a labelled "
                                         "object (" + " and ".join(OBJECT_CROPS) + "; empty = the task's default: "
                                         + ", ".join(f"{v} {t}" for t, v in OBJECT_CROPS.items())
                                         + "; the other crops are drawn anywhere)", QgsProcessingParameterNumber.Double,
                                         None, optional=True, minValue=0.0, maxValue=1.0),
            QgsProcessingParameterNumber(self.SEED, "Random seed (crops, augmentations, initial weights: the same seed "
                                         "and settings train the same network on the same device when TIME_BUDGET "
                                         "is 0; under a budget the learning rate follows the clock, so runs differ)",
                                         QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
        ]
        self.addParameter(NamedEnum(self.AUGMENT, "Augmentations", AUGMENTS, AUGMENT_NAMES, allowMultiple=True,
                                    defaultValue=list(range(len(AUGMENTS))), optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.PATIENCE, "Early stopping patience (epochs; 0 = off)",
                                                       QgsProcessingParameterNumber.Integer, PATIENCE_DEFAULT,
                                                       optional=True,
                                                       minValue=0))
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(QgsProcessingParameterFile(self.INIT_FROM, "Initialise from a model package (fine-tune; "
                                                     "folder or model.json)",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        # the picker shows .safetensors first; any name reaches the engine, which explains a pickle's refusal
        self.addParameter(QgsProcessingParameterFile(self.ENCODER_WEIGHTS, "Encoder weights (.safetensors)",
                                                     fileFilter="Safetensors weights (*.safetensors);;All files (*.*)",
                                                     optional=True))
        for p in (QgsProcessingParameterNumber(self.FREEZE_ENCODER, "Freeze the encoder for the first epochs",
                                               QgsProcessingParameterNumber.Integer, 0, optional=True, minValue=0),
                  QgsProcessingParameterNumber(self.ENCODER_LR, "Encoder learning rate factor (0.1 from "
                                               "pretrained weights)", QgsProcessingParameterNumber.Double, 1.0,
                                               optional=True, minValue=1e-6, maxValue=10.0)):
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Model package"))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, "Training report (JSON)"))
        self.addOutput(QgsProcessingOutputFile(self.CURVES, "Training curves (PNG)"))

    # ----------------------------------------------------------------------------------------

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        from ..rs_deep_plugin.engine.errors import RSDeepError

        task = self.parameterAsEnumName(parameters, self.TASK, context)
        if self.parameterAsBool(parameters, self.MULTI_LABEL, context) and task != PATCH_CLASSIFICATION.name:
            raise QgsProcessingException(f"MULTI_LABEL is for patch classification (several classes per patch); TASK "
                                         f"is {task}. Set TASK=patch_classification or turn MULTI_LABEL off")
        arch = ARCHITECTURES[self._enum_index(parameters, self.ARCHITECTURE, context)]
        given = (self.parameterAsString(parameters, self.ENCODER, context) or "").strip()
        encoder = given or default_encoder(task)
        epochs = self.parameterAsInt(parameters, self.EPOCHS, context)
        budget = number_or(self, parameters, self.TIME_BUDGET, context, TIME_BUDGET_DEFAULT)
        defaults = TOOLBOX_DEFAULTS[task]
        batch = self.parameterAsInt(parameters, self.BATCH_SIZE, context) or defaults["batch_size"]
        lr = number_or(self, parameters, self.LEARNING_RATE, context, 0) or defaults["lr"]
        tile = self.parameterAsInt(parameters, self.TILE_SIZE, context) or defaults["tile_size"]
        steps = self.parameterAsInt(parameters, self.STEPS_PER_EPOCH, context) or None
        val = number_or(self, parameters, self.VALIDATION, context, 0.2)
        device = self.parameterAsEnumName(parameters, self.DEVICE, context)
        precision = self.parameterAsEnumName(parameters, self.PRECISION, context)
        chosen = self.parameterAsEnumNames(parameters, self.AUGMENT, context) \
            if parameters.get(self.AUGMENT) is not None else AUGMENT_NAMES
        augment = {"flip": "flips" in chosen, "rotate": "rotations" in chosen}
        if "brightness" not in chosen:
            augment.update(brightness=0.0, contrast=0.0, gamma=0.0, noise=0.0)
        patience = number_or(self, parameters, self.PATIENCE, context, PATIENCE_DEFAULT, integer=True)
        ema = number_or(self, parameters, self.EMA, context, EMA_DECAY)
        seed = number_or(self, parameters, self.SEED, context, 0, integer=True)
        object_crops = number_or(self, parameters, self.OBJECT_CROPS, context, None)
        scaling = INPUT_SCALING_VALUES[self.parameterAsEnumName(parameters, self.INPUT_SCALING, context)]
        out_dir = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if not out_dir:
            raise QgsProcessingException("OUTPUT: give the folder to write the model package to")
        if os.path.isfile(out_dir):
            raise QgsProcessingException(f"OUTPUT {out_dir} is a file; give a folder for the model package")
        transfer = self._transfer_options(parameters, context)
        outputs = RunOutputs(self, parameters, context, feedback)
        final_dir = os.path.abspath(out_dir)
        try:  # trained into a hidden folder beside OUTPUT; our files moved into OUTPUT at the end
            staged = outputs.transaction.folder(final_dir, PACKAGE_FILES, "OUTPUT", ours=_rs_deep_package)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        out_dir = staged.tmp
        if task == "detection" and given and arch not in (AUTO, "CenterNet", "CenterNetOBB"):
            push_warning(feedback, f"ENCODER {encoder!r} is only used by CenterNet: the backbone of {arch} "
                                   "belongs to the architecture")
        from ..rs_deep_plugin.engine.training.builders import toolbox_builder
        try:  # auto with INIT_FROM: the package's own network (builder None)
            builder = None if arch == AUTO and transfer["init_from"] else \
                toolbox_builder(task, None if arch == AUTO else arch, encoder)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(final_dir))) or "model"
        common = dict(epochs=epochs, time_budget=budget or None, steps_per_epoch=steps, lr=lr, device=device,
                      precision=precision, name=name, augment=augment, ema_decay=ema, seed=seed, input_scaling=scaling,
                      **transfer)
        common["batch_size"] = batch
        if task == "segmentation":  # copy-paste: segmentation's crops only
            common["paste_prob"] = COPY_PASTE if "copy_paste" in chosen else 0.0
        if object_crops is not None:
            if task in OBJECT_CROPS:
                common["foreground_prob"] = object_crops
            else:
                push_warning(feedback, f"OBJECT_CROPS is for {' and '.join(OBJECT_CROPS)}; {task} samples its crops "
                                       "its own way (ignored)")
        bridge = _Bridge(feedback, 0, 100)
        callbacks = dict(progress=bridge.progress, is_cancelled=bridge.is_cancelled, log=bridge.log)
        feedback.pushInfo("Augmentations: " + (", ".join(AUGMENTS[AUGMENT_NAMES.index(n)] for n in chosen) or "none")
                          + f"; early stopping patience: {patience or 'off'}")

        chips = (self.parameterAsFile(parameters, self.CHIPS, context) or "").strip()
        try:
            with outputs:
                report = self._train(task, chips, parameters, context, feedback, out_dir, builder, tile, val,
                                     patience, common, callbacks, outputs, final_dir)
        except RSDeepError as exc:  # raised before the block
            raise QgsProcessingException(str(exc).replace(out_dir, final_dir)) from exc

        for key in ("package", "report_path", "curves_path"):  # where they are now
            if report.get(key):
                report[key] = report[key].replace(out_dir, final_dir)
        best = report["best"]["epoch"]

        feedback.pushInfo(f"Training finished: {report['epochs_run']} epochs in {report['seconds']:.0f} s on "
                          f"{report['device']}" + (f", the package holds epoch {best}" if best else "")
                          + (" (stopped early)" if report.get("stopped_early") else "")
                          + f"; report: {report['report_path']}")
        feedback.setProgress(100)
        return {self.OUTPUT: report["package"], self.REPORT: report["report_path"],
                self.CURVES: report.get("curves_path")}

    def _transfer_options(self, parameters, context):
        """INIT_FROM, ENCODER_WEIGHTS, FREEZE_ENCODER and ENCODER_LR as the engine's run settings."""
        init_from = (self.parameterAsFile(parameters, self.INIT_FROM, context) or "").strip()
        weights = (self.parameterAsFile(parameters, self.ENCODER_WEIGHTS, context) or "").strip()
        freeze = number_or(self, parameters, self.FREEZE_ENCODER, context, 0, integer=True)
        factor = number_or(self, parameters, self.ENCODER_LR, context, 1.0)
        return {"init_from": resolve_model_path(init_from) or None, "encoder_weights": weights or None,
                "freeze_encoder_epochs": freeze, "encoder_lr_factor": factor}

    def _train(self, task, chips, parameters, context, feedback, out_dir, builder, tile, val, patience, common,
               callbacks, outputs, final_dir):
        """Train into ``out_dir`` (the hidden folder of the run's transaction). A cancel after an epoch keeps the
        best model so far, as the engine does: the transaction is committed, then the cancel reported."""
        from ..rs_deep_plugin.engine.training.chips import load_manifest
        from ..rs_deep_plugin.engine.errors import Cancelled, RSDeepError
        try:
            if chips:
                if task in (REGRESSION.name, SUPER_RESOLUTION.name):
                    raise QgsProcessingException("CHIPS train segmentation, detection or change models; regression "
                                                 "trains from INPUT and TARGET, super-resolution from INPUT")
                if task in (PATCH_CLASSIFICATION.name, INSTANCE_SEGMENTATION.name):
                    raise QgsProcessingException(f"CHIPS train segmentation, detection or change models; "
                                                 f"{TASK_TABLE[task].short} trains from INPUT and LABELS")
                manifest = load_manifest(chips, task)  # clear errors: no manifest, another task, missing files
                common["description"] = (f"Trained by RS Deep on {len(manifest['chips'])} chips of "
                                         f"{manifest['source'].get('image')}")
                feedback.pushInfo(f"Chips: {manifest['split']['train_chips']} for training, "
                                  f"{manifest['split']['val_chips']} for validation ({manifest['root']})")
                report = self._train_from_chips(task, manifest["root"], out_dir, builder, tile, patience, common,
                                                callbacks)
            else:
                report = self._train_from_layers(task, parameters, context, feedback, out_dir, builder, tile, val,
                                                 patience, common, callbacks)
            if feedback.isCanceled() and os.path.isfile(os.path.join(out_dir, "model.json")):
                outputs.transaction.commit()  # cancelled while the package was written: it is whole, keep it
        except Cancelled as exc:
            message = str(exc).replace(out_dir, final_dir)
            if os.path.isfile(os.path.join(out_dir, "model.json")):  # the best model so far: kept, as documented
                outputs.transaction.commit()
            raise QgsProcessingException(message) from exc
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc).replace(out_dir, final_dir)) from exc
        return report

    @staticmethod
    def _train_from_chips(task, folder, out_dir, builder, tile, patience, common, callbacks):
        if task == "segmentation":
            from ..rs_deep_plugin.engine.training.segmentation import train_segmentation
            return train_segmentation(folder, None, out_dir, builder=builder, tile_size=tile, patience=patience,
                                      **common, **callbacks)
        if task == "detection":
            from ..rs_deep_plugin.engine.training.detection import train_detection
            return train_detection(folder, out_dir, builder=builder, tile_size=tile, patience=patience, **common,
                                   **callbacks)
        from ..rs_deep_plugin.engine.training.change import train_change
        return train_change(folder, out_dir, builder=builder, tile_size=tile, patience=patience, **common,
                            **callbacks)

    def _train_from_layers(self, task, parameters, context, feedback, out_dir, builder, tile, val, patience, common,
                           callbacks):
        layer, image = self._raster_file(parameters, self.INPUT, context,
                                         "Give INPUT (a raster layer or file) and LABELS, or CHIPS (a folder written "
                                         "by 'Export training data (chips)')")
        if task == REGRESSION.name:
            return self._train_regression(parameters, context, feedback, image, out_dir, builder, tile, val, patience,
                                          common, callbacks)
        if task == SUPER_RESOLUTION.name:
            from ..rs_deep_plugin.engine.training.superres import train_super_resolution
            scale = number_or(self, parameters, self.SCALE, context, 2, integer=True)
            common = dict(common, description=f"Trained by RS Deep on {os.path.basename(image)} (self-supervised, "
                                              f"x{scale})")
            return train_super_resolution(image, out_dir, scale=scale, builder=builder, tile_size=tile,
                                          val_fraction=val, val_side="bottom", patience=patience, **common,
                                          **callbacks)
        source = self.parameterAsSource(parameters, self.LABELS, context)
        if source is None:
            raise QgsProcessingException("LABELS is not set or not a valid vector layer; choose a polygon layer (or "
                                         "give CHIPS instead of INPUT and LABELS)")
        field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
        layer_name = source.sourceName() or "object"
        pairs = read_labelled_polygons(source, field, layer.crs(), context, feedback, "LABELS")
        check_overlap(pairs, layer, "LABELS")
        common = dict(common, description=f"Trained by RS Deep on {os.path.basename(image)} with "
                                          f"{source.sourceName()} ({len(pairs)} features)")
        styled = self.parameterAsVectorLayer(parameters, self.LABELS, context)

        def colors_for(class_names, kind):
            colors = label_colors(styled, field, class_names, kind)
            if colors:
                feedback.pushInfo("Class colours from the labels layer's style: " + ", ".join(
                    f"{n} #{c}" for n, c in zip(class_names, colors)))
            return colors

        if task == "segmentation":
            from ..rs_deep_plugin.engine.training.segmentation import train_segmentation
            class_names, labels = map_classes(task, pairs, field, layer_name)
            feedback.pushInfo("Classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
            return train_segmentation(image, labels, out_dir, class_names=class_names,
                                      class_colors=colors_for(class_names, task), builder=builder,
                                      tile_size=tile, val_fraction=val, val_side=AUTO_SIDE, patience=patience,
                                      **common, **callbacks)
        if task in OBJECT_TASKS:
            from ..rs_deep_plugin.engine.training.data import DetectionSample, split_sample
            from ..rs_deep_plugin.engine.training.detection import DetectionTask, train_detection
            from ..rs_deep_plugin.engine.training.instances import InstanceTask
            from ..rs_deep_plugin.engine.models.arch_centernet import is_oriented
            from ..rs_deep_plugin.engine.training.transfer import read_init_package
            class_names, labels = map_classes(task, pairs, field, layer_name)
            start = common.get("init_from")
            oriented = is_oriented(builder if builder is not None or not start
                                   else read_init_package(start, task).builder)
            instances = task == INSTANCE_SEGMENTATION.name
            if oriented or instances:  # the polygons: their minimum rotated rectangles are the boxes, or the objects
                boxes = [(g, v) for g, v in labels]
            else:
                boxes = [(*g.bounds, v) for g, v in labels]  # map coordinates: the engine maps them onto the raster
            kind = "objects (polygons)" if instances else "rotated boxes" if oriented else "boxes"
            feedback.pushInfo(f"{len(boxes)} {kind}; classes: " + ", ".join(class_names))
            sample = DetectionSample(image, boxes, name=os.path.basename(image), coords="map")
            samples, val_samples = [sample], None
            if val > 0:
                train_part, held = split_sample(sample, val, "bottom", size=(layer.width(), layer.height()))
                samples, val_samples = [train_part], [held]
            return train_detection(samples, out_dir, class_names=class_names,
                                   class_colors=colors_for(class_names, task), val_samples=val_samples,
                                   builder=builder, tile_size=tile, patience=patience,
                                   task_type=InstanceTask if instances else DetectionTask, **common, **callbacks)
        if task == "change":
            return self._train_change(parameters, context, feedback, image, pairs, field, out_dir, builder, tile,
                                      val, patience, common, callbacks, colors_for)

        if self.parameterAsBool(parameters, self.MULTI_LABEL, context):
            from ..rs_deep_plugin.engine.training.multilabel import train_multilabel_patches
            class_names, labels = map_multilabel_classes(pairs, field, layer_name)
            cover = number_or(self, parameters, self.LABEL_COVER, context, COVER_DEFAULT)
            feedback.pushInfo("Multi-label classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
                              + f"; a patch's labels: the classes covering at least {cover:g} of it")
            return train_multilabel_patches(image, labels, out_dir, class_names=class_names,
                                            class_colors=colors_for(class_names, task), builder=builder,
                                            patch_size=tile, val_fraction=val, val_side="bottom", cover=cover,
                                            patience=patience, **common, **callbacks)
        from ..rs_deep_plugin.engine.training.patches import train_patches
        class_names, labels, background = map_patch_classes(pairs, field, layer_name, feedback)
        feedback.pushInfo("Classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
        return train_patches(image, labels, out_dir, class_names=class_names,
                             class_colors=colors_for(class_names, task), background_class=background,
                             builder=builder, patch_size=tile, val_fraction=val, val_side="bottom",
                             patience=patience, **common, **callbacks)

    def _raster_file(self, parameters, name, context, missing):
        """(layer, its file) of the raster parameter ``name``; ``missing``: the message when it is not set."""
        layer = read_raster_layer(self, parameters, name, context)  # a path is never loaded as a QGIS layer
        if layer is None or not layer.isValid():
            raise QgsProcessingException(missing)
        return layer, raster_file(layer, name)

    def _train_regression(self, parameters, context, feedback, image, out_dir, builder, tile, val, patience, common,
                          callbacks):
        """Regression from INPUT and TARGET (a raster of the values to learn, resampled onto INPUT's grid)."""
        from ..rs_deep_plugin.engine.training.regression import train_regression
        target_layer, target = self._raster_file(parameters, self.TARGET, context,
                                                 "Regression learns the values of a raster: set TARGET (a raster "
                                                 "layer or file of the values per pixel, any grid) with INPUT; LABELS "
                                                 "are not used")
        loss = self.parameterAsEnumName(parameters, self.LOSS, context) \
            if parameters.get(self.LOSS) not in (None, "") else LOSSES[0]
        name = target_layer.name() or "value"
        feedback.pushInfo(f"Target: {name} ({os.path.basename(target)}), {loss.upper()} loss")
        common = dict(common, description=f"Trained by RS Deep on {os.path.basename(image)} against "
                                          f"{os.path.basename(target)}")
        return train_regression(image, target, out_dir, target_name=name, builder=builder, tile_size=tile,
                                val_fraction=val, val_side="bottom", loss=loss, patience=patience, **common,
                                **callbacks)

    def _train_change(self, parameters, context, feedback, image, pairs, field, out_dir, builder, tile, val,
                      patience, common, callbacks, colors_for):
        """Change from two rasters and the change polygons (:func:`train_change_from_rasters`: chips of both
        dates in a temporary folder, validated by the export's spatial-block split)."""
        from ..rs_deep_plugin.engine.training.change import train_change_from_rasters
        from qgis.core import QgsProcessingUtils
        _, after = self._raster_file(parameters, self.INPUT_AFTER, context,
                                     "Change detection needs two dates: set INPUT (before) and INPUT_AFTER (after), "
                                     "with LABELS marking the changed areas")
        class_names, labels = map_classes("change", pairs, field, "change")
        feedback.pushInfo("Classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
        return train_change_from_rasters(image, after, labels, out_dir, class_names=class_names,
                                         class_colors=colors_for(class_names, "change"), val_fraction=val,
                                         tile_size=tile, temp_dir=QgsProcessingUtils.tempFolder(), builder=builder,
                                         patience=patience, **common, **callbacks)
