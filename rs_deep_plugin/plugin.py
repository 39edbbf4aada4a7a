"""QGIS plugin entry: registers the Processing provider (and, with a GUI, the menu/toolbar)."""
import os

from qgis.core import QgsApplication, Qgis, QgsMessageLog

from .deps import missing_dependencies, missing_message

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RSDeepPlugin:
    def __init__(self, iface):
        self.iface = iface  # None under qgis_process
        self.provider = None
        self.actions = []

    # qgis_process and the GUI both call this
    def initProcessing(self):  # noqa: N802 (QGIS API)
        from ..processing_algorithms.provider import RSDeepProvider
        if self.provider is None:
            self.provider = RSDeepProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802 (QGIS API)
        self.initProcessing()
        missing = missing_dependencies()
        if missing:
            QgsMessageLog.logMessage(missing_message(missing), "RS Deep", Qgis.Warning)
            if self.iface is not None:
                self.iface.messageBar().pushMessage("RS Deep", missing_message(missing), Qgis.Warning, 0)

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
