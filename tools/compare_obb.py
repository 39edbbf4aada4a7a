#!/usr/bin/env python3
"""Oriented (CenterNetOBB) vs axis-aligned (CenterNet) building detection, both scored by rotated IoU on an area
neither saw.

    .venv/bin/python tools/compare_obb.py [--budget MINUTES] [--epochs N] [--seed S]

The bundled sample resources/sample/atlanta_pan.tif (SpaceNet Atlanta, 600 x 900 px, 0.5 m) with its 32 building
footprints (tests/data/buildings_atlanta/buildings.geojson) is cut as tools/compare_rf.py cuts it
(:func:`compare_rf.split_raster`: the left 65 % of the columns for training, the right 35 % held out). Through QGIS
Processing, for each architecture:

* ``rs_deep:train`` (TASK detection, the same settings and TIME_BUDGET for both) on the training part: the
  oriented detector learns the footprints' minimum rotated rectangles, the axis-aligned one their bounding boxes;
* ``rs_deep:detect`` on the held-out part;
* ``rs_deep:assess_accuracy`` with TASK oriented_detection: every output polygon (a rotated rectangle, or an
  axis-aligned box, which is its own minimum rotated rectangle) against the minimum rotated rectangles of the
  footprints centred in the held-out part, matched at rotated IoU 0.5: precision, recall, F1, AP50.

Prints a Markdown table and writes it with the numbers to build/compare_obb/.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
OUT = os.path.join(ROOT, "build", "compare_obb")
IMAGE = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
LABELS = os.path.join(ROOT, "tests", "data", "buildings_atlanta", "buildings.geojson")
SIDE, HELD_OUT = "right", 0.35
#: the same run settings for both detectors (the toolbox's detection defaults otherwise)
SETTINGS = dict(TASK="detection", ENCODER="resnet18", TILE_SIZE=128, BATCH_SIZE=4, VALIDATION=0, PATIENCE=0,
                DEVICE="cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=3.0, help="TIME_BUDGET per training run, minutes")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20, help="STEPS_PER_EPOCH")
    ap.add_argument("--score", type=float, default=0.2, help="SCORE_THRESHOLD of rs_deep:detect")
    args = ap.parse_args(argv)
    from qgis_env import start_processing
    app, processing, provider = start_processing()  # keep the provider referenced
    from compare_rf import split_raster, write_results

    os.makedirs(OUT, exist_ok=True)
    parts = split_raster(IMAGE, OUT, SIDE, HELD_OUT)
    rows = {}
    for arch in ("CenterNetOBB", "CenterNet"):
        model = os.path.join(OUT, arch)
        t0, c0 = time.time(), time.process_time()
        processing.run("rs_deep:train", dict(SETTINGS, INPUT=parts["train"], LABELS=LABELS, ARCHITECTURE=arch,
                                             OUTPUT=model, TIME_BUDGET=args.budget, EPOCHS=args.epochs,
                                             STEPS_PER_EPOCH=args.steps))
        wall, cpu = time.time() - t0, time.process_time() - c0
        boxes = os.path.join(OUT, f"{arch}_objects.gpkg")
        det = processing.run("rs_deep:detect", {"INPUT": parts["test"], "MODEL": model, "OUTPUT": boxes,
                                                "SCORE_THRESHOLD": args.score, "DEVICE": 0})
        res = processing.run("rs_deep:assess_accuracy", {
            "TASK": "oriented_detection", "PREDICTION_BOXES": det["OUTPUT"], "REFERENCE": LABELS,
            "EXTENT": _extent(parts["test"]), "IOU_THRESHOLD": 0.5,
            "OUTPUT_HTML": os.path.join(OUT, f"{arch}_accuracy.html")})
        with open(os.path.join(model, "training_report.json"), encoding="utf-8") as f:
            report = json.load(f)
        rows[arch] = {k: res[k.upper()] for k in ("precision", "recall", "f1", "ap")}
        rows[arch].update(train_wall_s=round(wall, 1), train_cpu_s=round(cpu, 1), epochs=report.get("epochs_run"),
                          detected=_count(det["OUTPUT"]))
        print(arch, rows[arch], flush=True)
    table = ["| detector | rotated-IoU precision | recall | F1 | AP50 | objects | training (wall s, epochs) |",
             "|---|---|---|---|---|---|---|"]
    for arch, r in rows.items():
        kind = "oriented (CenterNetOBB)" if arch == "CenterNetOBB" else "axis-aligned (CenterNet)"
        table.append(f"| {kind} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['ap']:.3f} | "
                     f"{r['detected']} | {r['train_wall_s']:.0f}, {r['epochs']} |")
    write_results(OUT, "\n".join(table), {"settings": dict(SETTINGS, TIME_BUDGET=args.budget, EPOCHS=args.epochs,
                                                            STEPS_PER_EPOCH=args.steps, SCORE_THRESHOLD=args.score),
                                            "results": rows})
    app.exitQgis()


def _extent(path):
    import rasterio
    with rasterio.open(path) as ds:
        b = ds.bounds
        return f"{b.left},{b.right},{b.bottom},{b.top} [{ds.crs.to_string()}]"


def _count(path):
    from qgis.core import QgsVectorLayer
    return QgsVectorLayer(path, "objects", "ogr").featureCount()


if __name__ == "__main__":
    main()
