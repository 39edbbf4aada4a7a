#!/usr/bin/env python3
"""Train the bundled demonstration model: buildings vs background on a SpaceNet Atlanta sample.

    .venv/bin/python tools/make_demo_model.py [--data ../shared/data/buildings_atlanta]
                                              [--out resources/models/buildings_demo] [--minutes 10]

Reads ``image.tif`` (panchromatic, 0.5 m, EPSG:32616) and ``buildings.geojson`` (building
footprints in the same CRS) from ``--data``, trains with RS Deep's own training code
(:func:`rs_deep_plugin.engine.training.segmentation.train_segmentation`, seeded, 2 CPU threads, rs_deep:train's
defaults: a budget of 10 minutes) on the left 65 % of the scene, writes the model package to ``--out`` and scores
it on the right 35 %, which it never saw (building IoU, with and without TTA); copies the image to ``resources/sample/`` as the
sample raster, and writes the attribution notes.
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Settings of the bundled model: rs_deep:train's defaults for segmentation (TOOLBOX_DEFAULTS: 4 crops of 256 px,
# learning rate 0.003; a 10-minute budget, at most 100 epochs, patience 10, the best epoch by validation IoU on the
# representative edge strip, weights averaged, a quarter of the crops on a labelled object, copy-paste of labelled
# objects into half of them) on the engine's light U-Net (MobileNetV2 with a narrower decoder: 8.4 MB in float16; the
# toolbox's MobileNetV2 U-Net is 13 MB, over the 10 MB a bundled model may be). It trains on the left 65 % of the
# scene only; the right 35 % (houses and forest) is held out and scored at the end.
SETTINGS = dict(
    epochs=100,
    time_budget=10,
    patience=10,
    seed=0,
    val_fraction=0.2,
    num_threads=2,
    package_tile_size=512,
    package_overlap=64,
    weights_dtype="float16",
)
HELD_OUT = 0.35  # right share of the scene never trained on (tools/compare_rf.py's buildings_atlanta_right split)


def held_out_iou(image, footprints, package, tta):
    """Building IoU of ``package`` on the right HELD_OUT of ``image`` (engine segment, ``tta``)."""
    import tempfile
    import rasterio
    from rasterio.features import rasterize
    from rasterio.windows import Window
    from rs_deep.rs_deep_plugin.engine.inference.segment import segment
    with rasterio.open(image) as ds:
        cut = int(round(ds.width * (1 - HELD_OUT)))
        left, bottom, right, top = ds.window_bounds(Window(cut, 0, ds.width - cut, ds.height))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "held_out.tif")
        segment(str(image), str(package), out, bounds=(left, bottom, right, top), tta=tta)
        with rasterio.open(out) as ds:
            pred = ds.read(1) == 1
            ref = rasterize([g for g, _ in footprints], out_shape=pred.shape, transform=ds.transform, fill=0,
                            default_value=1, dtype="uint8") == 1
    return round(float((pred & ref).sum() / max(1, (pred | ref).sum())), 4)


SOURCE_NOTE = """\
The imagery is from SpaceNet (Atlanta, SpaceNet 4 off-nadir dataset), as redistributed in the
CosmiQ Works `solaris` repository: `solaris/data/sample_geotiff.tif` (panchromatic, 0.5 m,
EPSG:32616) with the building footprints `solaris/data/geotiff_labels.geojson`.

* solaris repository (https://github.com/CosmiQ/solaris): Apache License 2.0.
* SpaceNet imagery and labels: Creative Commons Attribution-ShareAlike 4.0 International
  (CC BY-SA 4.0), SpaceNet on AWS (https://spacenet.ai/), a partnership of CosmiQ Works,
  Maxar Technologies (DigitalGlobe), and others.
"""

SAMPLE_ATTRIBUTION = """\
# Sample raster: atlanta_pan.tif

`atlanta_pan.tif` is a 600 x 900 px panchromatic image (UInt16, 0.5 m, EPSG:32616, nodata 0) of
a residential area of Atlanta, copied unchanged.

{source}
The file is redistributed under CC BY-SA 4.0; if you share something derived from it, give
the same attribution and use the same licence.
"""

MODEL_ATTRIBUTION = """\
# Demonstration model: buildings_demo

A building / background segmentation model (U-Net with a MobileNetV2 encoder, one
panchromatic band, 0.5 m) trained from scratch by RS Deep's own training code
(`tools/make_demo_model.py`, `rs_deep_plugin/engine/training/segmentation.py`) on one tiny sample image with
32 labelled buildings. It is a **demonstration, not a production model**: it shows the
plugin working on the bundled sample (`resources/sample/atlanta_pan.tif`) and will miss or
invent buildings elsewhere. It was trained on the left 65 % of the sample only; `training_report.json` holds its
training curves, its validation metrics (an edge strip of that part,
chosen as the one whose share of buildings is closest to the whole part's) and `held_out`: its building IoU on the
right 35 % of the sample, which it never saw.

Training data:

{source}
The weights are derived from CC BY-SA 4.0 data; they are shared under the same licence with
this attribution.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "buildings_atlanta"),
                        help="folder with image.tif and buildings.geojson")
    parser.add_argument("--out", default=str(REPO / "resources" / "models" / "buildings_demo"),
                        help="model package folder to write")
    parser.add_argument("--sample", default=str(REPO / "resources" / "sample"),
                        help="folder for the sample raster and its attribution")
    parser.add_argument("--minutes", type=float, default=SETTINGS["time_budget"], help="training time budget")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    ensure_dev_link()
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    from rs_deep.rs_deep_plugin.engine.models.package import package_summary
    from rs_deep.rs_deep_plugin.engine.progress import terminal_progress
    from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
    from rs_deep.rs_deep_plugin.engine.training.report import report_summary
    from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation

    data = Path(args.data)
    image, footprints = data / "image.tif", data / "buildings.geojson"
    for p in (image, footprints):
        if not p.is_file():
            sys.exit(f"error: {p} not found; give --data, the folder holding image.tif and buildings.geojson")
    out = Path(args.out)
    sample = Path(args.sample)

    import rasterio
    with rasterio.open(image) as ds:
        crs = ds.crs
    labels = read_vector_labels(footprints, class_value=1, dst_crs=crs)
    print(f"{len(labels)} building footprints from {footprints}")

    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS
    settings = dict(TOOLBOX_DEFAULTS["segmentation"], **SETTINGS)
    settings["time_budget"] = args.minutes
    import tempfile
    from compare_rf import split_raster  # the same cut as compare-rf's buildings_atlanta_right
    tmp = tempfile.mkdtemp()
    train_image = split_raster(str(image), tmp, "right", HELD_OUT)["train"]  # the left 1 - HELD_OUT of the scene
    t0, cpu0 = time.time(), time.process_time()
    report = train_segmentation(
        train_image, labels, out,
        class_names=["background", "building"], class_colors=["000000", "E31A1C"],
        band_names=["pan"], name="buildings_demo",
        description=("Demonstration model: buildings vs background in 0.5 m panchromatic imagery. Trained "
                     "by RS Deep on the left 65 % of a tiny SpaceNet Atlanta sample; not a production model."),
        progress=None if args.quiet else terminal_progress(),
        log=print, **settings)
    shutil.rmtree(tmp, ignore_errors=True)
    seconds, cpu = time.time() - t0, time.process_time() - cpu0

    with open(out / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(MODEL_ATTRIBUTION.format(source=SOURCE_NOTE))
    sample.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, sample / "atlanta_pan.tif")
    with open(sample / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(SAMPLE_ATTRIBUTION.format(source=SOURCE_NOTE))

    held = {"none": held_out_iou(image, labels, out, "none"), "d4": held_out_iou(image, labels, out, "d4")}
    report["held_out"] = {"area": f"right {HELD_OUT:.0%} of the scene, never trained on", "building_iou": held["none"],
                          "building_iou_tta_d4": held["d4"]}
    from rs_deep.rs_deep_plugin.engine.files import write_json
    from rs_deep.rs_deep_plugin.engine.training.report import REPORT_NAME
    write_json(str(out / REPORT_NAME), {k: v for k, v in report.items()
                                        if k not in ("package", "report_path", "curves_path")})
    pkg = load_package(out)
    size = sum((out / n).stat().st_size for n in ("model.json", "model.safetensors"))
    print()
    print(report_summary(report))
    print(package_summary(pkg))
    print(f"held-out building IoU (right {HELD_OUT:.0%}, never trained on): {held['none']:.3f}; with TTA d4 "
          f"{held['d4']:.3f}")
    print(f"package: {out} ({size / 1e6:.2f} MB); sample: {sample / 'atlanta_pan.tif'}")
    print(f"training took {seconds:.0f} s wall clock ({cpu:.0f} s CPU time; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if size > 10_000_000:
        sys.exit(f"error: the package is {size / 1e6:.1f} MB; the bundled model must be at most 10 MB")
    return report


if __name__ == "__main__":
    main()
