"""Shared plumbing of every tiled task: batching and read-ahead on a reader thread.

Detection, change detection and patch classification use these with their own read and
consume steps, so no task has its own copy of the tile loop.
"""
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
