"""Where training crops come from: random augmented crops of in-memory images (QGIS-free).

* :class:`CropSampler` / :class:`MultiCropSampler`: image + label crops (segmentation), from one region or
  several (chips);
* :class:`PairSampler`: crops of before/after pairs stacked as one image (change);
* :class:`PatchSampler`: crops with their majority label (patch classification);
* :class:`BoxCropSampler`: crops with their boxes (detection).

Every crop is rescaled by a random factor in ``scale_range``, rotated and flipped and jittered by
:mod:`.augment`. All samplers of one run share one seeded ``numpy.random.Generator``.
"""
import math

import numpy as np

from ..errors import InputError
from ..geo.labels import IGNORE, clip_boxes
from ..geo.rotated import transform_rboxes
from .augment import draw_geometry, flip, flip_boxes, photometric, resize, rot90, rot90_boxes
from .data import pad_to, patch_label, renumber

#: the tasks whose crops can be centred on a labelled pixel, and the default share of such crops (the rest drawn
#: anywhere): ``foreground_prob`` of train_segmentation / train_change, rs_deep:train OBJECT_CROPS. Segmentation's
#: was 0.5 until 0.14.0: a quarter gave a better building IoU on a held-out area in 4 seeds of 6, 0.285 against
#: 0.263 on average (README)
OBJECT_CROPS = {"segmentation": 0.25, "change": 0.5}
#: segmentation's copy-paste (``paste_prob`` of train_segmentation, rs_deep:train AUGMENT copy_paste): the share of
#: training crops into which 1-3 labelled objects of the training image are pasted (:meth:`CropSampler.paste`)
COPY_PASTE = 0.5


def _scale_range(scale_range):
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise InputError(f"scale_range must be (low, high) with 0 < low <= high; got {scale_range}")
    return float(lo), float(hi)


def _draw_scale(rng, scale_range):
    lo, hi = scale_range
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo


class CropSampler:
    """Random augmented training crops from an in-memory region.

    ``img`` [C, H, W] scaled float32 (0 at nodata), ``lab`` [H, W] uint8 (IGNORE = not used),
    ``valid`` [H, W] bool (False at nodata: those pixels stay 0 after augmentation, as at inference).
    ``paste_prob``: the share of crops that get labelled objects pasted into them (:meth:`paste`).
    """

    def __init__(self, img, lab, valid, tile, rng, scale_range=(0.8, 1.25), foreground_prob=0.5,
                 brightness=0.1, contrast=0.25, gamma=0.25, noise=0.03, flip=True, rotate=True, paste_prob=0.0):
        self.tile = tile
        self.flip, self.rotate = bool(flip), bool(rotate)
        self.paste_prob = float(paste_prob)
        self.scale_range = _scale_range(scale_range)
        max_src = int(math.ceil(tile * max(1.0, self.scale_range[1]))) + 1
        self.img, self.lab, self.valid = pad_to(img, lab, valid, max_src, max_src)
        self.rng = rng
        self.foreground_prob = foreground_prob
        self.brightness, self.contrast, self.gamma, self.noise = brightness, contrast, gamma, noise
        self.fg = np.flatnonzero(((self.lab > 0) & (self.lab != IGNORE)).ravel())

    def _crop(self):
        rng, t = self.rng, self.tile
        h, w = self.lab.shape
        src = max(8, min(int(round(t * _draw_scale(rng, self.scale_range))), h, w))
        if self.fg.size and rng.random() < self.foreground_prob:
            p = int(self.fg[rng.integers(self.fg.size)])
            r, c = divmod(p, w)
            y0 = min(max(r - int(rng.integers(src)), 0), h - src)
            x0 = min(max(c - int(rng.integers(src)), 0), w - src)
        else:
            y0 = int(rng.integers(h - src + 1))
            x0 = int(rng.integers(w - src + 1))
        img = self.img[:, y0:y0 + src, x0:x0 + src]
        lab = self.lab[y0:y0 + src, x0:x0 + src]
        valid = self.valid[y0:y0 + src, x0:x0 + src]
        if src != t:
            img, lab, valid = resize(img, t, lab, valid)
        return img, lab, valid

    def paste(self, img, lab, valid):
        """Copy-paste, in place: 1-3 objects of the region pasted at random places of the crop ``img``, ``lab``,
        ``valid`` (tile x tile), their labels with them. An object is the labelled (non-background) pixels of a
        window of a quarter of the tile around a labelled pixel drawn at random, turned and flipped (a house with
        its neighbours' corners, a part of a field): the network sees the objects on other ground than their
        own (a roof in the forest), which a few dozen labelled objects cannot show it otherwise."""
        rng, t = self.rng, self.tile
        h, w = self.lab.shape
        s = max(8, t // 4)
        for _ in range(int(rng.integers(1, 4))):
            r, c = divmod(int(self.fg[rng.integers(self.fg.size)]), w)
            y0, x0 = min(max(r - s // 2, 0), h - s), min(max(c - s // 2, 0), w - s)
            pi, pl, pv = self.img[:, y0:y0 + s, x0:x0 + s], self.lab[y0:y0 + s, x0:x0 + s], \
                self.valid[y0:y0 + s, x0:x0 + s]
            k, flipped = draw_geometry(rng, self.rotate, self.flip)
            pi, pl, pv = rot90(pi, k), rot90(pl, k), rot90(pv, k)
            if flipped:
                pi, pl, pv = flip(pi), flip(pl), flip(pv)
            m = (pl > 0) & (pl != IGNORE) & pv
            ty, tx = int(rng.integers(t - s + 1)), int(rng.integers(t - s + 1))
            img[:, ty:ty + s, tx:tx + s][:, m] = pi[:, m]
            lab[ty:ty + s, tx:tx + s][m] = pl[m]
            valid[ty:ty + s, tx:tx + s][m] = True

    def sample(self):
        img, lab, valid = self._crop()
        k, flipped = draw_geometry(self.rng, self.rotate, self.flip)
        img, lab, valid = rot90(img, k), rot90(lab, k), rot90(valid, k)
        if flipped:
            img, lab, valid = flip(img), flip(lab), flip(valid)
        img = np.array(img, dtype=np.float32)  # contiguous copies
        lab = np.array(lab, dtype=np.uint8)
        valid = np.array(valid, dtype=bool)
        if self.paste_prob > 0 and self.fg.size and self.rng.random() < self.paste_prob:
            self.paste(img, lab, valid)
        if not (self.gamma > 0 or self.contrast > 0 or self.brightness > 0 or self.noise > 0):
            return img, lab
        return photometric(img, valid, self.rng, self.brightness, self.contrast, self.gamma, self.noise), lab

    def batch(self, n):
        imgs, labs = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(labs)


class MultiCropSampler:
    """Crops from several regions (chips): a region is drawn in proportion to its area, then cropped
    and augmented by its own :class:`CropSampler` (all share ``rng``)."""

    def __init__(self, regions, tile, rng, **kwargs):
        self.samplers = [CropSampler(img, lab, valid, tile, rng, **kwargs) for img, lab, valid in regions]
        area = np.array([lab.size for _, lab, _ in regions], dtype=np.float64)
        self.p = area / area.sum()
        self.rng = rng

    def sample(self):
        return self.samplers[int(self.rng.choice(len(self.samplers), p=self.p))].sample()

    def batch(self, n):
        imgs, labs = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(labs)


class PairSampler:
    """Augmented crops from several pairs ([2C, H, W]: before bands, then after bands); a pair is drawn with
    probability ``weights`` (default: its area). Each date gets its own gain/offset (``date_jitter``) and,
    with ``swap_dates``, the dates are swapped half of the time."""

    def __init__(self, images, labels, valids, tile, rng, weights=None, swap_dates=True, date_jitter=0.1,
                 **crop_options):
        self.samplers = [CropSampler(img, lab, v, tile, rng, **crop_options)
                         for img, lab, v in zip(images, labels, valids)]
        w = np.asarray(weights if weights is not None else [lab.size for lab in labels], dtype=np.float64)
        self.p = w / w.sum()
        self.rng = rng
        self.swap = swap_dates
        self.date_jitter = date_jitter

    def batch(self, n):
        rng = self.rng
        imgs, labs = [], []
        for _ in range(n):
            img, lab = self.samplers[int(rng.choice(len(self.samplers), p=self.p))].sample()
            c = img.shape[0] // 2
            if self.date_jitter > 0:  # each date its own exposure: seasons, sensors, sun
                for d in (0, 1):
                    part = img[d * c:(d + 1) * c]
                    m = float(part.mean())
                    g = math.exp(rng.uniform(-self.date_jitter, self.date_jitter) * 2)
                    part -= m
                    part *= g
                    part += m + rng.uniform(-self.date_jitter, self.date_jitter)
            if self.swap and rng.random() < 0.5:
                img = np.concatenate([img[c:], img[:c]], axis=0)
            imgs.append(img)
            labs.append(lab)
        return np.stack(imgs), np.stack(labs)


class PatchSampler:
    """Random augmented patches with their majority label (see :func:`.data.patch_label`); patches whose
    majority covers less than ``min_purity`` of their labelled pixels are drawn again."""

    def __init__(self, img, lab, valid, patch, n_classes, rng, min_purity=0.5, **crop_options):
        self.crops = CropSampler(img, lab, valid, patch, rng, foreground_prob=0.0, **crop_options)
        self.k = n_classes
        self.min_purity = min_purity

    def batch(self, n, max_tries=200):
        imgs, labels = [], []
        while len(imgs) < n:
            for _ in range(max_tries):
                img, lab = self.crops.sample()
                k, purity = patch_label(lab, self.k)
                if k is not None and purity >= self.min_purity:
                    break
            else:
                raise InputError("No training patch is labelled and pure enough: check that the labels cover the "
                                 "image, or lower min_purity")
            imgs.append(img)
            labels.append(k)
        return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def rot90_points(x, y, size, k, flipped):
    """Points of a ``size`` x ``size`` image after :func:`.augment.rot90` by ``k`` then a left-right flip (as
    :func:`.augment.rot90_boxes` and :func:`.augment.flip_boxes` move boxes)."""
    for _ in range(k % 4):
        x, y = y, size - x
    if flipped:
        x = size - x
    return x, y


def mask_boxes(masks):
    """Boxes [N, 4] (xmin, ymin, xmax, ymax, pixel edges) enclosing the masks [N, H, W] (none empty)."""
    if not len(masks):
        return np.zeros((0, 4))
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    h, w = masks.shape[1:]
    return np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)],
                    axis=1).astype(np.float64)


class BoxCropSampler:
    """Random augmented square crops with their boxes from in-memory images at the model's GSD.

    ``items``: :class:`.data.LoadedSample` (scaled). Images are picked in proportion to their area, or to
    ``weights`` (one per image) when given; a share ``object_prob`` of the crops is placed on a box. Crops
    reaching beyond an image are zero there (as the engine reads beyond a raster). Boxes keeping less than
    ``min_visible`` of their area in a crop are dropped. ``gamma`` is off (0) by default for boxes. Oriented
    samples (``rboxes``) give their rotated boxes [N, 5], moved with the crop, its scale, turns and flips; instance
    samples (``instances``) also their masks [N, T, T], and the boxes enclosing them."""

    def __init__(self, items, tile, rng, scale_range=(0.8, 1.25), object_prob=0.7, min_visible=0.4,
                 brightness=0.1, contrast=0.25, noise=0.03, weights=None, flip=True, rotate=True, gamma=0.0):
        self.items = items
        self.flip, self.rotate = bool(flip), bool(rotate)
        self.tile = tile
        self.rng = rng
        self.scale_range = _scale_range(scale_range)
        self.object_prob = object_prob
        self.min_visible = min_visible
        self.brightness, self.contrast, self.gamma, self.noise = brightness, contrast, gamma, noise
        area = np.array([it.valid.size for it in items], dtype=np.float64)
        if weights is not None:
            area = np.asarray(weights, dtype=np.float64).reshape(-1)
            if len(area) != len(items) or not np.all(np.isfinite(area)) or np.any(area < 0) or not area.sum() > 0:
                raise InputError(f"sample_weights: expected {len(items)} non-negative numbers (one per training "
                                 f"image), not all 0; got {list(weights)}")
        self.p = area / area.sum()

    def _crop(self):
        rng, t = self.rng, self.tile
        it = self.items[int(rng.choice(len(self.items), p=self.p))]
        c, h, w = it.img.shape
        src = max(8, int(round(t * _draw_scale(rng, self.scale_range))))
        if len(it.boxes) and rng.random() < self.object_prob:
            b = it.boxes[int(rng.integers(len(it.boxes)))]
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            x0 = int(round(cx - rng.uniform(0.1, 0.9) * src))
            y0 = int(round(cy - rng.uniform(0.1, 0.9) * src))
        else:
            x0 = int(rng.integers(min(0, w - src), max(0, w - src) + 1))
            y0 = int(rng.integers(min(0, h - src), max(0, h - src) + 1))
        x0 = min(max(x0, min(0, w - src)), max(0, w - src))
        y0 = min(max(y0, min(0, h - src)), max(0, h - src))
        img = np.zeros((c, src, src), dtype=np.float32)
        valid = np.zeros((src, src), dtype=bool)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + src, w), min(y0 + src, h)
        img[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = it.img[:, iy0:iy1, ix0:ix1]
        valid[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = it.valid[iy0:iy1, ix0:ix1]
        boxes = it.boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
        boxes, kept = clip_boxes(boxes, np.arange(len(it.boxes)), src, src, self.min_visible)
        labels = it.labels[kept]
        rboxes = inst = None
        if it.rboxes is not None:  # an oriented sample: its rotated boxes follow the crop (whole, not clipped)
            rboxes = transform_rboxes(it.rboxes[kept], lambda x, y: ((x - x0) * (t / src), (y - y0) * (t / src)))
        if it.instances is not None:  # an instance sample: its objects' pixels, numbered as the kept boxes
            inst = np.zeros((src, src), dtype=np.int32)
            inst[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = renumber(it.instances[iy0:iy1, ix0:ix1], kept,
                                                                  len(it.boxes))
        if src != t:
            img, valid, *inst = resize(img, t, valid, *([] if inst is None else [inst]))
            inst = inst[0] if inst else None
            boxes = boxes * (t / src)
        return img, valid, boxes, labels, rboxes, inst

    def sample(self):
        t = self.tile
        img, valid, boxes, labels, rboxes, inst = self._crop()
        k, flipped = draw_geometry(self.rng, self.rotate, self.flip)
        if k:
            img, valid = rot90(img, k), rot90(valid, k)
            inst = None if inst is None else rot90(inst, k)
            boxes = rot90_boxes(boxes, t, k)
        if flipped:
            img, valid = flip(img), flip(valid)
            inst = None if inst is None else flip(inst)
            boxes = flip_boxes(boxes, t)
        if rboxes is not None:
            rboxes = transform_rboxes(rboxes, lambda x, y: rot90_points(x, y, t, k, flipped))
        img = np.array(img, dtype=np.float32)
        valid = np.array(valid, dtype=bool)
        img = photometric(img, valid, self.rng, self.brightness, self.contrast, self.gamma, self.noise)
        if inst is not None:  # an instance sample: (image, boxes of the masks, labels, masks [N, T, T])
            masks = np.asarray(inst)[None] == np.arange(1, len(labels) + 1, dtype=np.int32)[:, None, None]
            seen = masks.any(axis=(1, 2))
            masks, labels = masks[seen], labels[seen]
            return img, mask_boxes(masks).astype(np.float32), labels, masks
        # an oriented sample gives its rotated boxes [N, 5] (cx, cy, length, width, theta), the others boxes [N, 4]
        return img, (boxes if rboxes is None else rboxes).astype(np.float32), labels

    def batch(self, n):
        return [self.sample() for _ in range(n)]


__all__ = ["OBJECT_CROPS", "COPY_PASTE", "CropSampler", "MultiCropSampler", "PairSampler", "PatchSampler",
           "BoxCropSampler", "rot90_points", "mask_boxes"]
