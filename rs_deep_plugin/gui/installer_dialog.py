"""The dependency installer dialog: shows what is missing and what will be done, runs pip with QProcess
(output streamed into the dialog) and says clearly how it went. Never runs without the user's click."""
import html

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, Qt, pyqtSignal
from qgis.PyQt.QtGui import QFontDatabase
from qgis.PyQt.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QPlainTextEdit,
                                 QProgressBar, QPushButton, QVBoxLayout)

from .. import deps, installer

TAG = "RS Deep"


def default_target():
    return installer.deps_dir(QgsApplication.qgisSettingsDirPath())


class InstallerDialog(QDialog):
    """``installer_options``: extra keyword arguments for :class:`installer.Installer` (tests use them to
    install from a local folder of wheels)."""

    installFinished = pyqtSignal(object)  # installer.Result

    def __init__(self, parent=None, target=None, missing=None, installer_options=None):
        super().__init__(parent)
        self.setWindowTitle("RS Deep: install Python dependencies")
        self.setMinimumWidth(640)
        self.target = target or default_target()
        self.missing = deps.missing_dependencies() if missing is None else list(missing)
        self.options = dict(installer_options or {})
        self.installer = None
        self.process = None
        self.step = None
        self.result = None
        self.gpus = installer.nvidia_gpus() if "cuda" not in self.options else []

        layout = QVBoxLayout(self)
        self.intro = QLabel(self._intro_html())
        self.intro.setWordWrap(True)
        self.intro.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.intro)

        form = QFormLayout()
        self.build = QComboBox()
        if self.gpus:
            self.build.addItem(f"CUDA (NVIDIA GPU: {', '.join(self.gpus)})", True)
            self.build.addItem("CPU only (smaller download; the GPU is not used)", False)
        else:
            self.build.addItem("CPU only (no NVIDIA driver found)", False)
            self.build.addItem("CUDA (for an NVIDIA GPU; needs its driver)", True)
        if "cuda" in self.options:
            self.build.setCurrentIndex(self.build.findData(bool(self.options["cuda"])))
        self.build.currentIndexChanged.connect(self._plan)
        form.addRow("PyTorch build", self.build)
        layout.addLayout(form)

        self.plan_label = QLabel()
        self.plan_label.setWordWrap(True)
        layout.addWidget(self.plan_label)

        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.log.setMinimumHeight(220)
        self.log.setPlaceholderText("pip's output appears here while it installs.")
        layout.addWidget(self.log)

        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.status = QLabel()
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        buttons = QDialogButtonBox()
        self.install_button = QPushButton("Install")
        self.install_button.setDefault(True)
        buttons.addButton(self.install_button, QDialogButtonBox.ButtonRole.AcceptRole)
        self.cancel_button = QPushButton("Stop")
        self.cancel_button.setEnabled(False)
        buttons.addButton(self.cancel_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.close_button = buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.install_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.stop)
        self.close_button.clicked.connect(self.reject)
        layout.addWidget(buttons)
        self._plan()

    # ------------------------------------------------------------------------------------------- texts
    def _intro_html(self):
        pip_missing = [m for m in self.missing if installer.requirement_name(m) not in ("rasterio", "gdal")]
        manual = installer.manual_hints([installer.requirement_name(m) for m in self.missing])
        parts = []
        if self.missing:
            parts.append("RS Deep needs Python packages that QGIS's Python does not have: <b>"
                         + html.escape(", ".join(self.missing)) + "</b>.")
        else:
            parts.append("All the Python packages RS Deep needs are installed. You can still reinstall or "
                         "complete them here.")
        if pip_missing or not self.missing:
            parts.append("The installer downloads the versions pinned in the plugin's requirements.txt with pip "
                         "into a folder that only RS Deep uses:<br><code>" + html.escape(self.target) +
                         "</code><br>QGIS's own packages (numpy, GDAL, rasterio, shapely) are not touched.")
        parts += [html.escape(m) for m in manual]
        return "<p>" + "</p><p>".join(parts) + "</p>"

    def _plan(self, *_):
        opts = dict(self.options)
        opts["cuda"] = self.build.currentData()
        try:
            self.installer = installer.Installer(self.target, **opts)
        except Exception as exc:  # no Python/pip found: say so, do not offer to run
            self.installer = None
            self.plan_label.setText(f"<b>The installer cannot run:</b> {html.escape(str(exc))}")
            self.install_button.setEnabled(False)
            return
        self.plan_label.setText("<small>" + html.escape(self.installer.describe()).replace("\n", "<br>")
                                + "</small>")
        self.install_button.setEnabled(True)

    def append(self, text):
        self.log.appendPlainText(text.rstrip("\n"))

    # ---------------------------------------------------------------------------------------- running
    def start(self):
        if self.installer is None or self.is_running():
            return
        self.result = None
        self.log.clear()
        self.status.setText("Installing… (this can take a while: PyTorch is a large download)")
        self.install_button.setEnabled(False)
        self.build.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setVisible(True)
        try:
            step = self.installer.next_step()
        except Exception as exc:
            self._finish(installer.Result(False, str(exc)))
            return
        if step is None:
            self._finish(self.installer.result(None, 0))
            return
        self._run(step)

    def _run(self, step):
        self.step = step
        self.append(f"==> {step.title}")
        self.append("$ " + step.command_line())
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for k, v in step.env.items():
            env.insert(k, v)
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read)
        proc.finished.connect(self._step_finished)
        proc.errorOccurred.connect(self._error)
        self.process = proc
        proc.start(step.args[0], step.args[1:])

    def _read(self):
        if self.process is not None:
            data = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
            if data:
                self.append(data)

    def _error(self, error):
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            proc, self.process = self.process, None
            proc.deleteLater()
            self._finish(installer.Result(False, f"Could not start {self.step.args[0]}: {proc.errorString()}"))

    def _step_finished(self, code, status):
        if self.process is None:  # stopped by the user or failed to start
            return
        self._read()
        proc, self.process = self.process, None
        proc.deleteLater()
        rc = code if status == QProcess.ExitStatus.NormalExit else -1
        step = self.installer.next_step(self.step, rc)
        if step is None:
            self._finish(self.installer.result(self.step, rc))
        else:
            self._run(step)

    def stop(self):
        if self.process is not None:
            proc, self.process = self.process, None
            proc.kill()
            proc.waitForFinished(5000)
            proc.deleteLater()
            self._finish(installer.Result(False, "Stopped. Nothing half-installed is used: run the installer "
                                                 "again to complete it."))

    def is_running(self):
        return self.process is not None

    def _finish(self, result):
        self.result = result
        if self.installer is not None:  # stopped or finished: its temporary folder goes (result() did it too)
            self.installer.cleanup()
        self.progress.setVisible(False)
        self.cancel_button.setEnabled(False)
        self.install_button.setEnabled(self.installer is not None)
        self.build.setEnabled(True)
        text = result.message
        if result.ok:
            installer.activate(self.target)
            missing = deps.missing_dependencies()
            if missing:
                text += " Still missing: " + ", ".join(missing) + "."
                hints = installer.manual_hints([installer.requirement_name(m) for m in missing])
                if hints:
                    text += " " + " ".join(hints)
                result.ok = not [m for m in missing if installer.requirement_name(m) not in ("rasterio", "gdal")]
            else:
                text += " Every package RS Deep needs is now available; the RS Deep tools can be used (restart " \
                        "QGIS if one still reports a missing package)."
        self.status.setText(("<b>Done.</b> " if result.ok else "<b>Failed.</b> ") + html.escape(text))
        self.append(("Done: " if result.ok else "Failed: ") + text)
        QgsMessageLog.logMessage("Dependency installer: " + text, TAG, Qgis.Success if result.ok else Qgis.Critical)
        self.installFinished.emit(result)

    def reject(self):
        self.stop()
        super().reject()


def open_installer(parent=None, missing=None):
    dlg = InstallerDialog(parent, missing=missing)
    dlg.show()
    dlg.raise_()
    return dlg


__all__ = ["InstallerDialog", "open_installer", "default_target"]
