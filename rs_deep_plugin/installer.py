"""Installs RS Deep's Python dependencies into a folder the plugin owns (QGIS-free).

The packages go into ``<QGIS profile>/python/rs_deep_deps`` (``pip install --target``), never into QGIS's
own site-packages, and that folder is put on ``sys.path`` when the plugin loads (:func:`activate`).

How it installs, in steps (each one a ``python -m pip ...`` command, run by the dialog with QProcess so its
output is streamed, or by :func:`run_steps` with subprocess):

1. *pip bootstrap* (only when QGIS's pip is older than 22.2): a current pip into ``<target>/.pip``, used only
   by the installer.
2. *resolve*: ``pip install --dry-run --report`` of the pinned ``requirements.txt`` against the running
   environment, with a constraints file that pins the packages QGIS itself uses to the versions loaded now
   (numpy, GDAL, rasterio, shapely). pip reports only what is missing or too old; nothing is installed.
3. *install*: exactly those ``name==version`` into the target folder (``--target --no-deps``). numpy, GDAL,
   rasterio and QGIS's shapely are therefore never reinstalled.
4. *verify*: a fresh Python imports every module from the target and prints torch's CUDA status.

Which PyTorch build (see :func:`torch_index_args`):

* Linux x86_64 + NVIDIA driver (``nvidia-smi`` works): PyPI's torch, which is built with CUDA and brings the
  CUDA runtime as ``nvidia-*`` wheels (several GB).
* Linux without NVIDIA driver: the CPU-only build from PyTorch's index ``/whl/cpu`` (``2.15.0+cpu``, ~200 MB),
  with PyPI as extra index for everything else.
* Windows + NVIDIA driver: PyTorch's CUDA index (:data:`CUDA_INDEX_WINDOWS`); without: PyPI (CPU build).
* macOS: PyPI (CPU + Apple MPS).

``RS_DEEP_TORCH_INDEX_URL`` overrides the torch index. Run it without QGIS:
``python3 rs_deep_plugin/installer.py --target DIR`` (``--help`` for the options).
"""
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

DEPS_DIRNAME = "rs_deep_deps"
PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(PLUGIN_DIR, "requirements.txt")
PYPI_INDEX = "https://pypi.org/simple"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: PyTorch's CUDA wheel index used on Windows; keep it in step with the torch pin in requirements.txt
CUDA_INDEX_WINDOWS = "https://download.pytorch.org/whl/cu128"
MIN_PIP_FOR_REPORT = (22, 2)

#: distributions QGIS (or the distribution's packages QGIS is built with) provides: never reinstalled;
#: pinned to the running version in the constraints file, and dropped from the requested packages.
PROTECTED = ("numpy", "GDAL", "rasterio", "shapely")
#: how to get a protected package when it is missing (pip would bring a second GDAL/GEOS into QGIS)
MANUAL = {
    "rasterio": "rasterio must use QGIS's GDAL: install it from your distribution (Debian/Ubuntu: "
                "sudo apt-get install python3-rasterio; OSGeo4W: the python3-rasterio package).",
    "GDAL": "GDAL's Python bindings come with QGIS (Debian/Ubuntu: python3-gdal).",
}
#: packaging tools pip may want to upgrade for a dependency's metadata: never put into the target (a newer
#: setuptools there would shadow QGIS's own, e.g. without pkg_resources); none is needed to run the models
NEVER_INSTALL = ("setuptools", "pip", "wheel")
#: modules to verify after installing: import name -> distribution
VERIFY_MODULES = {
    "torch": "torch", "torchvision": "torchvision", "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm", "safetensors": "safetensors", "shapely": "shapely",
}


# --------------------------------------------------------------------------------------------- the folder
def deps_dir(settings_dir):
    """The plugin's own package folder inside a QGIS profile (QgsApplication.qgisSettingsDirPath())."""
    return os.path.join(settings_dir, "python", DEPS_DIRNAME)


def default_profile_dir():
    """QGIS 3's default profile folder on this OS (for the command line)."""
    if sys.platform.startswith("win"):
        base = os.environ.get("APPDATA", os.path.expanduser("~"))
        return os.path.join(base, "QGIS", "QGIS3", "profiles", "default")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Application Support/QGIS/QGIS3/profiles/default")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "QGIS", "QGIS3", "profiles", "default")


def activate(path):
    """Put the deps folder on sys.path (before the site-packages, after the standard library) if it exists.

    Returns True when the folder is (now) on sys.path. Packages in it are only those the running
    environment lacked or had too old, so it may come first without hiding QGIS's numpy or GDAL.
    """
    if not path or not os.path.isdir(path):
        return False
    path = os.path.abspath(path)
    if path in sys.path:
        return True
    index = len(sys.path)
    for i, p in enumerate(sys.path):
        if p.rstrip("/\\").endswith(("site-packages", "dist-packages")):
            index = i
            break
    sys.path.insert(index, path)
    importlib.invalidate_caches()
    return True


# ------------------------------------------------------------------------------------------ environment
def python_executable():
    """The Python interpreter QGIS runs (inside QGIS, sys.executable is the qgis binary)."""
    want = sys.version_info[:2]
    candidates = []
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python"):
        candidates.append(exe)
    base = getattr(sys, "_base_executable", None)
    if base and os.path.basename(base).lower().startswith("python"):
        candidates.append(base)
    if sys.platform.startswith("win"):
        for d in (sys.exec_prefix, os.path.dirname(exe), os.path.join(os.path.dirname(exe), "..", "apps",
                                                                       f"Python{want[0]}{want[1]}")):
            candidates += [os.path.join(d, "python.exe"), os.path.join(d, "python3.exe")]
    else:
        for d in (os.path.join(sys.exec_prefix, "bin"), os.path.dirname(exe), "/usr/bin"):
            candidates += [os.path.join(d, f"python{want[0]}.{want[1]}"), os.path.join(d, "python3")]
    candidates += [shutil.which(f"python{want[0]}.{want[1]}") or "", shutil.which("python3") or ""]
    seen = set()
    for c in candidates:
        if not c or c in seen or not os.path.isfile(c):
            continue
        seen.add(c)
        try:
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == f"{want[0]}.{want[1]}":
            return c
    raise RuntimeError(f"Cannot find the Python {want[0]}.{want[1]} interpreter QGIS uses (looked next to "
                       f"{exe} and on PATH)")


def pip_version(python):
    """pip's version tuple for ``python``, or None when pip is not installed there."""
    try:
        out = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"pip (\d+)\.(\d+)", out.stdout.strip())
    return (int(m.group(1)), int(m.group(2))) if out.returncode == 0 and m else None


def nvidia_gpus():
    """Names of the NVIDIA GPUs the driver reports (``nvidia-smi``), [] when there is no working driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None and sys.platform.startswith("win"):
        for c in (r"C:\Windows\System32\nvidia-smi.exe", r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe"):
            if os.path.isfile(c):
                exe = c
                break
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def torch_index_args(cuda, system=None, machine=None):
    """pip index options for the PyTorch build: CUDA when ``cuda`` else CPU (see the module docstring)."""
    override = os.environ.get("RS_DEEP_TORCH_INDEX_URL")
    if override:
        return ["--index-url", override, "--extra-index-url", PYPI_INDEX]
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Linux":
        if cuda or machine not in ("x86_64", "amd64"):
            return []  # PyPI: CUDA build on x86_64 (nvidia-* runtime wheels), CPU build on ARM
        return ["--index-url", CPU_INDEX, "--extra-index-url", PYPI_INDEX]
    if system == "Windows" and cuda:
        return ["--index-url", CUDA_INDEX_WINDOWS, "--extra-index-url", PYPI_INDEX]
    return []  # Windows CPU, macOS (CPU + MPS): PyPI


def installed_version(dist):
    """Version of an installed distribution seen by *this* Python, or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
    except Exception:  # broken metadata
        return None


def running_numpy_version():
    mod = sys.modules.get("numpy")
    if mod is not None and getattr(mod, "__version__", None):
        return mod.__version__
    v = installed_version("numpy")
    if v:
        return v
    try:
        import numpy
        return numpy.__version__
    except ImportError:
        return None


def protected_versions():
    """{distribution: version} of the protected packages as this Python has them (numpy: the running one)."""
    found = {}
    for dist in PROTECTED:
        v = running_numpy_version() if dist == "numpy" else installed_version(dist)
        if v:
            found[dist] = v.split("+")[0]
    return found


def constraints_text(versions=None):
    versions = protected_versions() if versions is None else versions
    lines = ["# Written by RS Deep's dependency installer: packages QGIS itself uses stay at the versions it",
             "# runs with (numpy, GDAL's bindings, rasterio built on QGIS's GDAL, shapely on QGIS's GEOS)."]
    lines += [f"{dist}=={v}" for dist, v in versions.items()]
    return "\n".join(lines) + "\n"


def _canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path=REQUIREMENTS):
    """Requirement lines of requirements.txt (comments and options dropped)."""
    reqs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                reqs.append(line)
    return reqs


def requirement_name(req):
    return _canon(re.split(r"[<>=!~;\[ @]", req, 1)[0])


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class Step:
    title: str
    args: list
    env: dict = field(default_factory=dict)  # extra environment for the command
    kind: str = ""
    display: str = ""  # shorter command line for the log

    def command_line(self):
        if self.display:
            return self.display
        return subprocess.list2cmdline(self.args) if sys.platform.startswith("win") else \
            " ".join(_quote(a) for a in self.args)


def _quote(a):
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"


class Installer:
    """The install as a sequence of commands; :meth:`next_step` hands out the next one.

    ``requirements``: pip requirement strings (default: requirements.txt less the protected packages QGIS
    already has). ``index_args``: pip index options (default: :func:`torch_index_args`). ``modules``: import
    names checked at the end (default: the ones of the requirements that :data:`VERIFY_MODULES` knows).
    """

    def __init__(self, target, python=None, requirements=None, index_args=None, cuda=None, modules=None,
                 pip_args=(), work_dir=None):
        self.target = os.path.abspath(target)
        self.python = python or python_executable()
        self.cuda = bool(nvidia_gpus()) if cuda is None else bool(cuda)
        self.index_args = list(torch_index_args(self.cuda) if index_args is None else index_args)
        self.protected = protected_versions()
        protected = {_canon(d) for d in self.protected}
        reqs = read_requirements() if requirements is None else list(requirements)
        self.skipped = [r for r in reqs if requirement_name(r) in protected]
        self.requirements = [r for r in reqs if requirement_name(r) not in protected]
        self.no_binary = ["shapely"] if sys.platform.startswith("linux") and any(
            requirement_name(r) == "shapely" for r in self.requirements) else []
        if modules is None:
            names = {requirement_name(r) for r in self.requirements}
            modules = [m for m, d in VERIFY_MODULES.items() if _canon(d) in names]
        self.modules = list(modules)
        self.pip_args = list(pip_args)
        self.work_dir = work_dir  # None: a temporary folder, made by write_constraints, removed by cleanup()
        self._temp_dir = None
        self.pip_dir = os.path.join(self.target, ".pip")
        self.to_install = None  # [name==version] after the resolve step
        self.left_out = []  # packaging tools pip asked for that stay out of the target
        self._queue = None
        self.log_lines = []

    @property
    def constraints(self):
        return os.path.join(self.work_dir, "constraints.txt") if self.work_dir else None

    @property
    def report(self):
        return os.path.join(self.work_dir, "report.json") if self.work_dir else None

    def cleanup(self):
        """Remove the temporary work folder (nothing is left behind in the system's temp folder)."""
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = self.work_dir = None

    # -- what the dialog shows before anything runs
    def describe(self):
        lines = [f"Python: {self.python}", f"Target folder: {self.target}",
                 "PyTorch build: " + ("CUDA (NVIDIA driver found)" if self.cuda else "CPU")]
        if self.index_args:
            lines.append("Package index options: " + " ".join(self.index_args))
        lines.append("Requested: " + (", ".join(self.requirements) or "nothing"))
        if self.protected:
            lines.append("Kept as QGIS has them (constraints): " +
                         ", ".join(f"{d} {v}" for d, v in self.protected.items()))
        return "\n".join(lines)

    def write_constraints(self):
        if self.work_dir is None:
            self.work_dir = self._temp_dir = tempfile.mkdtemp(prefix="rs_deep_install_")
        os.makedirs(self.work_dir, exist_ok=True)
        with open(self.constraints, "w", encoding="utf-8") as f:
            f.write(constraints_text(self.protected))
        return self.constraints

    def _env(self):
        paths = ([self.pip_dir] if os.path.isdir(self.pip_dir) else []) + [self.target]
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        # PYTHONNOUSERSITE: packages in the user's site dir are not QGIS's; do not let them satisfy anything
        return {"PYTHONPATH": os.pathsep.join(paths), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PYTHONNOUSERSITE": "1", "PIP_NO_INPUT": "1"}

    def _pip(self):
        return [self.python, "-m", "pip"]

    def _common(self):
        args = ["-c", self.constraints] + self.index_args + self.pip_args
        if self.no_binary:
            args += ["--no-binary", ",".join(self.no_binary)]
        return args

    def steps(self):
        """The first steps (the install step is added once the resolve step's report is read)."""
        self.write_constraints()
        os.makedirs(self.target, exist_ok=True)
        steps = []
        version = pip_version(self.python)
        if version is None:
            raise RuntimeError(f"pip is not available for {self.python}. Install it (Debian/Ubuntu: sudo apt-get "
                               "install python3-pip; Windows/OSGeo4W: python3-pip), then try again.")
        if version < MIN_PIP_FOR_REPORT:
            steps.append(Step("Installing a current pip for the installer (QGIS's pip is "
                              f"{version[0]}.{version[1]})",
                              self._pip() + ["install", "--target", self.pip_dir, "--upgrade", "pip>=23"]
                              + self.pip_args, self._env(), "bootstrap"))
        if not self.requirements:
            return steps
        steps.append(Step("Resolving the pinned versions against QGIS's Python",
                          self._pip() + ["install", "--dry-run", "--report",
                                         self.report, "--progress-bar", "off"] + self._common()
                          + self.requirements, self._env(), "resolve"))
        return steps

    def install_step(self):
        pins = pins_from_report(self.report)
        self.left_out = [p for p in pins if requirement_name(p) in {_canon(n) for n in NEVER_INSTALL}]
        self.to_install = [p for p in pins if p not in self.left_out]
        if not self.to_install:
            return None
        return Step(f"Installing {len(self.to_install)} packages into {self.target}",
                    self._pip() + ["install", "--target", self.target, "--upgrade", "--no-deps",
                                   "--progress-bar", "off"] + self._common() + self.to_install,
                    self._env(), "install")

    def verify_step(self):
        code = ("import importlib, sys\n"
                f"sys.path.insert(0, {self.target!r})\n"
                f"mods = {self.modules!r}\n"
                "bad = []\n"
                "for m in mods:\n"
                "    try:\n"
                "        mod = importlib.import_module(m)\n"
                "        print('  ok', m, getattr(mod, '__version__', ''), 'from', getattr(mod, '__file__', ''))\n"
                "    except Exception as exc:\n"
                "        bad.append(m); print('  FAILED', m, type(exc).__name__, exc)\n"
                "if 'torch' in sys.modules:\n"
                "    t = sys.modules['torch']\n"
                "    print('  torch CUDA:', t.cuda.is_available(), t.cuda.get_device_name(0) if t.cuda.is_available()"
                " else '')\n"
                "sys.exit(1 if bad else 0)\n")
        return Step("Checking that everything imports", [self.python, "-c", code], self._env(), "verify",
                    f"{self.python} -c 'import {', '.join(self.modules)}'")

    def next_step(self, previous=None, returncode=None):
        """The step to run after ``previous`` finished with ``returncode`` (None to start); None: done."""
        if previous is None:
            self._queue = self.steps()
        elif returncode != 0 or previous.kind == "verify":
            return None
        elif previous.kind == "resolve":
            step = self.install_step()
            if step is not None:
                self._queue.insert(0, step)
        if self._queue:
            return self._queue.pop(0)
        if previous is not None and self.modules:  # after the last pip command: check the imports
            return self.verify_step()
        return None

    def result(self, last_step, returncode):
        """The outcome of :func:`run_steps` (or the dialog's run) as a :class:`Result`; removes the work folder."""
        self.cleanup()
        if last_step is None:
            return Result(True, "Nothing to install: every requirement is already met.")
        if returncode != 0:
            hint = ""
            if last_step.kind in ("resolve", "install", "bootstrap"):
                hint = (" Check the network connection (pip needs PyPI" +
                        (" and PyTorch's package index)." if self.index_args else ").") +
                        " pip's own message is in the log above.")
                if self.no_binary:
                    hint += (" shapely is built against QGIS's GEOS: that needs the GEOS headers and a compiler "
                             "(Debian/Ubuntu: sudo apt-get install libgeos-dev build-essential), or install "
                             "python3-shapely from the distribution.")
            elif last_step.kind == "verify":
                hint = " Some packages were installed but do not import; the log above says which and why."
            return Result(False, f"{last_step.title}: failed (exit code {returncode}).{hint}", self.to_install or [])
        n = len(self.to_install or [])
        if n:
            return Result(True, f"Installed {n} packages into {self.target}: " + ", ".join(self.to_install),
                          self.to_install)
        return Result(True, "Nothing to install: every requirement is already met.")


def pins_from_report(report_path):
    """``name==version`` of every package pip's --report says it would install."""
    if not os.path.isfile(report_path):
        return []
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    pins = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        if meta.get("name") and meta.get("version"):
            pins.append(f"{meta['name']}=={meta['version']}")
    return pins


@dataclass
class Result:
    ok: bool
    message: str
    installed: list = field(default_factory=list)


def run_steps(installer, log=print):
    """Run the install with subprocess, streaming every line to ``log`` (used by tests and the CLI)."""
    step = installer.next_step()
    last_rc, last = 0, None
    while step is not None:
        log(f"==> {step.title}")
        log("$ " + step.command_line())
        env = dict(os.environ)
        env.update(step.env)
        proc = subprocess.Popen(step.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log(line.rstrip("\n"))
        last_rc, last = proc.wait(), step
        step = installer.next_step(step, last_rc)
    return installer.result(last, last_rc)


def manual_hints(missing_modules):
    """Messages for missing packages the installer must not pip-install (they must match QGIS's GDAL)."""
    return [MANUAL[m] for m in ("rasterio", "GDAL") if m in missing_modules or m.lower() in missing_modules]


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Install RS Deep's Python dependencies into a folder the plugin "
                                             "loads (never into QGIS's own site-packages).")
    ap.add_argument("--target", help="folder to install into (default: <QGIS profile>/python/rs_deep_deps)")
    ap.add_argument("--profile", default=default_profile_dir(), help="QGIS profile folder")
    ap.add_argument("--python", help="the Python QGIS runs (default: found automatically)")
    build = ap.add_mutually_exclusive_group()
    build.add_argument("--cpu", action="store_true", help="CPU-only PyTorch build")
    build.add_argument("--cuda", action="store_true", help="CUDA PyTorch build")
    ap.add_argument("pip_args", nargs="*", help="extra pip options after --, e.g. -- --no-index --find-links DIR")
    args = ap.parse_args(argv)
    cuda = True if args.cuda else False if args.cpu else None
    inst = Installer(args.target or deps_dir(args.profile), python=args.python, cuda=cuda, pip_args=args.pip_args)
    print(inst.describe())
    res = run_steps(inst)
    print(res.message)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
