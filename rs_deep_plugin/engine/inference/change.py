"""Change detection between two dates of the same area with a ``change`` model package.

The segmentation pipeline (:func:`.segment.segment`: tiling, blending, GSD matching, batching,
device, streaming atomic GeoTIFF output, cancel) runs unchanged on a :class:`PairReader`, which
reads the same window from BEFORE and AFTER and stacks the bands (before, then after) the way
bi-temporal networks take them (:mod:`..geo.pair`, :mod:`..models.arch_rs_deep`).

* The output grid is BEFORE's. When AFTER has another CRS, resolution or pixel grid it is warped
  on the fly onto BEFORE's grid (rasterio WarpedVRT, never written to disk) and only the area the
  two rasters share is processed; a pair that does not overlap is refused with the extents.
* Both dates must hold the same bands; BANDS picks the same band numbers from both.
* Class 0 of a change model is "no change"; the others are change classes (binary change, or
  from-to classes). :func:`.segment.class_polygons` turns the change classes into polygons with areas.
"""
import os
from functools import partial

from ..errors import InputError
from ..geo.pair import PairReader, inspect_pair, intersect_region
from ..models.loading import load_package
from ..models.package import ModelPackage
from ..tasks import TASKS
from .segment import segment

TASK = "change"
NO_CHANGE = 0  # class value of "no change" in every change model


def check_change_package(pkg):
    if pkg.task != TASK:
        raise InputError(f"'{pkg.name}' is a {pkg.task} model; {TASKS[TASK].short} needs a {TASK} model")
    if len(pkg.classes) < 2:
        raise InputError(f"'{pkg.name}' has {len(pkg.classes)} class; a change model has 'no change' (0) and at "
                         "least one change class")


def detect_change(before, after, package, output, *, probabilities=None, confidence=None, bands=None, bounds=None,
                  mask_geometries=None, tile_size=None, overlap=None, batch_size=None, device="auto", progress=None,
                  is_cancelled=None, match_gsd=True, max_band_width=8192, log=None, transaction=None,
                  max_pixels=None, tta="none", cluster=None, block_size=4096):
    """Change between ``before`` and ``after`` with the change model ``package``, on BEFORE's grid.

    ``output``: Byte class raster (0 = no change, 1.. = change classes, 255 = nodata or outside
    the area both dates cover). ``probabilities``: float32, one band per class. ``confidence``
    (internal, for :func:`.segment.class_polygons`): the winning probability x 255, 0 where no change or
    nodata. ``bounds``: (xmin, ymin, xmax, ymax) in BEFORE's CRS. ``tta``: test-time augmentation ("none",
    "flips", "d4"); both dates are flipped and rotated alike (their bands are stacked in one tile). Other options
    (``transaction``, ``cluster``, ``block_size`` too) as :func:`.segment.segment`. Returns a
    :class:`.segment.SegmentationResult`.
    """
    log = log or (lambda msg: None)
    pkg = package if isinstance(package, ModelPackage) else load_package(package)
    check_change_package(pkg)
    for key, path in (("OUTPUT", output), ("PROBABILITIES", probabilities), ("CONFIDENCE", confidence)):
        if path and os.path.exists(os.fspath(after)) and \
                os.path.abspath(os.fspath(path)) == os.path.abspath(os.fspath(after)):
            raise InputError(f"{key} is the AFTER raster; choose another file name (inputs are never modified)")
    pair = inspect_pair(before, after, pkg, bands)
    region = intersect_region(bounds, pair.overlap)
    for w in pair.warnings:
        log(w)
    result = segment(before, pkg, output, bands=bands, bounds=region, mask_geometries=mask_geometries,
                     probabilities=probabilities, confidence=confidence, skip_classes=[NO_CHANGE],
                     tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device, progress=progress,
                     is_cancelled=is_cancelled, match_gsd=match_gsd, max_band_width=max_band_width, log=log,
                     task=TASK, transaction=transaction, max_pixels=max_pixels, tta=tta, cluster=cluster,
                     block_size=block_size,
                     open_reader=partial(PairReader, before, after, bands=bands, match_gsd=match_gsd, pair=pair))
    result.warnings = list(pair.warnings) + list(result.warnings)
    return result


__all__ = ["detect_change", "check_change_package"]
