"""make bench: segmentation throughput, efficiency, memory and vectorising speed on the CPU.

Generates structured 8192 x 8192 and 2048 x 2048 RGB GeoTIFFs (in build/bench), runs the engine with a
model of the demo's architecture (3 bands in, random weights) in a fresh process for each size, BENCH_RUNS times
(default 3; the figures are the medians, with the range of efficiency and peak RSS beside them: on a shared
2-core machine one run's peak RSS varies by about 20 MiB and its speed by about 10 %), and
prints one JSON line last:

  mpix_per_s         input megapixels per second, end to end (8192^2), libraries already imported
  efficiency         time of bare forward passes over the same tiles / end-to-end time, both with the backend the
                     engine runs the package on by default (``backend``: onnxruntime from the ONNX cache on the CPU,
                     engine/models/onnx/cache.py; PyTorch with RS_DEEP_ONNX_CACHE=0)
  efficiency_cold    the same with the one-off import of that backend counted in (a fresh process; a QGIS session
                     pays it once)
  rss_ratio          peak RSS at 8192^2 / peak RSS at 2048^2 (memory bounded by tiles, not raster size)
  vectorise_vs_gdal  our vectorising time / gdal_polygonize.py on the same class raster
  startup_s          wall seconds of ``qgis_process run rs_deep:segment`` on a 64 x 64 px crop of the bundled Atlanta
                     image with the bundled buildings_demo package (DEVICE auto): start-up, imports, model loading;
                     the median of 3 runs after one unmeasured run (file cache, the package's ONNX cache and the
                     plugin's compiled modules warm, as in a QGIS profile after the plugin's first run)
  startup_first_s    the same, once, with an empty ONNX cache: the package's first run, which exports it
  peak_rss_mib_tiny  peak RSS of that process (MiB; the largest of the 3 runs)
  startup_onnx_s, peak_rss_mib_tiny_onnx   the same with buildings_demo exported to ONNX (onnxruntime, no torch)

``tools/bench.py --startup`` measures only the start-up figures (a few seconds per run) and prints them as one JSON
line.

GDAL's block cache is capped at 64 MB in the measured processes (GDAL_CACHEMAX, unless set already): GDAL's
default, 5 % of the RAM, is a cache that a large raster fills, and would hide the engine's own memory.
"""
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
OUT = os.path.join(ROOT, "build", "bench")
DEMO = os.path.join(ROOT, "resources", "models", "buildings_demo")
SAMPLE = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
CACHE = os.path.join(OUT, "cache")  # RS_DEEP_CACHE_DIR of the measured runs (the ONNX cache), unless set
PACKAGE = os.path.join(OUT, "bench_model")  # the bench's package (:func:`bench_package`)
DEMO_ONNX = os.path.join(OUT, "buildings_demo.onnx")  # buildings_demo exported to ONNX (start-up figures)
TINY = os.path.join(OUT, "atlanta_64.tif")  # the start-up raster


def make_raster(path, size, block=512):
    """Roofs, roads and vegetation-like texture, written block row by block row (bounded memory)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(size)
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32616",
                transform=from_origin(740000, 3740000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                compress="deflate", BIGTIFF="IF_SAFER")
    cell = 64
    ncell = size // cell + 1
    roofs = rng.random((ncell, ncell)) < 0.35
    tone = rng.integers(90, 220, (ncell, ncell, 3))
    with rasterio.open(path + ".tmp.tif", "w", **prof) as ds:
        for r0 in range(0, size, block):
            yy, xx = np.mgrid[r0:r0 + block, 0:size]
            cy, cx = yy // cell, xx // cell
            iy, ix = yy % cell, xx % cell
            inside = roofs[cy, cx] & (iy > 8) & (iy < 56) & (ix > 8) & (ix < 56)
            road = (iy < 6) | (ix < 6)
            base = 60 + 40 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 12, xx.shape)
            img = np.empty((3, block, size), np.float32)
            for b in range(3):
                band = base * (0.8 + 0.15 * b)
                band = np.where(road, 150.0, band)
                band = np.where(inside, tone[cy, cx, b], band)
                img[b] = band
            ds.write(np.clip(img, 0, 255).astype("uint8"), window=((r0, r0 + block), (0, size)))
    os.replace(path + ".tmp.tif", path)
    return path


def bench_package():
    """The demo's architecture and tiling, with 3 input bands and fixed random weights."""
    path = PACKAGE
    if os.path.exists(os.path.join(path, "model.json")):
        return path
    import torch
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.package import save_package
    demo = load_package(DEMO)
    builder = dict(demo.builder, in_channels=3)
    torch.manual_seed(0)
    save_package(build_model(builder), path, name="bench", task="segmentation", bands=["red", "green", "blue"],
                 classes=demo.classes, builder=builder, tile_size=demo.tile_size, overlap=demo.overlap,
                 gsd=0.5, value_scaling=[{"type": "min-max", "minimum": 0, "maximum": 255}])
    return path


def peak_rss_bytes():
    """This process's peak RSS: VmHWM (Linux; counted from this program's start) or ``ru_maxrss``. ``ru_maxrss`` of a
    child of a large process starts at the parent's RSS (Linux keeps the larger of the two at exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare(startup_files=False):
    """The bench's package (and with ``startup_files`` buildings_demo's ONNX export and the start-up raster), made
    by ``--prepare`` in a process of their own when missing: making them imports PyTorch, and the measured
    processes, forked from the bench's, would start with its peak RSS as theirs."""
    need = [os.path.join(PACKAGE, "model.json")] + ([DEMO_ONNX, TINY] if startup_files else [])
    if not all(os.path.exists(p) for p in need):
        subprocess.run([sys.executable, __file__, "--prepare"], check=True)


def child(raster, out_prefix):
    """One segmentation in this (fresh) process: prints a JSON dict. The network runs as the engine runs it by
    default (DEVICE cpu): onnxruntime from the ONNX cache (:mod:`..models.onnx.cache`, prepared before the clock
    starts, as on every run after a package's first), PyTorch when the cache is off (RS_DEEP_ONNX_CACHE=0)."""
    import numpy as np
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    from rs_deep.rs_deep_plugin.engine.models.onnx.cache import inference_backend, make_runner
    from rs_deep.rs_deep_plugin.engine.models.runners import select_device
    pkg = load_package(bench_package())
    t_prep = time.perf_counter()
    backend = inference_backend(pkg, "cpu")  # a cache miss exports the package here (timed on its own)
    prepare_seconds = time.perf_counter() - t_prep
    t_imp = time.perf_counter()
    if backend == "torch":
        import segmentation_models_pytorch  # noqa: F401 (the one-off import, timed on its own)
    else:
        import onnxruntime  # noqa: F401
    import_seconds = time.perf_counter() - t_imp
    t0 = time.perf_counter()
    res = segment(raster, pkg, out_prefix + "_classes.tif", confidence=out_prefix + "_conf.tif", skip_classes=[0],
                  device="cpu")
    e2e = time.perf_counter() - t0
    rss = peak_rss_bytes()
    # bare forward passes over the same number of tiles, same batch size, same network and backend
    runner = make_runner(pkg, select_device("cpu", backend))
    bs = 2
    x = np.random.default_rng(0).random((bs, 3, pkg.tile_size, pkg.tile_size), np.float32)
    if backend == "torch":
        torch = runner.torch
        xt = torch.from_numpy(x).contiguous(memory_format=runner.memory_format)

        def forward():
            with torch.inference_mode():
                runner.model(xt)
    else:
        def forward():
            runner.raw(x)
    forward()  # warm-up (also done by the engine's first batch)
    t1 = time.perf_counter()
    for _ in range((res.tiles_run + bs - 1) // bs):
        forward()
    fwd = time.perf_counter() - t1
    print(json.dumps({"seconds": e2e, "import_seconds": import_seconds, "forward_seconds": fwd, "peak_rss": rss,
                      "backend": backend, "prepare_seconds": prepare_seconds, "tiles": res.tiles,
                      "tiles_run": res.tiles_run, "mpix": res.width * res.height / 1e6}))


def tiny_raster(path, size=64):
    """A ``size`` x ``size`` px crop of the bundled Atlanta image (real pixels, its CRS and grid)."""
    import rasterio
    from rasterio.windows import Window
    if not os.path.exists(path):
        with rasterio.open(SAMPLE) as src:
            window = Window(200, 300, size, size)
            profile = dict(src.profile, width=size, height=size, transform=src.window_transform(window), tiled=False)
            for key in ("blockxsize", "blockysize"):
                profile.pop(key, None)
            with rasterio.open(path + ".tmp.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
        os.replace(path + ".tmp.tif", path)
    return path


def demo_onnx(path):
    """buildings_demo exported to ONNX (rs_deep's export, once)."""
    if not os.path.exists(path):
        from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
        export_onnx(DEMO, path)
    return path


def timed_process(cmd, env):
    """(wall seconds, peak RSS in bytes) of one process run to its end; its output is discarded (os.wait4 gives
    the rusage of that one child)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def startup(runs=3):
    """``qgis_process run rs_deep:segment`` on a 64 x 64 px raster with buildings_demo, as a package and as ONNX:
    {startup_s, peak_rss_mib_tiny, startup_onnx_s, peak_rss_mib_tiny_onnx} (module docstring)."""
    from qgis_env import qgis_env, qgis_process_cmd
    os.makedirs(OUT, exist_ok=True)
    prepare(startup_files=True)
    raster = tiny_raster(TINY)
    models = {"": DEMO, "_onnx": demo_onnx(DEMO_ONNX)}
    env = qgis_env()
    env.setdefault("GDAL_CACHEMAX", "64")
    env.setdefault("RS_DEEP_CACHE_DIR", CACHE)
    # Python keeps the plugin's compiled modules (__pycache__) after their first import, as in every QGIS profile;
    # a shell with PYTHONDONTWRITEBYTECODE set (some containers) would compile them again on every run (~0.3 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
    exe = qgis_process_cmd()
    subprocess.run([exe, "plugins", "enable", "rs_deep"], env=env, capture_output=True, check=False)
    line = {}
    first = dict(env, RS_DEEP_CACHE_DIR=tempfile.mkdtemp(prefix="rs_deep_bench_cache_"))
    try:
        line["startup_first_s"] = round(timed_process(
            [exe, "run", "rs_deep:segment", "--", f"INPUT={raster}", f"MODEL={DEMO}",
             f"OUTPUT={os.path.join(OUT, 'startup_first.tif')}"], first)[0], 2)
    finally:
        shutil.rmtree(first["RS_DEEP_CACHE_DIR"], ignore_errors=True)
    for suffix, model in models.items():
        out = os.path.join(OUT, f"startup{suffix}.tif")
        cmd = [exe, "run", "rs_deep:segment", "--", f"INPUT={raster}", f"MODEL={model}", f"OUTPUT={out}"]
        timed_process(cmd, env)  # unmeasured: the file cache (and the package's ONNX cache)
        measured = [timed_process(cmd, env) for _ in range(runs)]
        line[f"startup{suffix}_s"] = round(statistics.median(m[0] for m in measured), 2)
        line[f"peak_rss_mib_tiny{suffix}"] = round(max(m[1] for m in measured) / 2**20)
        print(f"qgis_process rs_deep:segment, 64 x 64 px, {os.path.basename(model)}: "
              f"{line[f'startup{suffix}_s']:.2f} s, peak RSS {line[f'peak_rss_mib_tiny{suffix}']} MiB", flush=True)
    return line


def vectorise_compare(prefix):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.geo.vectorize import vectorize
    pkg = load_package(bench_package())
    t0 = time.perf_counter()
    polys = vectorize(prefix + "_classes.tif", prefix + "_conf.tif", pkg.classes, min_area_m2=0, simplify=0)
    ours = time.perf_counter() - t0
    gdal = shutil.which("gdal_polygonize.py")
    dst = prefix + "_gdal.gpkg"
    if os.path.exists(dst):
        os.remove(dst)
    t0 = time.perf_counter()
    subprocess.run([gdal, "-q", prefix + "_classes.tif", "-f", "GPKG", dst], check=True)
    theirs = time.perf_counter() - t0
    return ours, theirs, len(polys)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        os.makedirs(OUT, exist_ok=True)
        bench_package()
        demo_onnx(DEMO_ONNX)
        tiny_raster(TINY)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--startup":
        print(json.dumps(startup()))
        return
    os.makedirs(OUT, exist_ok=True)
    prepare()
    results, spread = {}, {}
    runs = max(1, int(os.environ.get("BENCH_RUNS", "3")))
    for size in (2048, 8192):
        raster = make_raster(os.path.join(OUT, f"rgb_{size}.tif"), size)
        prefix = os.path.join(OUT, f"out_{size}")
        env = dict(os.environ)
        env.setdefault("GDAL_CACHEMAX", "64")
        env.setdefault("RS_DEEP_CACHE_DIR", CACHE)
        rows = []
        for i in range(runs):  # each in a fresh process; the figures are the medians of the runs
            proc = subprocess.run([sys.executable, __file__, "--child", raster, prefix], check=True,
                                  capture_output=True, text=True, env=env)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{size} x {size} run {i + 1}: {r['seconds']:.1f} s end to end, {r['forward_seconds']:.1f} s bare "
                  f"forward (efficiency {r['forward_seconds'] / r['seconds']:.3f}), {r['tiles_run']} tiles, peak RSS "
                  f"{r['peak_rss'] / 2**20:.0f} MiB", flush=True)
        results[size] = dict(rows[0], **{key: statistics.median(r[key] for r in rows)
                                         for key in ("seconds", "forward_seconds", "import_seconds", "peak_rss")},
                             efficiency=statistics.median(r["forward_seconds"] / r["seconds"] for r in rows))
        spread[size] = dict(rss=[round(min(r["peak_rss"] for r in rows) / 2**20), round(max(r["peak_rss"] for r in rows) / 2**20)],
                            efficiency=[round(min(r["forward_seconds"] / r["seconds"] for r in rows), 3),
                                        round(max(r["forward_seconds"] / r["seconds"] for r in rows), 3)])
    ours, gdal, n = vectorise_compare(os.path.join(OUT, "out_8192"))
    print(f"vectorising 8192^2 class raster: ours {ours:.1f} s ({n} polygons, with mean probability), "
          f"gdal_polygonize.py {gdal:.1f} s")
    # measured from a small fresh process: a child forked from this one (torch loaded) would report this
    # process's RSS as its own peak (Linux keeps the larger of the two at exec)
    proc = subprocess.run([sys.executable, __file__, "--startup"], check=True, capture_output=True, text=True)
    print("\n".join(proc.stdout.strip().splitlines()[:-1]), flush=True)
    lean = json.loads(proc.stdout.strip().splitlines()[-1])
    big = results[8192]
    line = {
        "mpix_per_s": round(big["mpix"] / big["seconds"], 3),
        "efficiency": round(big["efficiency"], 3),
        "efficiency_range": spread[8192]["efficiency"],
        "efficiency_cold": round(big["forward_seconds"] / (big["seconds"] + big["import_seconds"]), 3),
        "import_seconds": round(big["import_seconds"], 1),
        "rss_ratio": round(big["peak_rss"] / results[2048]["peak_rss"], 3),
        "vectorise_vs_gdal": round(ours / gdal, 3),
        "seconds_8192": round(big["seconds"], 1),
        "peak_rss_mib_8192": round(big["peak_rss"] / 2**20),
        "peak_rss_mib_2048": round(results[2048]["peak_rss"] / 2**20),
        "peak_rss_range_mib": {"8192": spread[8192]["rss"], "2048": spread[2048]["rss"]},
        "runs": runs,
        "tiles_8192": big["tiles_run"],
        "polygons": n,
        "gdal_cachemax_mb": int(os.environ.get("GDAL_CACHEMAX", "64")),
        "device": "cpu",
        "backend": big["backend"],
        "cores": os.cpu_count(),
    }
    line.update(lean)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
