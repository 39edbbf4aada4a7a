"""Streaming GeoTIFF output: tiled, compressed, overviews, colour table, written atomically.

Every output is first written to a hidden temporary file beside the destination and
renamed over it only when the whole run succeeded, so a failed or cancelled run
never leaves a partial layer and never clobbers an earlier result.
"""
import os
import queue
import threading
import uuid
from xml.sax.saxutils import escape

import numpy as np

from .errors import InputError

CLASS_NODATA = 255
PROB_NODATA = -1.0


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
    """A temp path beside ``final`` (with sidecars) that is renamed into place by commit()."""

    SIDECARS = (".aux.xml", ".qml", ".ovr")

    def __init__(self, final):
        self.final = os.path.abspath(final)
        folder, name = os.path.split(self.final)
        stem, ext = os.path.splitext(name)
        self.tmp = os.path.join(folder, f".{stem}.rsdeep-{uuid.uuid4().hex[:8]}{ext or '.tif'}")

    def commit(self):
        for side in self.SIDECARS:
            if os.path.exists(self.final + side) and not os.path.exists(self.tmp + side):
                os.remove(self.final + side)  # a stale sidecar would describe the old file
        os.replace(self.tmp, self.final)
        for side in self.SIDECARS:
            if os.path.exists(self.tmp + side):
                os.replace(self.tmp + side, self.final + side)

    def discard(self):
        for p in (self.tmp,) + tuple(self.tmp + s for s in self.SIDECARS):
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


class GeoTiffWriter:
    """A tiled, DEFLATE-compressed GeoTIFF written window by window."""

    def __init__(self, path, width, height, count, dtype, transform, crs, nodata,
                 colormap=None, category_names=None, band_descriptions=None, overview_resampling="nearest"):
        import rasterio
        self.rasterio = rasterio
        self.path = path
        self.colormap = colormap
        self.category_names = category_names
        self.overview_resampling = overview_resampling
        block = 256 if min(width, height) >= 256 else None
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs,
                       transform=transform, nodata=nodata, compress="deflate", BIGTIFF="IF_SAFER")
        if block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        if dtype == "uint8":
            profile["predictor"] = 2
        try:
            self.ds = rasterio.open(path, "w", **profile)
        except Exception as exc:
            raise InputError(f"Cannot create {path}: {exc}") from exc
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
        try:
            self.ds.write(array, window=Window(x, y, array.shape[2], array.shape[1]))
        except Exception as exc:
            raise InputError(f"Writing {self.path} failed ({exc}); is the disk full? Free space or choose "
                             "another output folder") from exc

    def close(self, overviews=True):
        from rasterio.enums import Resampling
        ds = self.ds
        try:
            ds.close()
            if overviews:
                factors = _overview_factors(ds.width, ds.height)
                if factors:
                    with self.rasterio.Env(COMPRESS_OVERVIEW="DEFLATE", GDAL_TIFF_OVR_BLOCKSIZE="256"):
                        with self.rasterio.open(self.path, "r+") as upd:
                            upd.build_overviews(factors, getattr(Resampling, self.overview_resampling))
                            upd.update_tags(ns="rio_overview", resampling=self.overview_resampling)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"Finishing {self.path} failed ({exc}); is the disk full?") from exc
        if self.category_names:
            write_category_names(self.path, self.category_names)

    def abort(self):
        try:
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


def class_counts(classes_block, n):
    return np.bincount(classes_block.ravel(), minlength=256)[:n]
