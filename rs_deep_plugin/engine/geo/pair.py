"""Two dates of one area read as one raster: :func:`inspect_pair` checks BEFORE and AFTER (bands, CRS, grid,
overlap) and :class:`PairReader` reads the same window from both and stacks the bands (before, then after), the
way bi-temporal networks take them. When AFTER has another CRS, resolution or pixel grid it is warped on the fly
onto BEFORE's grid (rasterio WarpedVRT, never written to disk)."""
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .raster import RasterReader, pixel_size_metres


@dataclass
class PairInfo:
    """How AFTER relates to BEFORE: aligned, or warped onto BEFORE's grid over ``overlap`` bounds."""

    aligned: bool
    overlap: tuple = None  # (xmin, ymin, xmax, ymax) in BEFORE's CRS; None = all of BEFORE
    resampling: str = "bilinear"
    warnings: list = field(default_factory=list)


def _open(path, what):
    import rasterio
    try:
        return rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the {what} raster {path}: {exc}") from exc


def _data_bands(ds):
    alpha = [i + 1 for i, ci in enumerate(ds.colorinterp) if getattr(ci, "name", str(ci)) == "alpha"]
    return ds.count - len(alpha) if ds.count > len(alpha) else ds.count


def _fmt_bounds(b):
    return f"({b[0]:.10g}, {b[1]:.10g}, {b[2]:.10g}, {b[3]:.10g})"


def _same_grid(a, b):
    return ((a.crs is None and b.crs is None) or (a.crs is not None and b.crs is not None and a.crs == b.crs)) \
        and (a.width, a.height) == (b.width, b.height) and a.transform.almost_equals(b.transform, 1e-9)


def inspect_pair(before, after, package=None, bands=None):
    """Check that BEFORE and AFTER can be compared; returns a :class:`PairInfo`.

    Raises :class:`InputError` (with the fix) for different band counts, a pair that does not
    overlap, or a pair on different grids that cannot be aligned because a CRS is missing.
    """
    a = _open(before, "BEFORE")
    try:
        b = _open(after, "AFTER")
        try:
            return _inspect(a, b, before, after, package, bands)
        finally:
            b.close()
    finally:
        a.close()


def _inspect(a, b, before, after, package, bands):
    na, nb = _data_bands(a), _data_bands(b)
    if bands:
        for what, ds in (("BEFORE", a), ("AFTER", b)):
            bad = [int(x) for x in bands if int(x) < 1 or int(x) > ds.count]
            if bad:
                raise InputError(f"BANDS {bad} do not exist in {what}: it has {ds.count} band(s) (numbered "
                                 f"1..{ds.count}); both dates are read with the same band numbers")
    elif na != nb:
        need = f" (the model takes {package.in_channels}: {', '.join(package.bands)})" if package else ""
        raise InputError(f"BEFORE has {na} band(s) and AFTER has {nb}: change detection compares the same bands "
                         f"of both dates{need}. Give two rasters with the same bands in the same order, or choose "
                         "the band numbers to compare in both with BANDS.")
    if _same_grid(a, b):
        return PairInfo(aligned=True)
    if a.crs is None or b.crs is None:
        which = "BEFORE and AFTER have" if a.crs is None and b.crs is None else \
            ("BEFORE has" if a.crs is None else "AFTER has")
        raise InputError(f"{which} no CRS and the two rasters are not on the same pixel grid (BEFORE "
                         f"{a.width}x{a.height} px, AFTER {b.width}x{b.height} px), so AFTER cannot be aligned to "
                         "BEFORE. Assign the CRS (Raster > Projections > Assign Projection) or give two rasters "
                         "of the same size on the same grid.")
    from rasterio.warp import transform_bounds
    try:
        ab = transform_bounds(b.crs, a.crs, *b.bounds, densify_pts=21)
    except Exception as exc:
        raise InputError(f"AFTER ({b.crs}) cannot be transformed to BEFORE's CRS ({a.crs}): {exc}") from exc
    bb = a.bounds
    ov = (max(bb.left, ab[0]), max(bb.bottom, ab[1]), min(bb.right, ab[2]), min(bb.top, ab[3]))
    px = min(abs(a.transform.a) or 1, abs(a.transform.e) or 1)
    if not (ov[2] - ov[0] >= px * 0.5 and ov[3] - ov[1] >= px * 0.5):
        raise InputError(f"BEFORE and AFTER do not overlap: BEFORE covers {_fmt_bounds(tuple(bb))} and AFTER "
                         f"covers {_fmt_bounds(ab)} in BEFORE's CRS ({a.crs}). Choose two rasters of the same area.")
    gsd_a = pixel_size_metres(a.crs, a.transform, a.width, a.height)
    gsd_b = pixel_size_metres(b.crs, b.transform, b.width, b.height)
    resampling = "average" if gsd_a and gsd_b and gsd_b < gsd_a / 1.5 else "bilinear"
    warnings = [f"AFTER ({b.crs.to_string()}, {gsd_b:.3g} m pixels) is not on BEFORE's grid ({a.crs.to_string()}, "
                f"{gsd_a:.3g} m pixels): it is warped onto BEFORE's grid on the fly ({resampling} resampling)."]
    full = (ov[0] <= bb.left and ov[1] <= bb.bottom and ov[2] >= bb.right and ov[3] >= bb.top)
    if not full:
        warnings.append(f"Only the area covered by both dates is processed: {_fmt_bounds(ov)} of BEFORE's "
                        f"{_fmt_bounds(tuple(bb))}.")
    return PairInfo(aligned=False, overlap=None if full else ov, resampling=resampling, warnings=warnings)


def _warped_after(after, before_ds, resampling):
    """AFTER warped onto BEFORE's grid as an in-memory VRT (nothing on disk): (MemoryFile, path)."""
    import rasterio
    from rasterio import shutil as rio_shutil
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT
    src = _open(after, "AFTER")
    mem = None
    try:
        opts = dict(crs=before_ds.crs, transform=before_ds.transform, width=before_ds.width,
                    height=before_ds.height, resampling=getattr(Resampling, resampling))
        has_alpha = any(getattr(ci, "name", "") == "alpha" for ci in src.colorinterp)
        if src.nodata is None and not has_alpha:
            opts["add_alpha"] = True  # outside AFTER's footprint becomes nodata, not black
        with WarpedVRT(src, **opts) as vrt:
            mem = MemoryFile(ext=".vrt")
            rio_shutil.copy(vrt, mem.name, driver="VRT")
        with rasterio.open(mem.name) as check:  # fail here, clearly, rather than in the reader thread
            check.profile
        return mem, mem.name
    except InputError:
        raise
    except Exception as exc:
        if mem is not None:
            mem.close()
        raise InputError(f"AFTER ({after}) cannot be warped onto BEFORE's grid: {exc}") from exc
    finally:
        src.close()


class PairReader:
    """Reads the same window of BEFORE and AFTER; duck-typed like :class:`.raster.RasterReader`.

    ``read_tile`` returns the two dates' scaled bands stacked, ``[2 x C, T, T]`` (before first),
    and the pixels valid in both. Geometry (grid, CRS, GSD, tile sizes) is BEFORE's.
    """

    def __init__(self, before, after, package, bands=None, match_gsd=True, pair=None):
        pair = pair or inspect_pair(before, after, package, bands)
        self.pair = pair
        self._mem = None
        self.before = RasterReader(before, package, bands=bands, match_gsd=match_gsd)
        try:
            src = after
            if not pair.aligned:
                self._mem, src = _warped_after(after, self.before.ds, pair.resampling)
            self.after = RasterReader(src, package, bands=bands, match_gsd=False)
        except BaseException:
            self.before.close()
            if self._mem is not None:
                self._mem.close()
            raise
        first = self.before
        for name in ("ds", "path", "width", "height", "transform", "crs", "bands", "scaling", "gsd", "model_gsd",
                     "scale", "tile", "native_tile", "native_overlap", "nodata", "deepness_style"):
            setattr(self, name, getattr(first, name))
        # both dates are read with exactly the same window and resampling
        self.after.scale, self.after.tile = first.scale, first.tile
        self.after.native_tile, self.after.native_overlap = first.native_tile, first.native_overlap
        self.has_mask = first.has_mask or self.after.has_mask

    def window_transform(self, x, y):
        return self.before.window_transform(x, y)

    def value_warnings(self):
        return self.before.value_warnings("BEFORE") + self.after.value_warnings("AFTER")

    def scaling_ranges(self):
        return f"BEFORE {self.before.scaling_ranges()}; AFTER {self.after.scaling_ranges()}"

    def read_tile(self, x, y):
        a, va = self.before.read_tile(x, y)
        b, vb = self.after.read_tile(x, y)
        return np.concatenate([a, b], axis=0), va & vb

    def close(self):
        try:
            self.before.close()
            self.after.close()
        finally:
            if self._mem is not None:
                self._mem.close()
                self._mem = None


def intersect_region(bounds, overlap):
    """The window to process: ``bounds`` (None: all) within the area both dates cover (``overlap``, None: all)."""
    if overlap is None:
        return bounds
    if bounds is None:
        return overlap
    out = (max(bounds[0], overlap[0]), max(bounds[1], overlap[1]), min(bounds[2], overlap[2]),
           min(bounds[3], overlap[3]))
    if not (out[2] > out[0] and out[3] > out[1]):
        raise InputError(f"EXTENT {_fmt_bounds(bounds)} does not overlap the area covered by both BEFORE and AFTER "
                         f"{_fmt_bounds(overlap)}; choose an extent inside both layers, in BEFORE's CRS")
    return out


__all__ = ["PairInfo", "PairReader", "inspect_pair", "intersect_region"]
