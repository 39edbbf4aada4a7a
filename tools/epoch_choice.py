#!/usr/bin/env python3
"""Which epoch to keep: every epoch of a segmentation run scored on the area it never saw.

    .venv/bin/python tools/epoch_choice.py [--seeds 0 1 2] [--minutes 10] [--data ../shared/data/buildings_atlanta]
                                           [--set weight_decay=0.05 ...] [--tag NAME]

Trains ``train_segmentation`` with rs_deep:train's segmentation defaults (the toolbox's MobileNetV2 U-Net,
TOOLBOX_DEFAULTS, 100 epochs, the time budget, patience off so that the whole budget is seen) on the left 65 %
of buildings_atlanta (tools/compare_rf.py's right cut), keeps the averaged weights that each epoch's validation
saw, and scores each of them afterwards on the right 35 % (tools/make_demo_model.py's ``held_out_iou``: the
building IoU of the engine's ``segment`` against the footprints). Then compares rules for the epoch to keep: the best validation IoU (the trainer's rule), the last
epoch, the latest epoch within a tolerance of the best validation IoU, a 3-epoch moving average, and weights
averaged over the best three or the last five epochs. Writes one JSON per seed and a summary to build/epoch_choice/
(build/epoch_choice/NAME/ with ``--tag``). ``--set KEY=VALUE`` overrides a trainer keyword (a Python literal), e.g.
``weight_decay=0.05``, to compare a setting's whole curve with the defaults'.
About 13 minutes a seed on 2 cores.
"""
import argparse
import ast
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
sys.path.insert(0, os.path.join(ROOT, "tools"))
OUT = os.path.join(ROOT, "build", "epoch_choice")


def run_seed(seed, minutes, data, work, overrides=None):
    import rasterio
    from compare_rf import split_raster
    from make_demo_model import held_out_iou as package_iou  # the same right cut, the same scoring
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
    from rs_deep.rs_deep_plugin.engine.models import package as package_module
    from rs_deep.rs_deep_plugin.engine.training import segmentation
    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS, default_encoder, toolbox_builder

    image, footprints = os.path.join(data, "image.tif"), os.path.join(data, "buildings.geojson")
    parts = split_raster(image, work, "right", 0.35)
    states, saved = [], {}
    validate, save_package = segmentation.SegmentationTask.validate, package_module.save_package

    def keeping(self, model, device, fmt):  # validation as always, and the weights it saw
        metrics, loss = validate(self, model, device, fmt)
        states.append(({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       metrics["iou"] if metrics else 0.0, loss))
        return metrics, loss

    def remembering(model, out_dir, **kw):  # the package's metadata, to write each epoch's weights the same way
        saved.update(model=model, kw=kw)
        return save_package(model, out_dir, **kw)

    segmentation.SegmentationTask.validate, package_module.save_package = keeping, remembering
    try:
        report = segmentation.train_segmentation(
            parts["train"], footprints, os.path.join(work, "package"), class_names=["background", "building"],
            builder=toolbox_builder("segmentation", None, default_encoder("segmentation")),
            epochs=100, patience=0, time_budget=minutes, seed=seed,
            **{**TOOLBOX_DEFAULTS["segmentation"], **(overrides or {})})
    finally:
        segmentation.SegmentationTask.validate, package_module.save_package = validate, save_package
    with rasterio.open(image) as ds:
        labels = read_vector_labels(footprints, class_value=1, dst_crs=ds.crs)

    def held_out_iou(state):
        model = saved["model"]
        model.load_state_dict(state)
        folder = os.path.join(work, "epoch")
        shutil.rmtree(folder, ignore_errors=True)
        save_package(model, folder, **saved["kw"])
        return package_iou(image, labels, folder, "none")

    def averaged(indices):
        out = {}
        for k in states[0][0]:
            ts = [states[i][0][k] for i in indices]
            out[k] = (sum(t.float() for t in ts) / len(ts)).to(ts[0].dtype) if ts[0].is_floating_point() else ts[-1]
        return out

    rows = []
    for i, (state, val_iou, val_loss) in enumerate(states):
        rows.append({"epoch": i + 1, "val_iou": val_iou, "val_loss": val_loss, "held_out_iou": held_out_iou(state)})
        print(f"seed {seed} epoch {i + 1}: validation IoU {val_iou:.3f}, held-out IoU {rows[-1]['held_out_iou']:.3f}",
              flush=True)
    val = [r["val_iou"] for r in rows]
    held = [r["held_out_iou"] for r in rows]
    n, top = len(rows), max(val)
    best = max(range(n), key=lambda i: (round(val[i], 6), -rows[i]["val_loss"]))  # the trainer's rank
    smooth = [sum(val[max(0, i - 1):i + 2]) / len(val[max(0, i - 1):i + 2]) for i in range(n)]
    rules = {"best_validation": best, "last": n - 1, "oracle": held.index(max(held)),
             "latest_within_0.03": max(i for i in range(n) if val[i] >= top - 0.03),
             "moving_average_3": smooth.index(max(smooth))}
    result = {k: {"epoch": i + 1, "held_out_iou": held[i]} for k, i in rules.items()}
    order = sorted(range(n), key=lambda i: -val[i])
    result["average_best_3"] = {"held_out_iou": held_out_iou(averaged(order[:3]))}
    result["average_last_5"] = {"held_out_iou": held_out_iou(averaged(range(max(0, n - 5), n)))}
    return {"seed": seed, "epochs": n, "kept_by_trainer": report["best"]["epoch"], "rules": result, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "buildings_atlanta"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer keyword over the defaults (a Python literal), e.g. weight_decay=0.05")
    parser.add_argument("--tag", default="", help="write to build/epoch_choice/TAG/")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = ast.literal_eval(value.strip())
    out = os.path.join(OUT, args.tag) if args.tag else OUT
    os.makedirs(out, exist_ok=True)
    results = []
    for seed in args.seeds:
        work = tempfile.mkdtemp(prefix="rs_deep_epochs_")
        try:
            results.append(run_seed(seed, args.minutes, args.data, work, overrides))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with open(os.path.join(out, f"seed{seed}.json"), "w", encoding="utf-8") as f:
            json.dump(results[-1], f, indent=1)
    print("\n| rule | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean |")
    print("| --- |" + " --- |" * (len(results) + 1))
    summary = {}
    for rule in results[0]["rules"]:
        values = [r["rules"][rule]["held_out_iou"] for r in results]
        summary[rule] = sum(values) / len(values)
        print(f"| {rule} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {summary[rule]:.3f} |")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
