#!/usr/bin/env python3
"""Train the bundled demonstration model: buildings vs background on a SpaceNet Atlanta sample.

    .venv/bin/python tools/make_demo_model.py [--data ../shared/data/buildings_atlanta]
                                              [--out resources/models/buildings_demo]

Reads ``image.tif`` (panchromatic, 0.5 m, EPSG:32616) and ``buildings.geojson`` (building
footprints in the same CRS) from ``--data``, trains with RS Deep's own training code
(:func:`rs_deep_plugin.engine.training.segmentation.train_segmentation`, seeded, 2 CPU threads, a few minutes)
and writes the model package to ``--out``; copies the image to ``resources/sample/`` as the
sample raster, and writes the attribution notes.
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Settings of the bundled model: 900 steps of 8 crops of 160 px, about 5 minutes on 2 idle CPU
# cores (0.32 s a step). Crops of 160 px (80 m) hold a few houses; smaller crops give more
# optimiser steps for the same compute, which matters more than context when training from scratch.
SETTINGS = dict(
    tile_size=160,
    epochs=20,
    steps_per_epoch=45,
    batch_size=8,
    lr=3e-3,
    patience=8,
    seed=0,
    val_fraction=0.2,
    num_threads=2,
    package_tile_size=512,
    package_overlap=64,
    weights_dtype="float16",
)

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
invent buildings elsewhere. `training_report.json` holds its training curves and validation
metrics (measured on the bottom strip of the sample, held out from training).

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
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    parser.add_argument("--steps-per-epoch", type=int, default=SETTINGS["steps_per_epoch"])
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

    settings = dict(SETTINGS, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    t0, cpu0 = time.time(), time.process_time()
    report = train_segmentation(
        image, labels, out,
        class_names=["background", "building"], class_colors=["000000", "E31A1C"],
        band_names=["pan"], name="buildings_demo",
        description=("Demonstration model: buildings vs background in 0.5 m panchromatic imagery. Trained "
                     "by RS Deep on a tiny SpaceNet Atlanta sample (32 buildings); not a production model."),
        progress=None if args.quiet else terminal_progress(),
        log=print, **settings)
    seconds, cpu = time.time() - t0, time.process_time() - cpu0

    with open(out / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(MODEL_ATTRIBUTION.format(source=SOURCE_NOTE))
    sample.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, sample / "atlanta_pan.tif")
    with open(sample / "ATTRIBUTION.md", "w", encoding="utf-8") as f:
        f.write(SAMPLE_ATTRIBUTION.format(source=SOURCE_NOTE))

    pkg = load_package(out)
    size = sum((out / n).stat().st_size for n in ("model.json", "model.safetensors"))
    print()
    print(report_summary(report))
    print(package_summary(pkg))
    print(f"package: {out} ({size / 1e6:.2f} MB); sample: {sample / 'atlanta_pan.tif'}")
    print(f"training took {seconds:.0f} s wall clock ({cpu:.0f} s CPU time; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if size > 10_000_000:
        sys.exit(f"error: the package is {size / 1e6:.1f} MB; the bundled model must be at most 10 MB")
    return report


if __name__ == "__main__":
    main()
