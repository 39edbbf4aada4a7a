"""Reading rasters for the models: windows, band choice, value scaling, GSD matching, nodata."""
import math
import os
import warnings

import numpy as np

from ..errors import InputError, require

GSD_TOLERANCE = 0.10  # resample only when the raster's GSD differs from the model's by more than 10 %


def apply_affine(transform, x, y):
    """``transform`` applied to pixel coordinates (scalars or numpy arrays) -> map coordinates; the same on every
    affine version (``transform * (x, y)`` is deprecated from affine 3 and ``@`` is missing before it)."""
    return (transform.a * x + transform.b * y + transform.c, transform.d * x + transform.e * y + transform.f)


def _rasterio():
    return require("rasterio")


def pixel_size_metres(crs, transform, width, height):
    """Ground sampling distance in metres (mean of x and y), or None without a CRS."""
    if crs is None:
        return None
    px = math.hypot(transform.a, transform.d)
    py = math.hypot(transform.b, transform.e)
    res = (px + py) / 2.0
    if crs.is_geographic:
        cx, cy = apply_affine(transform, width / 2.0, height / 2.0)
        lat = max(-89.0, min(89.0, cy))
        return res * 111_320.0 * math.sqrt(abs(math.cos(math.radians(lat))))  # geometric mean of x and y
    try:
        factor = crs.linear_units_factor[1]
    except Exception:  # unknown units: assume metres
        factor = 1.0
    if is_web_mercator(crs):  # map metres shrink to ground metres by cos(latitude)
        factor *= mercator_scale(crs, transform, width, height)
    return res * factor


def is_web_mercator(crs):
    try:
        return crs.to_epsg() in (3857, 900913, 3785)
    except Exception:
        return False


def mercator_scale(crs, transform, width, height):
    from rasterio.warp import transform as warp
    cx, cy = apply_affine(transform, width / 2.0, height / 2.0)
    _, lat = warp(crs, "EPSG:4326", [cx], [cy])
    return math.cos(math.radians(lat[0]))


def area_factor_m2(crs, transform, width, height):
    """Square metres per square map unit (approximate for geographic CRS)."""
    if crs is None:
        return 1.0
    if crs.is_geographic:
        cx, cy = apply_affine(transform, width / 2.0, height / 2.0)
        return 111_320.0 * math.cos(math.radians(max(-89.0, min(89.0, cy)))) * 110_574.0
    try:
        f = crs.linear_units_factor[1]
    except Exception:
        f = 1.0
    return f * f


def apply_scaling(data, scaling):
    """Apply MLM value scaling (one dict per band, or None) to float32 data [C, H, W] in place."""
    for i, s in enumerate(scaling):
        if s is None:
            continue
        band = data[i]
        t = s["type"]
        if t == "min-max":
            lo, hi = float(s["minimum"]), float(s["maximum"])
            band -= lo
            band *= 1.0 / (hi - lo)
        elif t == "z-score":
            band -= float(s["mean"])
            band *= 1.0 / float(s["stddev"])
        elif t == "clip":
            np.clip(band, float(s["minimum"]), float(s["maximum"]), out=band)
        elif t == "clip-min":
            np.maximum(band, float(s["minimum"]), out=band)
        elif t == "clip-max":
            np.minimum(band, float(s["maximum"]), out=band)
        elif t == "offset":
            band -= float(s["value"])
        elif t == "scale":
            band *= 1.0 / float(s["value"])
    return data


def percentile_scaling(data, valid, low=1.0, high=99.0, max_samples=2_000_000, seed=0, what="The training image"):
    """Per-band MLM min-max scaling from the ``low``..``high`` percentiles of the valid (and finite) pixels of
    ``data`` [C, H, W] (``valid`` [H, W]); at most ``max_samples`` of them, drawn with ``seed``."""
    out = []
    if np.issubdtype(data.dtype, np.floating):
        valid = valid & np.isfinite(data).all(axis=0)
    idx = np.flatnonzero(valid.ravel())
    if idx.size == 0:
        raise InputError(f"{what} has no valid pixels (all nodata)")
    if idx.size > max_samples:
        idx = np.random.default_rng(seed).choice(idx, max_samples, replace=False)
    for band in data:
        vals = band.ravel()[idx].astype(np.float64)
        lo, hi = np.percentile(vals, [low, high])
        lo, hi = float(lo), float(hi)
        if not hi > lo:
            lo, hi = float(vals.min()), float(vals.max())
        if not hi > lo:
            hi = lo + 1.0
        out.append({"type": "min-max", "minimum": lo, "maximum": hi})
    return out


# -----------------------------------------------------------------------------------------------------------
# per-input value scaling: a package with ``input_percentiles`` (rs_deep:input_percentiles) scales every input by
# its own percentiles instead of the stored ones (those of its training data)

#: rasters of at most this many pixels are read whole for their percentiles (exactly as training reads its image);
#: larger ones in a regular grid of SAMPLE_GRID x SAMPLE_GRID windows of SAMPLE_WINDOW px (about 1 M pixels)
FULL_READ_PIXELS = 4_000_000
SAMPLE_GRID = 16
SAMPLE_WINDOW = 64
_INPUT_SCALING = {}  # (file, size, mtime, bands, percentiles) -> scaling: one computation per input and process


def sample_windows(width, height, grid=SAMPLE_GRID, size=SAMPLE_WINDOW, block=(1, 1)):
    """``grid`` x ``grid`` windows (x, y, w, h) of ``size`` px spread evenly over a raster (their centres on a
    regular grid; fewer when the raster is small), each starting at a corner of its ``block`` (the raster's
    (width, height) of a block) so that it reads one block, not four."""
    out = []
    bw, bh = (b if b <= n / grid else 1 for b, n in zip(block, (width, height)))  # strips: not aligned along them
    w, h = min(size, width), min(size, height)
    for j in range(grid):
        for i in range(grid):
            x = int((i + 0.5) * width / grid) // bw * bw
            y = int((j + 0.5) * height / grid) // bh * bh
            out.append((min(max(0, x), width - w), min(max(0, y), height - h), w, h))
    return sorted(set(out))


def input_value_scaling(ds, bands, percentiles, path=None):
    """The MLM value scaling of the open raster ``ds`` itself: per band, min-max of its ``percentiles`` (low, high)
    over the pixels valid in every band. The whole raster (a small one) or :func:`sample_windows` (a large one),
    so that every process, block and thread of a run computes the same scaling; memoised per file (a local file by
    its size and time too) or GDAL dataset name (``/vsicurl/``...: read once per process, not once per block), not
    for ``/vsimem/`` (a warped date of a pair)."""
    key = None
    name = os.fspath(path) if path is not None else ""
    if os.path.isfile(name):
        st = os.stat(name)
        key = (os.path.abspath(name), st.st_size, st.st_mtime_ns, tuple(bands), tuple(percentiles))
    elif name and not name.startswith("/vsimem/"):
        key = (name, None, None, tuple(bands), tuple(percentiles))
    if key in _INPUT_SCALING:
        return [dict(s) for s in _INPUT_SCALING[key]]
    from rasterio.windows import Window
    low, high = (float(p) for p in percentiles)
    what = f"The input raster {os.path.basename(os.fspath(path))}" if path else "The input raster"
    try:
        if ds.width * ds.height <= FULL_READ_PIXELS:
            data = ds.read(bands, out_dtype="float32")
            valid = np.all(ds.read_masks(bands) > 0, axis=0)
        else:
            cols, masks = [], []
            bh, bw = ds.block_shapes[0]
            for x, y, w, h in sample_windows(ds.width, ds.height, block=(bw, bh)):
                win = Window(x, y, w, h)
                cols.append(ds.read(bands, window=win, out_dtype="float32").reshape(len(bands), 1, -1))
                masks.append(np.all(ds.read_masks(bands, window=win) > 0, axis=0).reshape(1, -1))
            data, valid = np.concatenate(cols, axis=2), np.concatenate(masks, axis=1)
    except (OSError, _rasterio().errors.RasterioError) as exc:
        raise InputError(f"Cannot read {path or 'the input raster'} for its value range: {exc}. The file is damaged "
                         "or incomplete; re-export it, or open it in QGIS to check it.") from exc
    scaling = percentile_scaling(data, valid, low, high, what=what)
    if key is not None:
        if len(_INPUT_SCALING) > 64:
            _INPUT_SCALING.clear()
        _INPUT_SCALING[key] = [dict(s) for s in scaling]
    return scaling


def describe_scaling(scaling, bands):
    """"band 1 12..873, band 2 ..." of min-max scalings, for the log."""
    parts = []
    for b, s in zip(bands, scaling):
        if s and s.get("type") == "min-max":
            parts.append(f"band {b} {s['minimum']:g}..{s['maximum']:g}")
    return ", ".join(parts)


def resolve_bands(count, colorinterp, requested, package):
    """1-based raster band numbers to feed the model, or a clear InputError."""
    need = package.in_channels
    names = ", ".join(package.bands)
    if requested:
        bands = [int(b) for b in requested]
        bad = [b for b in bands if b < 1 or b > count]
        if bad:
            raise InputError(f"BANDS {bad} do not exist: the raster has {count} band(s) (numbered 1..{count})")
        if len(bands) != need:
            raise InputError(f"The model '{package.name}' takes {need} band(s) ({names}); BANDS lists "
                             f"{len(bands)}. Give exactly {need} band number(s), in that order.")
        return bands
    if count == need:
        return list(range(1, need + 1))
    alpha = [i + 1 for i, ci in enumerate(colorinterp) if getattr(ci, "name", str(ci)) == "alpha"]
    if alpha and count - len(alpha) == need:
        return [b for b in range(1, count + 1) if b not in alpha]
    example = ",".join(str(i) for i in range(1, need + 1))
    raise InputError(f"The model '{package.name}' takes {need} band(s) ({names}) but the raster has {count}. "
                     f"Choose {need} of its bands with BANDS (for example BANDS={example}), or use a model "
                     f"made for {count}-band imagery.")


def read_error(path, window, exc):
    """The :class:`InputError` for pixels that cannot be read: a damaged or truncated file, or a VRT whose
    source is missing. Names the file, the window and the fix."""
    x0, y0 = int(window.col_off), int(window.row_off)
    where = f"pixels {x0}..{x0 + int(window.width)} x {y0}..{y0 + int(window.height)}"
    return InputError(f"Cannot read {path} ({where}): {exc}. The file is damaged or incomplete (or, for a VRT, "
                      "a file it refers to is missing or unreadable); re-export or re-download it, or open it in "
                      "QGIS to check it.")


def input_ranges(scaling, count):
    """Per band, the (low, high) raw values the model was made for, from its value scaling, or None: min-max
    and clip give their limits, z-score mean +- 3 stddev."""
    out = []
    for i in range(count):
        s = scaling[i] if scaling and i < len(scaling) else None
        t = (s or {}).get("type")
        try:
            if t in ("min-max", "clip"):
                lo, hi = float(s["minimum"]), float(s["maximum"])
            elif t == "z-score":
                lo = float(s["mean"]) - 3 * float(s["stddev"])
                hi = float(s["mean"]) + 3 * float(s["stddev"])
            else:
                lo = hi = None
        except (KeyError, TypeError, ValueError):
            lo = hi = None
        out.append((lo, hi) if lo is not None and hi > lo else None)
    return out


#: a pixel is "far outside" the model's input range beyond this share of the range's width on either side
RANGE_MARGIN = 0.5
#: the share of valid pixels far outside the range from which a run warns
RANGE_WARN_SHARE = 0.05


class ReadCounts:
    """Pixel counts gathered while tiles are read (overlapping tiles count their shared pixels more than once,
    so the shares are approximate): every pixel read, NaN/Inf pixels, valid pixels, valid pixels far outside
    the model's input range."""

    def __init__(self):
        self.read = self.nonfinite = self.valid = self.out_of_range = 0
        self.ranges = None

    def add(self, arr, valid, is_float, ranges):
        self.read += valid.size
        ok = valid
        if is_float:
            finite = np.isfinite(arr).all(axis=0)
            self.nonfinite += int(valid.size - np.count_nonzero(finite))
            ok = valid & finite
        self.valid += int(np.count_nonzero(ok))
        if any(ranges):
            self.ranges = ranges
            out = np.zeros(ok.shape, dtype=bool)
            with np.errstate(invalid="ignore"):
                for band, r in zip(arr, ranges):
                    if r is not None:
                        margin = (r[1] - r[0]) * RANGE_MARGIN
                        out |= (band < r[0] - margin) | (band > r[1] + margin)
            self.out_of_range += int(np.count_nonzero(out & ok))

    def merge(self, other):
        self.read += other.read
        self.nonfinite += other.nonfinite
        self.valid += other.valid
        self.out_of_range += other.out_of_range
        self.ranges = self.ranges or other.ranges

    def warnings(self, what="the input raster"):
        """Warnings for NaN/Inf pixels and for values far outside the model's input range."""
        out = []
        if self.nonfinite:
            out.append(f"{_share(self.nonfinite, self.read)} of the pixels of {what} are NaN or infinite: they are "
                       "treated as nodata (no class, no probability, no object there).")
        if self.valid and self.out_of_range >= RANGE_WARN_SHARE * self.valid:
            ranges = ", ".join(f"{r[0]:g}..{r[1]:g}" for r in self.ranges if r is not None)
            out.append(f"{_share(self.out_of_range, self.valid)} of the pixels of {what} are far outside the "
                       f"model's input range {ranges}; the results may be meaningless — check the bands (BANDS) "
                       "and that the raster holds the values the model was made for (its value scaling).")
        return out


def _share(part, whole):
    pct = 100.0 * part / max(1, whole)
    return f"{pct:.0f} %" if pct >= 1 else f"{pct:.2g} %"


def check_size(width, height, max_pixels):
    """Refuse, before any work, an area of more than ``max_pixels`` pixels (None or 0: no limit)."""
    if max_pixels and width * height > max_pixels:
        raise InputError(f"The area to process is {width:,} x {height:,} px ({width * height / 1e6:,.0f} million "
                         f"pixels), more than MAX_PIXELS ({int(max_pixels):,}). Set EXTENT to the area you need, "
                         "or raise MAX_PIXELS (0 = no limit) if you mean to process all of it.")


def input_warnings(reader, nothing_valid, masked=False):
    """The warnings on the values read (NaN/Inf, far outside the model's range) and on an area without a valid
    pixel, from the counts the reader gathered (:class:`.raster.ReadCounts`)."""
    out = list(reader.value_warnings()) if hasattr(reader, "value_warnings") else []
    if nothing_valid:
        why = "nodata or outside MASK" if masked else "nodata"
        out.append(f"There is no valid pixel in the processed area (it is all {why}): the outputs hold nothing. "
                   "Check the raster's nodata value, EXTENT and MASK.")
    return out


class RasterReader:
    """Reads model-ready tiles from one raster. Not thread-safe: one reader per thread."""

    def __init__(self, path, package, bands=None, match_gsd=True, pad="reflect"):
        rasterio = _rasterio()
        self.rasterio = rasterio
        try:
            self.ds = rasterio.open(path)
        except Exception as exc:
            raise InputError(f"Cannot open the input raster {path}: {exc}") from exc
        ds = self.ds
        self.path = path
        if pad not in ("reflect", "zeros"):
            raise ValueError(f"pad must be 'reflect' or 'zeros', got {pad!r}")
        self.pad = pad
        self.width, self.height = ds.width, ds.height
        self.transform, self.crs = ds.transform, ds.crs
        self.bands = resolve_bands(ds.count, ds.colorinterp, bands, package)
        self.scaling = package.value_scaling
        if package.input_percentiles:  # scaled by its own percentiles, not the training data's
            self.scaling = input_value_scaling(ds, self.bands, package.input_percentiles, path)
        self.gsd = pixel_size_metres(self.crs, self.transform, self.width, self.height)
        self.model_gsd = package.gsd
        self.scale = 1.0  # model pixel size in native pixels
        if match_gsd and self.gsd and package.gsd:
            ratio = package.gsd / self.gsd
            if abs(ratio - 1.0) > GSD_TOLERANCE:
                self.scale = ratio
        self.tile = package.tile_size
        self.native_tile = max(1, int(round(package.tile_size * self.scale)))
        self.native_overlap = int(round(package.overlap * self.scale))
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        self.has_mask = not all(
            len(f) == 1 and f[0].name == "all_valid" for f in flags)
        self.nodata = ds.nodata
        self.is_float = any(ds.dtypes[b - 1].startswith(("float", "complex")) for b in self.bands)
        types = {ds.dtypes[b - 1] for b in self.bands}
        # a Deepness model reads resampled tiles as QGIS hands them to Deepness (bilinear, in the raster's own integer
        # type) and its results go back to the raster's grid as they are (:func:`..inference.segment.tile_batches`)
        self.deepness_style = package.deepness_style
        self.resampled_type = types.pop() if self.deepness_style and len(types) == 1 and not self.is_float else \
            "float32"
        self.ranges = input_ranges(self.scaling, len(self.bands))
        self.counts = ReadCounts()

    def close(self):
        self.ds.close()

    def scaling_ranges(self):
        """The value ranges the bands are scaled from, for the log (:func:`describe_scaling`)."""
        return describe_scaling(self.scaling, self.bands)

    def value_warnings(self, what=None):
        """Warnings on the values read so far (NaN/Inf, far outside the model's input range)."""
        import os
        return self.counts.warnings(what or os.path.basename(os.fspath(self.path)) or "the input raster")

    def window_transform(self, x, y):
        from rasterio.windows import Window
        return self.ds.window_transform(Window(x, y, self.native_tile, self.native_tile))

    def resampling(self, shrink, resize=True):
        """``(GDAL resampling, output type)`` of a read resized to the model's pixels: none without ``resize``
        (float32); the average of the pixels when it ``shrink``s, bilinear when it grows; a Deepness model bilinear
        both ways, in the raster's own integer type (:attr:`resampled_type`)."""
        from rasterio.enums import Resampling
        if not resize:
            return Resampling.nearest, "float32"
        method = Resampling.average if shrink and not self.deepness_style else Resampling.bilinear
        return method, self.resampled_type

    def read_tile(self, x, y):
        """Native window (x, y, native_tile^2) -> (scaled float32 [C, T, T], valid bool [T, T]).

        Parts outside the raster are filled by mirroring the image (``pad="reflect"``: better context
        than zeros for segmentation) or with zeros (``pad="zeros"``: detection, whose training crops are
        zero beyond the image; a mirror would double the objects cut by the edge), and marked invalid.
        """
        from rasterio.enums import Resampling
        from rasterio.windows import Window
        n, t = self.native_tile, self.tile
        c = len(self.bands)
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + n, self.width), min(y + n, self.height)
        if ix1 <= ix0 or iy1 <= iy0:
            return np.zeros((c, t, t), dtype=np.float32), np.zeros((t, t), dtype=bool)
        f = t / n
        ox0, oy0 = int(round((ix0 - x) * f)), int(round((iy0 - y) * f))
        ox1, oy1 = max(ox0 + 1, int(round((ix1 - x) * f))), max(oy0 + 1, int(round((iy1 - y) * f)))
        win = Window(ix0, iy0, ix1 - ix0, iy1 - iy0)
        shape = (oy1 - oy0, ox1 - ox0)
        resampling, dtype = self.resampling(n > t, n != t)
        try:
            arr = self.ds.read(self.bands, window=win, out_shape=(c,) + shape, resampling=resampling,
                               out_dtype=dtype).astype(np.float32, copy=False)
            if self.has_mask:
                m = self.ds.read_masks(self.bands, window=win, out_shape=(c,) + shape,
                                       resampling=Resampling.nearest)
                v = np.any(m > 0, axis=0)  # nodata only where every band is nodata: a dark band is data
            else:
                v = np.ones(shape, dtype=bool)
        except (OSError, self.rasterio.errors.RasterioError) as exc:
            raise read_error(self.path, win, exc) from exc
        self.counts.add(arr, v, self.is_float, self.ranges)
        if self.is_float:  # NaN and +-Inf are nodata (they would poison the whole tile through the network)
            v &= np.isfinite(arr).all(axis=0)
        apply_scaling(arr, self.scaling)
        if not v.all():
            arr[:, ~v] = 0.0
        if shape == (t, t):  # a tile inside the raster (most of them): no other array
            return arr, v
        valid = np.zeros((t, t), dtype=bool)
        valid[oy0:oy1, ox0:ox1] = v
        if self.pad == "zeros":
            data = np.zeros((c, t, t), dtype=np.float32)
            data[:, oy0:oy1, ox0:ox1] = arr
            return data, valid
        pad = ((0, 0), (oy0, t - oy1), (ox0, t - ox1))
        try:
            return np.pad(arr, pad, mode="reflect" if min(shape) > 1 else "edge"), valid
        except ValueError:
            return np.pad(arr, pad, mode="edge"), valid


def region_window(width, height, transform, bounds=None, name="EXTENT"):
    """Pixel region (x0, y0, x1, y1) of the raster to process, from map bounds or the whole raster; ``name``: the
    parameter the bounds come from, for the messages."""
    if bounds is None:
        return 0, 0, width, height
    from rasterio.windows import from_bounds
    xmin, ymin, xmax, ymax = bounds
    if not (xmax > xmin and ymax > ymin):
        raise InputError(f"{name} {bounds} is empty; draw or choose an extent with a width and a height")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = from_bounds(xmin, ymin, xmax, ymax, transform=transform)
    x0 = max(0, int(math.floor(w.col_off + 1e-6)))
    y0 = max(0, int(math.floor(w.row_off + 1e-6)))
    x1 = min(width, int(math.ceil(w.col_off + w.width - 1e-6)))
    y1 = min(height, int(math.ceil(w.row_off + w.height - 1e-6)))
    if x1 <= x0 or y1 <= y0:
        left, top = apply_affine(transform, 0, 0)
        right, bottom = apply_affine(transform, width, height)
        raise InputError(f"{name} ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) does not overlap the raster "
                         f"({min(left, right):g}, {min(top, bottom):g}, {max(left, right):g}, "
                         f"{max(top, bottom):g}); choose an extent inside the layer, in the layer's CRS")
    return x0, y0, x1, y1
