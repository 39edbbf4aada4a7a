#!/usr/bin/env python3
"""Static Qt6 (QGIS 4) readiness check of the plugin's Python code, against the real PyQt6.

    python3 tools/qt6_check.py [PATH ...]        (default: the plugin's own code; exit 1 when anything is left)

Run it with an interpreter that has PyQt6 (Debian: apt-get install python3-pyqt6); it never imports QGIS or PyQt5.
It reports what QGIS's scripts/pyqt5_to_pyqt6/pyqt5_to_pyqt6.py would change in our code, by looking every
Qt name up in PyQt6 itself rather than in a list:
- every ``Class.Member`` / ``Class.Enum.Member`` chain rooted in a name imported from ``qgis.PyQt.*`` (or PyQt5)
  must exist in PyQt6: unscoped enums (``Qt.RightDockWidgetArea``, ``QProcess.MergedChannels``) do not;
- every name imported from ``qgis.PyQt.QtX`` must exist in PyQt6's QtX (QGIS's shim re-exports QtGui's QAction
  family from QtWidgets too);
- ``QVariant.Int``-style field types (deprecated from QGIS 3.38; use rs_deep_plugin/compat.py), ``exec_()``,
  ``qApp``, ``QRegExp``, direct ``PyQt5`` imports and ``.ui``/``resources_rc`` compiled resources.
rs_deep_plugin/compat.py is the one place allowed to name QVariant types (behind a QGIS version check).
"""
import ast
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATHS = ["__init__.py", "rs_deep_plugin", "processing_algorithms", "tools", "tests"]
COMPAT = os.path.join("rs_deep_plugin", "compat.py")
# QGIS's qgis.PyQt.QtWidgets keeps exporting the classes that Qt6 moved to QtGui
MOVED_TO_QTGUI = {"QAction", "QActionGroup", "QShortcut", "QUndoCommand", "QUndoStack", "QFileSystemModel"}
REMOVED = {"QRegExp": "QRegExp is gone in Qt6: use QRegularExpression",
           "qApp": "qApp is gone in Qt6: use QApplication.instance()",
           "resources_rc": "compiled resources are gone in Qt6: load files by path"}


def _pyqt6_module(name):
    try:
        return importlib.import_module(f"PyQt6.{name}")
    except ImportError:
        return None


def _resolve(obj, attrs):
    for a in attrs:
        try:
            obj = getattr(obj, a)
        except AttributeError:
            return False
    return True


def _chain(node):
    """``A.b.c`` -> ["A", "b", "c"] when it is a plain dotted name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def check_file(path, rel):
    problems = []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    qt_names = {}  # local name -> PyQt6 object
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module
            if mod.startswith("PyQt5"):
                problems.append((node.lineno, f"imports {mod}: import from qgis.PyQt instead"))
                continue
            if not (mod.startswith("qgis.PyQt") or mod.startswith("PyQt6")):
                continue
            sub = mod.split(".")[-1]
            for alias in node.names:
                if alias.name in REMOVED:
                    problems.append((node.lineno, REMOVED[alias.name]))
                    continue
                if sub in ("PyQt", "PyQt6"):  # from qgis.PyQt import sip / QtCore
                    target = _pyqt6_module(alias.name) if alias.name.startswith("Qt") else None
                    if target is not None:
                        qt_names[alias.asname or alias.name] = target
                    continue
                module = _pyqt6_module(sub)
                if module is None:
                    problems.append((node.lineno, f"PyQt6 has no module {sub}"))
                    continue
                obj = getattr(module, alias.name, None)
                if obj is None and sub == "QtWidgets" and alias.name in MOVED_TO_QTGUI:
                    obj = getattr(_pyqt6_module("QtGui"), alias.name, None)
                if obj is None:
                    problems.append((node.lineno, f"{alias.name} is not in PyQt6.{sub}"))
                    continue
                qt_names[alias.asname or alias.name] = obj
    # check each dotted chain once, whole: the inner ``a.b`` of ``a.b.c`` is not a place of its own
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in inner:
            chain = _chain(node)
            if not chain or chain[0] not in qt_names:
                continue
            if chain[0] == "QVariant" and len(chain) == 2 and chain[1][:1].isupper():
                if rel == COMPAT:  # the one allowed place, behind the QGIS version check
                    continue
                problems.append((node.lineno, f"QVariant.{chain[1]} as a type is deprecated from QGIS 3.38 and "
                                              "not in Qt6: use rs_deep_plugin.compat"))
                continue
            if not _resolve(qt_names[chain[0]], chain[1:]):
                problems.append((node.lineno, f"{'.'.join(chain)} does not exist in PyQt6 (unscoped enum? "
                                              "use the scoped form, e.g. Qt.AlignmentFlag.AlignLeft)"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exec_":
            problems.append((node.lineno, "exec_() is gone in PyQt6: use exec()"))
        elif isinstance(node, ast.Name) and node.id in ("qApp",):
            problems.append((node.lineno, REMOVED["qApp"]))
    return sorted(problems)


def python_files(paths):
    for p in paths:
        full = os.path.join(ROOT, p) if not os.path.isabs(p) else p
        if os.path.isfile(full) and full.endswith(".py"):
            yield full
        for dirpath, dirnames, filenames in os.walk(full):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".venv", "build", "data")]
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)
        if os.path.isdir(full):
            for name in os.listdir(full):
                if name.endswith(".ui"):
                    yield os.path.join(full, name)


def main(argv):
    if _pyqt6_module("QtCore") is None:
        print("qt6_check: PyQt6 is not installed for this interpreter (Debian: apt-get install python3-pyqt6)")
        return 2
    total = 0
    for path in python_files(argv or DEFAULT_PATHS):
        rel = os.path.relpath(path, ROOT)
        if path.endswith(".ui"):
            print(f"{rel}: .ui files: make sure they load with uic on Qt6 (not checked)")
            continue
        for line, msg in check_file(path, rel):
            print(f"{rel}:{line}: {msg}")
            total += 1
    print(f"qt6_check: {total} place(s) to change" if total else "qt6_check: nothing left to change for Qt6")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
