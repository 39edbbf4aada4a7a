"""The dock's runs: one Processing algorithm run in QGIS's task manager (queued -> running -> done / failed /
cancelled) whose layers load, styled, into a group named after it; and the row that shows its progress."""
import html
import time

from qgis.core import (Qgis, QgsApplication, QgsMessageLog, QgsProcessingAlgRunnerTask, QgsProcessingContext,
                       QgsProcessingFeedback, QgsProcessingUtils, QgsVectorLayer)
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QToolButton, QVBoxLayout

TAG = "RS Deep"


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


__all__ = ["Run", "RunWidget", "TAG"]
