"""Similarity search (recognition): where in a raster do places look like a query image? An embedding model (one
vector per image: Deepness's "Recognition" model type) embeds the query image and every patch of the raster; each
patch gets the cosine similarity of its embedding to the query's.

The data flow:

1. the query image (PNG, JPEG, GeoTIFF...; :func:`read_query`) is resized to the model's input with pixel centres
   aligned and no antialiasing (OpenCV's linear resize, which Deepness uses), kept in its own data type (an 8-bit
   image stays 8-bit, rounded) and scaled like the raster's patches; or the query is an area of the raster itself
   (:func:`read_query_area`), read as the patches are;
2. patches of the model's input size are laid on a regular grid from the top-left corner of the processed area
   (``stride`` px at the model's GSD apart, default side by side) and read, resampled to the model's GSD, by
   :class:`..geo.raster.RasterReader` on a background thread (:func:`.pipeline.prefetch`), ``batch_size`` at a time:
   memory is bounded by patch x batch whatever the raster's size;
3. every patch with enough valid pixels gets its similarity (-1 .. 1) and its rank (1: the most similar; equal
   similarities keep the grid's order, rows first);
   On a Dask cluster (``cluster``) the workers embed blocks of whole patch rows (:func:`similar_block_task`) and
   return the similarities; the query is embedded here;
4. optionally a similarity raster on the raster's grid (float32): each pixel the mean similarity of the patches
   that cover it, as Deepness's map; nodata where none was run. Written block by block from the patch grid
   (:func:`similarity_blocks`), to a temporary file committed at the end (or in the caller's transaction).
"""
import os
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import InputError, ModelPackageError
from ..geo.outputs import sweep_stale
from ..geo.raster import RasterReader, apply_scaling, region_window, resolve_bands
from ..geo.writer import AtomicFile, GeoTiffWriter, check_writable
from ..limits import MAX_QUERY_PIXELS, check_tile_memory
from ..models.postprocess import resize_bilinear
from .patches import PatchRun, patch_polygon, patch_reader
from .pipeline import Estimate, abandon, batched, end_run, open_device, open_region, prefetch, start_run
from .predict import VALUE_NODATA

TASK = "recognition"
#: the block side, in output pixels, of the similarity raster (:func:`similarity_blocks`)
BLOCK = 1024


@dataclass
class SimilarityResult(PatchRun):
    """A :class:`.patches.PatchRun` whose patch dicts (in the grid's order) also hold ``similarity`` (cosine
    similarity of the patch's embedding to the query's) and ``rank`` (1: the most similar). ``raster``: the
    similarity raster written (None without one)."""

    embedding_size: int = 0
    query_size: tuple = (0, 0)  # (height, width) of the query image as read
    raster: str = None

    def best(self, n=1):
        """The ``n`` most similar patches (rank 1 first)."""
        return sorted(self.features, key=lambda f: f["rank"])[:n]


def read_query(path, reader, package, bands=None):
    """The query image at ``path`` as the model takes it: float32 [C, T, T] (T the model's input size), resized with
    pixel centres aligned and no antialiasing, rounded to the image's own integer type when it has one (as OpenCV
    resizes an 8-bit image for Deepness), then scaled by ``reader``'s value scaling (the patches'). ``package``: the
    model (its band count). ``bands``: the
    image's bands to use (None: as for any input, e.g. the RGB of an RGBA PNG). Returns (image, (height, width))."""
    import rasterio
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise InputError(f"QUERY: {source} does not exist; choose an image file (PNG, JPEG, GeoTIFF...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an image without georeferencing is what a query usually is
            with rasterio.open(source) as ds:
                try:
                    use = resolve_bands(ds.count, ds.colorinterp, bands, package)
                except InputError as exc:
                    raise InputError(f"QUERY: {source} has {ds.count} band(s) and the model takes "
                                     f"{package.in_channels}: choose an image with the input raster's bands "
                                     "(a PNG or JPEG for an RGB model)") from exc
                if ds.width * ds.height > MAX_QUERY_PIXELS:
                    raise InputError(f"QUERY: {source} is {ds.width} x {ds.height} px, more than a query image may "
                                     f"have ({MAX_QUERY_PIXELS:,} px); give an image of about the model's input size "
                                     f"({reader.tile} px at the processing resolution), e.g. a crop of this one")
                data = ds.read(use)
                dtype = ds.dtypes[0]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"QUERY: {source} is not an image GDAL can read ({exc}); choose a PNG, JPEG or GeoTIFF "
                         "file") from exc
    t = reader.tile
    img = resize_bilinear(data.astype(np.float32), (t, t))
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        img = np.clip(np.rint(img), info.min, info.max).astype(np.float32)
    apply_scaling(img, reader.scaling)
    return np.ascontiguousarray(img, dtype=np.float32), tuple(data.shape[1:])


def read_query_area(reader, bounds):
    """The part of the input raster within ``bounds`` (xmin, ymin, xmax, ymax in its CRS) as the model takes it:
    float32 [C, T, T], resampled as the patches are (:meth:`..geo.raster.RasterReader.read_tile`; a longer side is
    squeezed, as an image file is), scaled by ``reader``'s value scaling. Nodata counts as 0. Returns (image,
    (height, width) in raster pixels)."""
    from rasterio.windows import Window
    x0, y0, x1, y1 = region_window(reader.width, reader.height, reader.transform, bounds, name="QUERY_EXTENT")
    w, h, t = x1 - x0, y1 - y0, reader.tile
    resampling, dtype = reader.resampling(max(w, h) > t, (w, h) != (t, t))
    img = reader.ds.read(reader.bands, window=Window(x0, y0, w, h), out_shape=(len(reader.bands), t, t),
                         resampling=resampling, out_dtype=dtype)
    img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    apply_scaling(img, reader.scaling)
    return np.ascontiguousarray(img, dtype=np.float32), (h, w)


def cosine(query, embeddings):
    """Cosine similarity of ``query`` [D] to each row of ``embeddings`` [N, D] (0 where either is all zeros)."""
    q = np.asarray(query, dtype=np.float32)
    e = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1) * np.linalg.norm(q)
    dots = e @ q
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 0).astype(np.float32)


def ranks(values):
    """Rank 1.. of each value, the highest first; equal values keep their order."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out


def similarity_blocks(starts_y, starts_x, n, scores, region, block=BLOCK):
    """The similarity raster of the area ``region`` (x0, y0, x1, y1), block by block: yields ``(x, y, values
    float32 [h, w], valid bool [h, w])`` in raster pixels, each pixel the mean of the ``scores`` [rows, cols]
    (NaN: patch not run) of the patches of ``n`` px starting at ``starts_y`` x ``starts_x`` (ascending) that cover
    it. Each block takes only the patches that reach into it."""
    x0, y0, x1, y1 = region
    sy, sx = np.asarray(starts_y), np.asarray(starts_x)
    run = np.isfinite(scores)

    def cover(starts, first, end):
        """(patch indices reaching into [first, end), cover [len(pixels), patches] as 0/1 float64)."""
        idx = np.arange(np.searchsorted(starts, first - n + 1), np.searchsorted(starts, end))
        px = np.arange(first, end)[:, None]
        return idx, ((px >= starts[idx][None]) & (px < starts[idx][None] + n)).astype(np.float64)

    for by in range(y0, y1, block):
        rows, ry = cover(sy, by, min(by + block, y1))
        for bx in range(x0, x1, block):
            cols, cx = cover(sx, bx, min(bx + block, x1))
            sub = np.ix_(rows, cols)
            num = ry @ np.where(run[sub], scores[sub], 0).astype(np.float64) @ cx.T
            den = ry @ run[sub].astype(np.float64) @ cx.T
            valid = den > 0
            values = np.full(valid.shape, VALUE_NODATA, dtype=np.float32)
            values[valid] = (num[valid] / den[valid]).astype(np.float32)
            yield bx, by, values, valid


def similarity_batch(reader, runner, seq, region, min_valid, query_embedding, bs, check=lambda: None,
                     on_batch=lambda done: None):
    """``([(row, col, similarity)], any valid pixel)``: the similarity to ``query_embedding`` of each patch of ``seq``
    [(row, col, x, y)] with enough valid pixels (:func:`.patches.patch_reader`), run ``bs`` at a time. ``check()``
    runs before each batch, ``on_batch(patches done)`` after it."""
    read, any_valid = patch_reader(reader, region, min_valid)
    out, done = [], 0
    for batch, (data, keep) in prefetch(read, batched(seq, bs)):
        check()
        sims = cosine(query_embedding, runner(data)) if data is not None else []
        out += [(r, c, float(s)) for (r, c, _, _), s in zip([p for p, ok in zip(batch, keep) if ok], sims)]
        done += len(batch)
        on_batch(done)
    return out, any_valid[0]


def similar_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): :func:`similarity_batch`
    with the query's embedding computed by the client."""
    return similarity_batch(reader, runner, job["patches"][i], job["region"], job["min_valid"],
                            job["query_embedding"], bs)


def find_similar(input_path, package, query=None, *, query_bounds=None, stride=None, bands=None, query_bands=None,
                 bounds=None, batch_size=None, device="auto", progress=None, is_cancelled=None, match_gsd=True,
                 min_valid=0.5, log=None, max_pixels=None, gsd=None, raster_output=None, transaction=None,
                 cluster=None, block_size=4096):
    """Compare every patch of ``input_path`` with the image file ``query``, or with the part of the raster within
    ``query_bounds`` (xmin, ymin, xmax, ymax in its CRS; one of the two), through the recognition model ``package``.

    ``stride``: px at the model's GSD between patch starts (None: the patch size, patches side by side). ``gsd``:
    the processing resolution in metres per pixel (None: the model's; Deepness's resolution). ``min_valid``: the
    share of a patch (of its part inside the area) that must hold valid pixels for it to be run. ``raster_output``:
    also write the similarity raster there (GeoTIFF; ``transaction`` as in :func:`.segment.segment`). ``cluster``:
    embed the patches on a Dask cluster (:mod:`.distributed`), in blocks of whole patch rows about ``block_size`` px
    high (the query is embedded here): the same similarities. Returns a :class:`SimilarityResult` (iterable over the
    patch dicts).
    """
    t_start, prog, log, pkg = start_run(package, TASK, progress, is_cancelled, log, gsd)
    final = None
    if raster_output:
        final = check_writable(raster_output, "OUTPUT_RASTER")
        if os.path.exists(os.fspath(input_path)) and os.path.abspath(os.fspath(input_path)) == final:
            raise InputError("OUTPUT_RASTER is the input raster; choose another file name (inputs are never "
                             "modified)")
    patch = pkg.tile_size
    step = int(stride) if stride else patch
    if step < 1:
        raise InputError(f"STRIDE must be at least 1 px; got {step}")
    if not 0 < min_valid <= 1:
        raise InputError(f"min_valid must be in (0, 1]; got {min_valid}")
    if (query is None) == (query_bounds is None):
        raise InputError("Give the query as an image file (QUERY) or as an area of the input raster (QUERY_EXTENT): "
                         "one of the two")
    open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd)
    reader = open_reader(pkg)
    result = SimilarityResult(patch_size=patch, stride=step, embedding_size=pkg.builder.get("classes") or 0)
    atomic = writer = None
    try:
        q, result.query_size = read_query(query, reader, pkg, query_bands) if query is not None else \
            read_query_area(reader, query_bounds)
        result.warnings, (x0, y0, x1, y1) = open_region(
            reader, pkg, bounds, max_pixels, log, georef="the patches get its pixel coordinates",
            resampled="the patches")
        from rasterio.windows import Window
        result.transform = reader.ds.window_transform(Window(x0, y0, x1 - x0, y1 - y0))
        result.crs, result.width, result.height = reader.crs, x1 - x0, y1 - y0
        n = reader.native_tile
        sn = max(1, int(round(step * reader.scale)))
        result.native_patch, result.native_stride = n, sn
        ys, xs = list(range(y0, y1, sn)), list(range(x0, x1, sn))
        seq = [(r, c, x, y) for r, y in enumerate(ys) for c, x in enumerate(xs)]
        result.patches = len(seq)
        dev, result.device, bs = open_device(device, batch_size, pkg, prog, log, min_batch=16)
        check_tile_memory(patch, bs, pkg.in_channels, 0, f"{pkg.source}: the model's input size",
                          "BATCH_SIZE" if batch_size else "the automatic BATCH_SIZE",
                          error=InputError if batch_size else ModelPackageError)
        runner = pkg.make_runner(dev)
        query_embedding = runner(q[None])[0]
        if not np.any(query_embedding):
            w = "The query image's embedding is all zeros: every similarity is 0. Choose another query image."
            result.warnings.append(w)
            log(w)
        prog.message(f"{len(seq)} patches of {n} px ({patch} px at the model's GSD), stride {sn} px, batch {bs}; "
                     f"query {result.query_size[1]} x {result.query_size[0]} px, embeddings of "
                     f"{query_embedding.shape[0]} values")
        region = (x0, y0, x1, y1)
        if cluster:
            from .distributed import run_blocks
            result.device = f"Dask cluster {cluster}"
            rows_per = max(1, block_size // sn)  # blocks of whole rows of patches
            groups = [ys[i:i + rows_per] for i in range(0, len(ys), rows_per)]
            patches = [[] for _ in groups]
            for q in seq:  # one pass: patch row r is in block r // rows_per
                patches[q[0] // rows_per].append(q)
            job = dict(open_reader=open_reader, gsd=pkg.gsd, tiling=(patch, 0), device=device,
                       batch_size=batch_size or 16, tta="none", region=region, min_valid=min_valid,
                       query_embedding=query_embedding, run=similar_block_task, kind="dense", patches=patches,
                       windows=[(x0, g[0], x1, min(g[-1] + n, y1)) for g in groups])
            found, any_valid = [], False
            for sims, valid in run_blocks(cluster, pkg, job, prog, log, share=0.9):
                found += sims
                any_valid = any_valid or valid
        else:
            estimate = Estimate(len(seq), "patches", prog.message)

            def on_batch(done):
                prog.update(0.9 * done / max(1, len(seq)))
                estimate.after(done)

            found, any_valid = similarity_batch(reader, runner, seq, region, min_valid, query_embedding, bs,
                                                prog.check, on_batch)
        scores = np.full((len(ys), len(xs)), np.nan, dtype=np.float32)
        for r, c, s in found:
            scores[r, c] = s
        run = [(r, c, x, y) for r, c, x, y in seq if np.isfinite(scores[r, c])]
        rank = ranks([scores[r, c] for r, c, _, _ in run])
        result.features = [
            {"geometry": patch_polygon(reader.transform, max(x, x0), max(y, y0), min(x + n, x1), min(y + n, y1)),
             "similarity": float(scores[r, c]), "rank": int(k), "row": r, "col": c,
             "window": (max(x, x0), max(y, y0), min(x + n, x1) - max(x, x0), min(y + n, y1) - max(y, y0))}
            for (r, c, x, y), k in zip(run, rank)]
        result.patches_run = len(run)
        if final:
            prog.message("Writing the similarity raster")
            if transaction is not None:
                atomic = transaction.file(final)
            else:
                sweep_stale(os.path.dirname(final))
                atomic = AtomicFile(final)
            writer = GeoTiffWriter(atomic.tmp, x1 - x0, y1 - y0, 1, "float32", result.transform, reader.crs,
                                   VALUE_NODATA, band_descriptions=["cosine similarity to the query"],
                                   overview_resampling="average", name=final)
            for bx, by, values, _ in similarity_blocks(ys, xs, n, scores, (x0, y0, x1, y1)):
                prog.check()
                writer.write(values, bx - x0, by - y0)
            writer.close(overviews=True)
            prog.check()
            if transaction is None:
                atomic.commit()
            result.raster = final
        return end_run(result, reader, result.patches_run == 0 and not any_valid, False, log, t_start, prog)
    except BaseException:
        abandon(None, [writer] if writer is not None else [], [atomic] if atomic is not None else [])
        raise
    finally:
        reader.close()


__all__ = ["find_similar", "similarity_batch", "similar_block_task", "read_query", "read_query_area", "cosine",
           "ranks", "similarity_blocks", "SimilarityResult"]
