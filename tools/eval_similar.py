#!/usr/bin/env python3
"""How well does similarity search (rs_deep:find_similar) find buildings on an area the model never saw?

    .venv/bin/python tools/eval_similar.py [--patch 64] [--out build/eval_similar.json]

The bundled buildings_demo U-Net was trained on the left 65 % of resources/sample/atlanta_pan.tif (SpaceNet
Atlanta, 0.5 m panchromatic, 32 footprints). Its encoder is exported as an embedding model (rs_deep:export_onnx
EMBEDDING), and so is the encoder of the same network with random weights (seed 0: what the architecture alone
gives). On the right 35 %, never trained on, the patches (PATCH px, side by side) are labelled "building" when at
least 5 % of their pixels are inside a footprint. Every building patch in turn is the query (QUERY_EXTENT: the
patch itself); the other patches are ranked by similarity, and the ranking is scored against the labels:
precision of the 5 best, and average precision (the mean precision at each building patch's rank). Prints one
table row per model and the share of building patches (what a random ranking scores), and writes the figures to
``--out``.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))  # rs_deep -> this folder (make setup)
IMAGE = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
LABELS = os.path.join(ROOT, "tests", "data", "buildings_atlanta", "buildings.geojson")
MODEL = os.path.join(ROOT, "resources", "models", "buildings_demo")
TRAINED_SHARE = 0.65  # buildings_demo was trained on the left 65 % of the sample


def engine(name):
    import importlib
    return importlib.import_module(f"rs_deep.rs_deep_plugin.engine{name}")


def building_share(image, region, patch):
    """{(row, col): share of building pixels} of the patches of ``patch`` px laid from the top-left of ``region``."""
    import rasterio
    from rasterio.features import rasterize
    from shapely.geometry import shape
    with open(LABELS) as fh:
        shapes = [shape(f["geometry"]) for f in json.load(fh)["features"]]
    with rasterio.open(image) as ds:
        mask = rasterize(shapes, out_shape=(ds.height, ds.width), transform=ds.transform).astype(bool)
    x0, y0, x1, y1 = region
    out = {}
    for r, y in enumerate(range(y0, y1, patch)):
        for c, x in enumerate(range(x0, x1, patch)):
            out[(r, c)] = float(mask[y:min(y + patch, y1), x:min(x + patch, x1)].mean())
    return out


def held_out(image):
    """(region in pixels, bounds in map units) of the part of ``image`` buildings_demo never saw (its right 35 %)."""
    import rasterio
    with rasterio.open(image) as ds:
        width, height, t = ds.width, ds.height, ds.transform
    region = (int(round(width * TRAINED_SHARE)), 0, width, height)
    left, top = t * region[:2]
    right, bottom = t * region[2:]
    return region, (left, bottom, right, top)


def random_copy(model, folder):
    """The package ``model`` with the random weights its network starts from (seed 0), saved in ``folder``."""
    import torch
    pkg = engine(".models.loading").load_package(model)
    torch.manual_seed(0)
    fields = {k: getattr(pkg, k) for k in ("name", "task", "bands", "classes", "builder", "tile_size", "overlap",
                                           "gsd", "value_scaling")}
    engine(".models.package").save_package(engine(".models.architectures").build_model(pkg.builder), folder,
                                           **fields)
    return folder


def average_precision(relevant):
    """Average precision of a ranking given as a list of bools (best first)."""
    hits, total = 0, 0.0
    for i, rel in enumerate(relevant, start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def score(model, image, region, bounds, patch, share, threshold):
    find_similar = engine(".inference.similar").find_similar
    import rasterio
    with rasterio.open(image) as ds:
        t = ds.transform
    x0, y0 = region[:2]
    queries = [k for k, v in share.items() if v >= threshold]
    p5, aps, ran = [], [], set()
    for r, c in queries:
        px, py = x0 + c * patch, y0 + r * patch
        left, top = t * (px, py)
        right, bottom = t * (px + patch, py + patch)
        res = find_similar(image, model, query_bounds=(left, bottom, right, top), bounds=bounds)
        ran |= {(f["row"], f["col"]) for f in res}
        ranked = [f for f in res.best(len(res)) if (f["row"], f["col"]) != (r, c)]
        relevant = [share.get((f["row"], f["col"]), 0.0) >= threshold for f in ranked]
        p5.append(float(np.mean(relevant[:5])))
        aps.append(average_precision(relevant))
    return {"queries": len(queries), "patches": len(ran), "precision_at_5": float(np.mean(p5)),
            "average_precision": float(np.mean(aps)),
            "base_rate": (len(queries) - 1) / max(1, len(ran) - 1)}  # a random ranking of the others


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=64, help="patch size in px (a multiple of 32)")
    ap.add_argument("--threshold", type=float, default=0.05, help="share of building pixels of a building patch")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "eval_similar.json"))
    args = ap.parse_args()
    export_onnx = engine(".models.onnx.export").export_onnx
    region, bounds = held_out(IMAGE)
    share = building_share(IMAGE, region, args.patch)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        trained = export_onnx(MODEL, os.path.join(tmp, "trained.onnx"), embedding=True, patch_size=args.patch)
        random = export_onnx(random_copy(MODEL, os.path.join(tmp, "random")), os.path.join(tmp, "random.onnx"),
                             embedding=True, patch_size=args.patch)
        for name, model in (("buildings_demo encoder (trained on the left 65 %)", trained),
                            ("the same network, random weights (seed 0)", random)):
            rows[name] = score(model, IMAGE, region, bounds, args.patch, share, args.threshold)
    first = next(iter(rows.values()))
    base = first["base_rate"]
    print(f"right 35 % of atlanta_pan.tif: {first['patches']} patches of {args.patch} px run (at least half inside), "
          f"{first['queries']} with >= {args.threshold:.0%} building pixels (a random ranking: precision {base:.3f})")
    print("| embedding model | queries | precision of the 5 best | average precision |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['queries']} | {r['precision_at_5']:.3f} | {r['average_precision']:.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"patch": args.patch, "threshold": args.threshold, "base_rate": base, "models": rows}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
