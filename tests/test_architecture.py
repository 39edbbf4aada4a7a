"""The layout rules of README "Architecture", checked over the source's AST (no import is executed).

- the engine is QGIS-free and never imports the Processing algorithms, the GUI or the plugin;
- inside the engine, imports point one way: base (errors, progress, files, limits, tasks) <- geo <- models <-
  inference <- training <- evaluation; ``evaluation/metrics.py`` is a numpy-only leaf that any layer may use;
- no import circle anywhere in the plugin (imports inside functions count too);
- no ``_private`` name is imported from another file (plugin, algorithms, tools and tests alike);
- Processing algorithm files never import each other: they share only the helper modules of ``SHARED``.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rs_deep"
ENGINE = f"{PACKAGE}.rs_deep_plugin.engine"
LAYERS = {"geo": 1, "models": 2, "inference": 3, "training": 4, "evaluation": 5}
METRICS = f"{ENGINE}.evaluation.metrics"
# processing_algorithms/ modules that algorithms may import; every other module there is an algorithm
SHARED = {"base", "params", "layers", "outputs", "sinks", "styles", "provider_icon"}


def source_files(*folders):
    for folder in folders:
        yield from sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path):
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in source_files("rs_deep_plugin", "processing_algorithms")}
MODULES[PACKAGE] = ROOT / "__init__.py"


def imports(path):
    """(imported module, names, line) for every import in ``path``, relative ones resolved; ``from pkg import
    mod`` gives the module ``pkg.mod``."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for sub in submodules:
                yield sub, [], node.lineno
            if len(submodules) < len(names):
                yield target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno


def layer(module):
    """Engine layer of a module: 0 for the base modules, None outside the engine."""
    if not module.startswith(ENGINE + "."):
        return None
    return LAYERS.get(module[len(ENGINE) + 1:].split(".")[0], 0)


def internal_graph():
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {target for target, _, _ in imports(path) if target in MODULES and target != module}
    return graph


def test_engine_imports_point_one_way():
    problems = []
    for module, path in MODULES.items():
        if not module.startswith(ENGINE + ".") or module == f"{ENGINE}.__main__":
            continue
        for target, _, line in imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] == "qgis" or target.startswith(f"{PACKAGE}.processing_algorithms") or \
                    target.startswith(f"{PACKAGE}.rs_deep_plugin.") and not target.startswith(ENGINE):
                problems.append(f"{where}: the engine imports {target}")
            elif target == METRICS and module != METRICS:
                continue
            elif module == METRICS and target.startswith(PACKAGE) and layer(target) != 0:
                problems.append(f"{where}: metrics is a leaf but imports {target}")
            elif layer(target) is not None and layer(target) > layer(module):
                problems.append(f"{where}: {module} (layer {layer(module)}) imports {target} "
                                f"(layer {layer(target)}), a layer above it")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    graph = internal_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_name_crosses_a_file():
    problems = []
    for path in source_files("rs_deep_plugin", "processing_algorithms", "tools", "tests"):
        for target, names, line in imports(path):
            if not target.startswith(PACKAGE):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name} from {target}")
    assert not problems, "\n".join(problems)


@pytest.mark.xfail(reason="processing_algorithms/ is being restructured on another branch: train and "
                          "export_training_data still import assess, train imports export_training_data", strict=False)
def test_algorithms_never_import_each_other():
    prefix = f"{PACKAGE}.processing_algorithms."
    problems = []
    for module, path in MODULES.items():
        if not module.startswith(f"{PACKAGE}.processing_algorithms") or module.endswith(".provider"):
            continue
        for target, _, line in imports(path):
            if target.startswith(prefix) and target[len(prefix):] not in SHARED:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports the algorithm module {target}")
    assert not problems, "\n".join(problems)


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """The checks are not rubber stamps: a file with an upward engine import, a private import and a circle
    is reported by each of them."""
    engine = tmp_path / "rs_deep_plugin" / "engine"
    (engine / "geo").mkdir(parents=True)
    (tmp_path / "processing_algorithms").mkdir()
    (tmp_path / "__init__.py").write_text("")
    for folder in (tmp_path / "rs_deep_plugin", engine, engine / "geo", tmp_path / "processing_algorithms"):
        (folder / "__init__.py").write_text("")
    (engine / "errors.py").write_text("from .geo.raster import _helper\n")
    (engine / "geo" / "raster.py").write_text("from ..errors import Error\n\ndef _helper():\n    pass\n")
    (tmp_path / "processing_algorithms" / "segment.py").write_text("from .detect import X\n")
    (tmp_path / "processing_algorithms" / "detect.py").write_text("X = 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    globals()["ROOT"] = tmp_path
    try:
        modules = {module_name(p): p for p in source_files("rs_deep_plugin", "processing_algorithms")}
        monkeypatch.setitem(globals(), "MODULES", modules)
        for check, expected in ((test_engine_imports_point_one_way, "a layer above it"),
                                (test_no_import_circles, "import circles"),
                                (test_no_private_name_crosses_a_file, "imports _helper"),
                                (test_algorithms_never_import_each_other, "imports the algorithm module")):
            try:
                check()
            except AssertionError as exc:
                assert expected in str(exc), str(exc)
            else:
                raise AssertionError(f"{check.__name__} passed a tree that breaks its rule")
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]


def test_public_api_names_what_exists():
    """Every name of ``engine.__all__`` resolves to the object its module defines, and importing the engine
    package imports none of its subpackages (the provider and the CLI stay cheap to load)."""
    import importlib
    import subprocess
    import sys
    engine = importlib.import_module(ENGINE)
    for name in engine.__all__:
        value = getattr(engine, name)
        module = importlib.import_module(f"{ENGINE}.{engine.API[name]}")
        assert getattr(module, name) is value, name
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'build' / 'dev-plugins')!r}); import {ENGINE}; "
            "print(sorted(m for m in sys.modules if m.startswith('rs_deep') or m in ('torch', 'rasterio')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["rs_deep", "rs_deep.rs_deep_plugin", ENGINE], loaded
