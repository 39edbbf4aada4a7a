"""Tiling maths: tile positions, blending weights, column bands for bounded memory."""
import numpy as np


def tile_starts(length, tile, stride):
    """Start offsets of tiles of size ``tile`` covering ``length``, no two more than ``stride`` apart.

    No tile hangs out of the raster (unless the raster is smaller than one tile, where one tile at 0 is padded).
    Overlapping tiles (``stride < tile``) are spread evenly from 0 to ``length - tile``, as few as that gap allows:
    every overlap is at least ``tile - stride``, without a last tile moved back onto the one before it (which would
    make the rows that two tile rows share, and that the blender keeps across the raster, almost a tile high). Tiles
    without overlap abut from 0, and the last one is moved back to end at ``length``.
    """
    if tile <= 0 or stride <= 0:
        raise ValueError("tile and stride must be positive")
    if length <= tile:
        return [0]
    span = length - tile
    if stride < tile:
        gaps = -(-span // stride)  # as many as a stride apart would need
        return [i * span // gaps for i in range(gaps + 1)]
    return list(range(0, span, stride)) + [span]


def ramp_1d(tile, overlap, eps=1e-3):
    """1-D blending weights: 1 in the middle, falling linearly to ~0 over ``overlap`` pixels at each end."""
    if overlap <= 0:
        return np.ones(tile, dtype=np.float32)
    i = np.arange(tile, dtype=np.float32)
    d = np.minimum(i, tile - 1 - i) + 0.5
    return np.clip(d / float(overlap), eps, 1.0).astype(np.float32)


def blend_weights(tile, overlap):
    """2-D separable weights for one tile; overlapping tiles are averaged with these."""
    w = ramp_1d(tile, overlap)
    return np.outer(w, w)


def column_bands(x0, x1, max_width, align=256):
    """Split columns [x0, x1) into bands at most ``max_width`` wide, cut at multiples of ``align``."""
    max_width = max(align, (max_width // align) * align)
    cuts = [x0]
    nxt = ((x0 // align) + 1) * align
    while True:
        target = cuts[-1] + max_width
        if target >= x1:
            break
        cut = max(nxt, (target // align) * align)
        cuts.append(cut)
    cuts.append(x1)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class TileGrid:
    """Tiles of ``tile`` native pixels with ``overlap`` covering a region [x0, x1) x [y0, y1)."""

    def __init__(self, x0, y0, x1, y1, tile, overlap):
        if x1 <= x0 or y1 <= y0:
            raise ValueError("empty region")
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1, y1
        self.tile = tile
        self.overlap = overlap
        stride = max(1, tile - overlap)
        self.xs = [x0 + s for s in tile_starts(x1 - x0, tile, stride)]
        self.ys = [y0 + s for s in tile_starts(y1 - y0, tile, stride)]

    def __len__(self):
        return len(self.xs) * len(self.ys)

    def core(self, x, y):
        """(cx0, cy0, cx1, cy1): the part of the tile at (x, y) nearer to it than to its neighbours (cut in the
        middle of each overlap; unbounded on the region's outer sides). The cores of all tiles cover the plane once,
        so an object belongs to the one tile whose core holds its centre."""
        def bounds(starts, s):
            k = starts.index(s)
            lo = (starts[k - 1] + self.tile + s) / 2.0 if k > 0 else -np.inf
            hi = (s + self.tile + starts[k + 1]) / 2.0 if k + 1 < len(starts) else np.inf
            return lo, hi

        (cx0, cx1), (cy0, cy1) = bounds(self.xs, x), bounds(self.ys, y)
        return cx0, cy0, cx1, cy1

    def row_ends(self):
        """{y: end} for each tile row: where the rows it finishes end (the next row's start; the region's end for the
        last row), as blending hands them on."""
        return dict(zip(self.ys, self.ys[1:] + [self.y1]))

    def columns_for(self, bx0, bx1):
        """Tile x-starts whose span meets columns [bx0, bx1)."""
        return [x for x in self.xs if x < bx1 and x + self.tile > bx0]

    def blocks(self, size, align=256):
        """Blocks of about ``size`` x ``size`` pixels that cut the region [(bx0, by0, bx1, by1)], row by row, for the
        cluster runs that keep what each tile finds (detection, instances: :func:`tiles_by_block`; blended runs use
        :meth:`row_blocks`). Every inner edge lies where one tile alone covers the pixels (at a multiple of
        ``align`` from the region's origin where it can)."""
        cols = block_edges(self.xs, self.tile, self.x0, self.x1, size, align)
        rows = block_edges(self.ys, self.tile, self.y0, self.y1, size, align)
        return [(a, c, b, d) for c, d in zip(rows[:-1], rows[1:]) for a, b in zip(cols[:-1], cols[1:])]

    def row_blocks(self, bands_cols, size):
        """Blocks of a blended run on a cluster, each tile run once: ``[(bx0, bx1, first, end)]``, the column bands
        ``bands_cols`` of the run in one process (:func:`column_bands`) cut into runs of whole tile rows
        ``self.ys[first:end]`` of about ``size`` x ``size`` px.

        A block finishes the rows from the end of the rows above it (the bottom of the tiles of ``first - 1``) to
        the start of its last row's successor (:meth:`block_rows`); the rows in between two blocks (the overlap of
        their tile rows) are joined from both (:class:`.segment.SeamJoiner`). Each cut is placed so that no tile of a
        third block reaches those rows: a block ends no earlier than the bottom of the tiles of the block above."""
        ys, n = self.ys, self.tile
        stride = max(1, n - self.overlap)  # as the grid's rows were laid out
        out = []
        for bx0, bx1 in bands_cols:
            per = max(1, int(round(size * size / max(1, bx1 - bx0) / stride)))  # tile rows of a block
            first = 0
            while first < len(ys):
                end = min(len(ys), first + per)
                while end < len(ys) and first > 0 and ys[end] < ys[first - 1] + n:
                    end += 1  # the rows shared with the block above would meet those shared with the next one
                if len(ys) - end < max(1, per // 2):
                    end = len(ys)  # no sliver of a block at the end
                out.append((bx0, bx1, first, end))
                first = end
        return out

    def block_rows(self, first, end):
        """(top, bottom): the rows [top, bottom) that a block of tile rows ``self.ys[first:end]`` finishes alone
        (:meth:`row_blocks`): below every tile of the rows above it, above every tile of the rows below it."""
        top = self.ys[first - 1] + self.tile if first > 0 else self.y0
        bottom = self.ys[end] if end < len(self.ys) else self.y1
        return top, bottom

    def block_window(self, block):
        """(bx0, top, bx1, bottom): the pixels that a block of :meth:`row_blocks` finishes alone."""
        bx0, bx1, first, end = block
        top, bottom = self.block_rows(first, end)
        return bx0, top, bx1, bottom


def tiles_by_block(blocks, tiles):
    """The tiles ``[(tile_no, x, y)]`` of each of ``blocks`` [(bx0, by0, bx1, by1)]: those whose top-left corner lies
    in it, so that each tile of a grid is in exactly one of its :meth:`TileGrid.blocks` (runs that keep what each
    tile finds: detection, instance segmentation)."""
    return [[(i, x, y) for i, x, y in tiles if bx0 <= x < bx1 and by0 <= y < by1] for bx0, by0, bx1, by1 in blocks]


def block_edges(starts, tile, lo, hi, size, align=256):
    """Edges ``[lo, ..., hi]`` of blocks of about ``size`` px along one axis of tiles at ``starts``: each inner
    edge is covered by one tile only (see :meth:`TileGrid.blocks`); any edge would give the same pixels."""
    size = max(1, int(size))
    single = []  # (first, last) of the ranges of positions that one tile alone covers
    for i, s in enumerate(starts):
        a = starts[i - 1] + tile if i > 0 else s
        b = starts[i + 1] if i + 1 < len(starts) else min(s + tile, hi)
        if b > a:
            single.append((a, b))
    candidates = []
    for a, b in single:
        first = lo + -(-(a - lo) // align) * align  # the first multiple of align from lo in [a, b)
        candidates.append(first if first < b else a)
    edges = [lo]
    while hi - edges[-1] > size + size // 2:  # no sliver of a block at the end
        later = [c for c in candidates if edges[-1] < c <= hi - size // 2]
        if not later:
            break
        target = edges[-1] + size
        edges.append(min(later, key=lambda c: (abs(c - target), c)))
    edges.append(hi)
    return edges
