"""The RS Deep dock panel: pick a raster layer and a model, run, get styled layers in a group.

It drives the same Processing algorithms as the toolbox (rs_deep:segment, rs_deep:detect, ...) through
QgsProcessingAlgRunnerTask in QGIS's task manager, so QGIS stays responsive. Runs (runs.py) queue up and run one
after another; each shows a progress bar, the elapsed time and a Cancel button.
"""
import html
import os
import re
import time

from qgis.core import (Qgis, QgsApplication, QgsCoordinateTransform, QgsMapLayerProxyModel, QgsMessageLog,
                       QgsProcessing, QgsProcessingFeatureSourceDefinition, QgsProcessingOutputLayerDefinition,
                       QgsProject, QgsReferencedRectangle, QgsUnitTypes, QgsWkbTypes)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox, QgsMapToolExtent
from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QMenu,
                                 QMessageBox, QPushButton, QScrollArea, QToolButton, QVBoxLayout, QWidget)

from .model_card import ModelInfo, device_choices
from .param_widgets import AreaWidget, is_hidden, is_optional, option_widget, widget_value
from .runs import TAG, Run, RunWidget
from .settings import set_setting, settings_value

MAX_RECENT = 8
#: runs larger than this (pixels at the model's GSD; setting rs_deep/confirm_pixels) ask before they start
CONFIRM_PIXELS = 400_000_000
CPU_MPIX_PER_S = 1.0  # a rough CPU rate (make bench: 1.1-1.9 Mpix/s on 2 cores) for the estimate shown

#: parameters the dock fills itself (everything else of supported types becomes an option widget)
HANDLED = {"MODEL", "EXTENT", "MASK", "DEVICE"}
EXTENT_MODES = [("layer", "Whole layer"), ("canvas", "Current map canvas"),
                ("selected", "Selected features of a polygon layer"), ("drawn", "Rectangle drawn on the map")]


def _round(x):
    """A figure for a person: two significant digits, thousands separated (0.078, 4.2, 1,300)."""
    return f"{float(f'{x:.2g}'):,.0f}" if x >= 10 else f"{x:.2g}"


def _option_key(saved, name):
    """The setting that keeps an option: per algorithm (``saved``), but CLUSTER, the Dask cluster of every inference
    algorithm, is one setting."""
    return "cluster" if name == "CLUSTER" else saved + name


def _slug(text):
    return re.sub(r"[^\w.-]+", "_", text).strip("_")[:80] or "run"


# -------------------------------------------------------------------------------------------- the dock
class RSDeepDock(QgsDockWidget):
    runFinished = pyqtSignal(object)  # Run

    def __init__(self, iface=None, parent=None):
        super().__init__("RS Deep", parent)
        self.setObjectName("RSDeepDock")
        self.iface = iface
        self.runs = []
        self.option_widgets = {}
        self.layer_combos = {}
        self.destination_checks = {}
        self.algorithm_id = None
        self.model_info = None
        self.drawn_extent = None
        self._map_tool = None
        self._previous_tool = None
        self._on_drawn = None  # what the rectangle drawn is for (start_drawing)
        self._devices_filled = False
        self.mask_param = None
        self._installer_dialog = None

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        body = QWidget()
        scroll.setWidget(body)
        self.setWidget(scroll)
        main = QVBoxLayout(body)

        self.deps_banner = QLabel()
        self.deps_banner.setWordWrap(True)
        self.deps_banner.setVisible(False)
        self.deps_banner.linkActivated.connect(lambda _: self.open_installer())
        main.addWidget(self.deps_banner)

        # model
        model_box = QgsCollapsibleGroupBox("Model")
        mform = QVBoxLayout(model_box)
        row = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(16)
        row.addWidget(self.model_combo, 1)
        self.browse_button = QToolButton()
        self.browse_button.setText("…")
        self.browse_button.setToolTip("Open a model package (folder, .zip or model.json)")
        self.browse_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.browse_button)
        menu.addAction("Package folder…", self.browse_folder)
        menu.addAction("Package .zip or model.json…", self.browse_file)
        self.browse_button.setMenu(menu)
        row.addWidget(self.browse_button)
        mform.addLayout(row)
        self.card = QLabel()
        self.card.setWordWrap(True)
        self.card.setTextFormat(Qt.TextFormat.RichText)
        mform.addWidget(self.card)
        main.addWidget(model_box)

        # inputs
        self.inputs_box = QgsCollapsibleGroupBox("Input")
        self.inputs_form = QFormLayout(self.inputs_box)
        main.addWidget(self.inputs_box)

        # extent
        extent_box = QgsCollapsibleGroupBox("Area and device")
        eform = QFormLayout(extent_box)
        self.extent_combo = QComboBox()
        for key, label in EXTENT_MODES:
            self.extent_combo.addItem(label, key)
        eform.addRow("Extent", self.extent_combo)
        self.polygon_combo = QgsMapLayerComboBox()
        self.polygon_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        eform.addRow("Polygons", self.polygon_combo)
        self.draw_button = QPushButton("Draw on the map")
        self.draw_button.clicked.connect(lambda *_: self.start_drawing())
        self.drawn_label = QLabel("no rectangle yet")
        drow = QHBoxLayout()
        drow.addWidget(self.draw_button)
        drow.addWidget(self.drawn_label, 1)
        self.draw_row = QWidget()
        self.draw_row.setLayout(drow)
        eform.addRow("", self.draw_row)
        self.device_combo = QComboBox()
        eform.addRow("Device", self.device_combo)
        self.extent_form = eform
        self.extent_combo.currentIndexChanged.connect(self._extent_mode_changed)
        main.addWidget(extent_box)

        # options generated from the algorithm's parameter definitions
        self.options_box = QgsCollapsibleGroupBox("Options")
        self.options_box.setCollapsed(True)
        self.options_form = QFormLayout(self.options_box)
        self.options_form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        main.addWidget(self.options_box)

        # outputs
        out_box = QgsCollapsibleGroupBox("Outputs")
        self.outputs_form = QFormLayout(out_box)
        self.output_dir = QgsFileWidget()
        self.output_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.output_dir.setToolTip("Folder for the result files; empty: temporary files (deleted when QGIS exits)")
        self.output_dir.lineEdit().setPlaceholderText("[temporary files]")
        self.outputs_form.addRow("Folder", self.output_dir)
        self.outputs_checks_row = QVBoxLayout()
        self.outputs_form.addRow(self.outputs_checks_row)
        main.addWidget(out_box)

        self.run_button = QPushButton("Run")
        self.run_button.setIcon(QIcon(_icon()))
        self.run_button.clicked.connect(self.run_clicked)
        main.addWidget(self.run_button)

        # runs
        runs_box = QgsCollapsibleGroupBox("Runs")
        rl = QVBoxLayout(runs_box)
        self.runs_layout = QVBoxLayout()
        rl.addLayout(self.runs_layout)
        self.clear_button = QPushButton("Clear finished")
        self.clear_button.clicked.connect(self.clear_finished)
        rl.addWidget(self.clear_button)
        main.addWidget(runs_box)
        main.addStretch(1)

        self.timer = QTimer(self)
        self.timer.setInterval(250)
        self.timer.timeout.connect(self._tick)

        self.refresh_models()
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        mode = settings_value("extent_mode", "layer")
        self.extent_combo.setCurrentIndex(max(0, self.extent_combo.findData(mode)))
        self.output_dir.setFilePath(settings_value("output_dir", ""))
        self._extent_mode_changed()
        self._model_changed()
        self.refresh_dependencies()

    # ------------------------------------------------------------------------------------------ models
    def refresh_models(self, select=None):
        select = select or (self.model_combo.currentData() if self.model_combo.count() else None) \
            or settings_value("last_model", "")
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        seen = set()
        for name, path in bundled_model_paths():
            self.model_combo.addItem(f"{name} (bundled)", path)
            seen.add(os.path.normpath(path))
        recent = [p for p in (settings_value("recent_models", [], list) or []) if p and os.path.exists(p)
                  and os.path.normpath(p) not in seen]
        if recent and self.model_combo.count():
            self.model_combo.insertSeparator(self.model_combo.count())
        for p in recent:
            self.model_combo.addItem(f"{_model_label(p)} (recent)", p)
            seen.add(os.path.normpath(p))
        if select and os.path.exists(select) and os.path.normpath(select) not in seen:
            self.model_combo.addItem(_model_label(select), select)
        index = self._model_index(select) if select else -1
        self.model_combo.setCurrentIndex(index if index >= 0 else (0 if self.model_combo.count() else -1))
        self.model_combo.blockSignals(False)

    def _model_index(self, path):
        for i in range(self.model_combo.count()):
            data = self.model_combo.itemData(i)
            if data and os.path.normpath(data) == os.path.normpath(path):
                return i
        return -1

    def set_model(self, path):
        """Select a model package (adds it to the list)."""
        path = os.path.abspath(path)
        if self._model_index(path) < 0:
            self.model_combo.addItem(_model_label(path), path)
        self.model_combo.setCurrentIndex(self._model_index(path))
        self._model_changed()

    def browse_folder(self):
        path = QFileDialog.getExistingDirectory(self, "Model package folder", settings_value("browse_dir", ""))
        if path:
            set_setting("browse_dir", os.path.dirname(path))
            self._remember_model(path)
            self.set_model(path)

    def browse_file(self):
        path, _ = QFileDialog.getOpenFileName(self, "Model package", settings_value("browse_dir", ""),
                                              "Model packages (*.zip model.json);;All files (*)")
        if path:
            set_setting("browse_dir", os.path.dirname(path))
            self._remember_model(path)
            self.set_model(path)

    def _remember_model(self, path):
        set_setting("last_model", path)
        bundled = {os.path.normpath(p) for _, p in bundled_model_paths()}
        if os.path.normpath(path) in bundled:
            return
        recent = [p for p in (settings_value("recent_models", [], list) or []) if p != path]
        set_setting("recent_models", ([path] + recent)[:MAX_RECENT])

    def _model_changed(self, *_):
        path = self.model_combo.currentData()
        self.model_info = ModelInfo.load(path) if path else None
        if self.model_info is None:
            self.card.setText("<i>No model: choose a package with “…”.</i>")
            self._set_algorithm(None)
            return
        card = self.model_info.card_html()
        alg_id = self.model_info.algorithm_id
        if self.model_info.pkg is not None:
            if alg_id is None or QgsApplication.processingRegistry().algorithmById(alg_id) is None:
                card += (f"<br><span style='color:#c62828'>This version of RS Deep cannot run "
                         f"{html.escape(self.model_info.pkg.task)} models ({alg_id or 'no algorithm'} is not "
                         "available).</span>")
                alg_id = None
            else:
                card += f"<br><small>Runs {alg_id}</small>"
        self.card.setText(card)
        self._set_algorithm(alg_id)

    # -------------------------------------------------------------------------------- generated widgets
    def algorithm(self):
        return QgsApplication.processingRegistry().algorithmById(self.algorithm_id) if self.algorithm_id else None

    def _set_algorithm(self, alg_id):
        if alg_id == self.algorithm_id and (alg_id is None or self.layer_combos):
            self._update_run_button()
            return
        self.algorithm_id = alg_id
        _clear_form(self.inputs_form)
        _clear_form(self.options_form)
        _clear_layout(self.outputs_checks_row)
        self.layer_combos, self.option_widgets, self.destination_checks = {}, {}, {}
        alg = self.algorithm()
        if alg is None:
            self.inputs_form.addRow(QLabel("<i>Choose a model this version can run.</i>"))
            self._update_run_button()
            return
        rasters = [p for p in alg.parameterDefinitions() if p.type() == "raster" and not is_hidden(p)]
        layers = QgsProject.instance().mapLayers().values()
        used = []
        for p in rasters:
            combo = QgsMapLayerComboBox()
            combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
            combo.setAllowEmptyLayer(is_optional(p))
            # BEFORE/AFTER: start on different layers
            for layer in layers:
                if layer.type() == layer.RasterLayer and layer.id() not in used and len(rasters) > 1:
                    combo.setLayer(layer)
                    break
            if combo.currentLayer() is not None:
                used.append(combo.currentLayer().id())
            combo.layerChanged.connect(self._update_run_button)
            self.inputs_form.addRow(p.description(), combo)
            self.layer_combos[p.name()] = combo
        saved = f"options/{alg.id().replace(':', '_')}/"
        for p in alg.parameterDefinitions():
            if p.name() in HANDLED or p.name() in self.layer_combos or is_hidden(p) or p.isDestination():
                continue
            widget = option_widget(p, settings_value(_option_key(saved, p.name())), draw=self.start_drawing)
            if widget is None:
                if not is_optional(p):
                    self.options_form.addRow(QLabel(f"{p.description()}: not settable here; use the toolbox"))
                continue
            self.options_form.addRow(p.description(), widget)
            self.option_widgets[p.name()] = (p, widget)
        for p in alg.destinationParameterDefinitions():
            if is_hidden(p):
                continue
            check = QCheckBox(p.description())
            default = settings_value(saved + "out_" + p.name(), None)
            on = p.createByDefault() if default is None else str(default).lower() in ("true", "1")
            check.setChecked(on or not is_optional(p))
            check.setEnabled(is_optional(p))
            self.outputs_checks_row.addWidget(check)
            self.destination_checks[p.name()] = (p, check)
        self.mask_param = next((p for p in alg.parameterDefinitions() if p.name() == "MASK"), None)
        self._fill_devices()
        self._update_run_button()

    def _fill_devices(self):
        alg = self.algorithm()
        device_param = next((p for p in alg.parameterDefinitions() if p.name() == "DEVICE"), None) if alg else None
        self.device_combo.setEnabled(device_param is not None)
        if self.isVisible():
            self.ensure_devices()

    def ensure_devices(self):
        """Fill the device list (imports torch: done when the dock is first shown, not at QGIS start-up)."""
        if self._devices_filled:
            return
        self._devices_filled = True
        wanted = settings_value("device", "auto")
        for label, value in device_choices():
            self.device_combo.addItem(label, value)
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findData(wanted)))

    def _update_run_button(self, *_):
        ok = self.algorithm() is not None and all(
            c.currentLayer() is not None for c in self.layer_combos.values() if not c.allowEmptyLayer())
        self.run_button.setEnabled(ok)

    # ------------------------------------------------------------------------------------------- extent
    def _extent_mode_changed(self, *_):
        mode = self.extent_combo.currentData()
        self.polygon_combo.setVisible(mode == "selected")
        label = self.extent_form.labelForField(self.polygon_combo)
        if label is not None:
            label.setVisible(mode == "selected")
        self.draw_row.setVisible(mode == "drawn")
        set_setting("extent_mode", mode)

    def _canvas(self):
        return self.iface.mapCanvas() if self.iface is not None else None

    def start_drawing(self, on_drawn=None):
        """The map tool that draws a rectangle, given to ``on_drawn`` (a QgsReferencedRectangle; default: the dock's
        own area, :meth:`set_drawn_extent`)."""
        canvas = self._canvas()
        if canvas is None:
            return
        self._on_drawn = on_drawn or self.set_drawn_extent
        self._previous_tool = canvas.mapTool()
        self._map_tool = QgsMapToolExtent(canvas)
        self._map_tool.extentChanged.connect(self._extent_drawn)
        canvas.setMapTool(self._map_tool)

    def _extent_drawn(self, rect):
        canvas = self._canvas()
        if rect.isEmpty():
            return
        self._on_drawn(QgsReferencedRectangle(rect, canvas.mapSettings().destinationCrs()))
        if self._previous_tool is not None:
            canvas.setMapTool(self._previous_tool)
        else:
            canvas.unsetMapTool(self._map_tool)

    def set_drawn_extent(self, rect):
        """A QgsReferencedRectangle (what the map tool gives; tests set it directly)."""
        self.drawn_extent = rect
        self.drawn_label.setText(f"{rect.width():.6g} × {rect.height():.6g} ({rect.crs().authid()})")

    def extent_parameters(self):
        """EXTENT (and MASK) for the chosen area mode; raises ValueError with a message for the user."""
        mode = self.extent_combo.currentData()
        if mode == "canvas":
            canvas = self._canvas()
            if canvas is None:
                raise ValueError("No map canvas")
            return {"EXTENT": QgsReferencedRectangle(canvas.extent(), canvas.mapSettings().destinationCrs())}
        if mode == "drawn":
            if self.drawn_extent is None or self.drawn_extent.isEmpty():
                raise ValueError("Draw a rectangle on the map first (“Draw on the map”).")
            return {"EXTENT": self.drawn_extent}
        if mode == "selected":
            layer = self.polygon_combo.currentLayer()
            if layer is None or layer.geometryType() != QgsWkbTypes.PolygonGeometry:
                raise ValueError("Choose a polygon layer for the area.")
            if layer.selectedFeatureCount() == 0:
                raise ValueError(f"Select one or more features of {layer.name()} first.")
            params = {"EXTENT": QgsReferencedRectangle(layer.boundingBoxOfSelected(), layer.crs())}
            if self.mask_param is not None:
                params["MASK"] = QgsProcessingFeatureSourceDefinition(layer.id(), True)
            return params
        return {}

    # ---------------------------------------------------------------------------------------------- run
    def parameters(self, run_name):
        """The algorithm's parameters from the dock's widgets (also saved as the user's settings)."""
        alg = self.algorithm()
        params = {"MODEL": self.model_combo.currentData()}
        for name, combo in self.layer_combos.items():
            if combo.currentLayer() is not None:
                params[name] = combo.currentLayer().id()
        params.update(self.extent_parameters())
        if any(p.name() == "DEVICE" for p in alg.parameterDefinitions()):
            self.ensure_devices()
            dev = self.device_combo.currentData() or "auto"
            p = alg.parameterDefinition("DEVICE")
            options = list(p.options()) if hasattr(p, "options") else []
            params["DEVICE"] = options.index(dev) if dev in options else dev
        saved = f"options/{alg.id().replace(':', '_')}/"
        for name, (p, widget) in self.option_widgets.items():
            value = widget_value(widget)
            if isinstance(widget, AreaWidget):  # drawn for this run, not kept as a setting
                if value is not None:
                    params[name] = value
                continue
            params[name] = value
            set_setting(_option_key(saved, name), value)
        folder = self.output_dir.filePath().strip()
        project = QgsProject.instance()
        for name, (p, check) in self.destination_checks.items():
            set_setting(saved + "out_" + name, check.isChecked())
            if not check.isChecked():
                continue
            if folder:
                ext = p.defaultFileExtension() if hasattr(p, "defaultFileExtension") else "tif"
                sink = os.path.join(folder, f"{_slug(run_name)}_{name.lower()}.{ext}")
            else:
                sink = QgsProcessing.TEMPORARY_OUTPUT
            out = QgsProcessingOutputLayerDefinition(sink, project)
            out.destinationName = p.description()
            params[name] = out
        set_setting("device", self.device_combo.currentData() or "auto")
        set_setting("output_dir", folder)
        return params

    def run_clicked(self):
        return self.start_run()

    def start_run(self):
        """Queue a run with the dock's current choices; returns the Run (or None with a message)."""
        alg = self.algorithm()
        if alg is None:
            self._message("Choose a model this version can run.", Qgis.Warning)
            return None
        missing = _missing_dependencies()
        if missing:
            self.refresh_dependencies()
        names = [c.currentLayer().name() for c in self.layer_combos.values() if c.currentLayer() is not None]
        model = self.model_info.pkg.name if self.model_info and self.model_info.pkg else "model"
        run_name = f"{model} on {' → '.join(names) or 'input'} {time.strftime('%H:%M:%S')}"
        taken = {r.name for r in self.runs}
        root = QgsProject.instance().layerTreeRoot()
        base, n = run_name, 1
        while run_name in taken or root.findGroup(run_name) is not None:
            n += 1
            run_name = f"{base} ({n})"
        try:
            params = self.parameters(run_name)
        except ValueError as exc:
            self._message(str(exc), Qgis.Warning)
            return None
        if not self.confirm_size(params):
            return None
        self._remember_model(self.model_combo.currentData())
        run = Run(run_name, alg.id(), params, QgsProject.instance(), self.iface, self)
        run.finished.connect(self._run_finished)
        widget = RunWidget(run)
        self.runs_layout.insertWidget(0, widget)
        self.runs.append(run)
        self._start_next()
        return run

    def run_pixels(self, params):
        """About how many pixels the run processes at the model's GSD (the input layer over EXTENT), or None."""
        layers = [c.currentLayer() for c in self.layer_combos.values() if c.currentLayer() is not None]
        layer = layers[0] if layers else None
        if layer is None or not hasattr(layer, "rasterUnitsPerPixelX") or layer.width() <= 0:
            return None
        extent = layer.extent()
        area = params.get("EXTENT")
        if area is not None and not area.isEmpty():
            try:
                rect = QgsCoordinateTransform(area.crs(), layer.crs(), QgsProject.instance()).transformBoundingBox(area)
                extent = extent.intersect(rect)
            except Exception:  # a bad transform: estimate on the whole layer
                pass
        px = layer.rasterUnitsPerPixelX() or 1.0
        pixels = (extent.width() / px) * (extent.height() / (layer.rasterUnitsPerPixelY() or px))
        pkg = self.model_info.pkg if self.model_info else None
        if pkg is not None and pkg.gsd and layer.crs().isValid() and not layer.crs().isGeographic():
            metres = px * QgsUnitTypes.fromUnitToUnitFactor(layer.crs().mapUnits(), QgsUnitTypes.DistanceMeters)
            pixels *= (metres / pkg.gsd) ** 2
        return pixels

    def confirm_size(self, params):
        """Above ``confirm_pixels`` (setting; CONFIRM_PIXELS by default) ask before a long run; True = go."""
        pixels = self.run_pixels(params)
        limit = settings_value("confirm_pixels", CONFIRM_PIXELS, float)
        if pixels is None or not limit or pixels <= limit:
            return True
        minutes = pixels / (CPU_MPIX_PER_S * 1e6) / 60
        answer = QMessageBox.question(
            self, "RS Deep: a large run",
            f"This run covers about {_round(pixels / 1e6)} million pixels at the model's resolution: roughly "
            f"{_round(minutes)} minutes on a CPU (a GPU is much faster). Run it? (Set a smaller area to go faster.)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _start_next(self):
        if any(r.status == Run.RUNNING for r in self.runs):
            return
        queued = [r for r in self.runs if r.status == Run.QUEUED]
        if queued:
            queued[0].start()
        if any(r.is_active() for r in self.runs):
            self.timer.start()

    def _run_finished(self, run):
        self.runFinished.emit(run)
        self._start_next()
        if not any(r.is_active() for r in self.runs):
            self.timer.stop()

    def _tick(self):
        for i in range(self.runs_layout.count()):
            w = self.runs_layout.itemAt(i).widget()
            if isinstance(w, RunWidget) and w.run.status == Run.RUNNING:
                w.refresh()

    def clear_finished(self):
        for i in reversed(range(self.runs_layout.count())):
            w = self.runs_layout.itemAt(i).widget()
            if isinstance(w, RunWidget) and not w.run.is_active():
                self.runs_layout.removeWidget(w)
                w.deleteLater()
        self.runs = [r for r in self.runs if r.is_active()]

    def cancel_all(self):
        for r in list(self.runs):
            if r.status == Run.QUEUED:
                r.cancel()
        for r in list(self.runs):
            r.cancel()

    def shutdown(self):
        """Before the plugin unloads: cancel the runs, put the map tool back."""
        self.timer.stop()
        self.cancel_all()
        for r in self.runs:
            try:
                r.finished.disconnect(self._run_finished)
            except TypeError:
                pass
            if r.is_active():  # its task still uses the run's context and feedback: outlive the dock
                r.setParent(None)
                _DETACHED.append(r)
                r.finished.connect(_DETACHED.remove)
        canvas = self._canvas()
        if canvas is not None and self._map_tool is not None and canvas.mapTool() is self._map_tool:
            canvas.unsetMapTool(self._map_tool)

    # ------------------------------------------------------------------------------------- dependencies
    def refresh_dependencies(self):
        missing = _missing_dependencies()
        if missing:
            self.deps_banner.setText(
                "<span style='color:#c62828'><b>Missing Python packages:</b> "
                f"{html.escape(', '.join(missing))}.</span> <a href='install'>Install them…</a>")
        self.deps_banner.setVisible(bool(missing))
        return missing

    def open_installer(self):
        from .installer_dialog import InstallerDialog
        dlg = InstallerDialog(self.iface.mainWindow() if self.iface is not None else self)
        dlg.installFinished.connect(lambda _res: self.refresh_dependencies())
        dlg.show()
        self._installer_dialog = dlg
        return dlg

    def _message(self, text, level=Qgis.Info):
        if self.iface is not None:
            self.iface.messageBar().pushMessage(TAG, text, level, 6)
        QgsMessageLog.logMessage(text, TAG, level)

    def showEvent(self, event):  # noqa: N802 (Qt API)
        super().showEvent(event)
        self.refresh_dependencies()
        self.ensure_devices()


# ----------------------------------------------------------------------------------------------- helpers
_DETACHED = []  # runs still finishing after their dock was closed by a plugin unload


def _missing_dependencies():
    from ..deps import missing_dependencies
    return missing_dependencies()


def bundled_model_paths():
    from ...processing_algorithms.base import MODELS_DIR, bundled_models
    return [(name, os.path.join(MODELS_DIR, name)) for name in bundled_models()]


def _icon():
    from ...processing_algorithms.provider_icon import ICON
    return ICON


def _model_label(path):
    base = os.path.basename(os.path.normpath(path))
    if base == "model.json":
        base = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return base


def _clear_form(form):
    while form.rowCount():
        form.removeRow(0)


def _clear_layout(layout):
    while layout.count():
        item = layout.takeAt(0)
        if item.widget() is not None:
            item.widget().deleteLater()


__all__ = ["RSDeepDock"]
