"""Change vector analysis (CVA) with an Otsu threshold: the classical unsupervised baseline.

numpy only. The change magnitude of a pixel is the length of the difference between its band
vectors at the two dates, ``|after - before|``; with ``normalize`` (default) each band of each
date is first standardised over the valid pixels (mean 0, standard deviation 1), a simple
relative radiometric normalisation. The magnitude histogram is split into no change / change by
Otsu's threshold (the one maximising the between-class variance).
"""
import numpy as np


def change_magnitude(before, after, valid=None, normalize=True):
    """CVA magnitude [H, W] (float32) of two co-registered images [C, H, W]; 0 where not ``valid``."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[None], b[None]
    if a.shape != b.shape:
        raise ValueError(f"before {a.shape} and after {b.shape} differ in shape; co-register them first")
    if valid is None:
        valid = np.ones(a.shape[1:], dtype=bool)
    valid = np.asarray(valid, dtype=bool) & np.all(np.isfinite(a), axis=0) & np.all(np.isfinite(b), axis=0)
    if normalize and valid.any():
        a = _standardise(a, valid)
        b = _standardise(b, valid)
    diff = b - a
    mag = np.sqrt(np.sum(np.where(valid[None], diff, 0.0) ** 2, axis=0))
    return mag.astype(np.float32)


def _standardise(x, valid):
    out = np.empty_like(x)
    for i, band in enumerate(x):
        v = band[valid]
        sd = v.std()
        out[i] = (band - v.mean()) / (sd if sd > 0 else 1.0)
    return out


def otsu_threshold(values, bins=256):
    """Otsu's threshold of a 1-D sample (finite values): the cut maximising between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no values to threshold")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between = between[:-1]  # the cut lies after bin k
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    k = int(best[len(best) // 2])  # the middle of a plateau of equally good cuts (e.g. empty bins between modes)
    return float(edges[k + 1])


def cva_otsu(before, after, valid=None, normalize=True, bins=256):
    """Binary change map by CVA + Otsu: returns (change bool [H, W], magnitude [H, W], threshold).

    Pixels that are not ``valid`` are never change.
    """
    a = np.asarray(before)
    if valid is None:
        valid = np.ones(a.shape[-2:], dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    mag = change_magnitude(before, after, valid, normalize=normalize)
    if not valid.any():
        return np.zeros(valid.shape, dtype=bool), mag, float("nan")
    t = otsu_threshold(mag[valid], bins=bins)
    return (mag > t) & valid, mag, t


__all__ = ["change_magnitude", "otsu_threshold", "cva_otsu"]
