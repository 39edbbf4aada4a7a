"""RS Deep QGIS plugin."""


def classFactory(iface):  # noqa: N802 (QGIS API)
    from .rs_deep_plugin.plugin import RSDeepPlugin
    return RSDeepPlugin(iface)
