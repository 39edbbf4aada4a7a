"""The few QGIS/Qt APIs that differ between QGIS 3.22 ... 3.44 (Qt5) and QGIS 4.x (Qt6), in one place.

Everything else in the plugin uses forms that work on all of them (scoped Qt enums, ``exec()``); this module
holds the rest, so no version check is scattered through the code. Checked statically by tools/qt6_check.py.
"""
from qgis.core import Qgis, QgsField, QgsFields, QgsMapLayer

QGIS_VERSION = Qgis.QGIS_VERSION_INT

if QGIS_VERSION >= 33800:  # QgsField(name, QVariant.Type) is deprecated from 3.38 (and gone with Qt6's QVariant)
    from qgis.PyQt.QtCore import QMetaType
    _TYPES = {"int": QMetaType.Type.Int, "int64": QMetaType.Type.LongLong, "double": QMetaType.Type.Double,
              "string": QMetaType.Type.QString}
else:
    from qgis.PyQt.QtCore import QVariant
    _TYPES = {"int": QVariant.Int, "int64": QVariant.LongLong, "double": QVariant.Double, "string": QVariant.String}


def make_fields(*spec):
    """``QgsFields`` from ``(name, kind)`` pairs, kind one of int, int64, double, string."""
    fields = QgsFields()
    for name, kind in spec:
        fields.append(QgsField(name, _TYPES[kind]))
    return fields


def save_default_style(layer):
    """Write the layer's style as its default (``<file>.qml`` beside a file layer); returns success."""
    if QGIS_VERSION >= 32600:  # the overload without categories is deprecated from 3.26
        _msg, ok = layer.saveDefaultStyle(QgsMapLayer.StyleCategory.AllStyleCategories)
    else:
        _msg, ok = layer.saveDefaultStyle()
    return ok


def push_warning(feedback, message):
    """A warning for the Processing log, the dock and ``qgis_process`` (a ``WARNING:`` line), never an ``ERROR:``.
    QGIS 3.22's ``qgis_process`` prints nothing for ``pushWarning``: there it becomes an info line that says so."""
    if QGIS_VERSION >= 32800:
        feedback.pushWarning(message)
    else:
        feedback.pushInfo(f"Warning: {message}")
