"""make bench-peers: RS Deep and GeoDeep side by side on the same ONNX model and the same raster.

The model is the bundled ``buildings_demo`` (its first convolution spread over 3 equal bands: GeoDeep runs RGB
models only) exported by ``rs_deep:export_onnx``, with the Deepness/GeoDeep metadata; the raster a 4096 x 4096
8-bit RGB GeoTIFF made by mirroring the bundled Atlanta sample (real imagery, gray, tiled 512 x 512). GeoDeep 0.9.13 (pip) runs in
its own virtual environment under ``build/peers`` (PyPI's rasterio and onnxruntime, nothing shared with QGIS);
RS Deep runs as users run it, ``qgis_process run rs_deep:segment``. Runs are interleaved (RS Deep, GeoDeep, RS
Deep, ...), each a fresh process measured by the kernel (``wait4``: user + system CPU seconds, peak RSS).

Prints one JSON line last: each tool's median wall and CPU seconds and largest peak RSS, and

  cpu_ratio_vs_geodeep   RS Deep CPU seconds / GeoDeep CPU seconds (below 1: RS Deep needs less CPU)
  rss_ratio_vs_geodeep   RS Deep peak RSS / GeoDeep peak RSS
  wall_ratio_vs_geodeep  the same for wall seconds (depends on what else the machine is doing)
  equal_pixels           share of pixels where both tools give the same class (GeoDeep median-filters its mask
                         and drops small segments; RS Deep blends overlapping tiles)

With ``--floor`` each round also runs both tools on a trivial model of the same tile size and metadata (one 1 x 1
convolution: about nothing to compute), and the line gets each tool's ``floor_cpu_s`` (median CPU
seconds of everything but the real model's forward passes: start-up, reading, blending, writing) and
``forward_cpu_s`` (its ``cpu_s`` less that floor).

  usage: tools/bench_peers.py [--size 4096] [--runs 3] [--floor]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from qgis_env import qgis_env, qgis_process_cmd, run_qgis_process  # noqa: E402
OUT = os.path.join(ROOT, "build", "peers")
VENV = os.path.join(OUT, "geodeep-venv")
GEODEEP = ["geodeep==0.9.13", "onnxruntime==1.32.0", "rasterio==1.4.3"]
DEMO = os.path.join(ROOT, "resources", "models", "buildings_demo")
SAMPLE = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
SYS_PY = "/usr/bin/python3"

# GeoDeep's run, as its documentation shows it, writing its class mask on the input's grid
GEODEEP_RUN = """
import sys, numpy as np, rasterio
from geodeep import run
raster, model, out = sys.argv[1:4]
mask = run(raster, model, output_type="raw")
with rasterio.open(raster) as src:
    prof = dict(driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1, dtype="uint8", crs=src.crs,
                transform=src.transform * src.transform.scale(src.width / mask.shape[1], src.height / mask.shape[0]),
                tiled=True, blockxsize=512, blockysize=512, compress="deflate")
with rasterio.open(out, "w", **prof) as dst:
    dst.write(mask.astype("uint8"), 1)
"""


def geodeep_python():
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".installed")
    if not os.path.exists(stamp) or open(stamp).read() != " ".join(GEODEEP):
        print("Installing " + ", ".join(GEODEEP) + " into " + VENV, flush=True)
        subprocess.run([SYS_PY, "-m", "venv", "--clear", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-cache-dir", *GEODEEP], check=True)
        with open(stamp, "w") as f:
            f.write(" ".join(GEODEEP))
    return py


def make_raster(path, size):
    """The Atlanta sample mirrored out to size x size px (real texture everywhere), 0.5 m, tiled; as 8-bit RGB (the
    panchromatic band stretched by the demo model's own min-max scaling, in all three bands): GeoDeep runs
    3-band models only, and scales 8-bit input by 1/255 as the model below does."""
    import numpy as np
    import rasterio
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    if os.path.exists(path):
        return path
    (scaling,) = load_package(DEMO).value_scaling
    with rasterio.open(SAMPLE) as src:
        img = src.read(1).astype(np.float32)
        prof = src.profile
    img = np.clip((img - scaling["minimum"]) / (scaling["maximum"] - scaling["minimum"]) * 255 + 0.5, 0, 255)
    img = img.astype(np.uint8)
    reps = (size // img.shape[0] + 2, size // img.shape[1] + 2)
    row = np.concatenate([img if j % 2 == 0 else img[:, ::-1] for j in range(reps[1])], axis=1)
    big = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps[0])], axis=0)[:size, :size]
    prof.update(width=size, height=size, count=3, dtype="uint8", nodata=None, tiled=True, blockxsize=512,
                blockysize=512, compress="deflate", photometric="RGB")
    with rasterio.open(path + ".tmp.tif", "w", **prof) as dst:
        for band in (1, 2, 3):
            dst.write(big, band)
    os.replace(path + ".tmp.tif", path)
    return path


def export_model(path):
    """buildings_demo taking RGB: its first convolution spread over three equal bands (transfer's band rule: each
    band a third), input scaled by 1/255; on the gray RGB raster above it computes what the demo computes on the
    stretched panchromatic band. Exported with rs_deep:export_onnx's engine call."""
    if os.path.exists(path):
        return path
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
    from rs_deep.rs_deep_plugin.engine.models.package import save_package
    from rs_deep.rs_deep_plugin.engine.training.transfer import adapt_bands, first_conv
    demo = load_package(DEMO)
    model = demo.load_model()
    state = model.state_dict()
    name, _ = first_conv(model)
    state[name] = adapt_bands(state[name], 3)
    builder = dict(demo.builder, in_channels=3)
    rgb = build_model(builder)
    rgb.load_state_dict(state)
    pkg_dir = os.path.join(OUT, "buildings_demo_rgb")
    save_package(rgb, pkg_dir, name="buildings_demo_rgb", task="segmentation", bands=["red", "green", "blue"],
                 classes=demo.classes, builder=builder, tile_size=demo.tile_size, overlap=demo.overlap, gsd=demo.gsd,
                 value_scaling=[{"type": "min-max", "minimum": 0, "maximum": 255}] * 3)
    export_onnx(pkg_dir, path)
    return path


def trivial_model(path, model):
    """``model``'s input, output and Deepness/GeoDeep metadata (without RS Deep's model.json) around one 1 x 1
    convolution (about 2 ms a 512-px tile on one core; no softmax: onnxruntime's costs 8 ms there): runs of it cost
    what a tool spends besides the forward passes."""
    if os.path.exists(path):
        return path
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from rs_deep.rs_deep_plugin.engine.models.onnx.package import MODEL_JSON_KEY
    src = onnx.load(model)
    (inp,), (out,) = src.graph.input, src.graph.output
    channels, classes = inp.type.tensor_type.shape.dim[1].dim_value, out.type.tensor_type.shape.dim[1].dim_value
    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((classes, channels, 1, 1),
                                                                                dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", [inp.name, "w"], [out.name])], "trivial", [inp], [out],
                              [weights])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for p in src.metadata_props:
        if p.key != MODEL_JSON_KEY:
            entry = proto.metadata_props.add()
            entry.key, entry.value = p.key, p.value
    onnx.save(proto, path)
    return path


def measure(cmd, env=None):
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def equal_share(a_path, b_path):
    import numpy as np
    import rasterio
    with rasterio.open(a_path) as a, rasterio.open(b_path) as b:
        x, y = a.read(1), b.read(1)
    if x.shape != y.shape:
        return None
    return float(np.mean(x == y))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--floor", action="store_true", help="also run both tools on a trivial model (see above)")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    raster = os.path.join(OUT, f"atlanta_rgb_{args.size}.tif")
    model, trivial = os.path.join(OUT, "buildings_demo.onnx"), os.path.join(OUT, "trivial.onnx")
    if args.prepare:
        make_raster(raster, args.size)
        trivial_model(trivial, export_model(model))
        return
    gd_py = geodeep_python()
    # made in a child: Linux keeps a parent's peak RSS (here: with torch loaded) as its children's at exec
    subprocess.run([sys.executable, __file__, "--prepare", "--size", str(args.size)], check=True)
    qgis_process = qgis_process_cmd()
    run_qgis_process(["--version"])  # enables the plugin in the bench's profile (not measured)
    # both keep their compiled modules (__pycache__) as installed software does; a shell with
    # PYTHONDONTWRITEBYTECODE set (some containers) would compile the plugin again on every run
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    ours_env = qgis_env()
    ours_env.pop("PYTHONDONTWRITEBYTECODE", None)
    def commands(onnx_model, suffix=""):
        ours, theirs = os.path.join(OUT, f"rs_deep{suffix}.tif"), os.path.join(OUT, f"geodeep{suffix}.tif")
        return {"rs_deep" + suffix: ([qgis_process, "run", "rs_deep:segment", "--", f"INPUT={raster}",
                                      f"MODEL={onnx_model}", f"OUTPUT={ours}"], ours, ours_env),
                "geodeep" + suffix: ([gd_py, "-c", GEODEEP_RUN, raster, onnx_model, theirs], theirs, plain)}

    tools = commands(model)
    if args.floor:
        tools.update(commands(trivial, "_floor"))
    figures = {name: [] for name in tools}
    for run in range(args.runs):
        for name, (cmd, done, env) in tools.items():
            if os.path.exists(done):
                os.remove(done)
            wall, cpu, rss = measure(cmd, env)
            figures[name].append((wall, cpu, rss))
            print(f"run {run + 1} {name}: {wall:.1f} s wall, {cpu:.1f} CPU-s, peak RSS {rss / 2**20:.0f} MiB",
                  flush=True)
    line = {"raster": f"{args.size}x{args.size} px, 3 bands Byte, 0.5 m (Atlanta sample mirrored, gray)",
            "model": "buildings_demo (RGB input) exported to ONNX", "runs": args.runs, "cores": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, rows in figures.items():
        line[name] = {"wall_s": round(statistics.median(r[0] for r in rows), 2),
                      "cpu_s": round(statistics.median(r[1] for r in rows), 2),
                      "peak_rss_mib": round(max(r[2] for r in rows) / 2**20)}
    ours, theirs = line["rs_deep"], line["geodeep"]
    line["cpu_ratio_vs_geodeep"] = round(ours["cpu_s"] / theirs["cpu_s"], 3)
    line["rss_ratio_vs_geodeep"] = round(ours["peak_rss_mib"] / theirs["peak_rss_mib"], 3)
    line["wall_ratio_vs_geodeep"] = round(ours["wall_s"] / theirs["wall_s"], 3)
    if args.floor:
        for name in ("rs_deep", "geodeep"):
            floor = line.pop(name + "_floor")["cpu_s"]
            line[name].update(floor_cpu_s=floor, forward_cpu_s=round(line[name]["cpu_s"] - floor, 2))
    share = equal_share(tools["rs_deep"][1], tools["geodeep"][1])
    line["equal_pixels"] = None if share is None else round(share, 4)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
