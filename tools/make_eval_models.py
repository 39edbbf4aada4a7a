#!/usr/bin/env python3
"""Train the evaluation models (change detection, patch classification) from ../shared/data.

    .venv/bin/python tools/make_eval_models.py [--data ../shared/data] [--out build/models]
                                               [--only change|patches] [--threads 2]

Everything is trained with RS Deep's own training code, seeded, on the CPU, in minutes, and
written as normal model packages that the Processing algorithms load:

* ``build/models/change/``: a Siamese U-Net change model (:mod:`rs_deep_plugin.engine.train_change`)
  trained on DSIFN pairs 0-6 and LEVIR-CD ``test_7``; scored on the pairs it never saw (DSIFN
  7-9, LEVIR-CD ``test_12``) through the engine (:func:`detect_change` on the files) against the
  classical baseline, change vector analysis + Otsu (:mod:`rs_deep_plugin.engine.cva`).
* ``build/models/patches/``: a timm ResNet-18 patch classifier
  (:mod:`rs_deep_plugin.engine.train_patches`) of 16 px (160 m) Sentinel-2 patches into cereals /
  grass / maize / other from the Danish field register; the right quarter of the image (its
  fields) is held out and scored through :func:`classify_patches`.

The LEVIR-CD and DSIFN samples are for research only: the models trained on them stay in
``build/`` (git-ignored) and are never copied into ``resources/``. Each package folder also gets
``training_report.json`` and ``eval_report.json`` (the held-out metrics printed here).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV_PLUGINS = REPO / "build" / "dev-plugins"

# Change model: ~10 minutes on 2 CPU cores.
CHANGE_SETTINGS = dict(
    builder={"library": "rs_deep", "architecture": "SiameseUnet", "encoder": "resnet18", "encoder_weights": None,
             "params": {"encoder_depth": 4, "decoder_channels": [96, 64, 32, 16], "fusion": "absdiff"}},
    tile_size=128,
    epochs=12,
    steps_per_epoch=30,
    batch_size=8,
    lr=2e-3,
    seed=0,
    package_tile_size=256,
    package_overlap=32,
    weights_dtype="float16",
)
DSIFN_PAIRS = ["0_2", "1_1", "2_4", "3_4", "4_4", "5_3", "6_3", "7_4", "8_3", "9_3"]
DSIFN_TRAIN, DSIFN_TEST = DSIFN_PAIRS[:7], DSIFN_PAIRS[7:]
LEVIR_TRAIN, LEVIR_TEST = ["7"], ["12"]

# Patch classifier: ~1-2 minutes on 2 CPU cores.
PATCH_SETTINGS = dict(
    builder={"library": "timm", "architecture": "resnet18", "encoder_weights": None,
             "params": {"output_stride": 8, "drop_rate": 0.2}},
    patch_size=16,
    epochs=15,
    steps_per_epoch=20,
    batch_size=64,
    lr=2e-3,
    seed=0,
    val_fraction=0.25,
    val_side="right",
    weights_dtype="float16",
)
CROP_CLASSES = ["cereals", "grass", "maize", "other"]
CROP_COLORS = ["E6C229", "4DAF4A", "FF7F00", "A6A6A6"]
OTHER = 3  # other crops and everything outside the field parcels


def crop_group(name):
    """Danish crop name (field register ``Afgroede``) -> class value of :data:`CROP_CLASSES`."""
    n = (name or "").lower()
    if "majs" in n:
        return 2
    if "græs" in n or "kløver" in n:
        return 1
    if any(w in n for w in ("byg", "hvede", "rug", "triticale", "havre", "vårsåede", "grønkorn")):
        return 0
    return OTHER


def _dsifn(data, n):
    d = data / "change_dsifn"
    return str(d / "A" / f"{n}.png"), str(d / "B" / f"{n}.png"), str(d / "label" / f"{n}.png")


def _levir(data, n):
    d = data / "change_levir"
    return str(d / f"test_{n}_A.tif"), str(d / f"test_{n}_B.tif"), str(d / f"test_{n}_label.tif")


def _check_out(out):
    resources = (REPO / "resources").resolve()
    if Path(out).resolve() == resources or resources in Path(out).resolve().parents:
        raise SystemExit(f"--out {out}: these models are trained on research-only data and must not go into "
                         "resources/; use build/ (git-ignored)")


def _write_json(path, obj):
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def make_change(data, out, threads, defaults_minutes=None):
    """Train the change model on the training pairs and score it and CVA + Otsu on the held-out pairs. With
    ``defaults_minutes``: rs_deep:train's change defaults (its Siamese U-Net, TOOLBOX_DEFAULTS, at most 100 epochs)
    under that time budget instead of CHANGE_SETTINGS; the last averaged weights are kept (no validation pairs)."""
    from rs_deep.rs_deep_plugin.engine.evaluation.baselines import cva_baseline, evaluate_pairs
    from rs_deep.rs_deep_plugin.engine.training.change import train_change
    train = [_dsifn(data, n) for n in DSIFN_TRAIN] + [_levir(data, n) for n in LEVIR_TRAIN]
    test = [_dsifn(data, n) for n in DSIFN_TEST] + [_levir(data, n) for n in LEVIR_TEST]
    settings = CHANGE_SETTINGS
    if defaults_minutes:
        from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS
        settings = dict(TOOLBOX_DEFAULTS["change"], epochs=100, time_budget=defaults_minutes, seed=0,
                        weights_dtype="float16")
    t0 = time.time()
    report = train_change(train, out, name="change_eval", num_threads=threads, device="cpu",
                          log=lambda m: print("  " + m, flush=True),
                          description="Bi-temporal building / land-cover change (Siamese U-Net, ResNet-18) trained "
                                      "on DSIFN and LEVIR-CD samples. Research use only: not for redistribution.",
                          **settings)
    print(f"change model trained in {time.time() - t0:.0f} s -> {out}", flush=True)
    model = evaluate_pairs(out, test, device="cpu")
    cva = cva_baseline(test)
    rows = [("pair", "model F1", "model IoU", "CVA F1", "CVA IoU")]
    for m, c in zip(model["pairs"], cva["pairs"]):
        rows.append((os.path.basename(m["before"]), m["metrics"]["f1"], m["metrics"]["iou"],
                     c["metrics"]["f1"], c["metrics"]["iou"]))
    rows.append(("all held-out pixels", model["overall"]["f1"], model["overall"]["iou"], cva["overall"]["f1"],
                 cva["overall"]["iou"]))
    print("Held-out change pairs (never seen in training): DSIFN " + ", ".join(DSIFN_TEST) + "; LEVIR-CD test_"
          + ", test_".join(LEVIR_TEST))
    for r in rows:
        print("  " + "  ".join(f"{v:>22}" if isinstance(v, str) else f"{v:>10.3f}" for v in r))
    ev = {"train_pairs": train, "test_pairs": test, "model": model, "cva_otsu": cva,
          "model_beats_cva": model["overall"]["f1"] > cva["overall"]["f1"] and
          model["overall"]["iou"] > cva["overall"]["iou"], "training_seconds": report["seconds"]}
    _write_json(Path(out) / "eval_report.json", ev)
    return ev


def make_patches(data, out, threads):
    from rs_deep.rs_deep_plugin.engine.evaluation.baselines import evaluate_patches
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_gpkg_polygons
    from rs_deep.rs_deep_plugin.engine.training.patches import train_patches
    image = data / "fields_denmark" / "image.tif"
    import rasterio
    with rasterio.open(image) as ds:
        crs, bounds, width = ds.crs, ds.bounds, ds.width
    fields = [(g, crop_group(v)) for g, v in read_gpkg_polygons(str(data / "fields_denmark" / "fields.gpkg"),
                                                                 "fields", "Afgroede", dst_crs=crs)]
    t0 = time.time()
    report = train_patches(str(image), fields, out, class_names=CROP_CLASSES, class_colors=CROP_COLORS,
                           background_class=OTHER, band_names=["b1", "b2", "b3"], name="crops_eval",
                           num_threads=threads, device="cpu", log=lambda m: print("  " + m, flush=True),
                           description="Dominant crop group of 160 m Sentinel-2 patches (cereals, grass, maize, "
                                       "other), trained on a Danish field register sample.",
                           **PATCH_SETTINGS)
    print(f"patch classifier trained in {time.time() - t0:.0f} s -> {out}", flush=True)
    win = report["data"]["validation"]["window"]
    left = bounds.left + win["col_off"] * (bounds.right - bounds.left) / width
    held_out = (left, bounds.bottom, bounds.right, bounds.top)
    ev = evaluate_patches(out, str(image), fields, CROP_CLASSES, bounds=held_out, background_class=OTHER,
                          device="cpu")
    g, f = ev["grid"], ev["fields"]
    print(f"Held-out area (right {PATCH_SETTINGS['val_fraction']:.0%} of the image, never seen in training):")
    print(f"  patch grid: accuracy {g['accuracy']:.3f}, macro F1 {g['macro_f1']:.3f} over {g['patches']} patches")
    print(f"  fields: accuracy {f['accuracy']:.3f}, macro F1 {f['macro_f1']:.3f} over {f['patches']} fields "
          f"({ev['fields_skipped']} fields smaller than a patch not scored)")
    for name, m in g["classes"].items():
        print(f"    {name:8s} grid F1 {m['f1']:.3f} ({m['patches']} patches); fields F1 "
              f"{f['classes'][name]['f1']:.3f} ({f['classes'][name]['patches']} fields)")
    ev.update(held_out_bounds=held_out, training_seconds=report["seconds"])
    _write_json(Path(out) / "eval_report.json", ev)
    return ev


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "build" / "models"))
    ap.add_argument("--only", choices=("change", "patches"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--change-defaults", type=float, metavar="MINUTES",
                    help="train the change model with rs_deep:train's defaults under this time budget instead")
    args = ap.parse_args(argv)
    _check_out(args.out)
    if not (DEV_PLUGINS / "rs_deep").exists():
        DEV_PLUGINS.mkdir(parents=True, exist_ok=True)
        os.symlink("../..", DEV_PLUGINS / "rs_deep")
    sys.path.insert(0, str(DEV_PLUGINS))
    data = Path(args.data)
    if args.only in (None, "patches"):
        make_patches(data, str(Path(args.out) / "patches"), args.threads)
    if args.only in (None, "change"):
        make_change(data, str(Path(args.out) / ("change_defaults" if args.change_defaults else "change")), args.threads,
                    args.change_defaults)
    return 0


if __name__ == "__main__":
    sys.exit(main())
