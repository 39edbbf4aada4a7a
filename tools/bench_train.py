#!/usr/bin/env python3
"""make bench-train: training crops per second of rs_deep:train's default networks in float32 and in bfloat16.

Trains rs_deep:train's default networks on the bundled samples through the engine, each run short and without
validation (only the steps are timed): segmentation (the toolbox's U-Net on MobileNetV2, crops of 256 px, batch 4,
the Atlanta panchromatic sample with its building footprints) and detection (CenterNet on ResNet-18, crops of 256
px, batch 4, the NEON OSBS_029 tile with its crowns). Each runs in float32 and in bfloat16 mixed precision, the
two interleaved for ``--rounds`` rounds; the figures are medians. ``precision="auto"`` chooses bfloat16 for
segmentation where the device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU) and float32 for
detection (its bfloat16 row says what that leaves). Prints one JSON line:

  native_bfloat16     whether the device computes bfloat16 natively
  <task>_float32_crops_s, <task>_bfloat16_crops_s   training crops per second
  <task>_speedup      bfloat16 / float32

  usage: tools/bench_train.py [--steps 12] [--rounds 2] [--device cpu]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build", "dev-plugins"))
IMAGE = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
BUILDINGS = os.path.join(ROOT, "tests", "data", "buildings_atlanta", "buildings.geojson")
TREES_IMAGE = os.path.join(ROOT, "resources", "sample", "osbs_029.tif")
TREES = os.path.join(ROOT, "tests", "data", "trees_neon", "OSBS_029_boxes.geojson")


def run(task, precision, steps, device, out):
    """(the precision the run used, its training crops per second) for one short run: 2 epochs of ``steps`` steps,
    the first a warm-up, the second timed by the report's per-epoch clock."""
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS, default_encoder, toolbox_builder
    d = TOOLBOX_DEFAULTS[task]
    common = dict(builder=toolbox_builder(task, None, default_encoder(task)), tile_size=d["tile_size"],
                  batch_size=d["batch_size"], lr=d["lr"], epochs=2, steps_per_epoch=steps, precision=precision,
                  device=device, seed=0, patience=0)
    if task == "segmentation":
        from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation
        report = train_segmentation(IMAGE, read_vector_labels(BUILDINGS, class_value=1), out, val_fraction=0,
                                    class_names=["background", "building"], **common)
    else:
        from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
        report = train_detection(TREES_IMAGE, out, boxes=TREES, class_names=["tree"], **common)
    first, second = report["history"][0]["seconds"], report["history"][1]["seconds"]
    return report["precision"], d["batch_size"] * steps / (second - first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch
    from rs_deep.rs_deep_plugin.engine.models.runners import select_device
    from rs_deep.rs_deep_plugin.engine.training.loop import native_bfloat16
    result = {"device": args.device, "threads": torch.get_num_threads(),
              "native_bfloat16": native_bfloat16(torch, select_device(args.device))}
    with tempfile.TemporaryDirectory(prefix="rs_deep_bench_train_") as tmp:
        for task in ("segmentation", "detection"):
            rates = {"float32": [], "bfloat16": []}
            for r in range(args.rounds):
                for precision in rates:
                    used, rate = run(task, precision, args.steps, args.device,
                                     os.path.join(tmp, f"{task}_{precision}_{r}"))
                    rates[precision].append(rate)
                    print(f"{task} {used} round {r + 1}: {rate:.2f} crops/s", flush=True)
            f32, bf16 = statistics.median(rates["float32"]), statistics.median(rates["bfloat16"])
            result.update({f"{task}_float32_crops_s": round(f32, 2), f"{task}_bfloat16_crops_s": round(bf16, 2),
                           f"{task}_speedup": round(bf16 / f32, 2)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
