"""The dependency installer, offline: a wheel built here, installed from a local folder into a temporary
target, never into site-packages; the PyTorch build choice; the dialog with its live log."""
import os
import site
import stat
import subprocess
import sys
import tempfile
import time

import numpy
import pytest
from qgis.PyQt.QtCore import QCoreApplication

from rs_deep.rs_deep_plugin import deps, installer

FAKE = "rsdeep_fake_dep"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """A throwaway package built into a wheel with pip, offline (setuptools from the environment)."""
    src = tmp_path_factory.mktemp("src")
    (src / FAKE).mkdir()
    (src / FAKE / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{FAKE}"\nversion = "0.1.0"\ndependencies = ["numpy"]\n')
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--isolated", "--no-build-isolation", "--no-index",
                    "--no-deps", "-q", "-w", str(wheels), str(src)], check=True)
    assert [p.name for p in wheels.iterdir()] == [f"{FAKE}-0.1.0-py3-none-any.whl"]
    return wheels


def _options(wheels):
    # --isolated: ignore the machine's pip configuration (its own indexes/find-links)
    return dict(requirements=[f"{FAKE}==0.1.0", "numpy>=1.20"], index_args=["--no-index", "--find-links", str(wheels)],
                cuda=False, pip_args=["--isolated"], modules=[FAKE])


def _site_dirs():
    dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    return {d: sorted(os.listdir(d)) for d in dirs}


@pytest.fixture
def clean_import():
    before = list(sys.path)
    yield
    sys.path[:] = before
    for name in [m for m in sys.modules if m == FAKE or m.startswith(FAKE + ".")]:
        del sys.modules[name]


def test_installs_into_the_target_only_and_protects_numpy(wheelhouse, tmp_path, clean_import):
    target = tmp_path / "profile" / "python" / installer.DEPS_DIRNAME
    assert installer.deps_dir(str(tmp_path / "profile")) == str(target)
    before = _site_dirs()
    inst = installer.Installer(str(target), **_options(wheelhouse))
    assert inst.requirements == [f"{FAKE}==0.1.0"] and inst.skipped == ["numpy>=1.20"]  # QGIS's numpy stays
    lines = []
    res = installer.run_steps(inst, lines.append)
    log = "\n".join(lines)
    assert res.ok, log
    assert res.installed == [f"{FAKE}==0.1.0"]
    assert "Successfully installed" in log and f"ok {FAKE} 0.1.0" in log
    # constraints: numpy pinned to the version running here
    constraints = installer.constraints_text(inst.protected).splitlines()
    assert f"numpy=={numpy.__version__}" in constraints
    assert any(c.startswith("GDAL==") for c in constraints)
    commands = [line for line in lines if line.startswith("$ ") and " pip install" in line]
    used = commands[0].split(" -c ", 1)[1].split(" ", 1)[0]
    assert len(commands) == 2 and all(f"-c {used}" in c for c in commands)
    # the constraints and pip's report lived in a temporary folder that is gone now
    assert os.path.basename(os.path.dirname(used)).startswith("rs_deep_install_")
    assert not os.path.exists(os.path.dirname(used)) and inst.work_dir is None
    assert "--dry-run --report" in commands[0] and f"--target {target} --upgrade --no-deps" in commands[1]
    # only our package in the target: numpy was satisfied by QGIS's own
    assert sorted(os.listdir(target)) == [FAKE, f"{FAKE}-0.1.0.dist-info"]
    # nothing written into any site-packages
    assert _site_dirs() == before
    # the plugin puts the folder on sys.path; the package imports from there
    assert installer.activate(str(target))
    import rsdeep_fake_dep
    assert rsdeep_fake_dep.__file__.startswith(str(target))
    assert sys.path.index(str(target)) < min(i for i, p in enumerate(sys.path) if p.endswith("site-packages"))
    # a second run finds everything there and installs nothing
    again = installer.run_steps(installer.Installer(str(target), **_options(wheelhouse)), lambda _: None)
    assert again.ok and again.installed == [] and "Nothing to install" in again.message


def _work_dirs():
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("rs_deep_install_")}


def test_a_failing_install_says_so_and_leaves_no_temporary_folder(tmp_path):
    opts = dict(requirements=["rsdeep-no-such-package==1.0"], index_args=["--no-index", "--find-links", str(tmp_path)],
                cuda=False, pip_args=["--isolated"], modules=["rsdeep_no_such_package"])
    before = _work_dirs()
    inst = installer.Installer(str(tmp_path / "t"), **opts)
    inst.describe()  # what the dialog shows: makes no folder
    assert _work_dirs() == before
    lines = []
    res = installer.run_steps(inst, lines.append)
    assert not res.ok and "failed" in res.message and "Resolving" in res.message
    assert any("No matching distribution" in line for line in lines)
    assert _work_dirs() == before


def test_torch_build_choice(monkeypatch):
    monkeypatch.delenv("RS_DEEP_TORCH_INDEX_URL", raising=False)
    cpu = installer.torch_index_args(False, "Linux", "x86_64")
    assert cpu == ["--index-url", installer.CPU_INDEX, "--extra-index-url", installer.PYPI_INDEX]
    assert installer.torch_index_args(True, "Linux", "x86_64") == []  # PyPI's Linux torch is the CUDA build
    assert installer.CUDA_INDEX_WINDOWS in installer.torch_index_args(True, "Windows", "AMD64")
    assert installer.torch_index_args(False, "Windows", "AMD64") == []
    assert installer.torch_index_args(False, "Darwin", "arm64") == []
    monkeypatch.setenv("RS_DEEP_TORCH_INDEX_URL", "https://example.invalid/whl")
    assert installer.torch_index_args(False, "Linux", "x86_64")[:2] == ["--index-url", "https://example.invalid/whl"]


def test_nvidia_driver_detection(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert installer.nvidia_gpus() == ["NVIDIA H100 80GB HBM3"]
    assert installer.Installer(str(tmp_path / "t"), requirements=[]).cuda
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert installer.nvidia_gpus() == []
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert installer.nvidia_gpus() == []


def test_missing_torch_is_reported_and_the_dialog_opens(monkeypatch, tmp_path):
    monkeypatch.setitem(deps.REQUIRED, "rsdeep_missing_torch", "torch")
    assert deps.missing_dependencies() == ["torch"]
    assert "torch" in deps.missing_message(["torch"])
    from rs_deep.rs_deep_plugin.gui.installer_dialog import InstallerDialog
    dlg = InstallerDialog(target=str(tmp_path / "deps"))
    try:
        assert "torch" in dlg.intro.text() and str(tmp_path / "deps") in dlg.intro.text()
        assert dlg.install_button.isEnabled() and not dlg.is_running()
        assert dlg.installer.python and "Target folder" in dlg.plan_label.text()
        assert dlg.build.count() == 2
    finally:
        dlg.close()


def test_dialog_streams_pip_output_and_reports(wheelhouse, tmp_path, clean_import):
    from rs_deep.rs_deep_plugin.gui.installer_dialog import InstallerDialog
    target = tmp_path / "deps"
    dlg = InstallerDialog(target=str(target), missing=[FAKE], installer_options=_options(wheelhouse))
    results = []
    dlg.installFinished.connect(results.append)
    dlg.start()
    assert dlg.is_running() and not dlg.install_button.isEnabled()
    end = time.monotonic() + 120
    while not results and time.monotonic() < end:
        QCoreApplication.processEvents()
        time.sleep(0.01)
    assert results and results[0].ok, dlg.log.toPlainText()
    text = dlg.log.toPlainText()
    assert "==> Resolving" in text and "Successfully installed rsdeep_fake_dep" in text
    assert "Done." in dlg.status.text()
    assert (target / FAKE / "__init__.py").exists()
    assert str(target) in sys.path  # usable at once
    dlg.close()


def test_packaging_tools_stay_out_of_the_target(tmp_path):
    import json
    inst = installer.Installer(str(tmp_path / "t"), requirements=["torch==2.15.0"], cuda=False, work_dir=str(tmp_path))
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          (("torch", "2.15.0+cpu"), ("setuptools", "84.2.1"), ("typing_extensions", "4.16.0"))]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    step = inst.install_step()
    assert inst.to_install == ["torch==2.15.0+cpu", "typing_extensions==4.16.0"] and inst.left_out == ["setuptools==84.2.1"]
    assert step.args[-2:] == inst.to_install and "--no-deps" in step.args
