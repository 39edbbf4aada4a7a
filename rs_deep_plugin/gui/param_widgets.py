"""Option widgets built from Processing parameter definitions, the values read back from them, and the
definitions' flags."""
from qgis.core import QgsProcessingParameterDefinition, QgsProcessingParameterFile
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QLineEdit, QPushButton,
                                 QSpinBox, QWidget)


def is_hidden(p):
    return bool(p.flags() & QgsProcessingParameterDefinition.FlagHidden)


def is_optional(p):
    return bool(p.flags() & QgsProcessingParameterDefinition.FlagOptional)


class AreaWidget(QWidget):
    """An extent parameter other than the dock's own area (rs_deep:find_similar's QUERY_EXTENT): "Draw on the map"
    and the rectangle drawn, a QgsReferencedRectangle (None until one is drawn). ``draw(callback)`` starts the
    dock's map tool, which calls ``callback(rectangle)``."""

    def __init__(self, draw, description):
        super().__init__()
        self.rectangle = None
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        button = QPushButton("Draw on the map")
        button.setToolTip(description)
        button.clicked.connect(lambda *_: draw(self.set_rectangle))
        self.label = QLabel("none drawn")
        row.addWidget(button)
        row.addWidget(self.label, 1)

    def set_rectangle(self, rect):
        self.rectangle = rect
        self.label.setText(f"{rect.width():.6g} × {rect.height():.6g} ({rect.crs().authid()})")


def option_widget(p, saved=None, draw=None):
    """A widget for a parameter definition, set to the saved value or the definition's default; ``draw``: starts
    the dock's map tool for an extent parameter (:class:`AreaWidget`; without it, extents are not settable)."""
    t = p.type()
    default = p.defaultValue()
    value = saved if saved not in (None, "") else default
    if t in ("number", "distance", "duration", "scale"):
        is_int = t == "number" and p.dataType() == p.Integer
        w = QSpinBox() if is_int else QDoubleSpinBox()
        lo = p.minimum() if p.minimum() > -1e15 else -1e12
        hi = p.maximum() if p.maximum() < 1e15 else 1e12
        if is_int:
            w.setRange(int(max(lo, -2 ** 31 + 1)), int(min(hi, 2 ** 31 - 1)))
        else:
            w.setDecimals(4)
            w.setRange(lo, hi)
        try:
            w.setValue(int(float(value)) if is_int else float(value))
        except (TypeError, ValueError):
            pass
        w.setToolTip(p.description())
        w.setProperty("rs_deep_default", default)
        return w
    if t == "enum":
        w = QComboBox()
        for opt in p.options():
            w.addItem(opt)
        try:
            w.setCurrentIndex(int(value) if value is not None else 0)
        except (TypeError, ValueError):
            pass
        return w
    if t == "boolean":
        w = QCheckBox()
        w.setChecked(str(value).lower() in ("true", "1") if value is not None else False)
        return w
    if t == "string":
        w = QLineEdit()
        w.setText("" if value is None else str(value))
        return w
    if t == "extent" and draw is not None:
        return AreaWidget(draw, p.description())
    if t == "file" and p.behavior() == QgsProcessingParameterFile.File:  # a file to read (rs_deep:find_similar's QUERY image)
        w = QgsFileWidget()
        w.setFilter(p.fileFilter() or "")
        w.setFilePath("" if value is None else str(value))
        w.setToolTip(p.description())
        return w
    return None


def widget_value(w):
    if isinstance(w, AreaWidget):
        return w.rectangle
    if isinstance(w, QgsFileWidget):
        return w.filePath()
    if isinstance(w, (QSpinBox, QDoubleSpinBox)):
        return w.value()
    if isinstance(w, QComboBox):
        return w.currentIndex()
    if isinstance(w, QCheckBox):
        return w.isChecked()
    if isinstance(w, QLineEdit):
        return w.text()
    return None


__all__ = ["option_widget", "widget_value", "is_hidden", "is_optional", "AreaWidget"]
