#!/usr/bin/env python3
"""Instance segmentation of buildings on an area the network never saw: Mask R-CNN masks vs detector boxes.

    make eval-instances   (or .venv/bin/python tools/eval_instances.py [--data ../shared/data/buildings_atlanta]
                                                                     [--minutes 6] [--baseline-minutes 3])

``../shared/data/buildings_atlanta``: a SpaceNet scene of Atlanta (600 x 900 px, 0.5 m, panchromatic) with its 32
building footprints. The left 60 % of the columns train, the right 40 % are held back (never trained on, no model
selection on them: the last epoch is packaged). Everything runs with rs_deep:train's defaults for the task
(:data:`rs_deep_plugin.engine.training.builders.TOOLBOX_DEFAULTS`) and a time budget:

* instance segmentation: the default Mask R-CNN (``train_instances``), applied with ``segment_instances`` (the
  engine of rs_deep:segment_instances) to the held-back area; its polygons are matched to the footprints by mask
  (polygon) IoU >= 0.5, and their bounding boxes to the footprints' bounding boxes by box IoU >= 0.5;
* baseline: the toolbox's default detector (CenterNet, ``train_detection``) on the same columns, its boxes matched to
  the footprints' bounding boxes by box IoU >= 0.5 (``--baseline-minutes 0`` leaves it out);
* U-Net polygons (``--unet``): ``rs_deep:train`` with its defaults (a segmentation U-Net, TIME_BUDGET 10) on the
  training columns, then ``rs_deep:segment`` of the held-back columns with polygons (OUTPUT_VECTOR, defaults): each
  building polygon is one object, its score the polygon's mean probability, matched by mask IoU >= 0.5 as the
  Mask R-CNN's (touching buildings come out as one polygon).

Precision, recall and F1 at the package's score threshold, AP50 over all objects (score >= 0.05 for the
detector: its ``detect`` keeps those). Reference: the footprints whose centroid lies in the held-back columns,
clipped to them. Prints a Markdown table and writes it with the numbers to ``build/eval_instances/``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "dev-plugins"))
OUT = REPO / "build" / "eval_instances"
HELD_OUT = 0.4


def areas(image):
    """(training window, held-back map polygon, raster CRS) of the left / right split."""
    import rasterio
    from shapely.geometry import box
    with rasterio.open(image) as ds:
        w, h, t, crs = ds.width, ds.height, ds.transform, ds.crs
    cols = int(round(w * (1 - HELD_OUT)))
    x0, y0 = t.c + cols * t.a, t.f
    x1, y1 = t.c + w * t.a, t.f + h * t.e
    return (0, 0, cols, h), box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), crs


def reference(labels, area, crs):
    """The footprints whose centroid lies in ``area``, clipped to it."""
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_geojson_shapes
    geoms, _ = read_geojson_shapes(str(labels), class_field=None, dst_crs=crs)
    return [g.intersection(area) for g in geoms if area.contains(g.centroid)]


def metrics(pred, truth, masks):
    from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import assess_detection
    if masks:
        m = assess_detection(pred, [(g, 0) for g in truth], masks=True)
    else:
        m = assess_detection(pred, [g.envelope for g in truth])
    return m


def summary(m, threshold):
    """P/R/F1 at ``threshold`` from a metrics dict computed at 0 (AP does not depend on it)."""
    return {k: round(float(m[k]), 3) for k in ("precision", "recall", "f1", "ap")} | {
        "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "score_threshold": threshold}


def at_threshold(rows, threshold, truth, masks):
    m = metrics(rows, truth, masks)
    kept = [r for r in rows if r[-1] >= threshold]
    return dict(summary(metrics(kept, truth, masks), threshold), ap=round(float(m["ap"]), 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "buildings_atlanta"))
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget of the Mask R-CNN")
    parser.add_argument("--baseline-minutes", type=float, default=3.0, help="of the detector (0: none)")
    parser.add_argument("--unet", action="store_true", help="also: U-Net polygons (rs_deep:train and rs_deep:segment "
                                                            "with their defaults) as instances")
    args = parser.parse_args()
    from rs_deep.rs_deep_plugin.engine.inference.detect import detect
    from rs_deep.rs_deep_plugin.engine.inference.instances import segment_instances
    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS, toolbox_builder
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    from rs_deep.rs_deep_plugin.engine.training.instances import train_instances
    data = Path(args.data)
    image, labels = data / "image.tif", data / "buildings.geojson"
    train_win, held, crs = areas(image)
    truth = reference(labels, held, crs)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"data": str(data.name), "held_out_columns": HELD_OUT, "reference_footprints": len(truth),
               "minutes": args.minutes, "baseline_minutes": args.baseline_minutes}
    sample = DetectionSample(str(image), str(labels), window=train_win, name="left 60 %")

    if args.unet:
        results["unet_polygons"] = unet_polygons(image, labels, truth)
        print(json.dumps(results["unet_polygons"], indent=1), flush=True)
    if args.minutes > 0:
        t0 = time.time()
        report = train_instances([sample], OUT / "instances_model", class_names=["building"], epochs=100,
                                 time_budget=args.minutes, **TOOLBOX_DEFAULTS["instance_segmentation"],
                                 log=lambda m: print(m, flush=True))
        res = segment_instances(str(image), OUT / "instances_model", bounds=held.bounds, score_threshold=0.05)
        rows = [(d.polygon, 0, d.score) for d in res]
        results["instances"] = {
            "train_seconds": round(time.time() - t0, 1), "epochs": report["epochs_run"],
            "steps": report["samples"]["crops_seen"] // report["batch_size"], "objects": len(res),
            "masks": at_threshold(rows, report_threshold(OUT / "instances_model"), truth, True),
            "boxes": at_threshold([(*p.bounds, c, s) for p, c, s in rows], report_threshold(OUT / "instances_model"),
                                  truth, False)}
        print(json.dumps(results["instances"], indent=1), flush=True)

    if args.baseline_minutes > 0:
        t0 = time.time()
        report = train_detection([sample], OUT / "detector_model", class_names=["building"], epochs=100,
                                 time_budget=args.baseline_minutes, builder=toolbox_builder("detection"),
                                 **TOOLBOX_DEFAULTS["detection"], log=lambda m: print(m, flush=True))
        det = detect(str(image), OUT / "detector_model", bounds=held.bounds, score_threshold=0.05)
        rows = [(*d.box, 0, d.score) for d in det]
        results["detector"] = {
            "train_seconds": round(time.time() - t0, 1), "epochs": report["epochs_run"], "objects": len(det),
            "architecture": report["builder"]["architecture"],
            "boxes": at_threshold(rows, report_threshold(OUT / "detector_model"), truth, False)}
        print(json.dumps(results["detector"], indent=1), flush=True)

    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| model (training budget) | matched by | precision | recall | F1 | AP50 | TP / FP / FN |",
             "|---|---|---|---|---|---|---|"]

    def row(model, what, m):
        lines.append(f"| {model} | {what} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['ap']:.3f} | "
                     f"{m['tp']} / {m['fp']} / {m['fn']} |")

    if "instances" in results:
        inst = results["instances"]
        for what, key in (("mask IoU >= 0.5", "masks"), ("box IoU >= 0.5 (its boxes)", "boxes")):
            row(f"Mask R-CNN ({args.minutes:g} min, {inst['steps']} steps)", what, inst[key])
    if "detector" in results:
        d = results["detector"]
        row(f"{d['architecture']} detector ({args.baseline_minutes:g} min)", "box IoU >= 0.5", d["boxes"])
    if "unet_polygons" in results:
        u = results["unet_polygons"]
        row(f"U-Net polygons (rs_deep:train defaults, {u['train_seconds'] / 60:.1f} min)", "mask IoU >= 0.5",
            u["masks"])
    text = (f"Held-back right {HELD_OUT:.0%} of {data.name} ({len(truth)} footprints; precision/recall/F1 at the "
            "package's score threshold)\n\n" + "\n".join(lines))
    print(text)
    (OUT / "results.md").write_text(text + "\n")


def unet_polygons(image, labels, truth):
    """rs_deep:train (defaults, a segmentation U-Net) on the training columns, rs_deep:segment of the held-back columns
    with polygons: every building polygon one object scored by its mean probability (see the module docstring)."""
    from qgis.core import QgsRasterLayer, QgsVectorLayer
    from qgis_env import start_processing
    from compare_rf import label_layer, split_raster, train_unet
    app, processing, provider = start_processing()  # noqa: F841 (the provider must stay referenced)
    folder = OUT / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    parts = split_raster(str(image), str(folder), "right", HELD_OUT)  # the columns of areas(): the same cut
    crs = QgsRasterLayer(parts["train"], "t").crs().authid()
    spec = {"labels": str(labels), "field": None}
    layer = label_layer(spec, "/", crs)
    wall, cpu = train_unet(processing, parts["train"], layer, str(folder / "model"), {})
    gpkg = folder / "held_out.gpkg"
    processing.run("rs_deep:segment", {"INPUT": parts["test"], "MODEL": str(folder / "model"),
                                       "OUTPUT": str(folder / "held_out.tif"), "OUTPUT_VECTOR": str(gpkg)})
    from shapely import wkb
    rows = [(wkb.loads(bytes(f.geometry().asWkb())), 0, float(f["mean_prob"]))
            for f in QgsVectorLayer(str(gpkg), "p", "ogr").getFeatures() if f["class_id"] == 1]
    return {"train_seconds": wall, "train_cpu_seconds": cpu, "objects": len(rows),
            "masks": at_threshold(rows, 0.5, truth, True)}


def report_threshold(package):
    """The score threshold a package stores (the engine's default otherwise)."""
    from rs_deep.rs_deep_plugin.engine.models.detection_options import package_defaults
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    return package_defaults(load_package(str(package)))[0]


if __name__ == "__main__":
    main()
