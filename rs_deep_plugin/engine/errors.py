"""Errors raised by the engine. Every message names what is wrong and how to fix it."""
import importlib


class RSDeepError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ModelPackageError(RSDeepError):
    """A model package is missing, malformed, or does not match its weights."""


class InputError(RSDeepError):
    """An input raster, extent, band choice or output path cannot be used."""


class Cancelled(RSDeepError):
    """The run was cancelled; nothing was written."""

    def __init__(self, message="The run was cancelled; no output was written."):
        super().__init__(message)


class MissingDependency(RSDeepError):
    """A Python package the engine needs is not installed."""


def require(module, name=None):
    """Import ``module`` (e.g. ``"torch"``, ``"segmentation_models_pytorch"``), or raise :class:`MissingDependency`
    naming the package to install (``name``, default the module's) and how. Heavy libraries are imported this way,
    inside the functions that need them, so that the plugin loads without them."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"{name or module} is not installed ({exc}); install the plugin's dependencies "
                                "(README, 'make setup')") from exc
