"""Patch (scene) classification: one label per square patch of a raster, with a classifier package.

Patches are laid on a regular grid from the top-left corner of the processed area: ``patch_size``
and ``stride`` are in pixels at the model's GSD (rasters at another GSD are resampled tile by tile
by :class:`.raster.RasterReader`, as segmentation does). Reading runs on a background thread
(:func:`.pipeline.prefetch`), the network on the device of :func:`.device.select_device` through
:class:`.device.ModelRunner`, ``batch_size`` patches at a time, so memory is bounded by patch x
batch whatever the size of the raster. A patch is classified when at least ``min_valid`` of the
part of it that can lie inside the processed area holds valid (not nodata) pixels.

A multi-label package (``rs_deep:multi_label``: sigmoid scores, one threshold per class) gives every patch the
classes whose score reaches their threshold (the package's ``rs_deep:class_thresholds``, or one ``threshold`` for
all classes), possibly none.
"""
import dataclasses
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..errors import InputError, ModelPackageError
from ..geo.raster import RasterReader, apply_affine
from ..limits import check_tile_memory
from ..models.tta import check_tta
from .pipeline import Estimate, batched, end_run, open_device, open_region, open_runner, prefetch, start_run

TASK = "patch_classification"
MIN_PATCH = 8


@dataclass
class PatchRun:
    """What every run over a grid of patches returns (patch classification, similarity search): ``features``, one
    dict per patch run, with its ``geometry`` (shapely polygon in the raster's CRS, the patch clipped to the
    processed area), ``row``, ``col`` (patch indices on the grid) and ``window`` (col_off, row_off, width, height:
    the clipped patch in raster pixels), and the grid."""

    features: list = field(default_factory=list)
    crs: object = None
    transform: object = None
    width: int = 0
    height: int = 0
    patch_size: int = 0  # px at the model's GSD
    stride: int = 0
    native_patch: int = 0  # px of the raster
    native_stride: int = 0
    patches: int = 0  # laid on the grid
    patches_run: int = 0  # run (enough valid pixels)
    device: str = ""
    seconds: float = 0.0
    warnings: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.features)

    def __len__(self):
        return len(self.features)


@dataclass
class PatchClassificationResult(PatchRun):
    """A :class:`PatchRun` whose patch dicts also hold ``class_id``, ``class_name``, ``score`` (the winning
    probability), ``top`` (the ``top_k`` best ``(class_id, class_name, score)``). Multi-label packages add
    ``labels`` (the class names whose score reaches their threshold, in class order), ``label_ids`` and ``scores``
    (the score of every class, in class order)."""

    gsd_scale: float = 1.0
    tta: str = "none"  # the test-time augmentation of the run (:data:`..models.tta.TTA_CHOICES`)
    multi_label: bool = False
    thresholds: list = None  # multi-label: the threshold of each class used
    class_names: list = None  # the package's classes, in order

    def class_counts(self):
        """{class name: patches}: of the winning class, or (multi-label) of every label of a patch."""
        out = {}
        for f in self.features:
            for name in (f["labels"] if self.multi_label else [f["class_name"]]):
                out[name] = out.get(name, 0) + 1
        return out


def check_patch_package(pkg):
    """A patch classifier's class count must match its network's (the task is checked by ``start_run``)."""
    if pkg.builder.get("classes") != len(pkg.classes):
        raise ModelPackageError(f"{pkg.source}: rs_deep:builder.classes is {pkg.builder.get('classes')} but "
                                f"classification:classes lists {len(pkg.classes)} classes")


def class_thresholds(pkg, threshold=None):
    """The threshold of each class of a multi-label package: ``threshold`` (THRESHOLD, one for every class) or the
    package's ``rs_deep:class_thresholds``. None for a single-label package; a ``threshold`` given for one, or
    outside (0, 1), is refused."""
    if threshold is None:
        return list(pkg.class_thresholds) if pkg.multi_label else None
    if not pkg.multi_label:
        raise InputError(f"THRESHOLD ({threshold:g}) is for multi-label classifiers; '{pkg.name}' is a single-label "
                         "classifier (softmax): each patch gets its best class, there is no score to threshold. "
                         "Leave THRESHOLD empty")
    if not 0 < threshold < 1:
        raise InputError(f"THRESHOLD must be a probability between 0 and 1 (exclusive); got {threshold:g}")
    return [float(threshold)] * len(pkg.classes)


def score_fields(class_names, prefix="score_", max_len=40):
    """The field name of each class's score in a multi-label patch layer: ``prefix`` + the name in lower-case ASCII
    letters, digits and underscores (accents dropped, other characters become ``_``), at most ``max_len``
    characters, made unique with ``_2``, ``_3``... in class order."""
    import re
    import unicodedata
    out, seen = [], set()
    for i, name in enumerate(class_names):
        text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii").lower()
        text = re.sub(r"[^a-z0-9]+", "_", text).strip("_") or f"class_{i}"
        base = (prefix + text)[:max_len]
        field, n = base, 2
        while field in seen:
            field = f"{base[:max_len - len(str(n)) - 1]}_{n}"
            n += 1
        seen.add(field)
        out.append(field)
    return out


def patch_starts(start, end, stride):
    """Regular grid of patch starts from ``start`` while a patch still begins inside [start, end)."""
    return list(range(start, end, stride)) if end > start else []


def patch_reader(reader, region, min_valid):
    """``(read, any_valid)``: ``read(batch)`` reads the patches ``batch`` [(row, col, x, y)] with ``reader`` and
    returns (data [B, C, T, T] of those with enough valid pixels, or None; whether each has: a list of bools). A
    patch is run when at least ``min_valid`` of the part of it that can lie inside ``region`` (x0, y0, x1, y1) holds
    valid pixels; ``any_valid[0]`` says whether any patch read so far had one there."""
    x0, y0, x1, y1 = region
    n, t = reader.native_tile, reader.tile
    f = t / n
    full = min(n, x1 - x0) * min(n, y1 - y0) * f * f  # most pixels a patch can have inside the area
    any_valid = [False]

    def read(batch):
        arrays, keep = [], []
        for r, c, x, y in batch:
            data, valid = reader.read_tile(x, y)
            # only the part of the patch inside the processed area counts
            cx0, cy0 = int(round((max(x, x0) - x) * f)), int(round((max(y, y0) - y) * f))
            cx1, cy1 = int(round((min(x + n, x1) - x) * f)), int(round((min(y + n, y1) - y) * f))
            inside = int(valid[cy0:cy1, cx0:cx1].sum())
            any_valid[0] = any_valid[0] or inside > 0
            ok = inside > 0 and inside >= min_valid * full - 1e-6
            keep.append(ok)
            if ok:
                arrays.append(data)
        return (np.stack(arrays) if arrays else None), keep

    return read, any_valid


def classify_patch_batch(reader, runner, seq, context, bs, check=lambda: None, on_batch=lambda done: None):
    """The patch dicts of the patches ``seq`` [(row, col, x, y)] with enough valid pixels, and whether any patch
    had a valid pixel. ``context``: region (x0, y0, x1, y1), min_valid, names, top_k, source (the package, for
    messages), thresholds (multi-label: one per class, else None). ``check()`` runs before each batch, ``on_batch(patches done)`` after it."""
    x0, y0, x1, y1 = context["region"]
    n = reader.native_tile
    read, any_valid = patch_reader(reader, context["region"], context["min_valid"])
    names, top_k, thresholds = context["names"], context["top_k"], context.get("thresholds")
    features, done = [], 0
    for batch, (data, keep) in prefetch(read, batched(seq, bs)):
        check()
        probs = runner(data) if data is not None else None
        if probs is not None and (probs.ndim != 2 or probs.shape[1] != len(names)):
            raise ModelPackageError(f"{context['source']}: the network returns {list(probs.shape[1:])} per patch; a "
                                    f"patch classifier returns one score per class ([{len(names)}])")
        j = 0
        for (r, c, x, y), ok in zip(batch, keep):
            if not ok:
                continue
            p = probs[j]
            j += 1
            order = np.argsort(-p, kind="stable")[:top_k]
            top = [(int(i), names[int(i)], float(p[i])) for i in order]
            rec = {}
            if thresholds is not None:
                ids = [i for i in range(len(p)) if p[i] >= thresholds[i]]
                rec = {"labels": [names[i] for i in ids], "label_ids": ids, "scores": [float(v) for v in p]}
            features.append({**rec,
                "geometry": patch_polygon(reader.transform, max(x, x0), max(y, y0), min(x + n, x1), min(y + n, y1)),
                "class_id": top[0][0], "class_name": top[0][1], "score": top[0][2], "top": top, "row": r, "col": c,
                "window": (max(x, x0), max(y, y0), min(x + n, x1) - max(x, x0), min(y + n, y1) - max(y, y0))})
        done += len(batch)
        on_batch(done)
    return features, any_valid[0]


def patch_block_task(reader, runner, job, i, bs):
    """Block ``i`` of a Dask run (:func:`.distributed.run_blocks` calls it on a worker): :func:`classify_patch_batch`."""
    return classify_patch_batch(reader, runner, job["patches"][i], job["context"], bs)


def classify_patches(input_path, package, *, patch_size=None, stride=None, bands=None, bounds=None, batch_size=None,
                     device="auto", top_k=3, progress=None, is_cancelled=None, match_gsd=True, min_valid=0.5,
                     log=None, max_pixels=None, tta="none", threshold=None, cluster=None, block_size=4096):
    """Classify the patches of ``input_path`` with the patch classifier ``package``.

    ``patch_size`` / ``stride``: px at the model's GSD (default: the package's patch size, and
    stride = patch size: patches side by side). ``bounds``: (xmin, ymin, xmax, ymax) in the
    raster's CRS. ``tta``: test-time augmentation, "none", "flips" (3 passes per patch) or "d4" (8 flips and
    rotations): the class probabilities of the flipped and rotated patches are averaged (:mod:`..models.tta`).
    ``threshold``: multi-label packages only: one score threshold for every class instead of the package's own.
    ``cluster``: classify the patches on a Dask cluster (:mod:`.distributed`), in blocks of about ``block_size``
    px: the same patches and classes. Returns a :class:`PatchClassificationResult` (iterable over the patch dicts).
    """
    t_start, prog, log, pkg = start_run(package, TASK, progress, is_cancelled, log)
    check_patch_package(pkg)
    tta = check_tta(tta)
    thresholds = class_thresholds(pkg, threshold)
    patch = int(patch_size) if patch_size else pkg.tile_size
    if patch < MIN_PATCH:
        raise InputError(f"PATCH_SIZE must be at least {MIN_PATCH} px; got {patch}")
    step = int(stride) if stride else patch
    if step < 1:
        raise InputError(f"STRIDE must be at least 1 px; got {step}")
    top_k = max(1, min(int(top_k), len(pkg.classes)))
    if not 0 < min_valid <= 1:
        raise InputError(f"min_valid must be in (0, 1]; got {min_valid}")
    pkg_opts = dataclasses.replace(pkg, tile_size=patch, overlap=0)
    open_reader = partial(RasterReader, input_path, bands=bands, match_gsd=match_gsd)
    reader = open_reader(pkg_opts)
    result = PatchClassificationResult(patch_size=patch, stride=step, multi_label=pkg.multi_label,
                                       thresholds=thresholds, class_names=[c.name for c in pkg.classes])
    try:
        result.warnings, (x0, y0, x1, y1) = open_region(
            reader, pkg, bounds, max_pixels, log, georef="patches get its pixel coordinates", resampled="the patches")
        result.gsd_scale = reader.scale
        from rasterio.windows import Window
        result.transform = reader.ds.window_transform(Window(x0, y0, x1 - x0, y1 - y0))
        result.crs, result.width, result.height = reader.crs, x1 - x0, y1 - y0
        n = reader.native_tile
        sn = max(1, int(round(step * reader.scale)))
        result.native_patch, result.native_stride = n, sn
        ys, xs = patch_starts(y0, y1, sn), patch_starts(x0, x1, sn)
        seq = [(r, c, x, y) for r, y in enumerate(ys) for c, x in enumerate(xs)]
        result.patches = len(seq)
        if n > x1 - x0 or n > y1 - y0:
            w = (f"PATCH_SIZE ({patch} px at the model's GSD, {n} px of the raster) is larger than the area "
                 f"classified ({x1 - x0} x {y1 - y0} px): the patches reach beyond it and are filled by mirroring "
                 "the image, so each class describes partly invented content. Choose a smaller PATCH_SIZE or a "
                 "larger area.")
            result.warnings.append(w)
            log(w)
        context = dict(region=(x0, y0, x1, y1), min_valid=min_valid, names=pkg.class_names(), top_k=top_k,
                       source=pkg.source, thresholds=thresholds)
        if thresholds is not None:
            log("Multi-label: a patch gets every class whose score reaches its threshold (" + ", ".join(
                f"{c.name} {t:g}" for c, t in zip(pkg.classes, thresholds))
                + (", THRESHOLD" if threshold is not None else ", the package's") + ")")
        if cluster:
            from .distributed import run_blocks
            result.device = f"Dask cluster {cluster}"
            check_tile_memory(patch, batch_size or 16, pkg.in_channels, 0, "PATCH_SIZE", "BATCH_SIZE")
            # blocks of whole rows of patches
            rows_per = max(1, block_size // sn)
            groups = [ys[i:i + rows_per] for i in range(0, len(ys), rows_per)]
            patches = [[q for q in seq if g[0] <= q[3] <= g[-1]] for g in groups]
            windows = [(x0, g[0], x1, min(g[-1] + n, y1)) for g in groups]
            prog.message(f"{len(seq)} patches of {n} px ({patch} px at the model's GSD), stride {sn} px, in "
                         f"{len(groups)} blocks on {cluster}")
            job = dict(open_reader=open_reader, gsd=pkg.gsd, tiling=(patch, 0), device=device,
                       batch_size=batch_size or 16, tta=tta, patches=patches, windows=windows, context=context)
            any_valid = False
            job.update(run=patch_block_task, kind="dense")
            for features, valid in run_blocks(cluster, pkg, job, prog, log, share=1.0):
                result.features += features
                any_valid = any_valid or valid
            result.features.sort(key=lambda feat: (feat["row"], feat["col"]))
        else:
            dev, result.device, bs = open_device(device, batch_size, pkg, prog, log, min_batch=16)
            runner = open_runner(pkg, dev, tta, log)
            check_tile_memory(patch, bs, pkg.in_channels, 0,
                              "PATCH_SIZE" if patch_size else f"{pkg.source}: the package's patch size",
                              "BATCH_SIZE" if batch_size else "the automatic BATCH_SIZE",
                              error=InputError if patch_size or batch_size else ModelPackageError)
            prog.message(f"{len(seq)} patches of {n} px ({patch} px at the model's GSD), stride {sn} px, batch {bs}")
            estimate = Estimate(len(seq), "patches", prog.message)

            def on_batch(done):
                prog.update(done / max(1, len(seq)))
                estimate.after(done)

            result.features, any_valid = classify_patch_batch(reader, runner, seq, context, bs, prog.check, on_batch)
        result.tta = tta
        result.patches_run = len(result.features)
        return end_run(result, reader, result.patches_run == 0 and not any_valid, False, log, t_start, prog)
    finally:
        reader.close()


def patch_polygon(transform, px0, py0, px1, py1):
    """The pixel rectangle [px0, px1) x [py0, py1) as a polygon in map coordinates."""
    from shapely.geometry import Polygon
    corners = [apply_affine(transform, x, y) for x, y in ((px0, py0), (px1, py0), (px1, py1), (px0, py1))]
    poly = Polygon(corners)
    return poly if poly.exterior.is_ccw else Polygon(corners[::-1])


__all__ = ["classify_patches", "classify_patch_batch", "patch_block_task", "patch_reader", "PatchRun",
           "PatchClassificationResult",
           "check_patch_package", "class_thresholds", "score_fields", "patch_starts", "patch_polygon"]
