"""Deepness conformance: Deepness's own dummy ONNX models and test raster (tests/data/deepness, Apache-2.0, see
ATTRIBUTION.md) through RS Deep's engine and Processing algorithms, against the values Deepness's tests assert
(test/test_map_processor_*.py of PUTvision/qgis-plugin-deepness)."""
import numpy as np
import pytest
import rasterio

from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.onnx.package import load_onnx_package

from conftest import DATA

DEEPNESS = DATA / "deepness"
FOTOMAP = DEEPNESS / "dummy_fotomap_small.tif"  # 1243 x 841 px at 2 cm
SEG = DEEPNESS / "segmentation"
RED = DEEPNESS / "one_output_sigmoid_red_detector.onnx"


def _run(alg, params):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())


def _names(path):
    return [c.name for c in load_onnx_package(path).classes]


def test_class_names_one_dict_per_output():
    # test_map_processor_segmentation_many_output_types: get_channel_name(0, 0) == 'background', (0, 1) == 'Coffee'
    assert _names(SEG / "one_output_sigmoid_bsx1x512x512.onnx") == ["background", "Coffee"]
