"""The dock's settings: QgsSettings values under ``rs_deep/``."""
from qgis.core import QgsSettings

PREFIX = "rs_deep/"


def settings_value(key, default=None, type_=None):
    s = QgsSettings()
    if type_ is not None:
        return s.value(PREFIX + key, default, type=type_)
    return s.value(PREFIX + key, default)


def set_setting(key, value):
    QgsSettings().setValue(PREFIX + key, value)


__all__ = ["PREFIX", "settings_value", "set_setting"]
