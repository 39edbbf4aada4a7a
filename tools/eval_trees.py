#!/usr/bin/env python3
"""Tree-crown detection on a NEON site the detector never saw: leave-one-site-out, and fine-tuning vs scratch.

    make eval-trees      (or .venv/bin/python tools/eval_trees.py [--data ../shared/data/trees_neon]
                                                              [--minutes 3] [--finetune-minutes 2]
                                                              [--only loso|finetune])

The DeepForest samples of ``../shared/data/trees_neon`` come from two NEON sites: Yellowstone (YELL, conifers,
1249 x 1035 px, 279 boxes) and Ordway-Swisher, Florida (OSBS_029, open pine, 400 x 400 px, 61 boxes), both
0.1 m RGB. Everything is trained with the engine's ``train_detection`` with rs_deep:train's defaults for
detection (:data:`rs_deep_plugin.engine.training.builders.TOOLBOX_DEFAULTS`: CenterNet on ResNet-18) and
a time budget per run, and scored with the package's own thresholds at IoU 0.5 (precision, recall, F1, AP50).

* ``loso``: train on one site, score on the whole other site (both directions);
* ``finetune``: the YELL package as INIT_FROM, fine-tuned on 10 / 25 / 50 / 100 % of the boxes of the top
  70 % of OSBS_029 (the top rows of it, every crown there labelled, as an analyst labels a small area
  completely), against training from scratch on the same boxes with the same time budget; scored
  on the bottom 30 % of OSBS_029, never trained on.

Prints a Markdown table and writes it with the numbers to ``build/eval_trees/``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "dev-plugins"))
OUT = REPO / "build" / "eval_trees"
YELL = "2019_YELL_2_541000_4977000_image_crop"
HELD_OUT = 0.3
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def samples(data):
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample
    yell = DetectionSample(str(data / f"{YELL}.png"), str(data / f"{YELL}.xml"), gsd=0.1, name="YELL")
    osbs = DetectionSample(str(data / "OSBS_029.tif"), str(data / "OSBS_029_boxes.geojson"), name="OSBS_029")
    return yell, osbs


def score(package, sample):
    """Precision, recall, F1 and AP50 of ``package`` on ``sample`` (the package's thresholds; AP over all
    detections scoring >= 0.05)."""
    from rs_deep.rs_deep_plugin.engine.evaluation.metrics import detection_metrics
    from rs_deep.rs_deep_plugin.engine.geo.raster import apply_scaling
    from rs_deep.rs_deep_plugin.engine.models.detection_options import package_defaults
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.runners import select_device
    from rs_deep.rs_deep_plugin.engine.training.data import load_sample, resample_to_gsd
    from rs_deep.rs_deep_plugin.engine.training.detection import predict_image
    pkg = load_package(str(package))
    model = pkg.load_model()
    it = load_sample(sample, ["tree"], None, "label", sample.name)
    if it.gsd and pkg.gsd and it.gsd != pkg.gsd:
        it = resample_to_gsd(it, pkg.gsd)
    apply_scaling(it.img, pkg.value_scaling)
    it.img[:, ~it.valid] = 0.0
    thr, iou_thr, _ = package_defaults(pkg)
    pred = predict_image(model, it.img, it.valid, pkg.tile_size, pkg.overlap, 0.05, iou_thr, 500,
                         select_device("cpu"))
    truth = [(it.boxes, it.labels)]
    m = detection_metrics([pred], truth, iou=0.5, score_threshold=thr)
    m["ap50"] = detection_metrics([pred], truth, iou=0.5)["ap"]
    m["score_threshold"] = thr
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in m.items()
            if k in ("precision", "recall", "f1", "ap50", "tp", "fp", "truth", "score_threshold")}


def train(train_samples, out, minutes, val_samples=None, **extra):
    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS, toolbox_builder
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    from rs_deep.rs_deep_plugin.engine.training.data import split_sample
    d = dict(TOOLBOX_DEFAULTS["detection"])
    train_samples = list(train_samples)
    if val_samples is None and len(train_samples) == 1:  # as rs_deep:train: VALIDATION 0.2, the bottom rows
        part, held = split_sample(train_samples[0], 0.2, "bottom")
        train_samples, val_samples = [part], [held]
    t0, c0 = time.time(), time.process_time()
    report = train_detection(list(train_samples), str(out), class_names=["tree"], band_names=["red", "green", "blue"],
                             builder=extra.pop("builder", toolbox_builder("detection")), val_samples=val_samples,
                             time_budget=minutes, epochs=100, patience=10, seed=0, num_threads=2,
                             augment={"flip": True, "rotate": True}, log=lambda m: None,
                             **dict(d, **extra))
    return {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "epochs": report["epochs_run"], "crops_seen": report["samples"]["crops_seen"]}


def top_rows(data, fraction):
    """OSBS_029's top ``fraction`` of the training part (the top 70 %), every crown in it labelled: the way an
    analyst labels a small area completely; (sample, number of boxes)."""
    from rs_deep.rs_deep_plugin.engine.training.data import DetectionSample, load_sample
    rows = int(round(400 * (1 - HELD_OUT) * fraction))
    s = DetectionSample(str(data / "OSBS_029.tif"), str(data / "OSBS_029_boxes.geojson"), window=(0, 0, 400, rows),
                        name=f"OSBS_029 rows 0-{rows}")
    return s, len(load_sample(s, ["tree"], None, "label", s.name).boxes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "trees_neon"))
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget of each training run")
    ap.add_argument("--finetune-minutes", type=float, default=2.0, help="time budget of each fine-tuning run")
    ap.add_argument("--only", choices=("loso", "finetune"))
    args = ap.parse_args(argv)
    from rs_deep.rs_deep_plugin.engine.training.data import split_sample
    data = Path(args.data)
    OUT.mkdir(parents=True, exist_ok=True)
    yell, osbs = samples(data)
    results = {}
    path = OUT / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
    results.update(minutes=args.minutes, finetune_minutes=args.finetune_minutes)
    if args.only in (None, "loso"):
        rows = {}
        for name, tr, te in (("YELL -> OSBS", yell, osbs), ("OSBS -> YELL", osbs, yell)):
            out = OUT / f"loso_{tr.name}"
            info = train([tr], out, args.minutes)
            rows[name] = dict(score(out, te), **info)
            print(name, rows[name], flush=True)
        results["loso"] = rows
    if args.only in (None, "finetune"):
        osbs_held = split_sample(osbs, HELD_OUT, "bottom")[1]
        base = OUT / "loso_YELL"
        if not (base / "model.json").is_file():
            train([yell], base, args.minutes)
        rows = {}
        for fraction in FRACTIONS:
            part, n = top_rows(data, fraction)
            for how in ("scratch", "finetune"):  # equal time budgets
                out = OUT / f"{how}_{int(fraction * 100)}"
                extra = {"init_from": str(base)} if how == "finetune" else {}
                info = train([part], out, args.finetune_minutes, val_samples=[], **extra)  # small areas: the last epoch
                rows[f"{how} {fraction:.0%}"] = dict(score(out, osbs_held), boxes=n, **info)
                print(how, fraction, rows[f"{how} {fraction:.0%}"], flush=True)
        results["finetune"] = rows
    path.write_text(json.dumps(results, indent=2))
    md = ["| run | trained on | scored on | precision | recall | F1 | AP50 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.get("loso", {}).items():
        a, b = name.split(" -> ")
        md.append(f"| leave-one-site-out | {a} (all) | {b} (all, {r['truth']} crowns) | {r['precision']:.2f} | "
                  f"{r['recall']:.2f} | {r['f1']:.2f} | {r['ap50']:.2f} |")
    for name, r in results.get("finetune", {}).items():
        how, frac = name.split(" ")
        md.append(f"| {'fine-tuned from YELL' if how == 'finetune' else 'from scratch'} | OSBS top 70 %: its top {frac} "
                  f"({r['boxes']} boxes) | OSBS bottom 30 % ({r['truth']} crowns) | {r['precision']:.2f} | "
                  f"{r['recall']:.2f} | {r['f1']:.2f} | {r['ap50']:.2f} |")
    text = "\n".join(md)
    print(text)
    (OUT / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
