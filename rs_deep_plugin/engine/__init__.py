"""RS Deep's engine: deep learning on rasters, QGIS-free (README "Architecture").

Layout, each layer importing only the ones above it in this list:

* ``errors``, ``progress``, ``files``, ``limits``, ``tasks``: what every part uses;
* ``geo/``: rasters and vectors in and out (reading, writing, date pairs, labels, polygons);
* ``models/``: model packages, the architecture allow-list, the runners (torch and ONNX);
* ``inference/``: tiled inference per task (segment, change, detect, patches, predict: regression and
  super-resolution, similar: similarity search) on one shared pipeline;
* ``training/``: training data, chips, samplers, one training loop, one trainer per task;
* ``evaluation/``: accuracy assessment and baselines; ``evaluation/metrics.py`` is a numpy-only leaf.

The public entry points below are imported on first use, so ``import rs_deep.rs_deep_plugin.engine`` stays
cheap (torch, rasterio and shapely load only when a function that needs them runs)::

    from rs_deep.rs_deep_plugin.engine import segment, terminal_progress
    segment("scene.tif", "model_folder", "classes.tif", progress=terminal_progress())
"""
import importlib

#: public name -> the module (relative to this package) that defines it
API = {
    # inference
    "segment": "inference.segment", "SegmentationResult": "inference.segment",
    "detect_change": "inference.change", "class_polygons": "inference.segment",
    "detect": "inference.detect", "DetectionResult": "inference.detect",
    "classify_patches": "inference.patches",
    "predict_raster": "inference.predict", "RasterPrediction": "inference.predict",
    "find_similar": "inference.similar", "SimilarityResult": "inference.similar",
    "vectorize": "geo.vectorize",
    # models
    "load_package": "models.loading", "save_package": "models.package", "ModelPackage": "models.package",
    "ModelClass": "models.package", "build_model": "models.architectures", "select_device": "models.runners",
    "export_onnx": "models.onnx.export",
    # training
    "export_training_data": "training.chips", "load_manifest": "training.chips",
    "train_segmentation": "training.segmentation", "train_detection": "training.detection",
    "train_change": "training.change", "train_patches": "training.patches",
    "train_regression": "training.regression", "train_super_resolution": "training.superres",
    # evaluation
    "assess_segmentation": "evaluation.accuracy", "assess_detection": "evaluation.accuracy",
    # common
    "Progress": "progress", "terminal_progress": "progress", "OutputTransaction": "geo.outputs",
    "RSDeepError": "errors", "InputError": "errors", "ModelPackageError": "errors", "Cancelled": "errors",
    "MissingDependency": "errors",
}
__all__ = sorted(API)


def __getattr__(name):
    if name not in API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(API))
