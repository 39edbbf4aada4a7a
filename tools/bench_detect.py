#!/usr/bin/env python3
"""Object detection benchmark on the CPU: objects per second and efficiency.

    .venv/bin/python tools/bench_detect.py [--size 4096] [--model resources/models/trees_demo]

Generates (once, in build/bench) a ``size`` x ``size`` RGB GeoTIFF at 0.1 m by mosaicking
mirrored and rotated copies of the tree samples (NEON imagery from ../shared/data/trees_neon,
or the bundled resources/sample/osbs_029.tif), runs :func:`rs_deep_plugin.engine.detect.detect`
with the bundled tree detector on it and prints one JSON line last:

  objects_per_s   objects found per second, end to end (reading, inference, merging, mapping)
  efficiency      time of bare forward passes over the same number of tiles (real tiles of the
                  raster, same batch size, same prepared network) / end-to-end time
  mpix_per_s      input megapixels per second, end to end
"""
import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
OUT = os.path.join(ROOT, "build", "bench")
MODEL = os.path.join(ROOT, "resources", "models", "trees_demo")
SOURCES = [os.path.join(ROOT, "..", "shared", "data", "trees_neon", "2019_YELL_2_541000_4977000_image_crop.png"),
           os.path.join(ROOT, "..", "shared", "data", "trees_neon", "OSBS_029.tif"),
           os.path.join(ROOT, "resources", "sample", "osbs_029.tif")]


def make_raster(path, size, block=512):
    """A mosaic of mirrored/rotated copies of real tree imagery, written block row by block row."""
    import warnings
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    if os.path.exists(path):
        return path
    images = []
    for src in SOURCES:
        if os.path.exists(src):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(src) as ds:
                    images.append(ds.read([1, 2, 3]))
    if not images:
        raise SystemExit("no tree imagery found (../shared/data/trees_neon or resources/sample/osbs_029.tif)")
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32612",
                transform=from_origin(541000, 4977000, 0.1, 0.1), tiled=True, blockxsize=512, blockysize=512,
                compress="deflate", BIGTIFF="IF_SAFER")
    piece = 384  # patches of this size are pasted side by side

    def patch(pi, pj):  # the same patch whichever block row asks for it
        rng = np.random.default_rng((size, pi, pj))
        img = images[int(rng.integers(len(images)))]
        _, h, w = img.shape
        y, x = int(rng.integers(0, h - piece + 1)), int(rng.integers(0, w - piece + 1))
        p = np.rot90(img[:, y:y + piece, x:x + piece], int(rng.integers(4)), axes=(1, 2))
        return p[:, :, ::-1] if rng.random() < 0.5 else p

    with rasterio.open(path + ".tmp.tif", "w", **prof) as ds:
        for r0 in range(0, size, block):
            r1 = min(r0 + block, size)
            rows = np.empty((3, r1 - r0, size), np.uint8)
            for pi in range(r0 // piece, (r1 - 1) // piece + 1):
                a0, a1 = max(pi * piece, r0), min((pi + 1) * piece, r1)
                for pj in range(0, (size + piece - 1) // piece):
                    c0, c1 = pj * piece, min((pj + 1) * piece, size)
                    rows[:, a0 - r0:a1 - r0, c0:c1] = patch(pi, pj)[:, a0 - pi * piece:a1 - pi * piece, :c1 - c0]
            ds.write(rows, window=((r0, r1), (0, size)))
    os.replace(path + ".tmp.tif", path)
    return path


def bench_detection(size=4096, model=MODEL, batch_size=None):
    """Time detection on a generated ``size``^2 raster; returns (and prints) the JSON line as a dict."""
    import numpy as np
    import torch
    from rs_deep.rs_deep_plugin.engine.inference.detect import detect
    from rs_deep.rs_deep_plugin.engine.models.detection_options import resolve_detection_options
    from rs_deep.rs_deep_plugin.engine.models.runners import DetectionRunner
    from rs_deep.rs_deep_plugin.engine.models.runners import default_batch_size, select_device
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.geo.raster import RasterReader
    from rs_deep.rs_deep_plugin.engine.inference.tiling import TileGrid
    os.makedirs(OUT, exist_ok=True)
    raster = make_raster(os.path.join(OUT, f"trees_{size}.tif"), size)
    pkg = load_package(model, task="detection")
    dev = select_device("cpu")
    bs = batch_size or default_batch_size(dev)
    t0 = time.perf_counter()
    res = detect(raster, pkg, device="cpu", batch_size=bs)
    e2e = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # bare forward passes over as many real tiles of the raster, same batch size, same prepared network
    reader = RasterReader(raster, pkg)
    grid = TileGrid(0, 0, reader.width, reader.height, reader.native_tile, reader.native_overlap)
    tiles = [(x, y) for y in grid.ys for x in grid.xs]
    step = max(1, len(tiles) // (4 * bs))
    sample = np.stack([reader.read_tile(x, y)[0] for x, y in tiles[::step][:4 * bs]])
    reader.close()
    runner = DetectionRunner(pkg.load_model(), dev, *resolve_detection_options(pkg))
    with torch.inference_mode():
        runner(sample[:bs])  # warm-up (the engine's first batch warms up too)
        t1 = time.perf_counter()
        nb = (res.tiles_run + bs - 1) // bs
        for k in range(nb):
            j = (k * bs) % (len(sample) - bs + 1)
            runner(sample[j:j + bs])
        fwd = time.perf_counter() - t1
    line = {
        "objects": len(res),
        "objects_per_s": round(len(res) / e2e, 2),
        "efficiency": round(fwd / e2e, 3),
        "mpix_per_s": round(size * size / 1e6 / e2e, 3),
        "seconds": round(e2e, 1),
        "forward_seconds": round(fwd, 1),
        "tiles": res.tiles_run,
        "raw_boxes": res.raw_detections,
        "size": size,
        "peak_rss_mib": round(rss / 2 ** 20),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "model": pkg.name,
    }
    print(f"{size} x {size} px: {len(res)} objects in {e2e:.1f} s end to end ({line['objects_per_s']} objects/s), "
          f"{fwd:.1f} s bare forward over {res.tiles_run} tiles, peak RSS {line['peak_rss_mib']} MiB", flush=True)
    print(json.dumps(line), flush=True)
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch-size", type=int)
    args = ap.parse_args(argv)
    bench_detection(args.size, args.model, args.batch_size)


if __name__ == "__main__":
    main()
