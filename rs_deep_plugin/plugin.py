"""QGIS plugin entry: registers the Processing provider (and, with a GUI, the menu/toolbar)."""
import os

from qgis.core import QgsApplication, Qgis, QgsMessageLog

from .deps import missing_dependencies, missing_message
from .installer import activate, deps_dir

PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MENU = "&RS Deep"


def _keep_triton_out():
    """PyPI's Linux torch brings triton, whose libtriton carries its own LLVM: loading it into the QGIS
    desktop (where Mesa's OpenGL has already loaded the system LLVM) crashes QGIS. torch only probes for
    triton (torch.compile GPU kernels, which RS Deep never uses), so make that probe fail cleanly.
    Set RS_DEEP_ALLOW_TRITON=1 to keep triton importable."""
    import sys
    if os.environ.get("RS_DEEP_ALLOW_TRITON") != "1" and "triton" not in sys.modules:
        sys.modules["triton"] = None  # `import triton` now raises ImportError
        return True
    return False


class RSDeepPlugin:
    def __init__(self, iface):
        self.iface = iface  # None under qgis_process
        self.provider = None
        self.actions = []
        self.toolbar = None
        self.dock = None
        self.deps_message = None
        self.installer_dialog = None
        self.blocked_triton = _keep_triton_out() if iface is not None else False
        # packages installed by the plugin's dependency installer (never QGIS's own site-packages)
        activate(deps_dir(QgsApplication.qgisSettingsDirPath()))

    # qgis_process and the GUI both call this
    def initProcessing(self):  # noqa: N802 (QGIS API)
        from ..processing_algorithms.provider import RSDeepProvider
        if self.provider is None:
            provider = RSDeepProvider()
            # the registry takes ownership and deletes a provider whose id is already registered
            # (another copy of the plugin, or a script that registered it): keep no dangling reference
            if QgsApplication.processingRegistry().addProvider(provider):
                self.provider = provider
            else:
                QgsMessageLog.logMessage("A Processing provider 'rs_deep' is already registered; using it",
                                         "RS Deep", Qgis.Warning)

    def initGui(self):  # noqa: N802 (QGIS API)
        self.initProcessing()
        missing = missing_dependencies()
        if missing:
            QgsMessageLog.logMessage(missing_message(missing), "RS Deep", Qgis.Warning)
            if self.iface is not None:
                self._offer_installer(missing)
        if self.iface is not None:
            self._init_gui_widgets()

    def _init_gui_widgets(self):
        from qgis.PyQt.QtCore import Qt
        from qgis.PyQt.QtGui import QIcon
        from qgis.PyQt.QtWidgets import QAction

        from ..processing_algorithms.provider_icon import ICON
        from .gui.dock import RSDeepDock
        main = self.iface.mainWindow()
        self.dock = RSDeepDock(self.iface, main)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()
        action = QAction(QIcon(ICON), "RS Deep", main)
        action.setObjectName("RSDeepDockAction")
        action.setToolTip("RS Deep: run deep-learning models on raster layers")
        action.setCheckable(True)
        self.dock.setToggleVisibilityAction(action)
        self.dock_action = action
        self.toolbar = self.iface.addToolBar("RS Deep")
        self.toolbar.setObjectName("RSDeepToolbar")
        self.toolbar.addAction(action)
        self.iface.addPluginToRasterMenu(MENU, action)
        install = QAction("Install Python dependencies…", main)
        install.setObjectName("RSDeepInstallAction")
        install.triggered.connect(lambda: self.open_installer())
        self.iface.addPluginToRasterMenu(MENU, install)
        self.actions = [action, install]

    def _offer_installer(self, missing):
        """One message bar entry with a button; nothing is installed until the user asks."""
        from qgis.PyQt.QtWidgets import QPushButton
        bar = self.iface.messageBar()
        item = bar.createMessage("RS Deep", "needs Python packages that are not installed: "
                                 f"{', '.join(missing)}.")
        button = QPushButton("Install dependencies…", item)
        button.clicked.connect(lambda: self.open_installer(missing))
        item.layout().addWidget(button)
        self.deps_message = item
        bar.pushWidget(item, Qgis.Warning, 0)

    def open_installer(self, missing=None):
        from .gui.installer_dialog import InstallerDialog
        parent = self.iface.mainWindow() if self.iface is not None else None
        self.installer_dialog = InstallerDialog(parent, missing=missing)
        if self.dock is not None:
            self.installer_dialog.installFinished.connect(lambda _res: self.dock.refresh_dependencies())
        self.installer_dialog.show()
        return self.installer_dialog

    def unload(self):
        if self.iface is not None:
            for action in self.actions:
                self.iface.removePluginRasterMenu(MENU, action)
            self.actions = []
            if self.toolbar is not None:
                self.iface.mainWindow().removeToolBar(self.toolbar)
                self.toolbar.deleteLater()
                self.toolbar = None
            if self.dock is not None:
                self.dock.shutdown()
                self.iface.removeDockWidget(self.dock)
                self.dock.deleteLater()
                self.dock = None
            if self.deps_message is not None:
                try:
                    self.iface.messageBar().popWidget(self.deps_message)
                except RuntimeError:  # already closed by the user
                    pass
                self.deps_message = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.blocked_triton:
            import sys
            if "triton" in sys.modules and sys.modules["triton"] is None:
                del sys.modules["triton"]
            self.blocked_triton = False
