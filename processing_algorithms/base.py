"""The base of the RS Deep algorithms (the run template, names, group, icon), named enums, feedback, the bundled
models."""
import os

from qgis.core import (QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingParameterDefinition,
                       QgsProcessingParameterEnum)
from qgis.PyQt.QtGui import QIcon

from ..rs_deep_plugin.deps import missing_dependencies, missing_message
from ..rs_deep_plugin.engine.errors import RSDeepError
from ..rs_deep_plugin.engine.models.runners import DEVICE_CHOICES
from .provider_icon import ICON

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(PLUGIN_DIR, "resources", "models")
DEVICES = list(DEVICE_CHOICES)  # the DEVICE choices: the engine's


class RSDeepAlgorithm(QgsProcessingAlgorithm):
    """What every RS Deep algorithm shares: its name (``NAME``, ``DISPLAY_NAME``), its toolbox group (``GROUP_ID``),
    the provider's icon, ``createInstance`` and the run template: :meth:`processAlgorithm` checks the dependencies,
    calls :meth:`process` (parameters in, one engine call, outputs out) and turns an engine error, a cancel included,
    into the ``QgsProcessingException`` Processing shows."""

    NAME = DISPLAY_NAME = None
    GROUP_ID = "apply"
    GROUPS = {"apply": "Apply models", "train": "Train and assess"}

    def name(self):
        return self.NAME

    def displayName(self):  # noqa: N802 (QGIS API)
        return self.DISPLAY_NAME

    def group(self):
        return self.GROUPS[self.GROUP_ID]

    def groupId(self):  # noqa: N802 (QGIS API)
        return self.GROUP_ID

    def icon(self):
        return QIcon(ICON)

    def createInstance(self):  # noqa: N802 (QGIS API)
        return type(self)()

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        try:
            results = self.process(parameters, context, feedback)
        except RSDeepError as exc:  # Cancelled included: its message says that nothing was written
            raise QgsProcessingException(str(exc)) from exc
        feedback.setProgress(100)
        return results

    def process(self, parameters, context, feedback):
        """The algorithm itself: its results, or an exception (``RSDeepError`` or ``QgsProcessingException``)."""
        raise NotImplementedError

    def parameterAsEnumName(self, parameters, name, context):  # noqa: N802 (QGIS style)
        """The chosen option of a ``NamedEnum`` parameter as its name, whether given by index or by name."""
        return self.parameterDefinition(name).names[self._enum_index(parameters, name, context)]

    def parameterAsEnumNames(self, parameters, name, context):  # noqa: N802 (QGIS style)
        """The chosen options of a multiple ``NamedEnum`` parameter as names."""
        definition = self.parameterDefinition(name)
        value = parameters.get(name)
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            return [definition.names[definition.index(v)] for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [definition.names[definition.index(v)] for v in value]
        return [definition.names[i] for i in self.parameterAsEnums(parameters, name, context)]

    def _enum_index(self, parameters, name, context):
        definition = self.parameterDefinition(name)
        value = parameters.get(name)
        if isinstance(value, str) and value.strip().lower() in definition.names:
            return definition.index(value)
        return self.parameterAsEnum(parameters, name, context)


class NamedEnum(QgsProcessingParameterEnum):
    """An enum parameter whose options also have names, so that ``qgis_process`` users and scripts may write
    ``TASK=segmentation`` as well as ``TASK=0`` on every QGIS version (QGIS's own static strings, from 3.24, refuse
    indices). The dialog shows the labels; read the value with ``RSDeepAlgorithm.parameterAsEnumName``."""

    def __init__(self, name, description, labels, names=None, defaultValue=0, allowMultiple=False,
                 optional=False):
        super().__init__(name, description, list(labels), allowMultiple, defaultValue, optional)
        self.names = [n.lower() for n in (names or labels)]

    def clone(self):
        copy = NamedEnum(self.name(), self.description(), self.options(), self.names, self.defaultValue(),
                         self.allowMultiple(), bool(self.flags() & QgsProcessingParameterDefinition.FlagOptional))
        copy.setFlags(self.flags())
        copy.setHelp(self.help())
        return copy

    def index(self, value):
        """The index of an option given by index or name."""
        text = str(value).strip().lower()
        return self.names.index(text) if text in self.names else int(text)

    def checkValueIsAcceptable(self, value, context=None):  # noqa: N802 (QGIS API)
        if isinstance(value, str) and value.strip() and not value.strip().lstrip("-").isdigit():
            parts = value.split(",") if self.allowMultiple() else [value]
            if all(p.strip().lower() in self.names for p in parts):
                return True
        return super().checkValueIsAcceptable(value, context)


def require_dependencies():
    missing = missing_dependencies()
    if missing:
        raise QgsProcessingException(missing_message(missing))


def bundled_models():
    """Names of the model packages shipped in resources/models."""
    if not os.path.isdir(MODELS_DIR):
        return []
    return sorted(d for d in os.listdir(MODELS_DIR) if os.path.isfile(os.path.join(MODELS_DIR, d, "model.json")))


def report_class_areas(feedback, result, classes):
    """The run's size, tiles, device, time and test-time augmentation, then the area of each class (segmentation
    and change)."""
    feedback.pushInfo(f"{result.width} x {result.height} px, {result.tiles_run}/{result.tiles} tiles run on "
                      f"{result.device} in {result.seconds:.1f} s, test-time augmentation {result.tta}")
    for c in classes:
        feedback.pushInfo(f"  {c.name}: {result.class_pixels.get(c.value, 0) * result.pixel_area_m2:,.1f} m²")


class FeedbackBridge:
    """Engine progress/cancel callbacks -> QgsProcessingFeedback."""

    def __init__(self, feedback, start=0.0, end=100.0):
        self.feedback = feedback
        self.start, self.end = start, end

    def progress(self, fraction, message=None):
        if message:
            self.feedback.pushInfo(message)
        if fraction is not None:
            self.feedback.setProgress(self.start + (self.end - self.start) * fraction)

    def is_cancelled(self):
        return self.feedback.isCanceled()

    def log(self, message):
        self.feedback.pushInfo(message)

    @property
    def callbacks(self):
        """``progress``, ``is_cancelled`` and ``log`` as the engine's keyword arguments."""
        return {"progress": self.progress, "is_cancelled": self.is_cancelled, "log": self.log}
