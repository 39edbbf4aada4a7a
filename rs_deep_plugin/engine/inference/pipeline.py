"""What every tiled inference task shares: the start of a run (:func:`start_run`: package and task check;
:func:`open_region`: input warnings, processed window, size check; :func:`open_device`: device, runner batch;
:func:`open_runner`: the probability runner, with test-time augmentation),
the tile options and their memory check (:func:`resolve_options`), the MASK index and the pure tile read
(:func:`read_tiles`), batching and read-ahead on a reader thread (:func:`prefetch`) and the time estimate.

Segmentation (and change detection through it), detection and patch classification each add only their own
consume step: blending into strips, merging boxes, or classifying patches.
"""
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError, ModelPackageError
from ..geo.raster import check_size, input_warnings, region_window
from ..limits import check_tile_memory
from ..models.loading import load_package
from ..models.package import ModelPackage
from ..models.onnx.cache import inference_backend, make_runner
from ..models.runners import default_batch_size, device_description, select_device
from ..models.tta import TTA_DESCRIPTIONS, with_tta
from ..progress import Progress
from ..tasks import OBJECT_TASKS, TASKS, runs_with



def start_run(package, task, progress=None, is_cancelled=None, log=None, gsd=None):
    """``(t_start, progress, log, package)`` for a run of ``task``: the package loaded when a path is given,
    and refused when it is a model of another task. ``gsd`` (metres per pixel; None: the package's): the processing
    resolution, which the raster is resampled to (Deepness's resolution, for models that do not state theirs)."""
    t_start = time.time()
    pkg = package if isinstance(package, ModelPackage) else load_package(package)
    tasks = (task,) if isinstance(task, str) else tuple(task)
    if pkg.task not in tasks:
        raise InputError(f"'{pkg.name}' is a {pkg.task} model; {TASKS[tasks[0]].short} needs a "
                         f"{' or '.join(tasks)} model{runs_with(pkg.task)}")
    if gsd is not None:
        if not gsd > 0:
            raise InputError(f"RESOLUTION must be positive (or 0 for the model's); got {gsd * 100:g} cm/px")
        pkg = dataclasses.replace(pkg, gsd=float(gsd))
    return t_start, Progress(progress, is_cancelled), log or (lambda msg: None), pkg


def open_region(reader, pkg, bounds, max_pixels, log, georef, resampled):
    """``(warnings, (x0, y0, x1, y1))``: the warnings on the input's georeferencing (logged), and the raster
    window to process (``bounds`` in the raster's CRS, None: all), refused when it has more than
    ``max_pixels`` pixels (None: no limit), before any work. ``georef`` says what the outputs get without a CRS,
    ``resampled`` what is mapped back to the raster when its GSD differs from the model's."""
    warnings = []
    if reader.crs is None:
        warnings.append(f"The input raster has no CRS: {georef} and the model's GSD cannot be checked, so the raster "
                        "is used at its own resolution. Assign a CRS (Raster > Projections > Assign Projection) "
                        "for georeferenced results.")
    elif reader.scale != 1.0:
        warnings.append(f"The raster's pixels are {reader.gsd:.3g} m and the model expects {pkg.gsd:.3g} m: tiles "
                        f"are resampled to the model's GSD and {resampled} mapped back to the raster's grid.")
    for w in warnings:
        log(w)
    if pkg.input_percentiles:
        lo, hi = pkg.input_percentiles
        log(f"Value scaling: the input's own {lo:g}th-{hi:g}th percentiles, as the model asks "
            f"({reader.scaling_ranges()})")
    region = region_window(reader.width, reader.height, reader.transform, bounds)
    check_size(region[2] - region[0], region[3] - region[1], max_pixels)
    return warnings, region


def open_device(device, batch_size, pkg, prog, log, min_batch=1):
    """``(device, its description, batch size)``: the device chosen (logged) and the batch size given, or the
    device's default (at least ``min_batch``)."""
    dev = select_device(device, inference_backend(pkg, device, log))
    name = device_description(dev)
    log(f"Device: {name}")
    prog.message(f"Loading model {pkg.name} on {name}")
    bs = int(batch_size) if batch_size else max(default_batch_size(dev), min_batch)
    if bs < 1:
        raise InputError(f"BATCH_SIZE must be at least 1; got {bs}")
    return dev, name, bs


def open_runner(pkg, dev, tta, log):
    """The package's probability runner on ``dev`` with the test-time augmentation ``tta`` (checked by
    :func:`..models.tta.check_tta`; logged): what segmentation, change and patch classification run."""
    log(f"Test-time augmentation: {TTA_DESCRIPTIONS[tta]}")
    return with_tta(make_runner(pkg, dev), tta)


def resolve_options(package, tile_size=None, overlap=None, batch_size=None, device="auto"):
    """(tile, overlap) in model pixels, from the parameters or the package. The one memory check of the
    tiled pipelines (segmentation, change, detection): a tile or a batch of tiles larger than the limits
    (:func:`.limits.check_tile_memory`) is refused here, before anything is read or allocated."""
    tile = int(tile_size) if tile_size else package.tile_size
    if tile < 32 or tile % 32:
        raise InputError(f"TILE_SIZE must be a multiple of 32 (the network halves the image 5 times); got {tile}")
    ov = package.overlap if overlap is None or overlap < 0 else int(overlap)
    if ov * 2 >= tile:
        raise InputError(f"OVERLAP must be less than half of TILE_SIZE ({tile // 2}); got {ov}")
    batch = int(batch_size) if batch_size else default_batch_size(
        select_device(device, inference_backend(package, device, prepare_now=False)))
    bands = package.in_channels * (2 if package.task == "change" else 1)
    classes = 0 if package.task in OBJECT_TASKS else len(package.classes)  # a detector returns boxes
    classes *= package.scale ** 2  # a super-resolution output has scale² times the pixels of its tile
    check_tile_memory(tile, batch, bands, classes,
                      "TILE_SIZE" if tile_size else f"{package.source}: the package's tile size",
                      "BATCH_SIZE" if batch_size else "the automatic BATCH_SIZE",
                      error=InputError if tile_size or batch_size else ModelPackageError)
    return tile, ov


def end_run(result, reader, nothing_valid, masked, log, t_start, prog):
    """The end of a tiled run that wrote its outputs: the warnings on the values read and on an area without a valid
    pixel (logged, added to ``result.warnings``), the run's seconds, the progress at 100 %. Returns ``result``."""
    said = input_warnings(reader, nothing_valid, masked)
    for w in said:
        log(w)
    result.warnings += said
    result.seconds = time.time() - t_start
    prog.update(1.0, None)
    return result


def abandon(background, writers, files):
    """After a failed or cancelled run: the background writer stopped, the raster writers aborted and the temporary
    ``files`` discarded, whatever fails on the way (the run's own error is the one to report)."""
    if background is not None:
        try:
            background.close()
        except BaseException:
            pass
    for w in writers:
        w.abort()
    for f in files:
        f.discard()


def mask_index(mask_geometries):
    """None without a MASK (``mask_geometries`` None); an empty MASK or one without polygons is refused (an
    empty list is a MASK that covers nothing, not "no MASK")."""
    if mask_geometries is None:
        return None
    from shapely import STRtree
    geoms = [g for g in mask_geometries if g is not None and not g.is_empty]
    other = sorted({g.geom_type for g in geoms if g.geom_type not in ("Polygon", "MultiPolygon")})
    if other:
        raise InputError(f"MASK must hold polygons; it holds {', '.join(other)} geometries. Give a polygon layer, "
                         "or no MASK")
    if not geoms:
        raise InputError("MASK has no polygons; give a polygon layer with at least one feature, or no MASK")
    return geoms, STRtree(geoms)


def read_tiles(reader, tiles, mask):
    """Pure read step: tiles [(x, y)] -> (data [B, C, T, T] of the tiles with valid pixels, or None;
    [(x, y, valid)] for every tile)."""
    from rasterio.features import geometry_mask
    from shapely.geometry import box
    arrays, metas = [], []
    n = reader.native_tile
    for x, y in tiles:
        data, valid = reader.read_tile(x, y)
        if mask is not None and valid.any():
            geoms, tree = mask
            t = reader.window_transform(x, y)
            x0, y0 = t * (0, 0)
            x1, y1 = t * (n, n)
            hits = [geoms[i] for i in tree.query(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))]
            if hits:
                tt = t * t.scale(n / reader.tile)  # mask at model resolution
                inside = geometry_mask(hits, out_shape=valid.shape, transform=tt, invert=True)
                valid &= inside
            else:
                valid[:] = False
        metas.append((x, y, valid))
        if valid.any():
            arrays.append(data)
    batch = np.stack(arrays) if arrays else None
    return batch, metas




def batched(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def prefetch(read, batches):
    """Yield ``(batch, read(batch))`` while the next batch is read on a background thread.

    GDAL releases the GIL while it reads and decodes, so reading overlaps with the model.
    ``read`` must use its own dataset handles (rasterio datasets are not thread-safe).
    """
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rs_deep-reader") as pool:
        pending = pool.submit(read, batches[0])
        for i, batch in enumerate(batches):
            result = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            yield batch, result


def rough_duration(seconds):
    """``seconds`` in words, to about two significant figures: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds, -1 if seconds >= 20 else 0)):.0f} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60):.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 10 else f"{round(hours):,.0f} h"


class Estimate:
    """Says, once the first batch has run, roughly how long the run will take: the first batch's time (model
    warm-up included, so rather more than less) times the number of batches."""

    def __init__(self, total, what, message):
        self.total, self.what, self.message = total, what, message
        self.t0 = time.time()
        self.said = False

    def after(self, done):
        if self.said or done <= 0 or done >= self.total:
            return
        self.said = True
        took = time.time() - self.t0
        self.message(f"The first {done:,} {self.what} took {took:.1f} s: the {self.total:,} {self.what} will take "
                     f"about {rough_duration(took * self.total / done)} on this machine")
