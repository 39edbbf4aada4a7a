"""make bench-dask: segmentation of the bench's generated raster in one process and on a Dask LocalCluster.

Uses tools/bench.py's raster (``make_raster``: 8192 x 8192 RGB by default, ``--size`` for another) and model
(``bench_package``: the demo's U-Net, 512-px tiles, 64-px overlap, random weights). Each run is a fresh process
(the client), timed end to end (cluster start-up, model shipping and the writing of the class and confidence
rasters included), on the CPU. Every mode runs BENCH_RUNS times (default 3), the modes interleaved round by round;
the figures are the medians (the seconds of every run in ``runs_s``, and the ratios of each round in
``overhead_1_rounds`` and ``scaling_2_rounds``: one run's time varies by 10-15 % on this shared machine). Prints
one JSON line:

  single_s           today's run in one process (on all cores; onnxruntime from the ONNX cache, as the engine runs the
                     package by default on the CPU, or torch with RS_DEEP_ONNX_CACHE=0)
  single_1thread_s   the same on one thread (RS_DEEP_THREADS=1)
  local1_s, local2_s CLUSTER=local:1 and local:2 (1 and 2 worker processes, one thread each:
                     RS_DEEP_THREADS=1), blocks of ``--block``
  local1_allcores_s  CLUSTER=local:1 as it runs by default: its one worker on every core (cores / N each)
  scaling_2          local1_s / local2_s (2 workers over 1, one thread each)
  overhead_1         single_s / local1_allcores_s (both on every core); overhead_1_same_threads:
                     single_1thread_s / local1_s (both on one thread)
  client_peak_rss_mib  peak RSS of each client process, the largest of its runs (the workers are other processes)
  equal_classes      each cluster run's class raster equals the single-process run's on one thread, as the
                     workers (single_1thread), pixel for pixel; confidence_max_diff: the largest difference of the
                     confidence rasters (Byte, probability x 255)
  pixels_differing_vs_single  class pixels that differ from today's run on all cores (the sums in another
                     order on another number of threads: a pixel at a tie of two classes may flip)
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
from bench import CACHE, OUT, bench_package, make_raster, peak_rss_bytes, prepare  # noqa: E402 (after the path set-up)

MODES = ("single", "single_1thread", "local:1", "local:2", "local:1-allcores")
#: the client's environment per mode (the LocalCluster's workers inherit it)
MODE_ENV = {"single_1thread": {"RS_DEEP_THREADS": "1"}, "local:1": {"RS_DEEP_THREADS": "1"},
            "local:2": {"RS_DEEP_THREADS": "1"}}


def child(mode, raster, prefix, block):
    """One run in this (fresh) process: prints a JSON dict. The package runs as the engine runs it by default on the
    CPU (onnxruntime from the ONNX cache, made before the clock starts, as tools/bench.py does)."""
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.onnx.cache import inference_backend
    pkg = load_package(bench_package())
    if inference_backend(pkg, "cpu") == "torch":
        import segmentation_models_pytorch  # noqa: F401 (imported before the clock starts, as in tools/bench.py)
    cluster = mode.split("-")[0] if mode.startswith("local") else None
    t0 = time.perf_counter()
    res = segment(raster, pkg, prefix + "_classes.tif", confidence=prefix + "_conf.tif", skip_classes=[0],
                  device="cpu", cluster=cluster, block_size=block)
    seconds = time.perf_counter() - t0
    rss = peak_rss_bytes() / 2**20
    print(json.dumps({"seconds": round(seconds, 2), "rss_mib": round(rss), "tiles": res.tiles,
                      "tiles_run": res.tiles_run}))


def warm():
    """Make the package's ONNX cache (a PyTorch export on a miss) in a process of its own, before any measured run:
    a measured client that exported it would report PyTorch's memory as its peak RSS."""
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.onnx.cache import inference_backend
    inference_backend(load_package(bench_package()), "cpu")


def compare(a, b):
    """(class pixels that differ, largest confidence difference) of two runs' outputs, read in row blocks."""
    import numpy as np
    import rasterio
    differ, conf = 0, 0
    for suffix in ("_classes.tif", "_conf.tif"):
        with rasterio.open(a + suffix) as da, rasterio.open(b + suffix) as db:
            for r in range(0, da.height, 1024):
                win = ((r, min(r + 1024, da.height)), (0, da.width))
                x, y = da.read(window=win), db.read(window=win)
                if suffix == "_classes.tif":
                    differ += int((x != y).sum())
                else:
                    conf = max(conf, int(np.abs(x.astype(np.int16) - y).max()))
    return differ, conf


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="raster width and height (px)")
    ap.add_argument("--block", type=int, default=4096, help="block size of the cluster runs (px)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "RASTER", "PREFIX"))
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.block)
    if args.warm:
        return warm()
    os.makedirs(OUT, exist_ok=True)
    raster = make_raster(os.path.join(OUT, f"rgb_{args.size}.tif"), args.size)
    prepare()
    env = dict(os.environ)
    env.setdefault("GDAL_CACHEMAX", "64")  # as tools/bench.py: GDAL's cache would hide the engine's memory
    env.setdefault("RS_DEEP_CACHE_DIR", CACHE)
    subprocess.run([sys.executable, __file__, "--warm"], check=True, env=env)
    runs, times = {}, {m: [] for m in MODES}
    load_start = round(os.getloadavg()[0], 2)
    rounds = max(1, int(os.environ.get("BENCH_RUNS", "3")))
    for r in range(rounds):
        for mode in MODES:
            prefix = os.path.join(OUT, f"dask_{args.size}_{mode.replace(':', '')}")
            proc = subprocess.run([sys.executable, __file__, "--block", str(args.block), "--child", mode, raster,
                                   prefix], check=True, capture_output=True, text=True,
                                  env=dict(env, **MODE_ENV.get(mode, {})))
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            times[mode].append(got["seconds"])
            rss = max(got["rss_mib"], runs.get(mode, {}).get("rss_mib", 0))
            runs[mode] = dict(got, prefix=prefix, rss_mib=rss)
            print(f"round {r + 1}/{rounds} {mode}: {got['seconds']} s", file=sys.stderr, flush=True)
    same_threads = {m: compare(runs["single_1thread"]["prefix"], runs[m]["prefix"]) for m in MODES[2:]}
    vs_single = {m: compare(runs["single"]["prefix"], runs[m]["prefix"])[0] for m in MODES[1:]}
    s = {m: statistics.median(times[m]) for m in MODES}
    print(json.dumps({
        "size": args.size, "block": args.block, "cpu_count": os.cpu_count(), "load_avg_start": load_start,
        "runs": rounds, "single_s": s["single"], "single_1thread_s": s["single_1thread"], "local1_s": s["local:1"],
        "local2_s": s["local:2"], "scaling_2": round(s["local:1"] / s["local:2"], 3),
        "local1_allcores_s": s["local:1-allcores"],
        "overhead_1": round(s["single"] / s["local:1-allcores"], 3),
        "overhead_1_same_threads": round(s["single_1thread"] / s["local:1"], 3),
        "overhead_1_rounds": [round(a / b, 3) for a, b in zip(times["single"], times["local:1-allcores"])],
        "scaling_2_rounds": [round(a / b, 3) for a, b in zip(times["local:1"], times["local:2"])],
        "runs_s": times,
        "tiles": runs["single"]["tiles"], "tiles_run_cluster": runs["local:2"]["tiles_run"],
        "client_peak_rss_mib": {m: runs[m]["rss_mib"] for m in MODES},
        "equal_classes": {m: same_threads[m][0] == 0 for m in MODES[2:]},
        "confidence_max_diff": {m: same_threads[m][1] for m in MODES[2:]},
        "pixels_differing_vs_single": vs_single, "load_avg_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
