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


def test_blender_reproduces_a_smooth_field_without_seams():
    """Every tile predicts the same per-pixel field: the blend must return it exactly (no seams)."""
    h, w, tile, ov = 300, 420, 64, 16
    yy, xx = np.mgrid[0:h + tile, 0:w + tile].astype(np.float32)
    field = np.stack([np.sin(xx / 17.0) * 0.5 + 0.5, np.cos(yy / 23.0) * 0.5 + 0.5])
    grid = TileGrid(0, 0, w, h, tile, ov)
    weights = blend_weights(tile, ov)
    out = np.full((2, h, w), np.nan, dtype=np.float32)
    for bx0, bx1 in column_bands(0, w, 256):
        xs = grid.columns_for(bx0, bx1)
        bl = StripBlender(xs[0], xs[-1] + tile, bx0, bx1, 0, h, tile, 2)
        for i, y in enumerate(grid.ys):
            for x in xs:
                bl.add(x, y, field[:, y:y + tile, x:x + tile], weights)
            nxt = grid.ys[i + 1] if i + 1 < len(grid.ys) else h
            fin = bl.finish(nxt)
            if fin:
                y0, probs, wsum = fin
                assert (wsum > 0).all()
                out[:, y0:y0 + probs.shape[1], bx0:bx1] = probs / wsum
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, field[:, :h, :w], atol=1e-5)


def test_blender_averages_disagreeing_tiles_smoothly():
    """Two tiles that disagree (0 vs 1) blend into a monotonic ramp across their overlap."""
    tile, ov = 64, 32
    bl = StripBlender(0, 96, 0, 96, 0, 64, tile, 1)
    wts = blend_weights(tile, ov)
    bl.add(0, 0, np.zeros((1, tile, tile), np.float32), wts)
    bl.add(32, 0, np.ones((1, tile, tile), np.float32), wts)
    y0, p, wsum = bl.finish(64)
    row = (p / wsum)[0, 32]
    assert row[0] == 0 and row[-1] == 1
    assert np.all(np.diff(row) >= -1e-6)
    assert np.max(np.diff(row)) < 0.1  # no jump: a seam would be a step of 1


def test_blender_hands_finished_rows_in_column_chunks_equal_to_one_block():
    """finish_each in narrow column chunks hands on exactly the rows and columns of one whole-band finish, each chunk
    its own copy (changing it leaves the strip alone), and the strip shifts the same way."""
    rng = np.random.default_rng(3)
    h, w, tile, ov = 150, 230, 64, 16
    grid = TileGrid(0, 0, w, h, tile, ov)
    weights = blend_weights(tile, ov)
    xs = grid.columns_for(20, 210)
    whole = StripBlender(xs[0], xs[-1] + tile, 20, 210, 0, h, tile, 3)
    parts = StripBlender(xs[0], xs[-1] + tile, 20, 210, 0, h, tile, 3)
    for i, y in enumerate(grid.ys):
        for x in xs:
            p = rng.random((3, tile, tile), dtype=np.float32)
            whole.add(x, y, p, weights)
            parts.add(x, y, p, weights)
        nxt = grid.ys[i + 1] if i + 1 < len(grid.ys) else h
        y0, probs, wsum = whole.finish(nxt)
        got = []

        def take(yy, x, pr, ws):
            got.append((yy, x, pr.copy(), ws.copy()))
            pr[:] = -1  # the chunk is the caller's own copy
        assert parts.finish_each(nxt, take, columns=37)
        assert [g[1] for g in got] == list(range(20, 210, 37))
        assert all(g[0] == y0 for g in got)
        np.testing.assert_array_equal(np.concatenate([g[2] for g in got], axis=2), probs)
        np.testing.assert_array_equal(np.concatenate([g[3] for g in got], axis=1), wsum)
    assert not parts.finish_each(h, take)


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
