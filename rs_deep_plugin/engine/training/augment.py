"""Augmentation of training crops: flips and 90-degree rotations of images, labels and boxes, resizing, and
the photometric jitter, written once for every sampler (:mod:`.samplers`).

The ``augment`` switches of every trainer (:data:`AUGMENT_KEYS`): ``flip``, ``rotate`` (geometric, on by
default) and the jitter of the scaled values: ``brightness`` (shift), ``contrast`` (log factor), ``gamma``
(log exponent) and ``noise`` (max Gaussian sigma); 0 turns one off.
"""
import math

import numpy as np

from ..errors import InputError

AUGMENT_KEYS = ("flip", "rotate", "brightness", "contrast", "gamma", "noise")


def check_augment(augment, keys=AUGMENT_KEYS):
    """``augment`` as a dict, with a clear error for unknown keys."""
    augment = dict(augment or {})
    unknown = set(augment) - set(keys)
    if unknown:
        raise InputError(f"augment: unknown keys {sorted(unknown)}; use {', '.join(keys)}")
    return augment


def draw_geometry(rng, rotate=True, flip=True):
    """(quarter turns 0..3, left-right flip?) drawn for one crop (nothing drawn for a switch that is off)."""
    k = int(rng.integers(4)) if rotate else 0
    flipped = bool(flip and rng.random() < 0.5)
    return k, flipped


def rot90(a, k):
    """``a`` ([C, H, W] or [H, W]) rotated by ``k`` quarter turns in its last two axes."""
    return np.rot90(a, k, axes=(a.ndim - 2, a.ndim - 1)) if k else a


def flip(a):
    """``a`` ([C, H, W] or [H, W]) flipped left-right."""
    return a[..., ::-1]


def rot90_boxes(boxes, size, k):
    """Boxes after :func:`rot90` by ``k`` of a ``size`` x ``size`` image."""
    b = boxes.copy()
    for _ in range(k % 4):
        b = np.stack([b[:, 1], size - b[:, 2], b[:, 3], size - b[:, 0]], axis=1)
    return b


def flip_boxes(boxes, size):
    """Boxes after :func:`flip` of a ``size`` wide image."""
    return np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], axis=1)


def photometric(img, valid, rng, brightness=0.1, contrast=0.25, gamma=0.0, noise=0.03):
    """Jitter the scaled values of ``img`` [C, H, W] (float32, in place): gamma (positive values), contrast
    about the mean of the valid pixels, brightness (plus a small independent shift per band), Gaussian noise;
    invalid pixels stay 0 (as inference reads nodata). Returns ``img``."""
    if gamma > 0:
        g = math.exp(rng.uniform(-gamma, gamma))
        pos = img > 0
        img[pos] = img[pos] ** g
    c = math.exp(rng.uniform(-contrast, contrast))
    b = rng.uniform(-brightness, brightness)
    mean = float(img[:, valid].mean()) if valid.any() else 0.0
    img -= mean
    img *= c
    img += mean + b
    if img.shape[0] > 1:  # small independent shift per band
        img += rng.uniform(-brightness / 3, brightness / 3, size=(img.shape[0], 1, 1)).astype(np.float32)
    sigma = rng.uniform(0.0, noise)
    if sigma > 0:
        img += rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    if not valid.all():
        img[:, ~valid] = 0.0
    return img


def resize(img, size, *masks):
    """``img`` [C, h, h] bilinear (antialiased when shrinking) and ``masks`` [h, h] nearest, to ``size`` x
    ``size``; returns ``(img, *masks)``, each mask in its own dtype (bool masks by > 0.5)."""
    import torch
    import torch.nn.functional as F
    src = img.shape[1]
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(img))[None]
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=src > size)[0].numpy()
        resized = []
        if masks:
            stack = np.stack(masks).astype(np.float32)
            near = F.interpolate(torch.from_numpy(stack)[None], size=(size, size), mode="nearest")[0].numpy()
            resized = [m > 0.5 if mask.dtype == bool else m.astype(mask.dtype) for m, mask in zip(near, masks)]
    return (out, *resized)


__all__ = ["AUGMENT_KEYS", "check_augment", "draw_geometry", "rot90", "flip", "rot90_boxes", "flip_boxes",
           "photometric", "resize"]
