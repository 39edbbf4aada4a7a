"""Handing the memory freed by a run back to the system while it runs.

A tiled run allocates and frees arrays of a few MB on several threads (tiles read, model outputs, weighted
tiles, finished rows). glibc keeps freed blocks of that size in its heaps for reuse (its mmap threshold rises to
the largest block freed) and, with holes between them, the heaps grow over a long run: ``make bench`` saw the
peak RSS of an 8192^2 segmentation climb by about 100 MiB after its first seconds. :func:`release_free_heap`,
called once per tile row, returns the free pages to the system (``malloc_trim``: a few milliseconds), so that the
memory of a run is that of its tiles and strips, not of its length.
"""
import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (Windows, macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap():
    """Return the free pages of the C heaps to the system (glibc); nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
