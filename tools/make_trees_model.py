#!/usr/bin/env python3
"""Train the bundled tree-crown detector (resources/models/trees_demo) on NEON samples from DeepForest.

    .venv/bin/python tools/make_trees_model.py [--data ../shared/data/trees_neon]
                                               [--out resources/models/trees_demo]

Trains RS Deep's detector (:func:`rs_deep_plugin.engine.train_detect.train_detection`: Faster
R-CNN with a MobileNetV3-Large FPN backbone from torchvision, built with no pretrained weights,
seeded, 2 CPU threads, a few minutes) on

* the Yellowstone crop ``2019_YELL_2_541000_4977000_image_crop.png`` with its Pascal VOC boxes
  (PNG, not georeferenced; NEON imagery is 0.1 m),
* the top 70 % of ``OSBS_029.tif`` (0.1 m, EPSG:32617) with ``OSBS_029_boxes.geojson``;

the bottom 30 % of OSBS_029 is held out: it is never trained on and never used to choose the
network (the last epoch is kept). It is scored at the end through the engine
(:func:`rs_deep_plugin.engine.detect.detect` on the GeoTIFF, with the package's own
thresholds): precision and recall at IoU 0.5 are printed and written to the training report.
Copies OSBS_029.tif to ``resources/sample/osbs_029.tif`` and writes the attribution notes.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
YELL = "2019_YELL_2_541000_4977000_image_crop"
HELD_OUT = 0.3  # bottom share of OSBS_029's rows never trained on (tests/test_detect.py uses the same strip)

# Settings of the bundled model (tuned to finish in a few minutes on 2 CPU cores).
BUILDER = {
    "library": "torchvision",
    "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
    "params": {"fpn_channels": 128, "representation_size": 256, "returned_layers": [3, 4],
               "anchor_sizes": [16, 32, 64, 128], "aspect_ratios": [0.5, 1.0, 2.0]},
}
SETTINGS = dict(
    builder=BUILDER,
    tile_size=192,
    epochs=8,
    steps_per_epoch=30,
    batch_size=4,
    lr=2e-3,
    seed=0,
    num_threads=2,
    keep="last",
    scale_range=(0.75, 1.33),
    package_tile_size=512,
    package_overlap=96,
    score_threshold=0.5,
    iou_threshold=0.4,
    max_detections=300,
    weights_dtype="float16",
)

SOURCE_NOTE = """\
The images and boxes are the sample data of DeepForest (weecology/DeepForest,
`src/deepforest/data/`): `OSBS_029.tif` (400 x 400 px RGB, 0.1 m, EPSG:32617, Ordway-Swisher
Biological Station, Florida) with `OSBS_029.xml`, and `2019_YELL_2_541000_4977000_image_crop.png`
(1249 x 1035 px RGB, Yellowstone) with its Pascal VOC boxes of tree crowns.

* DeepForest (https://github.com/weecology/DeepForest): MIT License, Copyright (c) Ben Weinstein
  and the DeepForest contributors.
* The imagery is from the National Ecological Observatory Network (NEON), airborne observation
  platform RGB camera mosaics (data product DP3.30010.001), public data courtesy of NEON /
  Battelle, sponsored by the U.S. National Science Foundation (https://www.neonscience.org/).
"""

MODEL_ATTRIBUTION = """\
# Demonstration model: trees_demo

A tree-crown detector (torchvision Faster R-CNN with a MobileNetV3-Large FPN backbone, RGB,
0.1 m) trained **from scratch** (no pretrained weights) by RS Deep's own training code
(`tools/make_trees_model.py`, `rs_deep_plugin/engine/train_detect.py`) in a few CPU minutes on
about 320 hand-drawn crown boxes. It is a **demonstration, not a production model**: it shows
the plugin working on the bundled sample (`resources/sample/osbs_029.tif`); expect missed and
invented trees elsewhere. `training_report.json` holds its training curve and its precision and
recall at IoU 0.5 on the bottom 30 % of the sample, which it was not trained on.

The sample raster `resources/sample/osbs_029.tif` is `OSBS_029.tif` copied unchanged.

Training data:

{source}
"""


def ensure_dev_link():
    """``build/dev-plugins/rs_deep -> ../..`` so that the engine imports as ``rs_deep.rs_deep_plugin``."""
    dev = REPO / "build" / "dev-plugins"
    link = dev / "rs_deep"
    if not link.exists():
        dev.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():  # dangling
            link.unlink()
        os.symlink(os.path.join("..", ".."), link)
    sys.path.insert(0, str(dev))


def held_out_score(image, boxes_geojson, package, fraction=HELD_OUT):
    """Precision/recall/AP at IoU 0.5 of ``package`` on the bottom ``fraction`` of ``image``, via the engine."""
    import numpy as np
    import rasterio
    from rs_deep.rs_deep_plugin.engine.detect import detect
    from rs_deep.rs_deep_plugin.engine.train_detect import detection_metrics, read_geojson_boxes
    with rasterio.open(image) as ds:
        t, w, h = ds.transform, ds.width, ds.height
    n = int(round(h * fraction))
    left, top = t * (0, h - n)
    right, bottom = t * (w, h)
    truth, _ = read_geojson_boxes(boxes_geojson)
    cy = (truth[:, 1] + truth[:, 3]) / 2
    truth = truth[(cy < top) & (cy >= bottom)]
    truth[:, 1] = np.maximum(truth[:, 1], bottom)
    res = detect(str(image), str(package), bounds=(left, bottom, right, top))
    pred = np.array([d.box for d in res]).reshape(-1, 4)
    scores = np.array([d.score for d in res])
    m = detection_metrics([(pred, scores, np.zeros(len(pred), int))], [(truth, np.zeros(len(truth), int))], iou=0.5,
                          score_threshold=res.score_threshold)
    m["bounds"] = [left, bottom, right, top]
    return m


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "trees_neon"),
                        help="folder with OSBS_029.tif, OSBS_029_boxes.geojson and the YELL crop + .xml")
    parser.add_argument("--out", default=str(REPO / "resources" / "models" / "trees_demo"),
                        help="model package folder to write")
    parser.add_argument("--sample", default=str(REPO / "resources" / "sample"), help="folder for the sample raster")
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    parser.add_argument("--steps-per-epoch", type=int, default=SETTINGS["steps_per_epoch"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    ensure_dev_link()
    from rs_deep.rs_deep_plugin.engine.package import load_package, package_summary
    from rs_deep.rs_deep_plugin.engine.progress import terminal_progress
    from rs_deep.rs_deep_plugin.engine.train import REPORT_NAME, _write_json
    from rs_deep.rs_deep_plugin.engine.train_detect import DetectionSample, split_sample, train_detection

    data = Path(args.data)
    osbs, osbs_boxes = data / "OSBS_029.tif", data / "OSBS_029_boxes.geojson"
    yell, yell_boxes = data / f"{YELL}.png", data / f"{YELL}.xml"
    for p in (osbs, osbs_boxes, yell, yell_boxes):
        if not p.is_file():
            sys.exit(f"error: {p} not found; give --data, the folder holding the DeepForest NEON samples")
    out, sample = Path(args.out), Path(args.sample)

    osbs_train, osbs_held = split_sample(DetectionSample(str(osbs), str(osbs_boxes)), HELD_OUT, "bottom")
    samples = [DetectionSample(str(yell), str(yell_boxes), gsd=0.1, name=yell.name), osbs_train]
    settings = dict(SETTINGS, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    t0 = time.time()
    report = train_detection(
        samples, out, val_samples=[osbs_held], class_names=["tree"], class_colors=["FFD92F"],
        band_names=["red", "green", "blue"], gsd=0.1, name="trees_demo",
        description=("Demonstration model: tree crowns in 0.1 m RGB imagery (NEON). Trained from scratch by RS Deep "
                     "on ~320 boxes of the DeepForest samples; not a production model."),
        progress=None if args.quiet else terminal_progress(), log=print, **settings)
    seconds = time.time() - t0

    sample.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(osbs, sample / "osbs_029.tif")
    with open(out / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(MODEL_ATTRIBUTION.format(source=SOURCE_NOTE))

    scores = held_out_score(sample / "osbs_029.tif", osbs_boxes, out)
    report["held_out_engine"] = scores
    _write_json(str(out / REPORT_NAME), report)
    pkg = load_package(out)
    size = sum((out / n).stat().st_size for n in ("model.json", "model.safetensors"))
    print()
    print(package_summary(pkg))
    print(f"held-out trees (bottom {HELD_OUT:.0%} of OSBS_029, never trained on), IoU 0.5, score >= "
          f"{scores['score_threshold']:g}: precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, "
          f"F1 {scores['f1']:.3f}, AP50 {scores['ap']:.3f} ({scores['tp']} of {scores['truth']} trees found, "
          f"{scores['fp']} false)")
    print(f"package: {out} ({size / 1e6:.2f} MB); sample: {sample / 'osbs_029.tif'}; training took {seconds:.0f} s")
    print(json.dumps({"precision": round(scores["precision"], 3), "recall": round(scores["recall"], 3),
                      "ap50": round(scores["ap"], 3), "seconds": round(seconds)}))
    if size > 10_000_000:
        sys.exit(f"error: the package is {size / 1e6:.1f} MB; the bundled model must be at most 10 MB")
    return report


if __name__ == "__main__":
    main()
