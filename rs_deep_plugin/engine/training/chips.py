"""Training data as georeferenced chips with a manifest (QGIS-free).

:func:`export_training_data` cuts a raster (a before/after pair for change) and its labels into
square chips of ``tile_size`` px every ``stride`` px and writes

* ``images/NNNNN.tif`` (and ``after/NNNNN.tif`` for change): the pixels of the source raster,
  unchanged (same data type, nodata, georeferencing of the chip);
* ``labels/NNNNN.tif`` (segmentation, change): uint8 class values, 0 = background / no change,
  255 = not labelled (nodata); detection keeps its boxes in the manifest (pixel coordinates of
  the chip, plus the map coordinates);
* ``manifest.json``: format ``rs_deep-chips`` version 1: task, classes (value, name, colour),
  bands, tile size, stride, GSD, CRS, and one entry per chip with its split.

The train/validation split is by spatial blocks, not by pixels or chips drawn at random: the
raster is cut into square blocks of ``block_size`` px, a seeded random share ``val_fraction``
of the blocks that hold chips is held back for validation, and a chip that would straddle a
training and a validation block is dropped, so no pixel is seen by both sides.

Every trainer accepts the folder (or its ``manifest.json``) instead of an image and labels:
:func:`.segmentation.train_segmentation` through :func:`segmentation_regions`,
:func:`.detection.train_detection` through :func:`detection_samples`, :func:`.change.train_change` through
:func:`change_pairs`.

The chips are written to a temporary folder beside ``out_dir`` and renamed at the end: a
cancelled or failed export leaves nothing behind, and an earlier export in ``out_dir`` is only
replaced once the new one is complete.
"""
import json
import os
import time

import numpy as np

from ..errors import InputError
from ..files import write_atomic
from ..geo.labels import IGNORE, label_shapes
from ..geo.outputs import StagedFolder, check_folder_output, json_has
from ..geo.raster import apply_affine, pixel_size_metres
from ..geo.writer import write_geotiff
from ..inference.tiling import tile_starts
from ..limits import loads_json
from ..models.package import DEFAULT_COLORS
from ..progress import Progress
from .data import DetectionSample, select_bands

MANIFEST = "manifest.json"
FORMAT = "rs_deep-chips"
VERSION = 1
TASKS = ("segmentation", "detection", "change")


# --------------------------------------------------------------------------------------------
# export


def _open(path, what):
    import rasterio
    try:
        return rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the {what} raster {path}: {exc}") from exc


def _split_blocks(blocks, val_fraction, seed):
    """The set of blocks held back for validation: a seeded random share of the blocks in use."""
    blocks = sorted(blocks)
    if not val_fraction or val_fraction <= 0 or len(blocks) < 2:
        return set()
    n = min(len(blocks) - 1, max(1, int(round(len(blocks) * val_fraction))))
    order = np.random.default_rng(seed).permutation(len(blocks))
    return {blocks[i] for i in order[:n]}


ENTRIES = (MANIFEST, "images", "labels", "after")  # what an export writes in its folder


def _earlier_export(path):
    """An export of an RS Deep version before the folder marker: its manifest names the chip format."""
    return json_has(os.path.join(path, MANIFEST), "format", FORMAT)


def check_output_folder(out_dir):
    """Refuse (InputError) an ``out_dir`` that exists and is not an earlier RS Deep export nor empty."""
    check_folder_output(os.path.abspath(os.fspath(out_dir)), ENTRIES, "OUTPUT", ours=_earlier_export)


def _stage_out(out_dir, transaction):
    """The :class:`.outputs.StagedFolder` the chips are written into: a hidden folder beside ``out_dir`` (same file
    system: the final renames are atomic). An existing ``out_dir`` is used only when RS Deep wrote it (its marker,
    or the manifest of an earlier export), and then only our own entries in it are replaced."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isfile(out_dir):
        raise InputError(f"{out_dir} is a file; give a folder for the chips")
    staged = StagedFolder(out_dir, ENTRIES, "OUTPUT", ours=_earlier_export)
    if transaction is not None:
        transaction.add(staged)
    return out_dir, staged


def export_training_data(image_path, labels, out_dir, *, task="segmentation", class_names, class_colors=None,
                         after_path=None, bands=None, tile_size=256, stride=None, only_labelled=True,
                         val_fraction=0.2, block_size=None, seed=0, min_visible=0.4, progress=None,
                         is_cancelled=None, log=None, transaction=None):
    """Cut ``image_path`` (+ ``after_path`` for change) and ``labels`` into chips in ``out_dir``.

    ``labels``: ``[(shapely geometry, class value)]`` in the image CRS, or (segmentation,
    change) a label raster path (class values; 255 / nodata = not labelled; a two-class change
    mask counts every value above 0 as change, 0/1 and 0/255 alike), resampled onto
    the image grid (nearest) when it is on another grid. Segmentation and change: value 0 is the
    background / no change and ``class_names[0]`` names it; every pixel outside the polygons is
    background. Detection: each geometry's bounding box is an object of class ``value``
    (0-based index into ``class_names``); boxes cut by a chip edge are kept when at least
    ``min_visible`` of their area is inside. ``after_path`` is resampled onto the before grid
    (bilinear) when it is on another one. ``only_labelled``: keep only chips that hold a
    labelled object (segmentation, change: a non-background pixel; detection: a box).
    ``block_size`` (px, default 4 x tile size): the side of the split blocks.
    ``transaction``: an :class:`.outputs.OutputTransaction` the folder joins (committed by the caller);
    without one the folder is put in place at the end. An existing ``out_dir`` must be an earlier RS Deep export
    (or empty); only its chips and manifest are replaced.

    Returns the manifest (a dict, also written to ``out_dir/manifest.json``) with ``path``.
    """
    t0 = time.time()
    log = log or (lambda msg: None)
    prog = Progress(progress, is_cancelled)
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    class_names = [str(n) for n in (class_names or [])]
    if task == "detection" and not class_names:
        raise InputError("class_names: name the object classes (e.g. ['tree'])")
    if task != "detection" and len(class_names) < 2:
        raise InputError("class_names: give at least two classes, the background / no change first")
    colors = list(class_colors) if class_colors else [DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
                                                      for i in range(len(class_names))]
    tile_size = int(tile_size)
    stride = int(stride or tile_size)
    if tile_size < 16:
        raise InputError(f"tile_size must be at least 16 px; got {tile_size}")
    if not 0 < stride <= tile_size:
        raise InputError(f"stride must be in 1..tile_size ({tile_size}); got {stride}")
    block_size = int(block_size or 4 * tile_size)
    if block_size < tile_size:
        raise InputError(f"block_size ({block_size} px) must be at least the tile size ({tile_size} px)")
    if not 0 <= (val_fraction or 0) < 0.9:
        raise InputError(f"val_fraction must be in [0, 0.9); got {val_fraction}")
    if task == "change" and not after_path:
        raise InputError("task 'change' needs the after raster (after_path)")

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.features import rasterize
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window
    from shapely.geometry import box as sbox

    ds = _open(image_path, "image")
    closers = [ds]
    try:
        if ds.crs is None and ds.transform.is_identity:
            raise InputError(f"The image {image_path} has no georeferencing (no CRS); assign one first "
                             "(Raster > Projections > Assign Projection)")
        use = select_bands(ds, bands, ds.name)
        w, h = ds.width, ds.height
        grid = dict(crs=ds.crs, transform=ds.transform, width=w, height=h)
        after = None
        if task == "change":
            a = _open(after_path, "after")
            closers.append(a)
            select_bands(a, use, a.name)
            if a.crs is not None and ds.crs is not None and (a.crs != ds.crs or a.transform != ds.transform
                                                              or (a.width, a.height) != (w, h)):
                from rasterio.warp import transform_bounds
                ab = transform_bounds(a.crs, ds.crs, *a.bounds)
                ib = ds.bounds
                if ab[0] >= ib[2] or ab[2] <= ib[0] or ab[1] >= ib[3] or ab[3] <= ib[1]:
                    raise InputError(f"The before ({os.path.basename(str(image_path))}) and after "
                                     f"({os.path.basename(str(after_path))}) rasters do not overlap; choose two "
                                     "images of the same place")
                a = WarpedVRT(a, resampling=Resampling.bilinear, **grid)
                closers.append(a)
                log("The after raster is resampled onto the before raster's grid (bilinear)")
            elif (a.width, a.height) != (w, h):
                raise InputError(f"The after raster ({a.width}x{a.height} px) is not on the before raster's grid "
                                 f"({w}x{h} px) and has no georeferencing to align it; resample it first")
            after = a

        # labels: a raster on (or resampled onto) the image grid, or shapes for rasterize / boxes
        lab_ds = shapes = tree = None
        if isinstance(labels, (str, os.PathLike)):
            if task == "detection":
                raise InputError("Detection chips need boxes (polygons), not a label raster")
            lab_ds = _open(labels, "label")
            closers.append(lab_ds)
            if (lab_ds.width, lab_ds.height) != (w, h) or lab_ds.transform != ds.transform:
                if lab_ds.crs is None:
                    raise InputError(f"The label raster {labels} is not on the image's grid and has no CRS; "
                                     "rasterize the labels onto the image grid")
                lab_ds = WarpedVRT(lab_ds, resampling=Resampling.nearest, nodata=IGNORE, **grid)
                closers.append(lab_ds)
        else:
            from shapely import STRtree
            shapes = label_shapes(labels, len(class_names))
            if not shapes:
                raise InputError("labels: no geometries given; label the objects to learn")
            tree = STRtree([g for g, _ in shapes])
            if not len(tree.query(sbox(*ds.bounds))):
                raise InputError(f"None of the {len(shapes)} label geometries overlaps the image "
                                 f"{os.path.basename(os.fspath(image_path))}; check that the labels cover the image "
                                 "and are in its CRS")

        xs, ys = tile_starts(w, tile_size, stride), tile_starts(h, tile_size, stride)
        n_total = len(xs) * len(ys)
        out_dir, staged = _stage_out(out_dir, transaction)
        tmp = staged.tmp
        try:
            sub = {"images": os.path.join(tmp, "images"), "labels": os.path.join(tmp, "labels"),
                   "after": os.path.join(tmp, "after")}
            os.makedirs(sub["images"])
            if task != "detection":
                os.makedirs(sub["labels"])
            if task == "change":
                os.makedirs(sub["after"])
            prof = ds.profile.copy()
            for key in ("blockxsize", "blockysize", "tiled", "interleave", "photometric", "compress"):
                prof.pop(key, None)
            prof.update(driver="GTiff", count=len(use), compress="deflate")
            lab_prof = dict(driver="GTiff", count=1, dtype="uint8", nodata=IGNORE, crs=ds.crs, compress="deflate")

            chips, skipped_empty, skipped_nodata = [], 0, 0
            tp = prog.sub(0.0, 0.97)
            done = 0
            for y0 in ys:
                for x0 in xs:
                    done += 1
                    tp.update(done / n_total)
                    cw, ch = min(tile_size, w - x0), min(tile_size, h - y0)
                    win = Window(x0, y0, cw, ch)
                    wt = ds.window_transform(win)
                    valid = np.all(ds.read_masks(use, window=win) > 0, axis=0)
                    if after is not None:
                        valid &= np.all(after.read_masks(use, window=win) > 0, axis=0)
                    if not valid.any():
                        skipped_nodata += 1
                        continue
                    entry = {"row": int(y0), "col": int(x0), "width": int(cw), "height": int(ch)}
                    b = rasterio.windows.bounds(win, ds.transform)
                    entry["bounds"] = [round(float(v), 6) for v in b]
                    if task == "detection":
                        chip_box = sbox(*b)
                        boxes = []
                        for j in tree.query(chip_box):
                            g, value = shapes[int(j)]
                            gx0, gy0, gx1, gy1 = g.bounds
                            full = max((gx1 - gx0) * (gy1 - gy0), 1e-12)
                            ix0, iy0 = max(gx0, b[0]), max(gy0, b[1])
                            ix1, iy1 = min(gx1, b[2]), min(gy1, b[3])
                            if ix1 <= ix0 or iy1 <= iy0 or (ix1 - ix0) * (iy1 - iy0) / full < min_visible:
                                continue
                            px0, py0 = apply_affine(~wt, ix0, iy1)
                            px1, py1 = apply_affine(~wt, ix1, iy0)
                            boxes.append([round(float(max(0.0, px0)), 2), round(float(max(0.0, py0)), 2),
                                          round(float(min(cw, px1)), 2), round(float(min(ch, py1)), 2), int(value)])
                        if only_labelled and not boxes:
                            skipped_empty += 1
                            continue
                        entry["boxes"] = boxes
                        lab = None
                    else:
                        if lab_ds is not None:
                            raw = lab_ds.read(1, window=win)
                            lmask = lab_ds.read_masks(1, window=win) > 0
                            raw = np.where(np.isfinite(raw), raw, IGNORE) if np.issubdtype(raw.dtype, np.floating) \
                                else raw
                            raw = raw.astype(np.int64)
                            if task == "change" and len(class_names) == 2:
                                raw = (raw > 0).astype(np.int64)  # change masks: 0/1 or 0/255
                            bad = np.unique(raw[lmask & (raw != IGNORE) & ((raw < 0) | (raw >= len(class_names)))])
                            if bad.size:
                                raise InputError(f"The label raster {labels} holds class values "
                                                 f"{bad[:10].tolist()} but only {len(class_names)} classes are "
                                                 f"named (0..{len(class_names) - 1}; 255 = not labelled)")
                            lab = np.where(lmask, raw, IGNORE).astype(np.uint8)
                        else:
                            hits = [shapes[int(j)] for j in tree.query(sbox(*b))]
                            lab = (rasterize(hits, out_shape=(ch, cw), transform=wt, fill=0, dtype="uint8")
                                   if hits else np.zeros((ch, cw), np.uint8))
                        lab[~valid] = IGNORE
                        counts = np.bincount(lab[lab != IGNORE].ravel(), minlength=len(class_names))
                        if only_labelled and not counts[1:].any():
                            skipped_empty += 1
                            continue
                        entry["class_pixels"] = {class_names[i]: int(c)
                                                 for i, c in enumerate(counts[:len(class_names)])}
                    cid = f"{len(chips):05d}"
                    chip_prof = dict(prof, width=cw, height=ch, transform=wt)
                    entry["id"] = cid
                    entry["image"] = f"images/{cid}.tif"
                    # each chip is checked as written: GDAL reports a full disk without an exception
                    write_geotiff(os.path.join(tmp, entry["image"]), ds.read(use, window=win),
                                  os.path.join(out_dir, entry["image"]), sync=False, **chip_prof)
                    if after is not None:
                        entry["after"] = f"after/{cid}.tif"
                        write_geotiff(os.path.join(tmp, entry["after"]), after.read(use, window=win),
                                      os.path.join(out_dir, entry["after"]), sync=False,
                                      **dict(chip_prof, dtype=after.dtypes[0]))
                    if lab is not None:
                        entry["label"] = f"labels/{cid}.tif"
                        write_geotiff(os.path.join(tmp, entry["label"]), lab, os.path.join(out_dir, entry["label"]),
                                      sync=False, **dict(lab_prof, width=cw, height=ch, transform=wt))
                    chips.append(entry)
            if not chips:
                raise InputError(("No chip holds labelled objects" if only_labelled and skipped_empty else
                                  "No chip holds valid pixels (the raster is all nodata)")
                                 + "; check that the labels overlap the raster and are in its CRS")

            # ---- split by spatial blocks -------------------------------------------------------
            def blocks_of(e):
                bx0, by0 = e["col"] // block_size, e["row"] // block_size
                bx1 = (e["col"] + e["width"] - 1) // block_size
                by1 = (e["row"] + e["height"] - 1) // block_size
                return {(bx, by) for bx in range(bx0, bx1 + 1) for by in range(by0, by1 + 1)}

            used = set()
            for e in chips:
                used |= blocks_of(e)
            val_blocks = _split_blocks(used, val_fraction, seed)
            kept, dropped = [], 0
            for e in chips:
                sides = {bk in val_blocks for bk in blocks_of(e)}
                if len(sides) > 1:
                    dropped += 1
                    for key in ("image", "after", "label"):
                        if key in e:
                            os.remove(os.path.join(tmp, e[key]))
                    continue
                e["split"] = "val" if sides.pop() else "train"
                kept.append(e)
            chips = kept
            n_train = sum(e["split"] == "train" for e in chips)
            n_val = len(chips) - n_train
            if n_train == 0:
                raise InputError("Every chip fell in a validation block; lower val_fraction or block_size")
            if val_fraction and n_val == 0:
                log("Warning: no chip is held back for validation (too few blocks hold labelled chips); lower "
                    "block_size or label a larger area")

            manifest = {
                "format": FORMAT, "version": VERSION, "task": task, "created_by": "RS Deep",
                "source": {"image": os.path.basename(os.fspath(image_path)),
                           "after": os.path.basename(os.fspath(after_path)) if after_path else None,
                           "width": w, "height": h,
                           "crs": ds.crs.to_wkt() if ds.crs else None,
                           "transform": list(ds.transform)[:6]},
                "bands": use,
                "band_names": [ds.descriptions[b - 1] or f"b{b}" for b in use],
                "dtype": ds.dtypes[use[0] - 1],
                "nodata": ds.nodata,
                "gsd": pixel_size_metres(ds.crs, ds.transform, w, h),
                "classes": [{"value": i, "name": n, "color": str(c).lstrip("#").upper()}
                            for i, (n, c) in enumerate(zip(class_names, colors))],
                "tile_size": tile_size, "stride": stride, "only_labelled": bool(only_labelled),
                "split": {"method": "spatial blocks", "block_size": block_size, "val_fraction": val_fraction or 0.0,
                          "seed": seed, "blocks": len(used), "val_blocks": sorted([list(b) for b in val_blocks]),
                          "train_chips": n_train, "val_chips": n_val, "dropped_on_block_edges": dropped},
                "skipped": {"without_labels": skipped_empty, "all_nodata": skipped_nodata},
                "chips": chips,
            }
            if task == "detection":
                manifest["boxes"] = {"train": sum(len(e["boxes"]) for e in chips if e["split"] == "train"),
                                     "val": sum(len(e["boxes"]) for e in chips if e["split"] == "val")}
            write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1),
                         name=os.path.join(out_dir, MANIFEST))
            prog.update(0.98, "Moving the chips into place")
            if transaction is None:
                staged.commit()
        except BaseException:
            staged.discard()
            raise
    finally:
        for c in reversed(closers):
            try:
                c.close()
            except Exception:
                pass
    if progress is not None:
        progress(1.0, f"{len(chips)} chips written to {out_dir}")
    log(f"{len(chips)} chips of {tile_size} px ({n_train} training, {n_val} validation in "
        f"{len(val_blocks)} of {len(used)} blocks of {block_size} px; {dropped} dropped on block edges, "
        f"{skipped_empty} without labels skipped) in {time.time() - t0:.1f} s")
    return dict(manifest, path=os.path.join(out_dir, MANIFEST))


# --------------------------------------------------------------------------------------------
# reading


def manifest_path(path):
    """The manifest.json of a chip folder (or the file itself), or None when ``path`` is not a chip set."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return None
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, MANIFEST)
    if os.path.basename(p) != MANIFEST or not os.path.isfile(p):
        return None
    return p


def is_chip_set(path):
    return manifest_path(path) is not None


def load_manifest(path, task=None):
    """The manifest of a chip folder, with absolute chip paths; checks the format, the task and the files."""
    p = manifest_path(path)
    if p is None:
        raise InputError(f"{path} is not a chip folder: it holds no {MANIFEST} (export one with "
                         "rs_deep:export_training_data)")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"Cannot read the chip manifest {p}: {exc}") from exc
    m = loads_json(data, f"The chip manifest {p}", error=InputError,
                   fix="export the chips again with rs_deep:export_training_data")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{p} is not an RS Deep chip manifest (format {FORMAT!r} expected)")
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{p}: version is {version!r}; expected a whole number (this RS Deep reads version "
                         f"{'1' if VERSION == 1 else f'1 to {VERSION}'}). Export the chips again with "
                         "rs_deep:export_training_data")
    if version > VERSION:
        raise InputError(f"{p} is chip format version {m.get('version')}; this RS Deep reads up to {VERSION}: "
                         "update the plugin")
    _check_manifest(m, p)
    if task and m.get("task") != task:
        raise InputError(f"The chips in {os.path.dirname(p)} are for {m.get('task')}, not {task}; choose the "
                         f"task {m.get('task')} or export chips for {task}")
    root = os.path.dirname(os.path.abspath(p))
    for e in m.get("chips", []):
        for key in ("image", "after", "label"):
            if key in e:
                full = os.path.normpath(os.path.join(root, e[key]))
                if not full.startswith(root + os.sep):
                    raise InputError(f"{p}: chip {e.get('id')} points outside its folder ({e[key]})")
                if not os.path.isfile(full):
                    raise InputError(f"{p}: the chip file {e[key]} is missing; export the chips again")
                e[key] = full
    if not m.get("chips"):
        raise InputError(f"{p} lists no chips")
    m["root"] = root
    return m


def _check_manifest(m, p):
    """The types of the manifest fields the trainers read (a hand-edited manifest gets a message, not a
    traceback)."""
    def bad(key, expected):
        return InputError(f"{p}: {key} is {_short(m, key)}; expected {expected}. Export the chips again with "
                          "rs_deep:export_training_data")

    if m.get("task") not in TASKS:
        raise bad("task", f"one of {', '.join(TASKS)}")
    classes = m.get("classes")
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, dict) and isinstance(c.get("value"), int) and not isinstance(c.get("value"), bool)
            and isinstance(c.get("name"), str) for c in classes):
        raise bad("classes", "a non-empty list of {value, name, color}")
    bands = m.get("bands")
    if not isinstance(bands, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bands):
        raise bad("bands", "a list of band numbers")
    for key in ("source", "split"):
        if not isinstance(m.get(key), dict):
            raise bad(key, "an object")
    for key in ("train_chips", "val_chips"):
        v = m["split"].get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"{p}: split.{key} is {v!r}; expected a number of chips. Export the chips again")
    chips = m.get("chips")
    if not isinstance(chips, list):
        raise bad("chips", "a list of chip entries")
    files = {"segmentation": ("image", "label"), "detection": ("image",), "change": ("image", "after", "label")}
    for i, e in enumerate(chips):
        ok = isinstance(e, dict) and all(isinstance(e.get(k), str) for k in files[m["task"]]) \
            and e.get("split", "train") in ("train", "val")
        if ok and m["task"] == "detection":
            boxes = e.get("boxes")
            ok = isinstance(boxes, list) and all(
                isinstance(b, list) and len(b) == 5 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in b) for b in boxes)
        if not ok:
            raise InputError(f"{p}: chip entry {i} is {str(e)[:200]}; expected an object with "
                             f"{', '.join(files[m['task']])} (relative paths), split 'train' or 'val'"
                             f"{' and boxes [[xmin, ymin, xmax, ymax, class]]' if m['task'] == 'detection' else ''}. "
                             "Export the chips again with rs_deep:export_training_data")


def _short(m, key):
    return repr(m[key])[:100] if key in m else "missing"


def class_info(manifest):
    """(class names, colours) of a manifest."""
    classes = sorted(manifest["classes"], key=lambda c: c["value"])
    return [c["name"] for c in classes], [c.get("color") or DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
                                          for i, c in enumerate(classes)]


def split_chips(manifest):
    """(training chips, validation chips) of a manifest."""
    train = [e for e in manifest["chips"] if e.get("split", "train") == "train"]
    val = [e for e in manifest["chips"] if e.get("split") == "val"]
    return train, val


def detection_samples(manifest):
    """(training samples, validation samples or None) for :func:`.detection.train_detection`."""
    train, val = split_chips(manifest)

    def samples(chips, edge):
        return [DetectionSample(e["image"], [tuple(b) for b in e["boxes"]], name=e["id"], boxes_at_window_edge=edge)
                for e in chips]

    return samples(train, "clip"), (samples(val, "centre") or None)


def change_pairs(manifest):
    """(training pairs, validation pairs or None) for :func:`.change.train_change`."""
    train, val = split_chips(manifest)
    return ([(e["image"], e["after"], e["label"]) for e in train],
            [(e["image"], e["after"], e["label"]) for e in val] or None)


def segmentation_regions(manifest):
    """Chips as in-memory regions: ``(train, val)``, each a list of ``(img float32 [C,H,W] raw, lab uint8, valid)``."""
    import rasterio
    out = ([], [])
    train, val = split_chips(manifest)
    n = len(manifest["classes"])
    for side, chips in enumerate((train, val)):
        for e in chips:
            with rasterio.open(e["image"]) as ds:
                img = ds.read(out_dtype="float32")
                valid = np.all(ds.read_masks() > 0, axis=0)
            with rasterio.open(e["label"]) as ls:
                lab = ls.read(1)
            lab = lab.copy()
            lab[(lab >= n) & (lab != IGNORE)] = IGNORE
            lab[~valid] = IGNORE
            out[side].append((img, lab, valid))
    return out


__all__ = ["export_training_data", "load_manifest", "is_chip_set", "manifest_path", "class_info", "split_chips",
           "detection_samples", "change_pairs", "segmentation_regions", "MANIFEST", "FORMAT"]
