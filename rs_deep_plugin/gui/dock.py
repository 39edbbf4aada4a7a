"""The RS Deep dock panel: pick a raster layer and a model, run, get styled layers in a group.

It drives the same Processing algorithms as the toolbox (rs_deep:segment, rs_deep:detect, ...) through
QgsProcessingAlgRunnerTask in QGIS's task manager, so QGIS stays responsive. Runs queue up and execute one
after another; each shows a progress bar, the elapsed time and a Cancel button.
"""
import html
import os
import re
import time

from qgis.core import (Qgis, QgsApplication, QgsCoordinateTransform, QgsMapLayerProxyModel, QgsMessageLog,
                       QgsProcessing, QgsProcessingAlgRunnerTask, QgsProcessingContext,
                       QgsProcessingFeatureSourceDefinition, QgsProcessingFeedback,
                       QgsProcessingOutputLayerDefinition, QgsProcessingParameterDefinition, QgsProcessingUtils,
                       QgsProject, QgsReferencedRectangle, QgsSettings, QgsUnitTypes, QgsVectorLayer, QgsWkbTypes)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox, QgsMapToolExtent
from qgis.PyQt.QtCore import QObject, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame,
                                 QHBoxLayout, QLabel, QLineEdit, QMenu, QMessageBox, QProgressBar, QPushButton,
                                 QScrollArea, QSpinBox, QToolButton, QVBoxLayout, QWidget)

TAG = "RS Deep"
PREFIX = "rs_deep/"
MAX_RECENT = 8
#: runs larger than this (pixels at the model's GSD; setting rs_deep/confirm_pixels) ask before they start
CONFIRM_PIXELS = 400_000_000
CPU_MPIX_PER_S = 1.0  # a rough CPU rate (make bench: 1.1-1.9 Mpix/s on 2 cores) for the estimate shown

#: model task -> Processing algorithm that runs it
TASK_ALGORITHMS = {
    "segmentation": "rs_deep:segment",
    "detection": "rs_deep:detect",
    "change": "rs_deep:detect_change",
    "patch_classification": "rs_deep:classify_patches",
}
TASK_NAMES = {
    "segmentation": "Semantic segmentation",
    "detection": "Object detection",
    "change": "Change detection",
    "patch_classification": "Patch classification",
}
#: parameters the dock fills itself (everything else of supported types becomes an option widget)
HANDLED = {"MODEL", "EXTENT", "MASK", "DEVICE"}
EXTENT_MODES = [("layer", "Whole layer"), ("canvas", "Current map canvas"),
                ("selected", "Selected features of a polygon layer"), ("drawn", "Rectangle drawn on the map")]


def settings_value(key, default=None, type_=None):
    s = QgsSettings()
    if type_ is not None:
        return s.value(PREFIX + key, default, type=type_)
    return s.value(PREFIX + key, default)


def set_setting(key, value):
    QgsSettings().setValue(PREFIX + key, value)


def _round(x):
    """A figure for a person: two significant digits, thousands separated (0.078, 4.2, 1,300)."""
    return f"{float(f'{x:.2g}'):,.0f}" if x >= 10 else f"{x:.2g}"


def _slug(text):
    return re.sub(r"[^\w.-]+", "_", text).strip("_")[:80] or "run"


def _is_advanced(p):
    return bool(p.flags() & QgsProcessingParameterDefinition.FlagAdvanced)


def _is_hidden(p):
    return bool(p.flags() & QgsProcessingParameterDefinition.FlagHidden)


def _is_optional(p):
    return bool(p.flags() & QgsProcessingParameterDefinition.FlagOptional)


# --------------------------------------------------------------------------------------------- models
class ModelInfo:
    """A model package's card, read once per path and modification time."""

    _cache = {}

    def __init__(self, path, pkg=None, error=None):
        self.path, self.pkg, self.error = path, pkg, error

    @classmethod
    def load(cls, path):
        try:
            key = (path, os.path.getmtime(path))
        except OSError:
            key = (path, None)
        if key not in cls._cache:
            from ..engine.models.package import load_package
            try:
                cls._cache[key] = cls(path, load_package(path))
            except Exception as exc:  # a broken package: show why
                cls._cache[key] = cls(path, error=str(exc))
        return cls._cache[key]

    @property
    def algorithm_id(self):
        return TASK_ALGORITHMS.get(self.pkg.task) if self.pkg else None

    def card_html(self):
        if self.pkg is None:
            return f"<b>Cannot use this model package</b><br>{html.escape(self.error or '')}"
        pkg = self.pkg
        gsd = f"{pkg.gsd:g} m" if pkg.gsd else "any"
        rows = [f"<b>{html.escape(pkg.name)}</b>"]
        if pkg.description:
            rows.append(f"<i>{html.escape(pkg.description)}</i>")
        rows.append(f"Task: {html.escape(TASK_NAMES.get(pkg.task, pkg.task))}")
        rows.append(f"Bands: {html.escape(', '.join(pkg.bands))}")
        rows.append(f"GSD: {gsd} &nbsp; Tile: {pkg.tile_size} px")
        swatches = "".join(
            f"<tr><td style='background-color:#{c.color}' width='18'>&nbsp;</td>"
            f"<td>&nbsp;{html.escape(c.name)}</td></tr>" for c in pkg.classes)
        return "<br>".join(rows) + f"<table cellspacing='2'>{swatches}</table>"


def bundled_model_paths():
    from ...processing_algorithms.base import MODELS_DIR, bundled_models
    return [(name, os.path.join(MODELS_DIR, name)) for name in bundled_models()]


# ------------------------------------------------------------------------------------------ device list
def device_choices():
    """[(label, DEVICE value)]: automatic, the CPU, and every accelerator torch finds (with its name)."""
    try:
        import torch
    except Exception:
        return [("CPU (PyTorch is not installed)", "cpu")]
    items = []
    try:
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            items.append((f"GPU: {', '.join(names)} (CUDA)", "cuda"))
    except Exception:
        pass
    mps = getattr(torch.backends, "mps", None)
    try:
        if mps is not None and mps.is_available():
            items.append(("Apple GPU (MPS)", "mps"))
    except Exception:
        pass
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    auto = f"Automatic: {items[0][0] if items else cpu}"
    return [(auto, "auto")] + items + [(cpu, "cpu")]


# -------------------------------------------------------------------------------------------- the runs
class _Feedback(QgsProcessingFeedback):
    """Keeps the algorithm's error messages (reported from the worker thread) for the message bar."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def reportError(self, error, fatalError=False):  # noqa: N802,N803 (QGIS API)
        self.errors.append(error)
        super().reportError(error, fatalError)


class Run(QObject):
    """One run of an algorithm from the dock: queued -> running -> done / failed / cancelled."""

    QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
    changed = pyqtSignal()
    finished = pyqtSignal(object)

    def __init__(self, name, algorithm_id, parameters, project, iface=None, parent=None):
        super().__init__(parent)
        self.name, self.algorithm_id, self.parameters = name, algorithm_id, parameters
        self.project, self.iface = project, iface
        self.status = self.QUEUED
        self.feedback = _Feedback()
        self.context = None
        self.task = None
        self.started = self.ended = None
        self.layers = []
        self.group = None
        self.message = ""
        self.results = {}

    # -- state
    def is_active(self):
        return self.status in (self.QUEUED, self.RUNNING)

    def elapsed(self):
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    def progress(self):
        return self.feedback.progress()

    # -- running
    def start(self):
        alg = QgsApplication.processingRegistry().algorithmById(self.algorithm_id)
        self.started = time.monotonic()
        self.status = self.RUNNING
        self.changed.emit()
        if alg is None:
            self._finish(False, {}, f"The algorithm {self.algorithm_id} is not available")
            return
        context = QgsProcessingContext()
        context.setProject(self.project)
        context.setFeedback(self.feedback)
        context.setTransformContext(self.project.transformContext())
        context.setEllipsoid(self.project.ellipsoid())
        self.context = context
        QgsMessageLog.logMessage(f"{self.name}: {alg.asPythonCommand(self.parameters, context)}", TAG, Qgis.Info)
        task = QgsProcessingAlgRunnerTask(alg, self.parameters, context, self.feedback)
        task.setDescription(f"RS Deep: {self.name}")
        task.executed.connect(self._executed)
        self.task = task
        if task.isCanceled():  # prepare() failed (e.g. a layer vanished): never reaches the task manager
            self.task = None
            self._executed(False, {})
            return
        QgsApplication.taskManager().addTask(task)

    def cancel(self):
        if self.status == self.QUEUED:
            self.status = self.CANCELLED
            self.message = "Cancelled before it started."
            self.changed.emit()
            self.finished.emit(self)
        elif self.status == self.RUNNING:
            self.feedback.cancel()
            if self.task is not None:
                try:
                    self.task.cancel()
                except RuntimeError:  # the task manager already deleted it
                    pass

    def _executed(self, successful, results):
        self.task = None  # the task manager deletes it
        if self.feedback.isCanceled():
            self._finish(False, {}, None, cancelled=True)
        elif successful:
            self._finish(True, results)
        else:
            error = self.feedback.errors[-1] if self.feedback.errors else "The algorithm failed; see the log."
            self._finish(False, {}, error)

    def _finish(self, ok, results, error=None, cancelled=False):
        self.ended = time.monotonic()
        took = f"{self.elapsed():.1f} s"
        if ok:
            self.results = dict(results)
            try:
                self._load_layers()
                self.status = self.DONE
                self.message = f"Done in {took}: {len(self.layers)} layer(s) in group “{self.name}”."
            except Exception as exc:
                self.status = self.FAILED
                self.message = f"The run finished but its layers could not be loaded: {exc}"
        elif cancelled:
            self.status = self.CANCELLED
            self.message = f"Cancelled after {took}; nothing was added."
        else:
            self.status = self.FAILED
            self.message = error or "Failed."
        log = self.feedback.textLog() if hasattr(self.feedback, "textLog") else ""
        level = {self.DONE: Qgis.Success, self.FAILED: Qgis.Critical}.get(self.status, Qgis.Info)
        QgsMessageLog.logMessage(f"{self.name}: {self.status} ({took}). {self.message}\n{log}".rstrip(), TAG, level)
        if self.iface is not None:
            bar = self.iface.messageBar()
            if self.status == self.DONE:
                bar.pushMessage(TAG, f"{self.name}: {self.message}", Qgis.Success, 6)
            elif self.status == self.FAILED:
                bar.pushMessage(TAG, f"{self.name} failed: {self.message}", Qgis.Critical, 0)
            else:
                bar.pushMessage(TAG, f"{self.name}: {self.message}", Qgis.Info, 4)
        self.context = None if not ok else self.context
        self.changed.emit()
        self.finished.emit(self)

    def _load_layers(self):
        """Load the outputs into a group named after the run, styled by the algorithm's post-processors
        (the same steps as Processing's own result handling, into our group)."""
        context = self.context
        root = self.project.layerTreeRoot()
        loaded = []
        for source, details in context.layersToLoadOnCompletion().items():
            layer = QgsProcessingUtils.mapLayerFromString(source, context, typeHint=details.layerTypeHint)
            if layer is None or not layer.isValid():
                raise RuntimeError(f"cannot open {source}")
            details.setOutputLayerName(layer)
            taken = context.temporaryLayerStore().takeMapLayer(layer)
            loaded.append((taken or layer, details))
        if not loaded:
            return
        self.group = root.insertGroup(0, self.name)
        # vectors above rasters
        loaded.sort(key=lambda ld: 0 if isinstance(ld[0], QgsVectorLayer) else 1)
        for layer, details in loaded:
            self.project.addMapLayer(layer, False)
            self.group.addLayer(layer)
            if details.postProcessor():
                details.postProcessor().postProcessLayer(layer, context, self.feedback)
            self.layers.append(layer)
        self.group.setExpanded(True)


class RunWidget(QFrame):
    """Progress bar, elapsed time and Cancel button of one run."""

    def __init__(self, run, parent=None):
        super().__init__(parent)
        self.run = run
        self.setFrameShape(QFrame.Shape.StyledPanel)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        top = QHBoxLayout()
        self.title = QLabel(f"<b>{html.escape(run.name)}</b>")
        self.title.setWordWrap(True)
        top.addWidget(self.title, 1)
        self.cancel_button = QToolButton()
        self.cancel_button.setText("Cancel")
        self.cancel_button.setToolTip("Cancel this run")
        self.cancel_button.clicked.connect(run.cancel)
        top.addWidget(self.cancel_button)
        layout.addLayout(top)
        row = QHBoxLayout()
        self.bar = QProgressBar()
        self.bar.setRange(0, 100)
        row.addWidget(self.bar, 1)
        self.elapsed = QLabel("queued")
        self.elapsed.setMinimumWidth(60)
        row.addWidget(self.elapsed)
        layout.addLayout(row)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setVisible(False)
        layout.addWidget(self.status)
        run.changed.connect(self.refresh)
        self.refresh()

    def refresh(self):
        run = self.run
        if run.status == Run.RUNNING:
            self.bar.setValue(int(run.progress()))
            self.elapsed.setText(_fmt_time(run.elapsed()))
        elif run.status == Run.QUEUED:
            self.elapsed.setText("queued")
        else:
            if run.status == Run.DONE:
                self.bar.setValue(100)
            self.elapsed.setText(_fmt_time(run.elapsed()))
            self.cancel_button.setVisible(False)
            colour = {Run.DONE: "#2e7d32", Run.FAILED: "#c62828"}.get(run.status, "#555555")
            self.status.setText(f"<span style='color:{colour}'>{html.escape(run.message)}</span>")
            self.status.setVisible(True)


def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


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
        self.draw_button.clicked.connect(self.start_drawing)
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
        rasters = [p for p in alg.parameterDefinitions() if p.type() == "raster" and not _is_hidden(p)]
        layers = QgsProject.instance().mapLayers().values()
        used = []
        for p in rasters:
            combo = QgsMapLayerComboBox()
            combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
            combo.setAllowEmptyLayer(_is_optional(p))
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
            if p.name() in HANDLED or p.name() in self.layer_combos or _is_hidden(p) or p.isDestination():
                continue
            widget = _option_widget(p, settings_value(saved + p.name()))
            if widget is None:
                if not _is_optional(p):
                    self.options_form.addRow(QLabel(f"{p.description()}: not settable here; use the toolbox"))
                continue
            self.options_form.addRow(p.description(), widget)
            self.option_widgets[p.name()] = (p, widget)
        for p in alg.destinationParameterDefinitions():
            if _is_hidden(p):
                continue
            check = QCheckBox(p.description())
            default = settings_value(saved + "out_" + p.name(), None)
            on = p.createByDefault() if default is None else str(default).lower() in ("true", "1")
            check.setChecked(on or not _is_optional(p))
            check.setEnabled(_is_optional(p))
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

    def start_drawing(self):
        canvas = self._canvas()
        if canvas is None:
            return
        self._previous_tool = canvas.mapTool()
        self._map_tool = QgsMapToolExtent(canvas)
        self._map_tool.extentChanged.connect(self._extent_drawn)
        canvas.setMapTool(self._map_tool)

    def _extent_drawn(self, rect):
        canvas = self._canvas()
        if rect.isEmpty():
            return
        self.set_drawn_extent(QgsReferencedRectangle(rect, canvas.mapSettings().destinationCrs()))
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
            value = _widget_value(widget)
            params[name] = value
            set_setting(saved + name, value)
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


def _option_widget(p, saved=None):
    """A widget for a parameter definition, set to the saved value or the definition's default."""
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
    return None


def _widget_value(w):
    if isinstance(w, (QSpinBox, QDoubleSpinBox)):
        return w.value()
    if isinstance(w, QComboBox):
        return w.currentIndex()
    if isinstance(w, QCheckBox):
        return w.isChecked()
    if isinstance(w, QLineEdit):
        return w.text()
    return None


__all__ = ["RSDeepDock", "Run", "RunWidget", "ModelInfo", "TASK_ALGORITHMS", "device_choices"]
