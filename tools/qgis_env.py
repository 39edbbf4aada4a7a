"""Environment and command line for running qgis_process on this checkout (used by make demo and tests)."""
import os
import shutil
import site
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qgis_process_cmd():
    """Debian's `qgis_process` wrapper passes --noversioncheck, which QGIS 3.22 rejects: use the binary."""
    exe = os.environ.get("RS_DEEP_QGIS_PROCESS") or shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if not exe:
        raise SystemExit("qgis_process not found: install QGIS (make setup)")
    return exe


def qgis_env(plugin_path=None, profile=None):
    env = dict(os.environ)
    env["QT_QPA_PLATFORM"] = env.get("QT_QPA_PLATFORM", "offscreen")
    env["QGIS_PLUGINPATH"] = plugin_path or os.path.join(ROOT, "build", "dev-plugins")
    env["QGIS_CUSTOM_CONFIG_PATH"] = profile or os.path.join(ROOT, "build", "qgis-profile")
    paths = [p for p in site.getsitepackages() if "site-packages" in p]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("XDG_RUNTIME_DIR", "/tmp/runtime-" + str(os.getuid()))
    return env


def run_qgis_process(args, plugin_path=None, profile=None, check=True, timeout=900, wrapper=()):
    """Run ``qgis_process ARGS`` on this checkout (the plugin enabled first); ``wrapper``: a command line that runs
    it, e.g. a Python script that sets resource limits and execs its arguments."""
    env = qgis_env(plugin_path, profile)
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
    exe = qgis_process_cmd()
    enable = subprocess.run([exe, "plugins", "enable", "rs_deep"], env=env, capture_output=True, text=True,
                            timeout=300)
    if enable.returncode != 0 and "already enabled" not in enable.stdout + enable.stderr:
        raise RuntimeError(f"qgis_process could not enable rs_deep:\n{enable.stdout}\n{enable.stderr}")
    proc = subprocess.run(list(wrapper) + [exe] + list(args), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"qgis_process failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_processing():
    """A headless QgsApplication with Processing and the rs_deep provider (this checkout, through
    build/dev-plugins): returns (app, processing module, provider); keep the provider referenced (the registry does
    not keep the Python object alive)."""
    import sys
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    import processing
    Processing.initialize()
    from rs_deep.processing_algorithms.provider import RSDeepProvider
    provider = RSDeepProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    return app, processing, provider
