"""Streaming GeoTIFF output: tiled, compressed, overviews, colour table, written atomically.

Every output is first written to a hidden temporary file beside the destination and
renamed over it only when the whole run succeeded, so a failed or cancelled run
never leaves a partial layer and never clobbers an earlier result.

A full disk must not pass for success: GDAL reports a failed flush (``_tiffWriteProc: File too
large``, ``No space left on device``) only as a logged error, and rasterio's ``write()`` and
``close()`` return normally. So every write and close runs under :func:`gdal_errors`, which
collects those errors, and every finished file is checked by :func:`verify_raster` (synced to
disk, its TIFF block table within the file, its last block of every band read back) before
anything is renamed; a failure is an :class:`InputError` saying that the disk may be full.
"""
import contextlib
import logging
import os
import queue
import struct
import threading
import warnings
from xml.sax.saxutils import escape

import numpy as np

from ..errors import InputError
from ..files import DISK_ERRNOS, temp_path

CLASS_NODATA = 255
PROB_NODATA = -1.0


def disk_error(name, detail):
    """The InputError for an output that could not be written completely (``detail``: what failed, text or the
    exception; rasterio 1.4 says "Write failed. See previous exception" and chains GDAL's message)."""
    if isinstance(detail, BaseException) and detail.__cause__ is not None:
        detail = detail.__cause__
    return InputError(f"Writing {name} failed ({detail}); disk full? Free space or choose another output folder "
                      "(earlier outputs were left untouched)")


class _GdalErrorLog(logging.Filter):
    """Collects, per thread, the GDAL errors that rasterio passes to Python logging.

    rasterio sends GDAL's errors to the loggers ``rasterio._env`` and ``rasterio._err`` only while a
    ``rasterio.Env`` is active in the thread that hits them, and at INFO level ("GDAL signalled an error:
    err_no=.., msg=..", rasterio 1.3 and 1.4 alike); otherwise GDAL prints them to stderr and nobody sees
    them. While a capture runs (:func:`gdal_errors`) those loggers are lowered to INFO and this filter
    collects the errors of the capturing thread; it lets through only what the loggers let through before.
    """

    LOGGERS = ("rasterio._env", "rasterio._err")

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._users = 0
        self._saved = {}  # logger name -> (its own level, its effective level) before the first capture

    def filter(self, record):
        sinks = getattr(self._local, "sinks", ())
        text = _gdal_error_text(record) if sinks else None
        if text is not None:
            for sink in sinks:
                sink.append(text)
        return record.levelno >= self._saved.get(record.name, (0, 0))[1]

    def start(self, sink):
        with self._lock:
            if self._users == 0:
                for name in self.LOGGERS:
                    lg = logging.getLogger(name)
                    self._saved[name] = (lg.level, lg.getEffectiveLevel())
                    lg.addFilter(self)
                    if lg.getEffectiveLevel() > logging.INFO:
                        lg.setLevel(logging.INFO)
            self._users += 1
        self._local.__dict__.setdefault("sinks", []).append(sink)

    def stop(self, sink):
        self._local.sinks.remove(sink)
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for name, (level, _) in self._saved.items():
                    lg = logging.getLogger(name)
                    lg.setLevel(level)
                    lg.removeFilter(self)


def _gdal_error_text(record):
    """The GDAL message of a CE_Failure / CE_Fatal record of rasterio's error handler, else None."""
    if record.levelno >= logging.ERROR:
        return record.getMessage()
    if record.levelno >= logging.INFO and str(record.msg).startswith("GDAL signalled an error"):
        args = record.args
        return str(args[-1]) if isinstance(args, tuple) and args else record.getMessage()
    return None


_GDAL_ERRORS = _GdalErrorLog()


@contextlib.contextmanager
def gdal_errors():
    """``with gdal_errors() as errors:`` runs the block in a ``rasterio.Env`` and collects in ``errors`` the
    messages of the GDAL errors raised in this thread meanwhile (a failed flush of a block, a directory that
    could not be written...), which GDAL does not turn into exceptions."""
    import rasterio
    found = []
    _GDAL_ERRORS.start(found)
    try:
        with rasterio.Env():
            yield found
    finally:
        _GDAL_ERRORS.stop(found)


@contextlib.contextmanager
def quiet_osgeo_exceptions_warning():
    """Runs the block without GDAL >= 3.9's FutureWarning that the host has not chosen between exceptions and return
    codes ("Neither gdal.UseExceptions() nor ...": printed on stderr, e.g. by qgis_process on QGIS 3.44) for the
    ``osgeo`` calls in it: that choice is the host application's, not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Neither (gdal|ogr)\.UseExceptions", category=FutureWarning)
        yield


def sync_file(path):
    """fsync ``path``: a network or quota-limited disk may report a full disk only now. Returns the error, or None
    (also where the file system cannot sync)."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            return exc.strerror or str(exc)
    finally:
        os.close(fd)
    return None


_TIFF_TYPES = {3: "u2", 4: "u4", 16: "u8"}  # SHORT, LONG, LONG8: the types of block offsets and byte counts


def tiff_problem(path):
    """A cheap structural check of a TIFF just written: every directory, and every block (tile or strip) of
    every image in it (overviews and masks included), lies within the file and has data. GDAL writes every block
    of a non-sparse GeoTIFF, so a block without data or past the end of the file was lost on the way to the disk.
    Returns what is wrong, or None (also for a file that is not a TIFF)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8:
            return f"the file is cut off at {size} bytes"
        if head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(e + "H", head[2:4])[0]
        if magic == 42:
            big, off = False, struct.unpack(e + "I", head[4:8])[0]
        elif magic == 43 and len(head) == 16:
            big, off = True, struct.unpack(e + "Q", head[8:16])[0]
        else:
            return None
        n_fmt, n_size, ent, word = ("Q", 8, 20, 8) if big else ("H", 2, 12, 4)
        seen = set()
        while off:
            image = len(seen) + 1
            if off in seen or image > 100_000:
                return "its directory chain loops"
            seen.add(off)
            f.seek(off)
            raw = f.read(n_size)
            if len(raw) < n_size:
                return f"directory {image} lies past the end of the file ({size} bytes)"
            count = struct.unpack(e + n_fmt, raw)[0]
            raw = f.read(count * ent + word)
            if len(raw) < count * ent + word:
                return f"directory {image} is cut off at the end of the file ({size} bytes)"
            tables = {}
            for i in range(count):
                entry = raw[i * ent:(i + 1) * ent]
                tag, typ = struct.unpack(e + "HH", entry[:4])
                if tag not in (273, 279, 324, 325):  # Strip/TileOffsets, Strip/TileByteCounts
                    continue
                if typ not in _TIFF_TYPES:
                    return f"directory {image} has a block table of type {typ}"
                n = struct.unpack(e + ("Q" if big else "I"), entry[4:4 + word])[0]
                dtype = np.dtype(_TIFF_TYPES[typ]).newbyteorder(e)
                nbytes = n * dtype.itemsize
                if nbytes <= word:
                    data = entry[4 + word:4 + word + nbytes]
                else:
                    at = struct.unpack(e + ("Q" if big else "I"), entry[4 + word:4 + 2 * word])[0]
                    f.seek(at)
                    data = f.read(nbytes)
                    if len(data) < nbytes:
                        return f"the block table of image {image} lies past the end of the file ({size} bytes)"
                tables[tag in (279, 325)] = np.frombuffer(data, dtype=dtype).astype(np.uint64)
            if len(tables) == 2:
                offsets, counts = tables[False], tables[True]
                if len(offsets) != len(counts):
                    return f"image {image} has {len(offsets)} block offsets but {len(counts)} block sizes"
                bad = np.flatnonzero((offsets == 0) | (counts == 0) | (offsets + counts > size))
                if bad.size:
                    return (f"{bad.size} of the {len(offsets)} blocks of image {image} are missing or lie past the "
                            f"end of the file ({size} bytes)")
            off = struct.unpack(e + ("Q" if big else "I"), raw[count * ent:count * ent + word])[0]
    return None


def read_problem(path):
    """Reopen ``path`` with GDAL and read the last block of every band. Returns what failed, or None."""
    import rasterio
    from rasterio.windows import Window
    try:
        with gdal_errors() as errors:
            with rasterio.open(path) as ds:
                for b in range(1, ds.count + 1):
                    bh, bw = ds.block_shapes[b - 1]
                    x, y = (ds.width - 1) // bw * bw, (ds.height - 1) // bh * bh
                    ds.read(b, window=Window(x, y, min(bw, ds.width - x), min(bh, ds.height - y)))
    except Exception as exc:
        return f"it cannot be read back: {exc}"
    return f"it cannot be read back: {errors[0]}" if errors else None


def verify_raster(path, name=None, sync=True):
    """Raise the disk-full :class:`InputError` (naming ``name``, default ``path``) unless the raster ``path``, just
    written and closed, is whole: synced to disk (``sync``), its TIFF structure within the file
    (:func:`tiff_problem`), readable by GDAL down to the last block of every band (:func:`read_problem`)."""
    try:
        problem = (sync and sync_file(path)) or tiff_problem(path) or read_problem(path)
    except OSError as exc:
        problem = f"it cannot be read back: {exc}"
    if problem:
        raise disk_error(name or path, problem)


def write_geotiff(path, array, name=None, sync=True, **profile):
    """Write ``array`` ([bands, rows, cols] or [rows, cols]) as a new raster ``path`` (rasterio ``profile``) in one
    go, and verify it (:func:`verify_raster`): a GDAL error or an incomplete file raise :class:`InputError`
    naming ``name`` (default ``path``)."""
    import rasterio
    name = name or path
    if array.ndim == 2:
        array = array[None]
    with gdal_errors() as errors:
        try:
            dst = rasterio.open(path, "w", **profile)
        except Exception as exc:
            raise InputError(f"Cannot create {name}: {exc}") from exc
        try:
            with dst:
                dst.write(array)
        except Exception as exc:
            raise disk_error(name, exc) from exc
    if errors:
        raise disk_error(name, errors[0])
    verify_raster(path, name, sync=sync)
    return path


def check_writable(path, what="OUTPUT"):
    """Fail early, with the fix, when ``path`` cannot be written."""
    if not path:
        raise InputError(f"{what}: no file name given")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"{what}: the folder {folder} does not exist; create it or choose another location")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what}: cannot write to {folder} (permission denied); choose a folder you can write to")
    if os.path.isdir(path):
        raise InputError(f"{what}: {path} is a folder; give a file name ending in .tif")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{what}: {path} exists and is read-only; choose another file name")
    return path


class AtomicFile:
    """A temp path beside ``final`` (with sidecars) that is renamed into place by commit().

    Sidecars: GDAL's ``<file>.aux.xml`` / ``<file>.ovr`` and QGIS's default style ``<stem>.qml`` (QGIS looks for
    ``o.qml`` beside ``o.tif``): written for the temporary file, they move with it."""

    SIDECARS = (".aux.xml", ".ovr")

    def __init__(self, final):
        self.final = os.path.abspath(final)
        self.tmp = temp_path(self.final, ext=os.path.splitext(self.final)[1] or ".tif")

    def _pairs(self):
        """(temporary, final) paths of every sidecar."""
        pairs = [(self.tmp + s, self.final + s) for s in self.SIDECARS]
        pairs.append((os.path.splitext(self.tmp)[0] + ".qml", os.path.splitext(self.final)[0] + ".qml"))
        return pairs

    def commit(self):
        pairs = self._pairs()
        for tmp, final in pairs:
            if os.path.exists(final) and not os.path.exists(tmp):
                os.remove(final)  # a stale sidecar would describe the old file
        os.replace(self.tmp, self.final)
        for tmp, final in pairs:
            if os.path.exists(tmp):
                os.replace(tmp, final)

    def discard(self):
        for p in [self.tmp] + [tmp for tmp, _ in self._pairs()]:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def _overview_factors(width, height, min_size=256):
    factors, f = [], 2
    while max(width, height) / f >= min_size / 2 and max(width, height) > min_size:
        factors.append(f)
        f *= 2
    return factors


#: DEFLATE level of the rasters written window by window: level 1 compresses about 1.5 times faster than the
#: default 6, for files about 15 % larger (class, confidence and probability rasters of ``make bench``)
ZLEVEL = 1
#: GDAL's threads for compressing those rasters and their overviews
GDAL_THREADS = str(os.cpu_count() or 1)


class GeoTiffWriter:
    """A tiled, DEFLATE-compressed GeoTIFF written window by window.

    ``name``: the file to name in error messages (the final output when ``path`` is its temporary file).
    :meth:`close` verifies the finished file: a writer that closed without error wrote a whole file.
    """

    def __init__(self, path, width, height, count, dtype, transform, crs, nodata,
                 colormap=None, category_names=None, band_descriptions=None, overview_resampling="nearest",
                 name=None):
        import rasterio
        self.rasterio = rasterio
        self.path = path
        self.name = name or path
        self.colormap = colormap
        self.category_names = category_names
        self.overview_resampling = overview_resampling
        block = 256 if min(width, height) >= 256 else None
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs,
                       transform=transform, nodata=nodata, compress="deflate", zlevel=ZLEVEL,
                       num_threads=GDAL_THREADS, BIGTIFF="IF_SAFER")
        if block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        if dtype == "uint8":
            profile["predictor"] = 2
        try:
            self.ds = rasterio.open(path, "w", **profile)
        except Exception as exc:
            raise InputError(f"Cannot create {self.name}: {exc}") from exc
        if band_descriptions:
            for i, d in enumerate(band_descriptions, start=1):
                self.ds.set_band_description(i, d)
        if colormap:
            # before any pixel: once GDAL's block cache has flushed a block to disk, the TIFF's photometric
            # tag can no longer change (rasters larger than the cache lost their colour table)
            self.ds.write_colormap(1, colormap)

    def write(self, array, x, y):
        from rasterio.windows import Window
        if array.ndim == 2:
            array = array[None]
        with gdal_errors() as errors:  # a block flushed to disk now (GDAL's cache is full) may fail silently
            try:
                self.ds.write(array, window=Window(x, y, array.shape[2], array.shape[1]))
            except Exception as exc:
                raise disk_error(self.name, exc) from exc
        if errors:
            raise disk_error(self.name, errors[0])

    def close(self, overviews=True):
        """Close, build the overviews, write the category names and verify the file (:func:`verify_raster`).
        Raises the disk-full :class:`InputError` when any of it failed: the file must then not be committed."""
        from rasterio.enums import Resampling
        ds = self.ds
        try:
            with gdal_errors() as errors:  # the last blocks and the TIFF directory reach the disk only now
                ds.close()
            if errors:
                raise disk_error(self.name, errors[0])
            factors = _overview_factors(ds.width, ds.height) if overviews else []
            if factors:
                with gdal_errors() as errors, \
                        self.rasterio.Env(COMPRESS_OVERVIEW="DEFLATE", ZLEVEL_OVERVIEW=str(ZLEVEL),
                                          GDAL_NUM_THREADS=GDAL_THREADS, GDAL_TIFF_OVR_BLOCKSIZE="256"):
                    with self.rasterio.open(self.path, "r+") as upd:
                        upd.build_overviews(factors, getattr(Resampling, self.overview_resampling))
                        upd.update_tags(ns="rio_overview", resampling=self.overview_resampling)
                if errors:
                    raise disk_error(self.name, errors[0])
        except InputError:
            raise
        except Exception as exc:
            raise disk_error(self.name, exc) from exc
        if self.category_names:
            try:
                write_category_names(self.path, self.category_names)
            except OSError as exc:
                raise disk_error(self.name + ".aux.xml", exc.strerror or exc) from exc
        verify_raster(self.path, self.name)

    def abort(self):
        try:
            with gdal_errors():  # the errors of a failed file are not news: keep them off stderr
                self.ds.close()
        except Exception:
            pass


def write_category_names(path, names):
    """GDAL keeps GeoTIFF category names in the PAM sidecar (.aux.xml)."""
    cats = "".join(f"      <Category>{escape(n)}</Category>\n" for n in names)
    xml = ("<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n"
           f"{cats}    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")
    with open(path + ".aux.xml", "w", encoding="utf-8") as f:
        f.write(xml)


class BackgroundWriter:
    """Runs write calls on one thread so that compression overlaps with inference.

    The queue is bounded, so memory stays bounded when the disk is slower than the model.
    """

    def __init__(self, maxsize=4):
        self._q = queue.Queue(maxsize=maxsize)
        self._error = None
        self._thread = threading.Thread(target=self._run, name="rs_deep-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            fn, args = item
            try:
                fn(*args)
            except BaseException as exc:  # reported to the caller on the next submit/close
                self._error = exc

    def submit(self, fn, *args):
        if self._error is not None:
            raise self._error
        self._q.put((fn, args))

    def close(self):
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def colormap_for(classes):
    cmap = {c.value: c.rgb + (255,) for c in classes}
    cmap[CLASS_NODATA] = (0, 0, 0, 0)
    return cmap
