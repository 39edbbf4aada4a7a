#!/usr/bin/env python3
"""Train the bundled tree-crown detector (resources/models/trees_demo) on NEON samples from DeepForest.

    .venv/bin/python tools/make_trees_model.py [--data ../shared/data/trees_neon]
                                               [--out resources/models/trees_demo] [--pick-threshold]

Trains RS Deep's detector (:func:`rs_deep_plugin.engine.training.detection.train_detection`) with the
``CenterNet`` builder of the ``rs_deep`` library (:mod:`rs_deep_plugin.engine.models.arch_centernet`:
an anchor-free heatmap-of-centres detector on an smp ResNet-18 U-Net, 3 encoder stages, outputs at
stride 2; no pretrained weights; seeded, 2 CPU threads, about 5 minutes) at 0.2 m (the 0.1 m
imagery is resampled; the engine does the same tile by tile) on

* the Yellowstone crop ``2019_YELL_2_541000_4977000_image_crop.png`` with its Pascal VOC boxes
  (PNG, not georeferenced; NEON imagery is 0.1 m),
* the top 70 % of ``OSBS_029.tif`` (0.1 m, EPSG:32617) with ``OSBS_029_boxes.geojson`` (30 % of
  the training crops, as the bundled sample is OSBS);

the bottom 30 % of OSBS_029 is held out: it is never trained on, never used to choose the
network (the last epoch is kept) nor its settings. It is scored at the end through the engine
(:func:`rs_deep_plugin.engine.detect.detect` on the GeoTIFF, with the package's own
thresholds): precision and recall at IoU 0.5 are printed and written to the training report.

The package's score threshold (:data:`SCORE_THRESHOLD`) was picked with ``--pick-threshold``:
the same training on a split of the *training* images only (YELL without its right 25 %, OSBS
rows 0-200), then the threshold of best F1 at IoU 0.5 on what that split held back (the right
25 % of YELL and OSBS rows 200-280), never on the held-out strip.

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
OSBS_TUNE_ROWS = (200, 280)  # --pick-threshold: OSBS rows held back from the training part (0-280)
YELL_TUNE = 0.25  # --pick-threshold: right share of the YELL crop held back

# Settings of the bundled model (tuned on the split above to finish in about 5 minutes on 2 CPU cores).
BUILDER = {
    "library": "rs_deep",
    "architecture": "CenterNet",
    "encoder": "resnet18",
    "params": {"base": "Unet", "encoder_depth": 3, "output_stride": 2, "decoder_channels": [64, 32],
               "head_channels": 64},
}
#: picked by --pick-threshold (best F1 on the held-back part of the training images)
SCORE_THRESHOLD = 0.25
SETTINGS = dict(
    builder=BUILDER,
    gsd=0.2,
    tile_size=192,
    epochs=8,
    steps_per_epoch=100,
    batch_size=4,
    lr=4e-3,
    seed=0,
    num_threads=2,
    keep="last",
    scale_range=(0.75, 1.33),
    sample_weights=[0.7, 0.3],  # YELL, OSBS
    package_tile_size=512,
    package_overlap=64,
    score_threshold=SCORE_THRESHOLD,
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

A tree-crown detector (RS Deep's anchor-free `CenterNet`: a heatmap of crown centres and a box
regression head on a ResNet-18 U-Net with 3 encoder stages, RGB, run at 0.2 m) trained **from
scratch** (no pretrained weights) by RS Deep's own training code (`tools/make_trees_model.py`,
`rs_deep_plugin/engine/training/detection.py`) in about 5 CPU minutes on about 320 hand-drawn crown
boxes. It is a **demonstration, not a production model**: it shows the plugin working on the
bundled sample (`resources/sample/osbs_029.tif`, 0.1 m: the engine resamples it to the model's
0.2 m); expect missed and invented trees elsewhere. `training_report.json` holds its training
curve and its precision and recall at IoU 0.5 on the bottom 30 % of the sample, which it was not
trained on.

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
    """Precision/recall/AP at IoU 0.5 of ``package`` on the bottom ``fraction`` of ``image``, via the engine.

    Precision, recall and F1 with the package's own thresholds; ``ap`` of those detections;
    ``ap_all`` of every detection scoring at least 0.05 (the whole precision-recall curve)."""
    import numpy as np
    import rasterio
    from rs_deep.rs_deep_plugin.engine.inference.detect import detect
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_geojson_boxes
    with rasterio.open(image) as ds:
        t, w, h = ds.transform, ds.width, ds.height
    n = int(round(h * fraction))
    left, top = t * (0, h - n)
    right, bottom = t * (w, h)
    truth, _ = read_geojson_boxes(boxes_geojson)
    cy = (truth[:, 1] + truth[:, 3]) / 2
    truth = truth[(cy < top) & (cy >= bottom)]
    truth[:, 1] = np.maximum(truth[:, 1], bottom)
    truths = [(truth, np.zeros(len(truth), int))]

    def run(**kwargs):
        res = detect(str(image), str(package), bounds=(left, bottom, right, top), **kwargs)
        pred = np.array([d.box for d in res]).reshape(-1, 4)
        return res, [(pred, np.array([d.score for d in res]), np.zeros(len(pred), int))]

    res, preds = run()
    m = detection_metrics(preds, truths, iou=0.5, score_threshold=res.score_threshold)
    m["ap_all"] = detection_metrics(run(score_threshold=0.05)[1], truths, iou=0.5)["ap"]
    m["bounds"] = [left, bottom, right, top]
    return m


def pick_threshold(yell, yell_boxes, osbs, osbs_boxes, settings, out, log=print):
    """Train with ``settings`` on part of the training images and return the score threshold of best F1
    (IoU 0.5) on the rest: the right ``YELL_TUNE`` of the YELL crop and OSBS rows ``OSBS_TUNE_ROWS``."""
    import numpy as np
    from rs_deep.rs_deep_plugin.engine.models.runners import select_device
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.geo.raster import apply_scaling
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample, load_sample, resample_to_gsd, split_sample
    from rs_deep.rs_deep_plugin.engine.training.detection import predict_image, train_detection
    r0, r1 = OSBS_TUNE_ROWS
    y_train, y_tune = split_sample(DetectionSample(str(yell), str(yell_boxes), gsd=0.1, name=yell.name), YELL_TUNE,
                                   "right")
    o_train = DetectionSample(str(osbs), str(osbs_boxes), window=(0, 0, 400, r0), name=f"OSBS_029.tif rows 0-{r0}")
    o_tune = DetectionSample(str(osbs), str(osbs_boxes), window=(0, r0, 400, r1 - r0), boxes_at_window_edge="centre",
                             name=f"OSBS_029.tif rows {r0}-{r1}")
    train_detection([y_train, o_train], out, class_names=["tree"], band_names=["red", "green", "blue"],
                    name="trees_threshold_pick", log=log, **dict(settings, keep="last"))
    pkg = load_package(out)
    model = pkg.load_model()
    preds, truths = [], []
    for s in (y_tune, o_tune):
        it = load_sample(s, ["tree"], None, "label", s.name)
        it = resample_to_gsd(it, pkg.gsd) if it.gsd and pkg.gsd and it.gsd != pkg.gsd else it
        apply_scaling(it.img, pkg.value_scaling)
        it.img[:, ~it.valid] = 0.0
        preds.append(predict_image(model, it.img, it.valid, pkg.tile_size, pkg.overlap, 0.05,
                                   settings["iou_threshold"], settings["max_detections"], select_device("cpu")))
        truths.append((it.boxes, it.labels))
    table = []
    for th in np.round(np.arange(0.1, 0.61, 0.05), 2):
        m = detection_metrics(preds, truths, iou=0.5, score_threshold=float(th))
        table.append((m["f1"], float(th), m["precision"], m["recall"]))
        log(f"  score >= {th:.2f}: precision {m['precision']:.3f}, recall {m['recall']:.3f}, F1 {m['f1']:.3f}")
    best = max(table)
    log(f"threshold of best F1 on the held-back training images: {best[1]:.2f} (F1 {best[0]:.3f}, AP50 "
        f"{detection_metrics(preds, truths, iou=0.5)['ap']:.3f})")
    return best[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "trees_neon"),
                        help="folder with OSBS_029.tif, OSBS_029_boxes.geojson and the YELL crop + .xml")
    parser.add_argument("--out", default=str(REPO / "resources" / "models" / "trees_demo"),
                        help="model package folder to write")
    parser.add_argument("--sample", default=str(REPO / "resources" / "sample"), help="folder for the sample raster")
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    parser.add_argument("--steps-per-epoch", type=int, default=SETTINGS["steps_per_epoch"])
    parser.add_argument("--pick-threshold", action="store_true",
                        help=f"first train on part of the training images and use the score threshold of best F1 on "
                             f"the rest (instead of {SCORE_THRESHOLD}); about doubles the time")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    ensure_dev_link()
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.package import package_summary
    from rs_deep.rs_deep_plugin.engine.progress import terminal_progress
    from rs_deep.rs_deep_plugin.engine.files import write_json
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample, split_sample
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    from rs_deep.rs_deep_plugin.engine.training.report import REPORT_NAME

    data = Path(args.data)
    osbs, osbs_boxes = data / "OSBS_029.tif", data / "OSBS_029_boxes.geojson"
    yell, yell_boxes = data / f"{YELL}.png", data / f"{YELL}.xml"
    for p in (osbs, osbs_boxes, yell, yell_boxes):
        if not p.is_file():
            sys.exit(f"error: {p} not found; give --data, the folder holding the DeepForest NEON samples")
    out, sample = Path(args.out), Path(args.sample)
    settings = dict(SETTINGS, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    if args.pick_threshold:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            settings["score_threshold"] = pick_threshold(yell, yell_boxes, osbs, osbs_boxes, settings,
                                                         Path(tmp) / "pick")

    osbs_train, osbs_held = split_sample(DetectionSample(str(osbs), str(osbs_boxes)), HELD_OUT, "bottom")
    samples = [DetectionSample(str(yell), str(yell_boxes), gsd=0.1, name=yell.name), osbs_train]
    t0 = time.time()
    report = train_detection(
        samples, out, val_samples=[osbs_held], class_names=["tree"], class_colors=["FFD92F"],
        band_names=["red", "green", "blue"], name="trees_demo",
        description=("Demonstration model: tree crowns in RGB imagery (NEON, run at 0.2 m). RS Deep's CenterNet "
                     "detector trained from scratch on ~320 boxes of the DeepForest samples; not a production model."),
        progress=None if args.quiet else terminal_progress(), log=print, **settings)
    seconds = time.time() - t0

    sample.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(osbs, sample / "osbs_029.tif")
    with open(out / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(MODEL_ATTRIBUTION.format(source=SOURCE_NOTE))

    scores = held_out_score(sample / "osbs_029.tif", osbs_boxes, out)
    report["held_out_engine"] = scores
    report["training_seconds"] = round(seconds, 1)
    write_json(str(out / REPORT_NAME), report)
    pkg = load_package(out)
    size = sum((out / n).stat().st_size for n in ("model.json", "model.safetensors"))
    print()
    print(package_summary(pkg))
    print(f"held-out trees (bottom {HELD_OUT:.0%} of OSBS_029, never trained on), IoU 0.5, score >= "
          f"{scores['score_threshold']:g}: precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, "
          f"F1 {scores['f1']:.3f}, AP50 {scores['ap']:.3f} (all scores >= 0.05: {scores['ap_all']:.3f}) "
          f"({scores['tp']} of {scores['truth']} trees found, {scores['fp']} false)")
    print(f"package: {out} ({size / 1e6:.2f} MB); sample: {sample / 'osbs_029.tif'}; training took {seconds:.0f} s")
    print(json.dumps({"precision": round(scores["precision"], 3), "recall": round(scores["recall"], 3),
                      "f1": round(scores["f1"], 3), "ap50": round(scores["ap"], 3),
                      "ap50_all": round(scores["ap_all"], 3), "seconds": round(seconds)}))
    if size > 10_000_000:
        sys.exit(f"error: the package is {size / 1e6:.1f} MB; the bundled model must be at most 10 MB")
    return report


if __name__ == "__main__":
    main()
