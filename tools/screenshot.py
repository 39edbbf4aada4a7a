"""docs/screenshot.png: real QGIS under Xvfb, RS Deep's dock running the bundled buildings model.

Starts the `qgis` binary on a virtual screen (Xvfb) with a throwaway profile (--profiles-path) in which
only RS Deep is enabled (QGIS_PLUGINPATH=build/dev-plugins), the venv's site-packages on PYTHONPATH, and this
same file as the start-up script (--code). Inside QGIS it loads resources/sample/atlanta_pan.tif, opens the
dock, runs the bundled `buildings_demo` model through the dock (a real background task), waits for the
result on the canvas, grabs the main window to PNG and quits.

    python tools/screenshot.py [--out docs/screenshot.png] [--model PATH] [--raster PATH] [--size 1600x1000]

Needs Xvfb (Debian/Ubuntu: apt-get install xvfb; tools/ensure_qgis.sh installs it).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

STAGE_ENV = "RS_DEEP_SCREENSHOT_STAGE"
try:
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
except NameError:  # exec'd by QGIS's --code: the paths come in the environment
    ROOT = os.getcwd()


# ------------------------------------------------------------------------------------ outside QGIS
def _start_xvfb(width, height):
    exe = shutil.which("Xvfb")
    if exe is None:
        raise SystemExit("Xvfb is not installed: apt-get install xvfb (tools/ensure_qgis.sh installs it)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([exe, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24",
                             "-nolisten", "tcp", "-noreset"], pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    display = b""
    deadline = time.time() + 30
    while time.time() < deadline and not display.endswith(b"\n"):
        chunk = os.read(read_fd, 16)
        if not chunk:
            break
        display += chunk
    os.close(read_fd)
    if not display.strip():
        proc.kill()
        raise SystemExit("Xvfb did not start")
    return proc, ":" + display.decode().strip()


def _write_profile(profiles):
    ini_dir = os.path.join(profiles, "profiles", "default", "QGIS")
    os.makedirs(ini_dir, exist_ok=True)
    with open(os.path.join(ini_dir, "QGIS3.ini"), "w") as f:
        f.write("[PythonPlugins]\nrs_deep=true\n\n"
                "[qgis]\ncheckVersion=false\nallowVersionCheck=false\nshowTips=false\n"
                "\n[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n")
    # no other profile to migrate from, no first-run questions
    with open(os.path.join(profiles, "profiles", "profiles.ini"), "w") as f:
        f.write("[core]\ndefaultProfile=default\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "screenshot.png"))
    ap.add_argument("--model", default=os.path.join(ROOT, "resources", "models", "buildings_demo"))
    ap.add_argument("--raster", default=os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif"))
    ap.add_argument("--size", default="1600x1000", help="window (and virtual screen) size, WxH")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    for what, path in (("model package", args.model), ("raster", args.raster)):
        if not os.path.exists(path):
            raise SystemExit(f"The {what} {path} is missing (give another with --{what.split()[-1]})")
    width, height = (int(v) for v in args.size.lower().split("x"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from qgis_env import qgis_env

    qgis = shutil.which("qgis") or shutil.which("qgis.bin")
    if qgis is None:
        raise SystemExit("QGIS is not installed (make setup installs it)")
    work = tempfile.mkdtemp(prefix="rs_deep_screenshot_")
    _write_profile(work)
    status = os.path.join(work, "status.json")
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    xvfb, display = _start_xvfb(width, height)
    env = qgis_env(profile=work)
    env.update({"DISPLAY": display, "QT_QPA_PLATFORM": "xcb", STAGE_ENV: "qgis",
                "RS_DEEP_SCREENSHOT_OUT": out, "RS_DEEP_SCREENSHOT_STATUS": status,
                "RS_DEEP_SCREENSHOT_MODEL": os.path.abspath(args.model),
                "RS_DEEP_SCREENSHOT_RASTER": os.path.abspath(args.raster),
                "RS_DEEP_SCREENSHOT_SIZE": f"{width}x{height}"})
    env.pop("QGIS_CUSTOM_CONFIG_PATH", None)
    cmd = [qgis, "--profiles-path", work, "--nologo", "--code", os.path.abspath(__file__)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = "timeout", (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace")
    finally:
        xvfb.terminate()
        xvfb.wait(10)
    result = json.load(open(status)) if os.path.exists(status) else {}
    if not result.get("ok"):
        log = os.path.join(work, "qgis.log")
        with open(log, "w") as f:
            f.write(output)
        raise SystemExit(f"Screenshot failed (QGIS exit {rc}): {result.get('error', 'no status written')}\n"
                         f"QGIS's output: {log}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"run: {result.get('run')} ({result.get('message')})")
    print(f"wrote {out} ({result.get('width')} x {result.get('height')} px) in {time.time() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------------------------- inside QGIS
def in_qgis():
    """Runs as QGIS's --code start-up script."""
    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
    from qgis.PyQt.QtCore import Qt, QTimer
    from qgis.utils import iface, plugins

    out = os.environ["RS_DEEP_SCREENSHOT_OUT"]
    status_path = os.environ["RS_DEEP_SCREENSHOT_STATUS"]
    width, height = (int(v) for v in os.environ["RS_DEEP_SCREENSHOT_SIZE"].split("x"))
    import faulthandler
    fault_log = open(os.path.join(os.path.dirname(status_path), "python-faults.log"), "w")
    faulthandler.enable(fault_log, all_threads=True)
    keep = [fault_log]  # callbacks and timers stay alive until QGIS quits
    state = {}

    def write_status(**kw):
        with open(status_path, "w") as f:
            json.dump(kw, f)

    def quit_qgis(code=0):
        QgsProject.instance().setDirty(False)
        QTimer.singleShot(200, lambda: QgsApplication.exit(code))

    def fail(message):
        write_status(ok=False, error=message)
        quit_qgis(1)

    def later(ms, fn):
        t = QTimer()
        t.setSingleShot(True)
        t.timeout.connect(fn)
        t.start(ms)
        keep.append(t)

    def start():
        try:
            win = iface.mainWindow()
            win.showNormal()
            win.setGeometry(0, 0, width, height)
            plugin = plugins.get("rs_deep")
            if plugin is None or getattr(plugin, "dock", None) is None:
                return fail("the rs_deep plugin is not loaded: " + ", ".join(plugins))
            layer = QgsRasterLayer(os.environ["RS_DEEP_SCREENSHOT_RASTER"], "atlanta_pan")
            if not layer.isValid():
                return fail("cannot open the raster")
            QgsProject.instance().addMapLayer(layer)
            dock = plugin.dock
            if dock.isHidden():
                plugin.dock_action.trigger()
            win.resizeDocks([dock], [440], Qt.Orientation.Horizontal)
            dock.set_model(os.environ["RS_DEEP_SCREENSHOT_MODEL"])
            dock.layer_combos["INPUT"].setLayer(layer)
            iface.mapCanvas().setExtent(layer.extent())
            run = dock.start_run()
            if run is None:
                return fail("the dock did not start a run")
            state["run"] = run
            run.finished.connect(finished)
            keep.append(finished)
        except Exception as exc:  # report instead of leaving QGIS open
            import traceback
            fail(f"{exc}\n{traceback.format_exc()}")

    def finished(run):
        if run.status != run.DONE:
            return fail(f"the run ended {run.status}: {run.message}")
        # the class raster's opaque background would hide the image: show the image and the building polygons
        for layer in run.layers:
            if isinstance(layer, QgsRasterLayer):
                node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
                if node is not None:
                    node.setItemVisibilityChecked(False)
        canvas = iface.mapCanvas()
        canvas.refreshAllLayers()
        later(2500, grab)  # let the canvas render the new layers

    def grab():
        canvas = iface.mapCanvas()
        if canvas.isDrawing():
            return later(500, grab)
        win = iface.mainWindow()
        image = win.grab()
        if not image.save(out, "PNG"):
            return fail(f"could not write {out}")
        run = state["run"]
        write_status(ok=True, run=run.name, message=run.message, width=image.width(), height=image.height())
        quit_qgis(0)

    later(3000, start)  # let the main window settle and the plugins finish loading


if os.environ.get(STAGE_ENV) == "qgis":
    in_qgis()
elif __name__ == "__main__":
    sys.exit(main())
