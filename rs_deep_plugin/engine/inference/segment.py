"""Semantic segmentation of a raster of any size with a model package.

The work is split so that it can be distributed later without changing the algorithms:

* :func:`.pipeline.read_tiles` is a pure function of a batch of windows (read, scale, mask), and the
  model runner a pure function of the batch (tiles -> probabilities);
* a :class:`StripBlender` sums the weighted tiles of one column band, tile row by tile row, and hands
  each pixel to the writer once its last tile is in;
* one writer streams the finished blocks to tiled GeoTIFFs.

Memory is bounded by tile size x batch size, plus the rows that two tile rows share across a column band
(``max_band_width`` columns, 8192 by default), whatever the size of the raster; the C heap's free pages go back
to the system after each tile row (:func:`..memory.release_free_heap`).
"""
import collections
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..errors import InputError
from ..memory import release_free_heap
from ..geo.outputs import sweep_stale
from ..geo.raster import RasterReader, area_factor_m2
from ..geo.vectorize import vectorize
from ..geo.writer import (CLASS_NODATA, PROB_NODATA, AtomicFile, BackgroundWriter, GeoTiffWriter, check_writable,
                          colormap_for)
from ..models.postprocess import resize_bilinear
from ..models.tta import check_tta
from .pipeline import (Estimate, abandon, batched, end_run, mask_index, open_device, open_region, open_runner,
                       prefetch, read_tiles, resolve_options, start_run)
from .tiling import TileGrid, blend_weights, column_bands


@dataclass
class SegmentationResult:
    output: str
    probabilities: str = None
    confidence: str = None
    output_file: str = None  # where the class raster is now: its temporary file while a transaction is open
    width: int = 0
    height: int = 0
    crs: object = None
    transform: object = None
    class_pixels: dict = field(default_factory=dict)  # class value -> pixel count
    pixel_area_m2: float = 0.0
    tiles: int = 0
    tiles_run: int = 0
    device: str = ""
    seconds: float = 0.0
    gsd_scale: float = 1.0
    tta: str = "none"  # the test-time augmentation of the run (:data:`..models.tta.TTA_CHOICES`)
    warnings: list = field(default_factory=list)


#: finished rows leave the blender in column chunks of at most this many output pixels (:meth:`StripBlender.finish_each`)
FINISH_COLUMNS = 1024


def column_chunks(c0, c1, columns=FINISH_COLUMNS):
    """[(a, b)]: columns [c0, c1) in chunks of at most ``columns`` (None: one chunk)."""
    step = columns or max(1, c1 - c0)
    return [(a, min(c1, a + step)) for a in range(c0, c1, step)]


class StripBlender:
    """Sums the weighted tiles of one column band [ax0, ax1) (the span of its tiles), tile row by tile row, and hands
    on each pixel once every tile over it was added: ``take(y, x, values [K, h, w], wsum [h, w])`` gets the finished
    pixels of a tile row (weighted sums and their weights, its own copies, at most ``columns`` wide, clipped to the
    band's own columns [bx0, bx1)) while the row is still being added.

    The current tile row is summed in a window of two tiles' width that moves right with the tiles; only the rows
    that a tile row shares with the next one (those below ``upto``) are kept across the band, so the memory is that
    of the tiles and of the rows' overlap, not of a strip of the band's width and a tile's height. A pixel's sum is
    that of its tiles added in the run's order (tile row by tile row, left to right) whatever the band's width.

    Tile rows come in order: ``add(x, y, values, weight, upto)`` for each tile of the row at ``y`` with valid pixels,
    left to right, then ``end_row(y, upto)`` (also for a row without a tile added); ``upto`` is where the rows that
    this tile row finishes end (the next row's start; the band's end for the last row)."""

    def __init__(self, ax0, ax1, bx0, bx1, tile, classes, take, columns=FINISH_COLUMNS):
        self.ax0, self.ax1, self.bx0, self.bx1 = ax0, ax1, bx0, bx1
        self.n, self.k, self.take, self.columns = tile, classes, take, columns
        self.width = min(2 * tile, ax1 - ax0)  # the window's columns: a tile and the next one's start
        self.acc = np.zeros((classes, tile, self.width), dtype=np.float32)
        self.wsum = np.zeros((tile, self.width), dtype=np.float32)
        self.wx0 = self.wx1 = ax0  # the window's first column, and the end of the columns loaded into it
        self.scratch = None
        self.y = self.upto = None  # the tile row being added
        self.next_y = None  # where the rows kept from the last row start (its ``upto``)
        # [K, rows, ax1 - ax0], [rows, ax1 - ax0]: the sums of the rows that the last tile row shares with this one
        # (its first ``kept_rows``), replaced column by column, once a column is in the window, by those that this
        # row shares with the next
        self.kept = self.kept_w = None
        self.kept_rows = 0

    def _start(self, y, upto):
        if self.next_y is not None and y != self.next_y:
            raise ValueError(f"tile row {y} does not start where the rows kept from the last one start "
                             f"({self.next_y})")
        if not y < upto <= y + self.n:
            raise ValueError(f"tile row {y} cannot finish the rows up to {upto}")
        self.y, self.upto = y, upto
        rows = y + self.n - upto
        if self.kept is None or self.kept.shape[1] < rows:
            kept = np.empty((self.k, rows, self.ax1 - self.ax0), dtype=np.float32)
            kept_w = np.empty((rows, self.ax1 - self.ax0), dtype=np.float32)
            h = self.kept_rows
            if h:
                kept[:, :h], kept_w[:h] = self.kept[:, :h], self.kept_w[:h]
            self.kept, self.kept_w = kept, kept_w
        self.wx0 = self.wx1 = self.ax0

    def add(self, x, y, probs, weight, upto):
        """probs [K, n, n] of the tile at (x, y), weight [n, n] (already zero where invalid)."""
        if self.y is None:
            self._start(y, upto)
        assert y == self.y and x >= self.wx0, "tiles must be added row by row, left to right"
        n = weight.shape[0]
        if x + n > self.wx0 + self.width:
            self._advance(x)
        self._load(x + n)
        if self.scratch is None or self.scratch.shape != probs.shape:
            self.scratch = np.empty(probs.shape, dtype=np.float32)  # the weighted tile, without a new array per tile
        np.multiply(probs, weight, out=self.scratch)
        c = x - self.wx0
        self.acc[:, :n, c:c + n] += self.scratch
        self.wsum[:n, c:c + n] += weight

    def end_row(self, y, upto):
        """The tile row at ``y`` is complete: its remaining finished pixels are handed on."""
        if self.y is None:
            self._start(y, upto)
        self._advance(self.ax1)
        self.kept_rows = self.y + self.n - self.upto
        self.next_y, self.y = self.upto, None

    def kept_sums(self, rows):
        """(sums [K, rows, ax1 - ax0], weights [rows, ax1 - ax0]): copies of the first ``rows`` rows kept from the last
        row (the rows from its ``upto`` down that its tiles cover), from column ``ax0``."""
        rows = min(rows, self.kept_rows)
        return self.kept[:, :rows].copy(), self.kept_w[:rows].copy()

    def _load(self, end):
        """Bring the columns up to ``end`` into the window: the rows kept from the last row, zero below."""
        a, b = self.wx1, min(end, self.ax1)
        if b <= a:
            return
        wa, wb, ka, kb, h = a - self.wx0, b - self.wx0, a - self.ax0, b - self.ax0, self.kept_rows
        if h:
            self.acc[:, :h, wa:wb] = self.kept[:, :h, ka:kb]
            self.wsum[:h, wa:wb] = self.kept_w[:h, ka:kb]
        self.acc[:, h:, wa:wb] = 0
        self.wsum[h:, wa:wb] = 0
        self.wx1 = b

    def _advance(self, to):
        """Finish the columns left of ``to`` (no tile of this row that is still to come covers them) and move the
        window to start there."""
        while self.wx0 < to:
            b = min(to, self.wx0 + self.width)
            self._load(b)
            self._finish(self.wx0, b)
            d, keep = b - self.wx0, self.wx1 - b
            if keep:
                for a in self.acc:  # channel by channel: numpy copies the whole source of overlapping 3-D slices
                    a[:, :keep] = a[:, d:d + keep]
                self.wsum[:, :keep] = self.wsum[:, d:d + keep]
            self.wx0 = b

    def _finish(self, a, b):
        """Columns [a, b) of the window: rows above ``upto`` to ``take``, the rows below kept for the next row."""
        rows, y = self.upto - self.y, self.y
        wa, wb = a - self.wx0, b - self.wx0
        below = self.n - rows
        if below:
            self.kept[:, :below, a - self.ax0:b - self.ax0] = self.acc[:, rows:, wa:wb]  # loaded: no longer needed
            self.kept_w[:below, a - self.ax0:b - self.ax0] = self.wsum[rows:, wa:wb]
        ca, cb = max(a, self.bx0), min(b, self.bx1)
        for c0, c1 in column_chunks(ca, cb, self.columns):
            self.take(y, c0, self.acc[:, :rows, c0 - self.wx0:c1 - self.wx0].copy(),
                      self.wsum[:rows, c0 - self.wx0:c1 - self.wx0].copy())


def plan_tiles(grid, bands_cols):
    """Sequence of tiles with markers: [(band_index, x, y, end_of_row)]."""
    seq = []
    for b, (bx0, bx1) in enumerate(bands_cols):
        xs = grid.columns_for(bx0, bx1)
        for y in grid.ys:
            for i, x in enumerate(xs):
                seq.append((b, x, y, i == len(xs) - 1))
    return seq


def _nearest(size, new):
    """Indices of a nearest-neighbour resampling of ``size`` pixels to ``new``."""
    return np.minimum((np.arange(new) * size) // new, size - 1)


def _containing(size, new):
    """For each of ``new`` pixels over the extent of ``size`` pixels, the index of the one its centre lies in."""
    return np.minimum(((np.arange(new) + 0.5) * size / new).astype(np.int64), size - 1)


def tile_batches(reader, runner, seq, xy, mask, bs, check, scale=1):
    """Runs the model over the tiles ``seq`` (``xy(item)``: the tile's (x, y)), ``bs`` at a time, reading ahead on one
    thread and running the forward passes of the next batches on others while the batch before them is blended: as
    many at once as the runner takes (``runner.concurrent_batches``, one without it; an ONNX runner on the CPU: its
    lanes, :class:`..models.onnx.runners.OnnxRunner`, which keep both cores busy while this thread blends). Yields
    per batch ``[(item, values [K, m, m] or None, valid [m, m])]`` with m = the tile in output pixels (``scale`` times
    the raster's tile: super-resolution): None for a tile without valid pixels; ``check()`` runs before each batch
    (cancel)."""
    out_n = reader.native_tile * int(scale)
    depth = max(1, int(getattr(runner, "concurrent_batches", 1)))
    reads = prefetch(lambda b: read_tiles(reader, [xy(t) for t in b], mask), batched(seq, bs))
    try:
        with ThreadPoolExecutor(depth, thread_name_prefix="rs_deep-forward") as forward:
            # (batch, metas, its forward pass): ``depth`` batches run while the one before them is blended
            pending = collections.deque()
            for batch, (data, metas) in reads:
                check()
                pending.append((batch, metas, forward.submit(runner, data) if data is not None else None))
                if len(pending) > depth:
                    yield _tile_values(pending.popleft(), out_n, reader.deepness_style)
            while pending:
                check()
                yield _tile_values(pending.popleft(), out_n, reader.deepness_style)
    finally:
        # the read ahead ends here, whatever stopped the run (an error, cancel): the caller closes the reader next,
        # and a read still running on a closed dataset would crash GDAL
        reads.close()


def _tile_values(pending, out_n, as_is=False):
    """``[(item, values, valid)]`` of a batch whose forward pass was submitted (:func:`tile_batches`); ``as_is``: a
    Deepness model's values go back to the raster's grid as they are (:attr:`..models.package.ModelPackage.
    deepness_style`), others bilinearly."""
    batch, metas, future = pending
    values = future.result() if future is not None else None
    out, j = [], 0
    for item, (_, _, valid) in zip(batch, metas):
        p = None
        if valid.any():
            p = values[j]
            j += 1
            if p.shape[-1] != valid.shape[-1]:  # super-resolution: the output is finer than the tile read
                valid = valid[np.ix_(*(_nearest(valid.shape[-1], m) for m in p.shape[-2:]))]
            if not np.isfinite(p[0]).all():  # the model predicts the tile's centre only
                valid = valid & np.isfinite(p[0])
                p = np.nan_to_num(p, nan=0.0)
            if p.shape[-1] != out_n:  # read at the model's GSD: back to the raster's grid
                if as_is:  # a Deepness model: its pixels as they are, each raster pixel the one it lies in
                    p = p[:, _containing(p.shape[-2], out_n)][:, :, _containing(p.shape[-1], out_n)]
                else:
                    p = resize_bilinear(p, (out_n, out_n))
                valid = valid[np.ix_(_nearest(valid.shape[-1], out_n), _nearest(valid.shape[-1], out_n))]
        out.append((item, p, valid))
    return out


def blend_tiles(reader, mask, runner, grid, bands_cols, seq, batch_size, channels, write_rows, prog, scale=1):
    """Run ``runner`` on the tiles ``seq`` (:func:`plan_tiles`) of ``grid`` read by ``reader`` and blend them with
    :func:`.tiling.blend_weights` in one :class:`StripBlender` per column band; ``write_rows(y, values [K, h, w],
    wsum [h, w], x)`` gets each finished block (weighted sums and their weights, in output pixels; its own copies, at
    most :data:`FINISH_COLUMNS` wide). ``scale``: the
    runner's output is that many times finer than the tiles it reads (super-resolution); the output grid is then
    the raster's grid ``scale`` times finer. Returns the number of tiles run (the others had no valid pixel)."""
    n, s = reader.native_tile, int(scale)
    out_n = n * s  # a tile in output pixels
    weights = blend_weights(out_n, reader.native_overlap * s)
    upto = {y: end * s for y, end in grid.row_ends().items()}
    band_now = -1
    done = run = 0
    estimate = Estimate(len(seq), "tiles", prog.message)

    for batch in tile_batches(reader, runner, seq, lambda t: t[1:3], mask, batch_size, prog.check, s):
        for (b, x, y, end_row), p, valid in batch:
            if b != band_now:  # the band before ended with its last row
                bx0, bx1 = bands_cols[b]
                xs = grid.columns_for(bx0, bx1)
                blender = StripBlender(xs[0] * s, (xs[-1] + n) * s, bx0 * s, bx1 * s, out_n, channels,
                                       lambda y0, x, values, wsum: write_rows(y0, values, wsum, x))
                band_now = b
            if p is not None:
                blender.add(x * s, y * s, p, weights if valid.all() else weights * valid, upto[y])
                run += 1
            if end_row:
                blender.end_row(y * s, upto[y])
                release_free_heap()
            done += 1
        prog.update(done / max(1, len(seq)) * 0.95, None)
        estimate.after(done)
    return run


def finish_rows(probs, wsum, spans, thr, k, skip, keep):
    """The outputs of finished rows: ``probs`` [K, h, w] (weighted sums, divided here in place) and their weights
    ``wsum`` [h, w] -> ({"output": class band(s), "probabilities": [K, h, w], "confidence": [h, w]}, for the names
    in ``keep``; pixels per class [k])."""
    valid = wsum > 0
    np.divide(probs, wsum, out=probs, where=valid[None])
    won = [classify_max(probs[a:a + m], thr, binary) for a, m, binary in spans]
    bands = np.stack([c + np.uint8(a) if a else c for (c, _), (a, _, _) in zip(won, spans)])
    bands[:, ~valid] = CLASS_NODATA
    counts = np.bincount(bands.ravel(), minlength=256)[:k]
    out = {"output": bands[0] if len(spans) == 1 else bands}
    if "probabilities" in keep:
        probs[:, ~valid] = PROB_NODATA
        out["probabilities"] = probs
    if "confidence" in keep:
        best = won[0][1]  # polygons: the first output's classes
        best *= 255
        conf = np.clip(np.rint(best, out=best), 1, 255, out=best).astype(np.uint8)
        conf[~valid] = 0
        for c in skip:
            conf[bands[0] == c] = 0
        out["confidence"] = conf
    return out, counts


def blend_block(reader, runner, grid, block, mask, bs, channels, take, check=lambda: None, scale=1):
    """Run and blend the tiles of one block ``(bx0, bx1, first, end)`` of ``grid`` (:meth:`.tiling.TileGrid.row_blocks`:
    the tile rows ``grid.ys[first:end]`` of the column band [bx0, bx1)) alone, on a worker of :mod:`.distributed`:
    each tile is run once in the whole run, and blended in the order, and with the weights, of :func:`blend_tiles`.

    ``take(y, x, values [K, h, w], wsum [h, w])`` gets the rows that the block finishes alone
    (:meth:`.tiling.TileGrid.block_rows`; weighted sums and their weights, its own copies, column chunk by column
    chunk) in output pixels: ``scale`` times finer than the raster's (super-resolution). The rows it shares with the
    blocks above and below are returned as a :class:`Seam` for :class:`SeamJoiner`. Returns (tiles run, seam)."""
    bx0, bx1, first, last = block
    n, s = grid.tile, int(scale)
    out_n = n * s
    xs, ys = grid.columns_for(bx0, bx1), grid.ys[first:last]
    top, bottom = grid.block_rows(first, last)
    weights = blend_weights(out_n, grid.overlap * s)
    seam = Seam(ax0=xs[0] * s)
    run = 0

    def in_block(y, x, values, wsum):
        if y + wsum.shape[0] > top * s:
            cut = max(0, top * s - y)
            take(y + cut, x, values[:, cut:], wsum[cut:])

    blender = StripBlender(xs[0] * s, (xs[-1] + n) * s, bx0 * s, bx1 * s, out_n, channels, in_block)
    upto = {y: min(end, bottom) * s for y, end in grid.row_ends().items()}
    seq = [(x, y, i == len(xs) - 1) for y in ys for i, x in enumerate(xs)]
    for batch in tile_batches(reader, runner, seq, lambda t: t[:2], mask, bs, check, s):
        for (x, y, end_row), p, valid in batch:
            if p is not None:
                w = weights if valid.all() else weights * valid
                if y < top:  # its top rows are shared with the block above: its weighted values go to the join
                    h = (top - y) * s
                    part = np.empty((p.shape[0], h, out_n), dtype=np.float32)
                    np.multiply(p[:, :h], w[:h], out=part)  # as StripBlender.add weights it
                    seam.head.append((x * s, y * s, part, w[:h].copy()))
                blender.add(x * s, y * s, p, w, upto[y])
                run += 1
            if end_row:
                blender.end_row(y * s, upto[y])
    if last < len(grid.ys):  # the rows shared with the block below: the weighted sums of this block's tiles
        seam.tail = (bottom * s,) + blender.kept_sums((min(grid.y1, grid.ys[last - 1] + n) - bottom) * s)
    return run, seam


@dataclass
class Seam:
    """What a block of a blended cluster run (:func:`blend_block`) shares with its neighbours in its column band, in
    output pixels: ``head``, the weighted values ``[(x, y, values [K, h, n], weights [h, n])]`` of its tiles on the
    rows it shares with the block above (in the order they were added); ``tail``, ``(y, sums [K, h, w], weights
    [h, w])``: its weighted sums on the rows it shares with the block below, from column ``ax0``."""
    ax0: int = 0
    head: list = field(default_factory=list)
    tail: tuple = None


class SeamJoiner:
    """The client's half of a blended cluster run: finishes the rows that two blocks of a column band share (their
    tile rows' overlap) once both blocks are in. The block above's sums get the block below's weighted tiles added
    in the order of a run in one process (tile row by tile row, left to right), so the rows are the same, bit for
    bit; ``take(y, values [K, h, w], wsum [h, w], x)`` as :func:`blend_tiles`'s ``write_rows``."""

    def __init__(self, blocks, take, scale=1):
        self.blocks, self.take, self.s = blocks, take, int(scale)
        self.parts = {}  # (band's bx0, bx1, first tile row of the block below) -> {"above": ..., "below": ...}

    def add(self, i, seam):
        bx0, bx1, first, last = self.blocks[i]
        if seam.tail is not None:
            self._put((bx0, bx1, last), "above", seam)
        if first > 0:
            self._put((bx0, bx1, first), "below", seam)

    def _put(self, key, side, seam):
        got = self.parts.setdefault(key, {})
        got[side] = seam
        if len(got) == 2:
            del self.parts[key]
            self._join(key[0] * self.s, key[1] * self.s, got["above"], got["below"])

    def _join(self, bx0, bx1, above, below):
        y, sums, wsum = above.tail
        for x, ty, values, weights in below.head:
            r, c = ty - y, x - above.ax0
            sums[:, r:r + values.shape[1], c:c + values.shape[2]] += values
            wsum[r:r + values.shape[1], c:c + values.shape[2]] += weights
        for a, b in column_chunks(bx0 - above.ax0, bx1 - above.ax0):
            self.take(y, sums[:, :, a:b].copy(), wsum[:, a:b].copy(), above.ax0 + a)

    def close(self):
        """Every shared row was joined (a block missing would leave rows unwritten)."""
        if self.parts:
            raise RuntimeError(f"rows shared by blocks were not joined: {sorted(self.parts)}")


def segment_block(reader, runner, grid, block, mask, bs, spans, thr, skip, keep, check=lambda: None):
    """The finished outputs of one block ``(bx0, bx1, first, end)`` of ``grid`` (:meth:`.tiling.TileGrid.row_blocks`),
    computed alone (a worker of :mod:`.distributed`): :func:`blend_block`, its rows classified by :func:`finish_rows`,
    so its pixels are those of one run over the whole raster.

    Returns ``([(x, y, outputs)], pixels per class, tiles run, seam)`` (outputs: :func:`finish_rows`'s; the seam:
    the rows shared with the blocks above and below, for :class:`SeamJoiner`)."""
    k = spans[-1][0] + spans[-1][1]
    chunks, counts = [], np.zeros(k, dtype=np.int64)

    def take(y, x, probs, wsum):
        res, c = finish_rows(probs, wsum, spans, thr, k, skip, keep)
        counts[:] += c
        chunks.append((x, y, res))

    run, seam = blend_block(reader, runner, grid, block, mask, bs, k, take, check)
    return chunks, counts, run, seam


def segment_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): ``(i, segment_block(...))``."""
    return i, segment_block(reader, runner, job["grid"], job["blocks"][i], mask_index(job["mask"]), bs, job["spans"],
                            job["thr"], job["skip"], job["keep"])


def argmax_max(probs):
    """(argmax [h, w] uint8, max [h, w]) over the classes of ``probs`` [K, h, w], in one pass over the classes (the
    first class wins a tie, as ``np.argmax``): several times faster than ``np.argmax(axis=0)`` on class-first arrays,
    and the winning probability comes with it."""
    best = probs[0].copy()
    cls = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, len(probs)):
        better = probs[k] > best
        cls[better] = k
        np.maximum(best, probs[k], out=best)
    return cls, best


def classify(probs, threshold=None, binary=False):
    """Class per pixel of blended probabilities [K, h, w]: the argmax; with a ``threshold``, as Deepness does: a
    pixel whose winning probability is below it is class 0 (``binary``, a one-channel sigmoid model: class 1 where
    its probability is at least ``threshold``)."""
    return classify_max(probs, threshold, binary)[0]


def classify_max(probs, threshold=None, binary=False):
    """(:func:`classify`'s classes, the winning probability [h, w])."""
    cls, best = argmax_max(probs)
    if threshold is None:
        return cls, best
    if binary and len(probs) == 2:
        return (probs[1] >= threshold).astype(np.uint8), best
    cls[best < threshold] = 0
    return cls, best


def _output_spans(package):
    """[(first class, classes, binary)] per model output: one class band each (Deepness: one set of classes per
    output); one span of every class for a package with one output."""
    groups = package.output_groups or [(len(package.classes), package.binary_output)]
    spans, a = [], 0
    for m, binary in groups:
        spans.append((a, m, binary))
        a += m
    return spans


def model_threshold(package, threshold=None):
    """The probability threshold of a run: ``threshold`` (negative: none), else the package's (None: argmax)."""
    if threshold is None:
        return package.threshold
    if threshold < 0:
        return None
    if threshold > 1:
        raise InputError(f"THRESHOLD is a probability 0..1 (or -1 for the model's); got {threshold}")
    return float(threshold)


def segment(input_path, package, output, *, bands=None, bounds=None, mask_geometries=None,
            probabilities=None, confidence=None, skip_classes=None, tile_size=None, overlap=None,
            batch_size=None, device="auto", progress=None, is_cancelled=None, match_gsd=True,
            max_band_width=8192, log=None, task="segmentation", open_reader=None, transaction=None,
            max_pixels=None, threshold=None, gsd=None, tta="none", cluster=None, block_size=4096):
    """Segment ``input_path`` with ``package`` into the class raster ``output``.

    Optional ``probabilities``: float32 raster, one band per class. ``confidence`` (internal):
    Byte raster of the winning class's probability x 255, 0 where nodata or a ``skip_classes``
    class, used by :mod:`vectorize`. Returns a :class:`SegmentationResult`.

    Other dense tasks reuse this pipeline: ``task`` is the package task required (e.g. "change"),
    ``open_reader(package)`` returns a reader duck-typed like :class:`.raster.RasterReader`
    (default: a RasterReader of ``input_path``); the package it gets carries the tile options.
    ``max_pixels``: an area of more pixels is refused before any work (None: no limit).
    ``threshold``: probability threshold (:func:`classify`); None: the package's (an ONNX model's ``seg_thresh``),
    negative: none (argmax). ``gsd``: processing resolution in metres per pixel (None: the package's).
    ``tta``: test-time augmentation, "none", "flips" (3 passes per tile) or "d4" (8 flips and rotations): the
    probabilities of the flipped and rotated tiles, each turned back, are averaged (:mod:`..models.tta`).

    ``transaction``: an :class:`.outputs.OutputTransaction` that ``output`` and ``probabilities`` join (committed
    by the caller, with its other outputs; ``result.output_file`` is the class raster's temporary file until
    then). Without one, every output is renamed into place when the run succeeds.

    ``cluster``: run on a Dask cluster (:mod:`.distributed`: a scheduler address or "local:N"; None: in this
    process), in blocks of about ``block_size`` px on the same tile grid: the same pixels, written here.
    ``open_reader`` must then be picklable (a :func:`functools.partial`, not a lambda).
    """
    t_start, prog, log, pkg = start_run(package, task, progress, is_cancelled, log, gsd)
    thr = model_threshold(pkg, threshold)
    tta = check_tta(tta)
    outs = {"output": output, "probabilities": probabilities, "confidence": confidence}
    finals = {}
    in_abs = os.path.abspath(os.fspath(input_path)) if os.path.exists(os.fspath(input_path)) else None
    for key, path in outs.items():
        if path:
            finals[key] = check_writable(path, key.upper())
            if in_abs and finals[key] == in_abs:
                raise InputError(f"{key.upper()} is the input raster; choose another file name (inputs are "
                                 "never modified)")
    pkg_opts = pkg.with_tiling(*resolve_options(pkg, tile_size, overlap, batch_size, device))
    if open_reader is None:
        open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd)
    reader = open_reader(pkg_opts)
    result = SegmentationResult(output=finals["output"])
    atomic = {}
    pending = set()  # outputs committed by the caller's transaction
    writers = {}
    bg = None
    try:
        result.warnings, (x0, y0, x1, y1) = open_region(
            reader, pkg, bounds, max_pixels, log, georef="outputs get its pixel grid but no CRS",
            resampled="the results")
        result.gsd_scale = reader.scale
        mask = mask_index(mask_geometries)
        from rasterio.windows import Window
        out_transform = reader.ds.window_transform(Window(x0, y0, x1 - x0, y1 - y0))
        width, height = x1 - x0, y1 - y0
        result.width, result.height, result.crs, result.transform = width, height, reader.crs, out_transform
        result.pixel_area_m2 = abs(out_transform.a * out_transform.e - out_transform.b * out_transform.d) * \
            area_factor_m2(reader.crs, reader.transform, reader.width, reader.height)
        if cluster:  # the workers load the model on their own devices
            runner, bs, result.device = None, 1, f"Dask cluster {cluster}"
        else:
            dev, result.device, bs = open_device(device, batch_size, pkg_opts, prog, log)  # the run's tile size
            runner = open_runner(pkg_opts, dev, tta, log)
        result.tta = tta
        k = len(pkg.classes)
        names = [c.name for c in pkg.classes]
        skip = set(skip_classes or [])

        for key, final in finals.items():
            if transaction is not None and key != "confidence":  # confidence: internal, the caller removes it
                atomic[key] = transaction.file(final)
                pending.add(key)
            else:
                sweep_stale(os.path.dirname(final))
                atomic[key] = AtomicFile(final)
        spans = _output_spans(pkg)
        writers["output"] = GeoTiffWriter(atomic["output"].tmp, width, height, len(spans), "uint8", out_transform,
                                          reader.crs, CLASS_NODATA, colormap=colormap_for(pkg.classes),
                                          category_names=names, band_descriptions=[
                                              "class" if len(spans) == 1 else f"class (output {i + 1})"
                                              for i in range(len(spans))],
                                          overview_resampling="mode", name=finals["output"])
        if "probabilities" in atomic:
            writers["probabilities"] = GeoTiffWriter(atomic["probabilities"].tmp, width, height, k, "float32",
                                                     out_transform, reader.crs, PROB_NODATA,
                                                     band_descriptions=[f"p({n})" for n in names],
                                                     overview_resampling="average", name=finals["probabilities"])
        if "confidence" in atomic:
            writers["confidence"] = GeoTiffWriter(atomic["confidence"].tmp, width, height, 1, "uint8",
                                                  out_transform, reader.crs, None, name=finals["confidence"])
        bg = BackgroundWriter()
        counts = np.zeros(k, dtype=np.int64)

        n = reader.native_tile
        grid = TileGrid(x0, y0, x1, y1, n, reader.native_overlap)
        bands_cols = column_bands(x0, x1, max_band_width)
        seq = plan_tiles(grid, bands_cols)
        result.tiles = len(seq)

        def write(outputs, x, y, c):
            counts[:] += c
            for key, array in outputs.items():
                bg.submit(writers[key].write, array, x - x0, y - y0)

        def write_rows(y_row, probs, wsum, bx0):
            outputs, c = finish_rows(probs, wsum, spans, thr, k, skip, writers)
            write(outputs, bx0, y_row, c)

        if cluster:
            from .distributed import run_blocks
            blocks = grid.row_blocks(bands_cols, block_size)
            prog.message(f"{len(seq)} tiles of {n} px ({reader.tile} px at the model's GSD), overlap "
                         f"{reader.native_overlap} px, in {len(blocks)} blocks of about {block_size} x {block_size} "
                         f"px on {cluster}")
            job = dict(open_reader=open_reader, gsd=pkg.gsd, tiling=(pkg_opts.tile_size, pkg_opts.overlap),
                       device=device, batch_size=batch_size, tta=tta, mask=mask_geometries, grid=grid, spans=spans,
                       thr=thr, skip=skip, keep=tuple(writers), blocks=blocks, run=segment_block_task, kind="dense",
                       windows=[grid.block_window(b) for b in blocks])
            seams = SeamJoiner(blocks, write_rows)
            for i, (chunks, c, run, seam) in run_blocks(cluster, pkg, job, prog, log):
                for x, y, outputs in chunks:
                    write(outputs, x, y, 0)
                counts[:] += c
                result.tiles_run += run
                seams.add(i, seam)
            seams.close()
        else:
            prog.message(f"{len(seq)} tiles of {n} px ({reader.tile} px at the model's GSD), overlap "
                         f"{reader.native_overlap} px, batch {bs}, {len(bands_cols)} column band(s)")
            result.tiles_run = blend_tiles(reader, mask, runner, grid, bands_cols, seq, bs, k, write_rows, prog)
        bg.close()
        bg = None
        prog.check()
        reader.close()  # its blocks leave GDAL's cache before the overviews read the outputs back
        release_free_heap()
        prog.message("Writing overviews")
        for key, w in writers.items():
            w.close(overviews=(key != "confidence"))
        prog.check()
        for key, a in atomic.items():
            if key not in pending:
                a.commit()
        result.output_file = atomic["output"].tmp if "output" in pending else finals["output"]
        result.class_pixels = {c.value: int(counts[c.value]) for c in pkg.classes}
        result.probabilities = finals.get("probabilities")
        result.confidence = finals.get("confidence")
        return end_run(result, reader, int(counts.sum()) == 0, mask is not None, log, t_start, prog)
    except BaseException:
        abandon(bg, writers.values(), atomic.values())
        raise
    finally:
        reader.close()


def class_polygons(result, confidence, classes, *, min_area_m2=None, simplify=None, progress=None,
                    is_cancelled=None):
    """Polygons of the classes of a :func:`segment` or :func:`.change.detect_change` result (from its ``confidence``
    raster: the classes it skipped, background or "no change", have none).

    Defaults: polygons under 10 pixels are dropped, simplified by one pixel. Returns the records of
    :func:`.vectorize.vectorize` (geometry, class_id, class_name, area_m2, mean_probability).
    """
    px_area = result.pixel_area_m2
    if min_area_m2 is None or min_area_m2 < 0:
        min_area_m2 = 10 * px_area
    if simplify is None or simplify < 0:
        simplify = math.hypot(result.transform.a, result.transform.d)
    return vectorize(result.output_file or result.output, confidence, classes, min_area_m2=min_area_m2,
                     simplify=simplify,
                     area_factor=area_factor_m2(result.crs, result.transform, result.width, result.height),
                     progress=progress, is_cancelled=is_cancelled)
