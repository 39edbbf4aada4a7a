#!/usr/bin/env python3
"""U-Net vs per-pixel random forest on the same labels, scored on an area neither saw.

    make compare-rf        (or .venv/bin/python tools/compare_rf.py [--data ../shared/data] [--quick])

For each labelled scene of ../shared/data (buildings_atlanta: building footprints on 0.5 m
panchromatic; fields_denmark: crop groups of the Danish field register on 10 m Sentinel-2) the raster is
cut in two by area: a training part and a held-out part (`SPLITS`). Then, through QGIS Processing:

* U-Net: ``rs_deep:train`` (segmentation, Unet/resnet18, the labels of the training part) then
  ``rs_deep:segment`` on the held-out part;
* random forest: scikit-learn's RandomForestClassifier on the pixels of the training part, one pixel
  at a time (its band values are the features: no neighbourhood), predicting the held-out part;

and both class rasters are scored by ``rs_deep:assess_accuracy`` against the same reference polygons
(pixels outside every polygon are background). Prints a Markdown table and writes it, with the
numbers, to build/compare_rf/.
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

# scene -> (image, labels, layer, class field, grouping, held-out side, held-out share, training settings)
SPLITS = {
    "buildings_atlanta": dict(image="buildings_atlanta/image.tif", labels="buildings_atlanta/buildings.geojson",
                              field=None, side="bottom", held_out=0.35,
                              train=dict(TILE_SIZE=160, EPOCHS=20, STEPS_PER_EPOCH=40, BATCH_SIZE=8,
                                         LEARNING_RATE=0.003, PATIENCE=8)),
    "fields_denmark": dict(image="fields_denmark/image.tif", labels="fields_denmark/fields.gpkg|layername=fields",
                           field="Afgroede", side="right", held_out=0.3,
                           train=dict(TILE_SIZE=64, EPOCHS=30, STEPS_PER_EPOCH=40, BATCH_SIZE=16,
                                      LEARNING_RATE=0.003, PATIENCE=10)),
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--quick", action="store_true", help="2 epochs (a smoke run, not the published numbers)")
    ap.add_argument("--only", choices=sorted(SPLITS))
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qgis.core import QgsApplication
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    import processing
    Processing.initialize()
    from rs_deep.processing_algorithms.provider import RSDeepProvider
    provider = RSDeepProvider()  # keep a reference: the registry does not keep the Python object alive
    QgsApplication.processingRegistry().addProvider(provider)
    from qgis.core import QgsRasterLayer

    results = {}
    for scene, spec in SPLITS.items():
        if args.only and scene != args.only:
            continue
        out = os.path.join(OUT, scene)
        os.makedirs(out, exist_ok=True)
        parts = split_raster(os.path.join(args.data, spec["image"]), out, spec["side"], spec["held_out"])
        crs = QgsRasterLayer(parts["train"], "t").crs().authid()
        layer = label_layer(spec, args.data, crs)
        settings = dict(spec["train"], **({"EPOCHS": 2} if args.quick else {}))
        print(f"== {scene}: held-out {spec['side']} {spec['held_out']:.0%}; U-Net training {settings}", flush=True)
        t0 = time.time()
        model = os.path.join(out, "unet")
        processing.run("rs_deep:train", dict(INPUT=parts["train"], LABELS=layer, CLASS_FIELD="class", TASK=0,
                                             ARCHITECTURE=1, ENCODER="resnet18", VALIDATION=0.2, DEVICE=0,
                                             OUTPUT=model, **settings))
        unet_s = time.time() - t0
        unet_tif = os.path.join(out, "unet_held_out.tif")
        processing.run("rs_deep:segment", {"INPUT": parts["test"], "MODEL": model, "OUTPUT": unet_tif})
        with open(os.path.join(model, "model.json"), encoding="utf-8") as f:
            names = [c["name"] for c in json.load(f)["properties"]["mlm:output"][0]["classification:classes"]]
        rf_tif = os.path.join(out, "rf_held_out.tif")
        t0 = time.time()
        rf_info = random_forest(parts["train"], parts["test"], layer, names, rf_tif)
        rf_s = time.time() - t0
        results[scene] = {
            "classes": names,
            "unet": dict(assess(processing, unet_tif, layer, model, os.path.join(out, "unet_report.html")),
                         seconds=round(unet_s, 1)),
            "random_forest": dict(assess(processing, rf_tif, layer, model, os.path.join(out, "rf_report.html")),
                                  seconds=round(rf_s, 1), **rf_info),
        }
    if args.only and os.path.isfile(os.path.join(OUT, "results.json")):  # keep the other scene's numbers
        with open(os.path.join(OUT, "results.json"), encoding="utf-8") as f:
            earlier = json.load(f)
        results = {k: (results[k] if k in results else earlier[k]) for k in SPLITS if k in results or k in earlier}
    md = ["| scene (held-out area) | method | overall accuracy | kappa | mean IoU | IoU per class |",
          "| --- | --- | --- | --- | --- | --- |"]
    for scene, r in results.items():
        for key, label in (("unet", "U-Net (rs_deep:train)"), ("random_forest", "per-pixel random forest")):
            m = r[key]
            ious = ", ".join(f"{n} {m['classes'][n]['iou']:.2f}" if m["classes"].get(n, {}).get("iou") is not None
                             else f"{n} –" for n in r["classes"])
            md.append(f"| {scene} | {label} | {m['overall_accuracy']:.3f} | {m['kappa']:.3f} | "
                      f"{m['mean_iou']:.3f} | {ious} |")
    text = "\n".join(md)
    print(text)
    with open(os.path.join(OUT, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
