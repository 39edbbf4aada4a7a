"""QGIS 4 (Qt6) readiness: the static check of tools/qt6_check.py over the plugin (run against the real PyQt6),
and the metadata that makes QGIS 4 show the plugin at all."""
import configparser
import subprocess
import sys

from conftest import ROOT

CHECK = ROOT / "tools" / "qt6_check.py"


def _check(*paths):
    return subprocess.run([sys.executable, str(CHECK), *map(str, paths)], capture_output=True, text=True, timeout=300)


def test_the_plugin_has_nothing_left_to_change_for_qt6():
    proc = _check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing left to change for Qt6" in proc.stdout


def test_the_check_finds_what_qt6_rejects(tmp_path):
    """The check is no rubber stamp: unscoped enums, QVariant field types, exec_() and a QtWidgets name that is
    not in PyQt6 are each reported with their line; the scoped forms pass."""
    bad = tmp_path / "bad.py"
    bad.write_text("from qgis.PyQt.QtCore import Qt, QVariant, QProcess\n"
                   "from qgis.PyQt.QtWidgets import QDialog, QDesktopWidget\n"
                   "a = Qt.RightDockWidgetArea\n"
                   "b = QProcess.MergedChannels\n"
                   "c = QVariant.Int\n"
                   "QDialog().exec_()\n"
                   "ok = (Qt.DockWidgetArea.RightDockWidgetArea, QProcess.ProcessChannelMode.MergedChannels)\n")
    proc = _check(bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    for line, what in ((2, "QDesktopWidget"), (3, "Qt.RightDockWidgetArea"), (4, "QProcess.MergedChannels"),
                       (5, "QVariant.Int"), (6, "exec_()")):
        assert f"bad.py:{line}: " in out and what in out, out
    assert "bad.py:7:" not in out
    assert "5 place(s) to change" in out


def test_metadata_lets_qgis_4_show_the_plugin():
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    assert general["qgisMinimumVersion"] == "3.22"
    major, minor = (int(v) for v in general["qgisMaximumVersion"].split("."))
    assert (major, minor) >= (4, 0), "QGIS 4 hides plugins whose qgisMaximumVersion is below 4"
