"""Raster to raster: regression (a value per pixel and output channel) and super-resolution (an image ``scale`` times
finer) of a raster of any size with a model package.

The tiles are read, run and blended exactly as in segmentation (:func:`.segment.blend_tiles`: the same tile grid,
the same :func:`.tiling.blend_weights` over the overlaps, the same column bands, so memory is bounded by tile size x
batch size x band width); only the blended values are written differently: as they are (float32, regression) or
rounded to the model's data type (super-resolution), after the package's value scale and offset, with nodata where
no valid pixel was read.

* regression: on the raster's grid, one float32 band per output channel, nodata :data:`VALUE_NODATA`;
* super-resolution: the raster's grid ``scale`` times finer over the same extent (the transform's pixel size
  divided by ``scale``), one band per output channel, float32 or the package's ``output_dtype`` (uint8, uint16:
  values rounded and clipped to the type's range, 0 kept for nodata).

On a Dask cluster (``cluster``, :mod:`.distributed`) each worker blends a block of the same tile grid
(:func:`.segment.blend_block`, each tile run once) and returns its finished values (the weighted sums divided by
their weights; the rows two blocks share are joined here, :class:`.segment.SeamJoiner`); the
value scale and offset, the statistics, nodata and the data type are applied here, as in one process: the same
values.
"""
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..errors import InputError
from ..geo.outputs import sweep_stale
from ..geo.raster import RasterReader
from ..geo.writer import AtomicFile, BackgroundWriter, GeoTiffWriter, check_writable
from ..tasks import RASTER_TASKS
from .pipeline import abandon, end_run, mask_index, open_device, open_region, resolve_options, start_run
from .segment import SeamJoiner, blend_block, blend_tiles, plan_tiles
from .tiling import TileGrid, column_bands

#: nodata of float32 outputs: the lowest float32 (a regression value may be negative, 0 or -1)
VALUE_NODATA = float(np.finfo(np.float32).min)
#: nodata of integer super-resolution outputs (valid values are clipped to 1.. so that they stay data)
INT_NODATA = 0
INT_RANGES = {"uint8": (1, 255), "uint16": (1, 65535)}


@dataclass
class RasterPrediction:
    output: str
    task: str = ""
    width: int = 0
    height: int = 0
    crs: object = None
    transform: object = None
    scale: int = 1
    dtype: str = "float32"
    nodata: float = None
    band_names: list = field(default_factory=list)
    units: str = ""
    value_scale: float = 1.0
    #: per output channel: {"min", "max", "mean"} of the valid pixels (None when there is none)
    statistics: list = field(default_factory=list)
    valid_pixels: int = 0
    tiles: int = 0
    tiles_run: int = 0
    device: str = ""
    seconds: float = 0.0
    warnings: list = field(default_factory=list)


def finished_values(values, wsum):
    """Blended values [K, h, w] (weighted sums) divided in place by their weights ``wsum`` [h, w]: returns where
    there were valid pixels (the rest is left as it was)."""
    valid = wsum > 0
    np.divide(values, wsum, out=values, where=valid[None])
    return valid


def predict_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): :func:`.segment.blend_block`
    with its finished values: ``(i, [(x, y, values [K, h, w], valid [h, w])], tiles run, seam)``, in output pixels
    (the seam: the rows shared with the blocks above and below, for :class:`.segment.SeamJoiner`)."""
    chunks = []

    def take(y, x, values, wsum):
        chunks.append((x, y, values, finished_values(values, wsum)))

    run, seam = blend_block(reader, runner, job["grid"], job["blocks"][i], mask_index(job["mask"]), bs,
                            job["channels"], take, scale=job["scale"])
    return i, chunks, run, seam


def predict_raster(input_path, package, output, *, bands=None, bounds=None, mask_geometries=None, tile_size=None,
                   overlap=None, batch_size=None, device="auto", progress=None, is_cancelled=None, match_gsd=True,
                   max_band_width=8192, log=None, transaction=None, max_pixels=None, gsd=None, value_scale=None,
                   cluster=None, block_size=4096):
    """Apply the regression or super-resolution model ``package`` to ``input_path``; write ``output`` (GeoTIFF).

    ``value_scale``: multiply the model's values by this instead of the package's ``value_scale`` (Deepness's
    "output scaling"; None or 0: the package's). ``gsd``: processing resolution in metres per pixel (None: the
    package's). A model of another task is refused with its task and the algorithm that runs it. ``transaction``:
    as in :func:`.segment.segment`. ``cluster``: run on a Dask cluster (:mod:`.distributed`: a scheduler address or
    "local:N"; None: in this process), in blocks of about ``block_size`` output pixels (``block_size / scale`` input
    pixels) on the same tile grid: the same values, written here. Returns a :class:`RasterPrediction`.
    """
    t_start, prog, log, pkg = start_run(package, RASTER_TASKS, progress, is_cancelled, log, gsd)
    final = check_writable(output, "OUTPUT")
    if os.path.exists(os.fspath(input_path)) and os.path.abspath(os.fspath(input_path)) == final:
        raise InputError("OUTPUT is the input raster; choose another file name (inputs are never modified)")
    factor = float(value_scale) if value_scale else pkg.value_scale
    offset = pkg.value_offset
    s = pkg.scale if pkg.task == "super_resolution" else 1
    dtype = pkg.output_dtype
    nodata = VALUE_NODATA if dtype == "float32" else INT_NODATA
    pkg_opts = pkg.with_tiling(*resolve_options(pkg, tile_size, overlap, batch_size, device))
    open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd)
    reader = open_reader(pkg_opts)
    result = RasterPrediction(output=final, task=pkg.task, scale=s, dtype=dtype, nodata=nodata, units=pkg.units,
                              value_scale=factor, band_names=[c.name for c in pkg.classes])
    atomic = writer = bg = None
    try:
        result.warnings, (x0, y0, x1, y1) = open_region(
            reader, pkg, bounds, max_pixels, log, georef="the output gets its pixel grid but no CRS",
            resampled="the values")
        mask = mask_index(mask_geometries)
        from rasterio.windows import Window
        transform = reader.ds.window_transform(Window(x0, y0, x1 - x0, y1 - y0))
        transform = transform * transform.scale(1.0 / s)  # super-resolution: s times finer, same extent
        width, height = (x1 - x0) * s, (y1 - y0) * s
        result.width, result.height, result.crs, result.transform = width, height, reader.crs, transform
        if cluster:  # the workers load the model on their own devices
            runner, bs, result.device = None, 1, f"Dask cluster {cluster}"
        else:
            dev, result.device, bs = open_device(device, batch_size, pkg, prog, log)
            runner = pkg.make_runner(dev)
        k = len(pkg.classes)
        if transaction is not None:
            atomic = transaction.file(final)
        else:
            sweep_stale(os.path.dirname(final))
            atomic = AtomicFile(final)
        unit = f" [{pkg.units}]" if pkg.units else ""
        writer = GeoTiffWriter(atomic.tmp, width, height, k, dtype, transform, reader.crs, nodata,
                               band_descriptions=[f"{c.name}{unit}" for c in pkg.classes],
                               overview_resampling="average", name=final)
        bg = BackgroundWriter()
        stats = np.zeros((k, 3))  # sum, min, max
        stats[:, 1], stats[:, 2] = np.inf, -np.inf
        count = [0]

        def write_values(y_row, bx0, values, valid):
            if factor != 1.0:
                values *= np.float32(factor)
            if offset:
                values += np.float32(offset)
            n_valid = int(valid.sum())
            if n_valid:
                v = values[:, valid]
                stats[:, 0] += v.sum(axis=1, dtype=np.float64)
                stats[:, 1] = np.minimum(stats[:, 1], v.min(axis=1))
                stats[:, 2] = np.maximum(stats[:, 2], v.max(axis=1))
                count[0] += n_valid
            if dtype != "float32":
                lo, hi = INT_RANGES[dtype]
                values = np.clip(np.rint(values), lo, hi).astype(dtype)
            values[:, ~valid] = nodata
            bg.submit(writer.write, values, bx0 - x0 * s, y_row - y0 * s)

        grid = TileGrid(x0, y0, x1, y1, reader.native_tile, reader.native_overlap)
        bands_cols = column_bands(x0, x1, max(256, max_band_width // s))
        seq = plan_tiles(grid, bands_cols)
        result.tiles = len(seq)
        what = f"{pkg.scale} times finer" if s > 1 else "values"
        if cluster:
            from .distributed import run_blocks
            side = max(1, int(block_size) // s)  # a block's output is about block_size px a side
            blocks = grid.row_blocks(bands_cols, side)
            prog.message(f"{len(seq)} tiles of {reader.native_tile} px ({reader.tile} px at the model's GSD), "
                         f"overlap {reader.native_overlap} px, in {len(blocks)} blocks of about {side} x {side} px "
                         f"on {cluster}; {what}")
            job = dict(open_reader=open_reader, gsd=pkg.gsd, tiling=(pkg_opts.tile_size, pkg_opts.overlap),
                       device=device, batch_size=batch_size, tta="none", mask=mask_geometries, grid=grid,
                       channels=k, scale=s, blocks=blocks, windows=[grid.block_window(b) for b in blocks],
                       run=predict_block_task, kind="dense")
            seams = SeamJoiner(blocks, lambda y, values, wsum, x: write_values(
                y, x, values, finished_values(values, wsum)), scale=s)
            for i, chunks, run, seam in run_blocks(cluster, pkg, job, prog, log):
                for x, y, values, valid in chunks:
                    write_values(y, x, values, valid)
                result.tiles_run += run
                seams.add(i, seam)
            seams.close()
        else:
            prog.message(f"{len(seq)} tiles of {reader.native_tile} px ({reader.tile} px at the model's GSD), "
                         f"overlap {reader.native_overlap} px, batch {bs}, {len(bands_cols)} column band(s); {what}")
            result.tiles_run = blend_tiles(reader, mask, runner, grid, bands_cols, seq, bs, k,
                                           lambda y, values, wsum, x: write_values(
                                               y, x, values, finished_values(values, wsum)), prog, scale=s)
        bg.close()
        bg = None
        prog.check()
        prog.message("Writing overviews")
        writer.close(overviews=True)
        prog.check()
        if transaction is None:
            atomic.commit()
        result.valid_pixels = count[0]
        result.statistics = [
            {"min": float(stats[i, 1]), "max": float(stats[i, 2]), "mean": float(stats[i, 0] / count[0])}
            if count[0] else None for i in range(k)]
        return end_run(result, reader, count[0] == 0, mask is not None, log, t_start, prog)
    except BaseException:
        abandon(bg, [writer] if writer is not None else [], [atomic] if atomic is not None else [])
        raise
    finally:
        reader.close()


__all__ = ["predict_raster", "predict_block_task", "finished_values", "RasterPrediction", "VALUE_NODATA",
           "INT_NODATA"]
