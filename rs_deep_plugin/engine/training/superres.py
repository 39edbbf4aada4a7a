"""Training a super-resolution model from one image, self-supervised (QGIS-free).

There is no higher-resolution truth: the pairs are made from the image itself. Each training crop of ``tile_size``
px is the target, and the same crop averaged over blocks of ``scale`` x ``scale`` px (the image as a sensor
``scale`` times coarser would see it) is the input. The network (:mod:`..models.arch_superres`, ESPCN) learns to
restore the crop from its ``scale`` times coarser version; applied to the image itself, it assumes the same detail
one level finer (the usual self-supervised assumption: textures and edges look alike across scales). Validation
does the same on a held-back strip and reports the PSNR of the network and of bicubic interpolation.

The image is scaled with one min-max for every band (1st..99th percentiles of all valid values), so that the
package's scalar ``rs_deep:value_scale`` and ``rs_deep:value_offset`` turn the output back into the image's values;
the output is written in the image's data type (8 or 16 bit, else float32). The package has no GSD: it runs on the
raster's own pixels. The loop is :func:`.loop.fit`; only the hooks differ.
"""
import math
import os

import numpy as np

from ..errors import InputError
from .augment import check_augment
from .data import (band_names as image_band_names, compute_value_scaling, model_classes, read_image, scale_image,
                   validation_split, window_dict, window_slices)
from .loop import TrainParams, check_package_tiling, check_tile, fit, import_torch
from .regression import TargetCropSampler, TargetTask

DTYPES = ("uint8", "uint16")


def psnr(pred, target, peak=1.0):
    """Peak signal-to-noise ratio (dB) of ``pred`` against ``target`` over the finite target pixels."""
    ok = np.isfinite(target)
    mse = float(np.mean((pred[ok].astype(np.float64) - target[ok]) ** 2)) if ok.any() else float("nan")
    return 10.0 * math.log10(peak * peak / mse) if mse > 0 else float("inf")


def downsample(x, scale):
    """Average over blocks of ``scale`` x ``scale`` px of a torch tensor [B, C, H, W] (H, W multiples of scale)."""
    import torch.nn.functional as F
    return F.avg_pool2d(x, scale)


def super_resolve(model, lr, device):
    """The network's output [C, s x h, s x w] (numpy) for an in-memory low-resolution image [C, h, w]."""
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(lr))[None].to(device)).float()[0].cpu().numpy()


def bicubic(lr, scale):
    """Bicubic upsampling (torch's, the network's skip) of [C, h, w] by ``scale``."""
    import torch
    import torch.nn.functional as F
    with torch.no_grad():
        return F.interpolate(torch.from_numpy(np.ascontiguousarray(lr))[None], scale_factor=scale, mode="bicubic",
                             align_corners=False)[0].numpy()


def validation_pairs(region, scale):
    """(low-resolution input [C, h, w], target [C, s x h, s x w] with NaN where unknown) of a held-back region."""
    import torch
    img, target, _ = region
    h, w = (img.shape[1] // scale) * scale, (img.shape[2] // scale) * scale
    lr = downsample(torch.from_numpy(np.ascontiguousarray(img[:, :h, :w]))[None], scale)[0].numpy()
    return lr, target[:, :h, :w]


class SuperResolutionTask(TargetTask):
    """Super-resolution: L1 between the network's output for the block-averaged crop and the crop; the best epoch
    has the highest validation PSNR (also reported: bicubic interpolation's)."""

    task = "super_resolution"
    monitor, monitor_label, curves = "psnr", "PSNR", ("psnr",)

    def __init__(self, train, val, scale, extra):
        super().__init__(train, val)
        self.scale = scale
        self.extra = extra

    def build_model(self, device, memory_format):
        from ..models.architectures import build_model, validate_builder
        b = dict(self.builder or {"library": "rs_deep", "architecture": "ESPCN"})
        b.update(in_channels=len(self.band_names), classes=len(self.classes), encoder_weights=None)
        b["params"] = dict(b.get("params") or {}, scale=self.scale)
        self.builder = validate_builder(b, "builder")
        return build_model(self.builder).to(device).to(memory_format=memory_format)

    def make_sampler(self, rng):
        return TargetCropSampler(self.train, self.tile_size, rng, brightness=0.0, contrast=0.0, gamma=0.0,
                                 noise=0.0, **self.sampler_options)

    def training_loss(self, model, batch, device, memory_format):
        import torch
        _, y = batch
        yt = torch.from_numpy(y).to(device)
        known = torch.isfinite(yt)
        x = downsample(torch.nan_to_num(yt, nan=0.0), self.scale).contiguous(memory_format=memory_format)
        out = model(x).float()
        if not bool(known.any()):
            return (out * 0).sum(), None
        return (out[known] - yt[known]).abs().mean(), None

    def validate(self, model, device, memory_format):
        if not self.val:
            return None, None
        preds, cubic, targets = [], [], []
        for region in self.val:
            lr, target = validation_pairs(region, self.scale)
            preds.append(super_resolve(model, lr, device).ravel())
            cubic.append(bicubic(lr, self.scale).ravel())
            targets.append(target.ravel())
        p, c, t = (np.concatenate(a) for a in (preds, cubic, targets))
        ok = np.isfinite(t)
        metrics = {"psnr": psnr(p, t), "psnr_bicubic": psnr(c, t), "mae": float(np.abs(p[ok] - t[ok]).mean()),
                   "mae_bicubic": float(np.abs(c[ok] - t[ok]).mean()), "pixels": int(ok.sum())}
        return metrics, metrics["mae"]

    def epoch_message(self, metrics, val_loss, best):
        return (f", val PSNR {metrics['psnr']:.2f} dB (bicubic {metrics['psnr_bicubic']:.2f} dB; best "
                f"{best['metrics']['psnr']:.2f} dB at epoch {best['epoch']})")

    def network(self):
        return (f"ESPCN x{self.scale} (self-supervised: each crop restored from its {self.scale} x {self.scale} block "
                "average)")

    def training_info(self, best_metrics):
        return {"val": best_metrics, "pairs": f"the image and its {self.scale} x {self.scale} block average"}

    def package_extra(self, best_metrics=None):
        return dict(self.extra, **{"rs_deep:scale": self.scale})


def train_super_resolution(image_path, out_dir, *, scale=2, bands=None, band_names=None, builder=None, tile_size=64,
                           val_fraction=0.2, val_side="bottom", augment=None, package_tile_size=128,
                           package_overlap=16, **options):
    """Train a super-resolution network ``scale`` times finer on ``image_path`` alone (self-supervised pairs: see
    the module) and write a model package (task super-resolution) to ``out_dir``. ``tile_size``: the training crops
    (the targets; a multiple of 32 and of ``scale``). ``builder``: an ``ESPCN`` builder (default: 32 features, 4
    blocks). ``options``: the run settings of :class:`.loop.TrainParams` (defaults: 30 epochs, batch size 16,
    patience 8, name "super-resolution-model"). Returns the training report (:func:`.loop.fit`)."""
    params = TrainParams.of(options, epochs=30, batch_size=16, weight_decay=0.0, patience=8,
                            name="super-resolution-model")
    import_torch()
    if isinstance(scale, bool) or not isinstance(scale, int) or not 2 <= scale <= 8:
        raise InputError(f"scale must be an integer 2..8 (how many times finer the output is); got {scale!r}")
    check_tile(tile_size, "tile_size")
    if tile_size % scale:
        raise InputError(f"tile_size ({tile_size}) must be a multiple of the scale ({scale})")
    check_package_tiling(package_tile_size, package_overlap)
    augment = check_augment(augment)
    augment = {k: augment[k] for k in ("flip", "rotate") if k in augment}
    params.prog.message(f"Reading {image_path}")
    ds, bands, data, valid = read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        names = image_band_names(ds, bands, band_names)
        dtypes = {ds.dtypes[b - 1] for b in bands}
    finally:
        ds.close()
    if params.input_scaling:
        raise InputError("A super-resolution model writes values in its training image's range, so it cannot scale "
                         "each input by its own percentiles: leave input_scaling (INPUT_SCALING) at its default")
    per_band = compute_value_scaling(data, valid, seed=params.seed)
    lo, hi = min(s["minimum"] for s in per_band), max(s["maximum"] for s in per_band)
    scaling = [{"type": "min-max", "minimum": lo, "maximum": hi} for _ in per_band]  # one range: a scalar inverse
    scale_image(data, valid, scaling)
    target = np.where(valid[None], data, np.nan).astype(np.float32)
    train_win, val_win = validation_split(w, h, val_fraction, val_side)
    rows, cols = window_slices(train_win)
    train = [(data[:, rows, cols], target[:, rows, cols], valid[rows, cols])]
    val = []
    if val_win is not None:
        r2, c2 = window_slices(val_win)
        val = [(np.ascontiguousarray(data[:, r2, c2]), target[:, r2, c2], valid[r2, c2])]
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES else "float32"
    extra = {"rs_deep:value_scale": hi - lo, "rs_deep:value_offset": lo, "rs_deep:output_dtype": dtype}
    task = SuperResolutionTask(train, val, scale, extra)
    task.sampler_options = augment
    task.configure(
        classes=model_classes(names, None, ["808080"] * len(names)), band_names=names, band_numbers=bands,
        builder=builder, value_scaling=scaling, gsd=None, tile_size=tile_size, augment=augment,
        package_tile_size=package_tile_size, package_overlap=package_overlap,
        settings={"scale": scale, "pairs": "self-supervised: each crop and its block average", "output_dtype": dtype},
        data={"image": os.path.basename(os.fspath(image_path)), "image_size": {"width": w, "height": h},
              "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                             "window": window_dict(val_win)}},
        samples={"train_pixels": int(valid[rows, cols].sum()),
                 "val_pixels": int(val[0][2].sum()) if val else 0})
    return fit(task, params, out_dir)


__all__ = ["train_super_resolution", "SuperResolutionTask", "psnr", "bicubic", "super_resolve", "validation_pairs"]
