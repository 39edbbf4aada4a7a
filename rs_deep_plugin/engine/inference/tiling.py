"""Tiling maths: tile positions, blending weights, column bands for bounded memory."""
import numpy as np


def tile_starts(length, tile, stride):
    """Start offsets of tiles of size ``tile`` covering ``length`` with ``stride``.

    The last tile is moved back so that it ends at ``length`` (no tile hangs out of
    the raster unless the raster is smaller than one tile, where one tile at 0 is padded).
    """
    if tile <= 0 or stride <= 0:
        raise ValueError("tile and stride must be positive")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


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

    def columns_for(self, bx0, bx1):
        """Tile x-starts whose span meets columns [bx0, bx1)."""
        return [x for x in self.xs if x < bx1 and x + self.tile > bx0]
