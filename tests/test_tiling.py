import numpy as np
import pytest

from rs_deep.rs_deep_plugin.engine.inference.segment import StripBlender
from rs_deep.rs_deep_plugin.engine.inference.tiling import TileGrid, blend_weights, column_bands, ramp_1d, tile_starts


@pytest.mark.parametrize("length,tile,stride", [(1, 64, 48), (64, 64, 48), (65, 64, 48), (1000, 256, 192),
                                                (8192, 512, 448), (300, 64, 1)])
def test_tiles_cover_everything_and_stay_inside(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s:s + tile] = True
        if length >= tile:
            assert 0 <= s and s + tile <= length
    assert covered.all()
    assert starts == sorted(set(starts))
    gaps = np.diff(starts)
    assert (gaps <= stride).all()


def test_single_tile_for_tiny_rasters():
    assert tile_starts(1, 512, 448) == [0]
    assert tile_starts(511, 512, 448) == [0]


def test_ramp_weights_are_symmetric_positive_and_flat_in_the_middle():
    w = ramp_1d(64, 16)
    assert w.shape == (64,)
    assert np.allclose(w, w[::-1])
    assert (w > 0).all() and w.max() == 1.0
    assert np.all(w[16:48] == 1.0)
    assert np.all(np.diff(w[:16]) > 0)
    assert np.all(ramp_1d(32, 0) == 1.0)
    assert blend_weights(64, 16).shape == (64, 64)


def test_column_bands_are_aligned_and_partition_the_columns():
    bands = column_bands(0, 20000, 8192)
    assert bands[0][0] == 0 and bands[-1][1] == 20000
    for (a, b), (c, _) in zip(bands, bands[1:]):
        assert b == c and b % 256 == 0
    assert all(b - a <= 8192 for a, b in bands)
    assert column_bands(10, 300, 8192) == [(10, 300)]


def blend(grid, bx0, bx1, tiles, columns=None, classes=2):
    """Runs a StripBlender over the band [bx0, bx1) of ``grid`` with the tiles ``tiles(x, y)`` -> (values, weights)
    or None (a tile without valid pixels), as the segmentation pipeline does; returns what it handed on
    [(y, x, values, wsum)] (each chunk checked to be its own copy)."""
    got = []

    def take(y, x, values, wsum):
        got.append((y, x, values.copy(), wsum.copy()))
        values[:] = -1  # the chunk is the caller's own copy: changing it leaves the blender alone
        wsum[:] = -1

    xs, n = grid.columns_for(bx0, bx1), grid.tile
    bl = StripBlender(xs[0], xs[-1] + n, bx0, bx1, n, classes, take, columns=columns)
    for y, nxt in zip(grid.ys, grid.ys[1:] + [grid.y1]):
        for x in xs:
            t = tiles(x, y)
            if t is not None:
                bl.add(x, y, t[0], t[1], nxt)
        bl.end_row(y, nxt)
    return got


def assemble(got, shape, x0=0):
    """The chunks handed on, put together (each pixel once: NaN where none came)."""
    k, h, w = shape
    out, ws = np.full(shape, np.nan, np.float32), np.full((h, w), np.nan, np.float32)
    for y, x, values, wsum in got:
        assert np.isnan(ws[y:y + wsum.shape[0], x - x0:x - x0 + wsum.shape[1]]).all(), "a pixel handed on twice"
        out[:, y:y + values.shape[1], x - x0:x - x0 + values.shape[2]] = values
        ws[y:y + wsum.shape[0], x - x0:x - x0 + wsum.shape[1]] = wsum
    return out, ws


def test_blender_reproduces_a_smooth_field_without_seams():
    """Every tile predicts the same per-pixel field: the blend must return it exactly (no seams)."""
    h, w, tile, ov = 300, 420, 64, 16
    yy, xx = np.mgrid[0:h + tile, 0:w + tile].astype(np.float32)
    field = np.stack([np.sin(xx / 17.0) * 0.5 + 0.5, np.cos(yy / 23.0) * 0.5 + 0.5])
    grid = TileGrid(0, 0, w, h, tile, ov)
    weights = blend_weights(tile, ov)
    got = []
    for bx0, bx1 in column_bands(0, w, 256):
        got += blend(grid, bx0, bx1, lambda x, y: (field[:, y:y + tile, x:x + tile], weights))
    sums, wsum = assemble(got, (2, h, w))
    assert (wsum > 0).all()
    np.testing.assert_allclose(sums / wsum, field[:, :h, :w], atol=1e-5)


def test_blender_averages_disagreeing_tiles_smoothly():
    """Two tiles that disagree (0 vs 1) blend into a monotonic ramp across their overlap."""
    tile, ov = 64, 32
    grid = TileGrid(0, 0, 96, 64, tile, ov)
    assert grid.xs == [0, 32] and grid.ys == [0]
    wts = blend_weights(tile, ov)
    got = blend(grid, 0, 96, lambda x, y: (np.full((1, tile, tile), float(x > 0), np.float32), wts), classes=1)
    p, wsum = assemble(got, (1, 64, 96))
    row = (p / wsum)[0, 32]
    assert row[0] == 0 and row[-1] == 1
    assert np.all(np.diff(row) >= -1e-6)
    assert np.max(np.diff(row)) < 0.1  # no jump: a seam would be a step of 1


@pytest.mark.parametrize("h,w,tile,ov,bx0,bx1,columns", [(150, 230, 64, 16, 20, 210, 37), (150, 230, 64, 16, 0, 230, None),
                                                         (1000, 700, 128, 32, 0, 700, 1024), (40, 50, 64, 16, 0, 50, 7)])
def test_blender_sums_each_pixel_as_a_whole_strip_would(h, w, tile, ov, bx0, bx1, columns):
    """Whatever the chunks it hands on, each pixel of the band comes once, with the sums of a strip of the band's
    width added in the run's order, bit for bit: the rows a tile row shares with the next are kept, the rest handed
    on; tiles without valid pixels (None) are skipped, even a whole row of them."""
    rng = np.random.default_rng(3)
    grid = TileGrid(0, 0, w, h, tile, ov)
    weights = blend_weights(tile, ov)
    xs = grid.columns_for(bx0, bx1)
    ax0, ax1 = xs[0], xs[-1] + tile
    tiles = {(x, y): None if (i * 7 + j) % 5 == 3 or j == 1 else
             (rng.random((3, tile, tile), dtype=np.float32), weights * (rng.random((tile, tile)) > 0.2))
             for j, y in enumerate(grid.ys) for i, x in enumerate(xs)}
    strip = np.zeros((3, max(h, tile), ax1 - ax0), np.float32)  # a whole strip, summed in the same order
    strip_w = np.zeros((max(h, tile), ax1 - ax0), np.float32)
    for y in grid.ys:
        for x in xs:
            if tiles[x, y] is not None:
                p, wt = tiles[x, y]
                strip[:, y:y + tile, x - ax0:x - ax0 + tile] += p * wt
                strip_w[y:y + tile, x - ax0:x - ax0 + tile] += wt
    got = blend(grid, bx0, bx1, lambda x, y: tiles[x, y], columns=columns, classes=3)
    if columns:
        assert max(g[3].shape[1] for g in got) <= columns
    sums, wsum = assemble(got, (3, h, bx1 - bx0), x0=bx0)
    np.testing.assert_array_equal(sums, strip[:, :h, bx0 - ax0:bx1 - ax0])
    np.testing.assert_array_equal(wsum, strip_w[:h, bx0 - ax0:bx1 - ax0])


def test_blender_keeps_only_the_rows_tile_rows_share():
    """The memory of a band 8192 px wide: a window of two tiles and the rows two tile rows share, not a strip of the
    band's width and a tile's height (make bench: 50 MB at 8192 px, 2 classes)."""
    grid = TileGrid(0, 0, 8192, 8192, 512, 64)
    bl = StripBlender(0, 8192, 0, 8192, 512, 2, lambda *a: None)
    ones, w = np.ones((2, 512, 512), np.float32), blend_weights(512, 64)
    for y, nxt in zip(grid.ys[:3], grid.ys[1:4]):
        for x in grid.xs:
            bl.add(x, y, ones, w, nxt)
        bl.end_row(y, nxt)
    held = sum(a.nbytes for a in (bl.acc, bl.wsum, bl.kept, bl.kept_w))
    assert held < 16 * 2**20, held  # a strip: 3 x 512 x 8192 x 4 bytes = 48 MiB
    assert max(a - b for a, b in zip([y + 512 for y in grid.ys], grid.ys[1:])) < 100  # even overlaps
    with pytest.raises(ValueError, match="does not start"):
        bl.add(0, grid.ys[4], ones, w, grid.ys[5])


@pytest.mark.parametrize("height,tile,overlap,width,band,size", [
    (8192, 512, 64, 8192, 8192, 4096), (8192, 512, 64, 8192, 8192, 2048), (900, 128, 32, 600, 256, 200),
    (900, 128, 32, 600, 8192, 64), (1000, 128, 96, 300, 8192, 128), (700, 256, 16, 900, 512, 10000),
    (100, 128, 32, 100, 8192, 64)])
def test_row_blocks_run_each_tile_once_and_share_rows_with_their_neighbours_only(height, tile, overlap, width, band,
                                                                                size):
    """The blocks of a blended cluster run (TileGrid.row_blocks): in each column band, every tile row in one block;
    the rows a block finishes alone and the rows two blocks share cut the band's rows once, and no tile of any
    other block reaches the shared rows (so that joining the two blocks gives the one-process sums)."""
    grid = TileGrid(0, 0, width, height, tile, overlap)
    bands = column_bands(0, width, band)
    blocks = grid.row_blocks(bands, size)
    assert sorted({b[:2] for b in blocks}) == bands
    for bx0, bx1 in bands:
        mine = [b for b in blocks if b[:2] == (bx0, bx1)]
        assert [r for b in mine for r in range(b[2], b[3])] == list(range(len(grid.ys)))  # each row once, in order
        rows = np.zeros(height, dtype=int)
        for i, (_, _, first, end) in enumerate(mine):
            top, bottom = grid.block_rows(first, end)
            assert grid.block_window(mine[i]) == (bx0, top, bx1, bottom)
            rows[top:bottom] += 1
            for y in grid.ys[:first] + grid.ys[end:]:  # no other block's tile meets the rows it finishes alone
                assert y + tile <= top or y >= bottom
            if end < len(grid.ys):  # the rows shared with the next block: tiles of these two blocks only
                shared = (bottom, min(height, grid.ys[end - 1] + tile))
                rows[shared[0]:shared[1]] += 1
                nxt = mine[i + 1]
                assert grid.block_rows(nxt[2], nxt[3])[0] == shared[1]
                for j, y in enumerate(grid.ys):
                    if y < shared[1] and y + tile > shared[0]:
                        assert first <= j < nxt[3]
        assert (rows == 1).all()
    if size >= height:
        assert len(blocks) == len(bands)  # one block per band when it is large enough
