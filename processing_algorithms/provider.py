"""The "RS Deep" Processing provider (id ``rs_deep``)."""

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .segment import SegmentAlgorithm
from .change import ChangeAlgorithm
from .patches import PatchClassificationAlgorithm
from .detect import DetectAlgorithm
from .instances import SegmentInstancesAlgorithm
from .predict_raster import PredictRasterAlgorithm
from .similar import FindSimilarAlgorithm
from .assess import AssessAccuracyAlgorithm
from .train import TrainAlgorithm
from .export_onnx import ExportOnnxAlgorithm
from .export_training_data import ExportTrainingDataAlgorithm

from .provider_icon import ICON


class RSDeepProvider(QgsProcessingProvider):
    def id(self):
        return "rs_deep"

    def name(self):
        return "RS Deep"

    def longName(self):  # noqa: N802 (QGIS API)
        return "RS Deep: deep learning on remote-sensing imagery"

    def icon(self):
        return QIcon(ICON)

    def svgIconPath(self):  # noqa: N802 (QGIS API)
        return ICON

    def loadAlgorithms(self):  # noqa: N802 (QGIS API)
        self.addAlgorithm(SegmentAlgorithm())
        self.addAlgorithm(ChangeAlgorithm())
        self.addAlgorithm(PatchClassificationAlgorithm())
        self.addAlgorithm(DetectAlgorithm())
        self.addAlgorithm(SegmentInstancesAlgorithm())
        self.addAlgorithm(PredictRasterAlgorithm())
        self.addAlgorithm(FindSimilarAlgorithm())
        self.addAlgorithm(ExportTrainingDataAlgorithm())
        self.addAlgorithm(TrainAlgorithm())
        self.addAlgorithm(AssessAccuracyAlgorithm())
        self.addAlgorithm(ExportOnnxAlgorithm())
