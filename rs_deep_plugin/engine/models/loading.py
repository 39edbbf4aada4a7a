"""Any model file a user gives -> a :class:`.package.ModelPackage`: an RS Deep package (folder or zip) or a
single-file ONNX model (Deepness / GeoDeep, or exported by RS Deep). Loading never causes network traffic."""
import os

from .architectures import force_offline
from .onnx.package import load_onnx_package
from .package import ModelPackage, read_package


def is_onnx_path(path):
    return path is not None and not isinstance(path, ModelPackage) and os.fspath(path).lower().endswith(".onnx")


def load_package(path, task=None):
    """Read and validate the model at ``path`` (package folder, zip or ``.onnx``); ``task`` checks it is the
    right kind of model."""
    force_offline()  # loading a model never causes network traffic (see architectures.force_offline)
    if is_onnx_path(path):  # optional ONNX backend
        return load_onnx_package(path, task=task)
    return read_package(path, task=task)


__all__ = ["load_package", "is_onnx_path"]
