"""Multi-label patch classification on an area the model never saw: which crop groups are present in each 160 m
patch of the Sentinel-2 fields sample (tests/data/fields_denmark, may ship).

Labels: the crop type of each parcel (``Afgroede``) merged into four groups by make_eval_models' rule (cereals:
barley, wheat, rye, triticale, oats, spring mixtures, green cereals; grass: grass and clover; maize; other crops:
the rest, e.g. potatoes, beets, rape, peas, Christmas trees); a patch's labels are the groups whose parcels cover at
least 20 % of it (outside the parcels: no group). The image is split by area: the model trains on the left 272
columns (its own validation: their bottom 25 %, where the per-class thresholds are chosen) and is scored on the
right 180 columns (11 x 17 patches of 16 px). Baselines, from the training patches only: the most common label set
on every patch, every class whose training prevalence is at least 50 %, and every class on every patch.

    .venv/bin/python tools/eval_multilabel.py [--minutes 15] [--epochs 40] [--architecture resnet10t]
"""
import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build" / "dev-plugins"))
sys.path.insert(0, str(REPO / "tools"))

from make_eval_models import crop_group  # noqa: E402

GROUPS = ["cereals", "grass", "maize", "other crops"]
SPLIT = 272
PATCH = 16
COVER = 0.2


def crop(src, dst, col0, col1):
    import rasterio
    from rasterio.windows import Window
    with rasterio.open(src) as ds:
        win = Window(col0, 0, col1 - col0, ds.height)
        profile = dict(ds.profile, width=col1 - col0, transform=ds.window_transform(win))
        data = ds.read(window=win)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return str(dst)


def scores_of(metrics):
    return {"micro_f1": round(metrics["micro_f1"], 3), "macro_f1": round(metrics["macro_f1"], 3),
            "exact_match": round(metrics["exact_match"], 3),
            "classes": {n: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()
                            if k in ("precision", "recall", "f1", "support", "predicted")}
                        for n, c in metrics["classes"].items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--architecture", default="resnet10t", help="a timm classifier of the allow-list")
    ap.add_argument("--out", default=str(REPO / "build" / "eval_multilabel"))
    args = ap.parse_args()
    from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import assess_multilabel_patches
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_gpkg_polygons
    from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches
    from rs_deep.rs_deep_plugin.engine.training.multilabel import train_multilabel_patches

    data = REPO / "tests" / "data" / "fields_denmark"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [(g, crop_group(v)) for g, v in read_gpkg_polygons(str(data / "fields.gpkg"), "fields", "Afgroede")]
    print("parcels per group:", dict(collections.Counter(GROUPS[v] for _, v in fields)))
    train_img = crop(data / "image.tif", out / "left.tif", 0, SPLIT)
    test_img = crop(data / "image.tif", out / "right.tif", SPLIT, 452)
    t0 = time.time()
    report = train_multilabel_patches(train_img, fields, out / "model", class_names=GROUPS, patch_size=PATCH,
                                      val_fraction=0.25, val_side="bottom", cover=COVER, epochs=args.epochs,
                                      builder={"library": "timm", "architecture": args.architecture, "params": {}},
                                      time_budget=args.minutes, patience=10, device=args.device, batch_size=64,
                                      lr=2e-3, log=lambda m: print("  " + m, flush=True))
    print(f"trained in {time.time() - t0:.0f} s; package epoch {report['best']['epoch']} of {report['epochs_run']}; "
          f"thresholds {report['best']['metrics']['thresholds']}")
    reference = [(g, GROUPS[v]) for g, v in fields]

    def assess(res):
        return assess_multilabel_patches([(f["geometry"], f["labels"]) for f in res], reference, GROUPS, COVER)

    held = classify_patches(test_img, str(out / "model"), device=args.device)
    results = {"model (package thresholds)": assess(held),
               "model (threshold 0.5)": assess(classify_patches(test_img, str(out / "model"), device=args.device,
                                                                threshold=0.5))}
    # baselines from the training area's own patch grid (the same label rule)
    train_grid = classify_patches(train_img, str(out / "model"), device=args.device)
    train_truth = assess(train_grid)["truth"]
    prevalence = {n: sum(n in t for t in train_truth) / len(train_truth) for n in GROUPS}
    mode = collections.Counter(tuple(t) for t in train_truth).most_common(1)[0][0]
    cells = [f["geometry"] for f in held]
    for name, labels in (("baseline: most common training label set " + repr(list(mode)), list(mode)),
                         ("baseline: classes with training prevalence >= 50 %",
                          [n for n in GROUPS if prevalence[n] >= 0.5]),
                         ("baseline: every class on every patch", GROUPS)):
        results[name] = assess_multilabel_patches([(g, labels) for g in cells], reference, GROUPS, COVER)
    summary = {"held_out_patches": len(held), "training_prevalence": {n: round(v, 3) for n, v in prevalence.items()},
               "held_out_prevalence": {n: round(sum(n in t for t in results["model (package thresholds)"]["truth"])
                                                / len(held), 3) for n in GROUPS},
               "thresholds": report["best"]["metrics"]["thresholds"],
               "validation": scores_of(report["best"]["metrics"]),
               "epochs_run": report["epochs_run"], "best_epoch": report["best"]["epoch"],
               "training_seconds": report["training_seconds"], "device": report["device"],
               "results": {k: scores_of(v) for k, v in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for k, v in results.items():
        per = ", ".join(f"{n} {'-' if c['f1'] is None else format(c['f1'], '.3f')}" for n, c in v["classes"].items())
        print(f"{k}: micro F1 {v['micro_f1']:.3f}, macro F1 {v['macro_f1']:.3f}, exact {v['exact_match']:.3f} | {per}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RS_DEEP_THREADS", "2")
    sys.exit(main())
