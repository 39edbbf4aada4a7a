"""Shared plumbing of every tiled task: batching and read-ahead on a reader thread.

Detection, change detection and patch classification use these with their own read and
consume steps, so no task has its own copy of the tile loop.
"""
import time
from concurrent.futures import ThreadPoolExecutor


def batched(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def prefetch(read, batches):
    """Yield ``(batch, read(batch))`` while the next batch is read on a background thread.

    GDAL releases the GIL while it reads and decodes, so reading overlaps with the model.
    ``read`` must use its own dataset handles (rasterio datasets are not thread-safe).
    """
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rs_deep-reader") as pool:
        pending = pool.submit(read, batches[0])
        for i, batch in enumerate(batches):
            result = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            yield batch, result


def rough_duration(seconds):
    """``seconds`` in words, to about two significant figures: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds, -1 if seconds >= 20 else 0)):.0f} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60):.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 10 else f"{round(hours):,.0f} h"


class Estimate:
    """Says, once the first batch has run, roughly how long the run will take: the first batch's time (model
    warm-up included, so rather more than less) times the number of batches."""

    def __init__(self, total, what, message):
        self.total, self.what, self.message = total, what, message
        self.t0 = time.time()
        self.said = False

    def after(self, done):
        if self.said or done <= 0 or done >= self.total:
            return
        self.said = True
        took = time.time() - self.t0
        self.message(f"The first {done:,} {self.what} took {took:.1f} s: the {self.total:,} {self.what} will take "
                     f"about {rough_duration(took * self.total / done)} on this machine")
