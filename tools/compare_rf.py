#!/usr/bin/env python3
"""U-Net (rs_deep:train with its defaults) vs per-pixel random forest on the same labels, scored on an area neither saw.

    make compare-rf        (or .venv/bin/python tools/compare_rf.py [--data ../shared/data] [--quick]
                                                                 [--only SPLIT] [--old-recipe])

For each split of ``SPLITS`` (a labelled scene of ../shared/data cut in two by area: a training part and a
held-out part; buildings_atlanta: building footprints on 0.5 m panchromatic, held out once at the bottom,
mostly forest, and once on the right, houses and forest; fields_denmark: crop groups of the Danish field
register on 10 m Sentinel-2), through QGIS Processing:

* U-Net: ``rs_deep:train`` with its defaults (INPUT, LABELS, CLASS_FIELD and OUTPUT only) on the training
  part, then ``rs_deep:segment`` on the held-out part, once as it is and once with TTA d4 (the 8
  flips/rotations averaged); with ``--old-recipe`` also the explicit settings of 0.5.0 (``OLD_RECIPE``);
* random forest: scikit-learn's RandomForestClassifier on the pixels of the training part, one pixel
  at a time (its band values are the features: no neighbourhood), predicting the held-out part;

and every class raster is scored by ``rs_deep:assess_accuracy`` against the same reference polygons
(pixels outside every polygon are background). Prints a Markdown table and writes it, with the
numbers (and the training wall and CPU seconds), to build/compare_rf/.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
OUT = os.path.join(ROOT, "build", "compare_rf")

# split -> image, labels, class field, held-out side and share
SPLITS = {
    "buildings_atlanta": dict(image="buildings_atlanta/image.tif", labels="buildings_atlanta/buildings.geojson",
                              field=None, side="bottom", held_out=0.35),
    "buildings_atlanta_right": dict(image="buildings_atlanta/image.tif", labels="buildings_atlanta/buildings.geojson",
                                    field=None, side="right", held_out=0.35),
    "fields_denmark": dict(image="fields_denmark/image.tif", labels="fields_denmark/fields.gpkg|layername=fields",
                           field="Afgroede", side="right", held_out=0.3),
}
#: the settings that 0.5.0's table was measured with (rs_deep:train's defaults were then 20 epochs of 4 steps)
OLD_RECIPE = {
    "buildings": dict(ARCHITECTURE=1, ENCODER="resnet18", TILE_SIZE=160, EPOCHS=20, STEPS_PER_EPOCH=40, BATCH_SIZE=8,
                      LEARNING_RATE=0.003, PATIENCE=8),
    "fields": dict(ARCHITECTURE=1, ENCODER="resnet18", TILE_SIZE=64, EPOCHS=30, STEPS_PER_EPOCH=40, BATCH_SIZE=16,
                   LEARNING_RATE=0.003, PATIENCE=10),
}


def crop_group(name):
    from make_eval_models import CROP_CLASSES, crop_group as group
    return CROP_CLASSES[group(name)]


def split_raster(src_path, out_dir, side, share):
    """Write the training part and the held-out part of a raster as GeoTIFFs (same pixels, same grid)."""
    import rasterio
    from rasterio.windows import Window
    with rasterio.open(src_path) as src:
        w, h = src.width, src.height
        if side == "bottom":
            cut = int(round(h * (1 - share)))
            parts = {"train": Window(0, 0, w, cut), "test": Window(0, cut, w, h - cut)}
        else:
            cut = int(round(w * (1 - share)))
            parts = {"train": Window(0, 0, cut, h), "test": Window(cut, 0, w - cut, h)}
        paths = {}
        for name, win in parts.items():
            prof = src.profile.copy()
            prof.update(width=int(win.width), height=int(win.height), transform=src.window_transform(win),
                        driver="GTiff", tiled=False, compress="deflate")
            prof.pop("blockxsize", None), prof.pop("blockysize", None)
            path = os.path.join(out_dir, f"{name}.tif")
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(src.read(window=win))
            paths[name] = path
    return paths


def write_results(folder, markdown, data):
    """Print the Markdown table and write it (results.md) and the numbers (results.json) to ``folder``."""
    print(markdown)
    with open(os.path.join(folder, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)


def label_layer(spec, data, crs_authid):
    """The reference polygons as a memory layer with a text field `class` (grouped crop names)."""
    from qgis.core import QgsFeature, QgsVectorLayer, QgsCoordinateTransform, QgsProject
    src = QgsVectorLayer(os.path.join(data, spec["labels"]), "labels", "ogr")
    if not src.isValid():
        raise SystemExit(f"cannot read {spec['labels']}")
    mem = QgsVectorLayer(f"MultiPolygon?crs={crs_authid}&field=class:string(40)", "reference", "memory")
    xf = QgsCoordinateTransform(src.crs(), mem.crs(), QgsProject.instance())
    feats = []
    for f in src.getFeatures():
        g = f.geometry()
        if g.isEmpty():
            continue
        g.transform(xf)
        name = crop_group(f[spec["field"]]) if spec["field"] else "building"
        nf = QgsFeature(mem.fields())
        nf.setGeometry(g)
        nf["class"] = name
        feats.append(nf)
    mem.dataProvider().addFeatures(feats)
    return mem


def random_forest(train_tif, test_tif, layer, class_names, out_tif, seed=0, max_pixels=200_000):
    """Per-pixel random forest: band values in, class out. Writes the held-out class raster."""
    import rasterio
    from rasterio.features import rasterize
    from shapely import wkb
    from sklearn.ensemble import RandomForestClassifier
    index = {n: i for i, n in enumerate(class_names)}
    shapes = [(wkb.loads(bytes(f.geometry().asWkb())), index[f["class"]]) for f in layer.getFeatures()
              if f["class"] in index]
    with rasterio.open(train_tif) as ds:
        x = ds.read().astype(np.float32)
        y = rasterize(shapes, out_shape=(ds.height, ds.width), transform=ds.transform, fill=0, dtype="uint8")
    feats = x.reshape(x.shape[0], -1).T
    labels = y.ravel()
    rng = np.random.default_rng(seed)
    take = rng.permutation(labels.size)[:max_pixels]
    t0 = time.time()
    rf = RandomForestClassifier(n_estimators=100, n_jobs=2, random_state=seed, class_weight="balanced")
    rf.fit(feats[take], labels[take])
    fit_s = time.time() - t0
    with rasterio.open(test_tif) as ds:
        xt = ds.read().astype(np.float32)
        prof = ds.profile.copy()
    pred = rf.predict(xt.reshape(xt.shape[0], -1).T).reshape(xt.shape[1:]).astype(np.uint8)
    prof.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open(out_tif, "w", **prof) as dst:
        dst.write(pred, 1)
    return {"fit_seconds": round(fit_s, 1), "training_pixels": int(take.size)}


def assess(processing, prediction, layer, model, html):
    from qgis.core import QgsVectorLayer
    table = html.replace(".html", ".csv")
    res = processing.run("rs_deep:assess_accuracy", {
        "PREDICTION": prediction, "REFERENCE": layer, "CLASS_FIELD": "class", "OUTSIDE": 0, "MODEL": model,
        "OUTPUT_HTML": html, "OUTPUT_TABLE": table})
    rows = QgsVectorLayer(res["OUTPUT_TABLE"], "t", "ogr")
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None  # undefined (no pixel of the class on either side)
    per_class = {f["class_name"]: {"iou": num(f["iou"]), "f1": num(f["f1"])} for f in rows.getFeatures()}
    return {"overall_accuracy": res["OVERALL_ACCURACY"], "kappa": res["KAPPA"], "mean_iou": res["MEAN_IOU"],
            "classes": per_class, "report": html}


def train_unet(processing, train_tif, layer, out, settings):
    """rs_deep:train into ``out`` with ``settings`` over the defaults; (wall seconds, CPU seconds)."""
    t0, c0 = time.time(), time.process_time()
    processing.run("rs_deep:train", dict(INPUT=train_tif, LABELS=layer, CLASS_FIELD="class", TASK=0, OUTPUT=out,
                                         **settings))
    return round(time.time() - t0, 1), round(time.process_time() - c0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--quick", action="store_true", help="a 1-minute budget (a smoke run, not the published numbers)")
    ap.add_argument("--only", choices=sorted(SPLITS), action="append", help="this split only (repeatable)")
    ap.add_argument("--old-recipe", action="store_true", help="also train with 0.5.0's explicit settings")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an rs_deep:train parameter over the defaults for the U-Net (repeatable), e.g. "
                         "--set ENCODER=mobilenet_v2 --set TIME_BUDGET=10; the results go to build/compare_rf/<split>/"
                         "unet_<settings>")
    args = ap.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.set)
    from qgis_env import start_processing
    app, processing, provider = start_processing()  # keep the provider referenced
    from qgis.core import QgsRasterLayer

    results = {}
    if os.path.isfile(os.path.join(OUT, "results.json")):  # keep the other splits' numbers
        with open(os.path.join(OUT, "results.json"), encoding="utf-8") as f:
            results = {k: v for k, v in json.load(f).items() if k in SPLITS}
    for scene, spec in SPLITS.items():
        if args.only and scene not in args.only:
            continue
        out = os.path.join(OUT, scene)
        os.makedirs(out, exist_ok=True)
        parts = split_raster(os.path.join(args.data, spec["image"]), out, spec["side"], spec["held_out"])
        crs = QgsRasterLayer(parts["train"], "t").crs().authid()
        layer = label_layer(spec, args.data, crs)
        quick = {"TIME_BUDGET": 1} if args.quick else {}
        recipes = {"unet": dict(quick, **extra)}
        if args.old_recipe:
            recipes["unet_old"] = dict(OLD_RECIPE[scene.split("_")[0]], **({"EPOCHS": 2} if args.quick else {}))
        row = {}
        for key, settings in recipes.items():
            print(f"== {scene}: held-out {spec['side']} {spec['held_out']:.0%}; U-Net ({key}) {settings or 'defaults'}",
                  flush=True)
            model = os.path.join(out, key)
            wall, cpu = train_unet(processing, parts["train"], layer, model, settings)
            with open(os.path.join(model, "training_report.json"), encoding="utf-8") as f:
                rep = json.load(f)
            info = dict(seconds=wall, cpu_seconds=cpu, settings=settings, epochs=rep["epochs_run"],
                        crops_seen=rep["samples"]["crops_seen"], tile_size=rep["tile_size"],
                        batch_size=rep["batch_size"])
            for tta in (("none", "d4") if key == "unet" else ("none",)):
                tif = os.path.join(out, f"{key}_{tta}_held_out.tif")
                processing.run("rs_deep:segment", {"INPUT": parts["test"], "MODEL": model, "OUTPUT": tif, "TTA": tta})
                name = key if tta == "none" else f"{key}_tta"
                row[name] = dict(assess(processing, tif, layer, model, os.path.join(out, f"{name}_report.html")),
                                 tta=tta, **info)
        with open(os.path.join(out, "unet", "model.json"), encoding="utf-8") as f:
            names = [c["name"] for c in json.load(f)["properties"]["mlm:output"][0]["classification:classes"]]
        rf_tif = os.path.join(out, "rf_held_out.tif")
        t0 = time.time()
        rf_info = random_forest(parts["train"], parts["test"], layer, names, rf_tif)
        row["random_forest"] = dict(assess(processing, rf_tif, layer, os.path.join(out, "unet"), os.path.join(out, "rf_report.html")),
                                    seconds=round(time.time() - t0, 1), **rf_info)
        results[scene] = dict(classes=names, held_out=f"{spec['side']} {spec['held_out']:.0%}", **row)
    labels = {"unet": "U-Net, rs_deep:train defaults", "unet_tta": "the same + TTA d4 at rs_deep:segment",
              "unet_old": "U-Net, 0.5.0 recipe", "random_forest": "per-pixel random forest"}
    md = ["| scene (held-out area) | method | training | overall accuracy | kappa | mean IoU | IoU per class |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for scene, r in results.items():
        for key, label in labels.items():
            if key not in r:
                continue
            m = r[key]
            ious = ", ".join(f"{n} {m['classes'][n]['iou']:.2f}" if m["classes"].get(n, {}).get("iou") is not None
                             else f"{n} –" for n in r["classes"])
            took = f"{m['seconds'] / 60:.1f} min" if key != "unet_tta" else "(same model)"
            if key == "unet" and m.get("settings"):
                label += " with " + ", ".join(f"{k}={v}" for k, v in m["settings"].items())
            md.append(f"| {scene.split('_right')[0]} ({r['held_out']}) | {label} | {took} | "
                      f"{m['overall_accuracy']:.3f} | {m['kappa']:.3f} | {m['mean_iou']:.3f} | {ious} |")
    write_results(OUT, "\n".join(md), results)
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
