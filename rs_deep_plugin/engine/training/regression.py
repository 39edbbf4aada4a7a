"""Training a regression model (a value per pixel) from an image and a target raster (QGIS-free).

The target raster (any grid, any CRS: e.g. a coarser map of building cover, canopy height, a vegetation index) is
resampled onto the image's grid (bilinear; nodata stays nodata) and its pixels that are nodata, outside the image
or under the image's nodata are left out of the loss and of the metrics. The image is read and scaled as for
segmentation (:mod:`.data`: per-band min-max of the 1st..99th percentiles, stored as the package's value scaling),
the validation strip is held back the same way (:func:`.data.validation_split`), and the loop is the same
(:func:`.loop.fit`): only the hooks differ. The network (an allow-listed smp encoder-decoder, one output channel
per target band, no activation) learns the target standardised by the training pixels' mean and standard
deviation; the package's ``rs_deep:value_scale`` and ``rs_deep:value_offset`` turn its output back into the
target's units, so ``rs_deep:predict_raster`` writes them. Loss: L1 (default) or MSE; the best epoch has the
lowest validation RMSE, reported with MAE, R² and the RMSE of the trivial prediction, the training mean.
"""
import math
import os

import numpy as np

from ..errors import InputError
from ..geo.raster import pixel_size_metres
from ..models.package import DEFAULT_COLORS
from .augment import check_augment, draw_geometry, flip, photometric, rot90
from .builders import resolve_builder
from .data import (band_names as image_band_names, compute_value_scaling, model_classes, read_image, scale_image,
                   validation_split, window_dict, window_slices)
from .loop import (MIN_STEPS, TrainingTask, TrainParams, check_package_tiling, check_tile, fit, import_torch,
                   input_percentiles)
from .segmentation import predict_region

LOSSES = ("l1", "mse")


def read_target(path, like, band=1):
    """Band ``band`` of the raster ``path`` resampled (bilinear) onto the grid of the open dataset ``like``:
    float32 [H, W], NaN where it is nodata or does not cover the image."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject
    try:
        src = rasterio.open(path)
    except Exception as exc:
        raise InputError(f"Cannot open the target raster {path}: {exc}") from exc
    with src:
        if not 1 <= band <= src.count:
            raise InputError(f"The target raster {path} has {src.count} band(s); band {band} does not exist")
        if (src.crs is None) != (like.crs is None):
            raise InputError(f"The target raster {path} and the image must both have a CRS (or both none) to be "
                             "matched; assign the missing CRS")
        data = src.read(band, out_dtype="float32", masked=True).filled(np.nan)
        out = np.full((like.height, like.width), np.nan, dtype=np.float32)
        reproject(data, out, src_transform=src.transform, src_crs=src.crs or like.crs, src_nodata=np.nan,
                  dst_transform=like.transform, dst_crs=like.crs or src.crs, dst_nodata=np.nan,
                  resampling=Resampling.bilinear)
    return out


def regression_metrics(pred, target, baseline=None):
    """{rmse, mae, r2, pixels[, baseline_rmse, baseline_mae]} of ``pred`` against ``target`` over the finite target
    pixels (R² against the target's own mean; ``baseline``: the constant the trivial model predicts)."""
    ok = np.isfinite(target)
    if not ok.any():
        return None
    p, t = pred[ok].astype(np.float64), target[ok].astype(np.float64)
    err = p - t
    var = float(((t - t.mean()) ** 2).sum())
    out = {"rmse": float(np.sqrt((err ** 2).mean())), "mae": float(np.abs(err).mean()),
           "r2": 1.0 - float((err ** 2).sum()) / var if var > 0 else 0.0, "pixels": int(ok.sum())}
    if baseline is not None:
        out["baseline_rmse"] = float(np.sqrt(((t - baseline) ** 2).mean()))
        out["baseline_mae"] = float(np.abs(t - baseline).mean())
    return out


class TargetCropSampler:
    """Random training crops of ``tile`` px from in-memory regions ``[(img [C, H, W] scaled, target [K, H, W]
    standardised, NaN where unknown, valid [H, W])]``, drawn in proportion to their area, with random flips,
    90-degree rotations and the photometric jitter of segmentation (:func:`.augment.photometric`)."""

    def __init__(self, regions, tile, rng, flip=True, rotate=True, brightness=0.1, contrast=0.25, gamma=0.25,
                 noise=0.03):
        self.regions = [self._padded(r, tile) for r in regions]
        area = np.array([r[1].shape[1] * r[1].shape[2] for r in regions], dtype=np.float64)
        self.p = area / area.sum()
        self.tile, self.rng = tile, rng
        self.flip, self.rotate = bool(flip), bool(rotate)
        self.jitter = dict(brightness=brightness, contrast=contrast, gamma=gamma, noise=noise)

    @staticmethod
    def _padded(region, tile):
        img, target, valid = region
        ph, pw = max(0, tile - valid.shape[0]), max(0, tile - valid.shape[1])
        if ph or pw:
            pad = ((0, ph), (0, pw))
            img = np.pad(img, ((0, 0),) + pad, mode="edge")
            target = np.pad(target, ((0, 0),) + pad, constant_values=np.nan)
            valid = np.pad(valid, pad, constant_values=False)
        return img, target, valid

    def sample(self):
        rng, t = self.rng, self.tile
        img, target, valid = self.regions[int(rng.choice(len(self.regions), p=self.p))]
        h, w = valid.shape
        y0, x0 = int(rng.integers(h - t + 1)), int(rng.integers(w - t + 1))
        img, target, valid = (a[..., y0:y0 + t, x0:x0 + t] for a in (img, target, valid))
        k, flipped = draw_geometry(rng, self.rotate, self.flip)
        img, target, valid = rot90(img, k), rot90(target, k), rot90(valid, k)
        if flipped:
            img, target, valid = flip(img), flip(target), flip(valid)
        img = np.array(img, dtype=np.float32)
        if any(v > 0 for v in self.jitter.values()):
            img = photometric(img, np.array(valid), rng, **self.jitter)
        return img, np.array(target, dtype=np.float32)

    def batch(self, n):
        imgs, targets = zip(*(self.sample() for _ in range(n)))
        return np.stack(imgs), np.stack(targets)


class TargetTask(TrainingTask):
    """A task whose network returns raw values (regression, super-resolution) learnt from in-memory regions
    ``[(img, target, valid)]`` (:class:`TargetCropSampler`); no validation data: the last epoch is kept."""

    activation = "none"

    def __init__(self, train, val):
        self.train, self.val = train, val
        self.select_best = bool(val)
        self.train_px = sum(v.size for _, _, v in train)
        self.sampler_options = {}

    def default_steps(self, batch_size):
        return max(MIN_STEPS, int(math.ceil(2.0 * self.train_px / (self.tile_size * self.tile_size) / batch_size)))

    def network(self):
        """The network and what it learns, in the log line that starts the training."""
        raise NotImplementedError

    def describe(self, device, steps, batch_size, epochs):
        return (f"Training {self.network()} on {device}: {epochs} epochs x {steps} steps x {batch_size} crops of "
                f"{self.tile_size} px; {self.train_px} training px")


class RegressionTask(TargetTask):
    """Regression: a value per pixel, L1 or MSE on the standardised target (unknown pixels left out); the best
    epoch has the lowest validation RMSE (in the target's units)."""

    task = "regression"
    monitor, monitor_label, mode, curves = "rmse", "RMSE", "min", ("r2",)

    def __init__(self, train, val, loss, mean, std, units):
        super().__init__(train, val)
        self.loss = loss
        self.mean, self.std, self.units = mean, std, units

    def build_model(self, device, memory_format):
        from ..models.architectures import build_model
        self.builder = resolve_builder("regression", self.builder, len(self.band_names), len(self.classes))
        return build_model(self.builder).to(device).to(memory_format=memory_format)

    def make_sampler(self, rng):
        return TargetCropSampler(self.train, self.tile_size, rng, **self.sampler_options)

    def training_loss(self, model, batch, device, memory_format):
        import torch
        x, y = batch
        xt = torch.from_numpy(x).to(device).contiguous(memory_format=memory_format)
        yt = torch.from_numpy(y).to(device)
        known = torch.isfinite(yt)
        if not bool(known.any()):
            return (model(xt) * 0).sum(), None  # a batch without a known pixel: no gradient
        err = model(xt).float()[known] - yt[known]
        return (err.abs().mean() if self.loss == "l1" else (err ** 2).mean()), None

    def validate(self, model, device, memory_format):
        if not self.val:
            return None, None
        preds, targets = [], []
        for img, target, _ in self.val:
            _, raw = predict_region(model, img, device, memory_format=memory_format, raw=True)
            preds.append((raw * self.std + self.mean).reshape(len(raw), -1))
            targets.append((target * self.std + self.mean).reshape(len(target), -1))
        metrics = regression_metrics(np.concatenate(preds, axis=1), np.concatenate(targets, axis=1), self.mean)
        if metrics is None:
            return None, None
        return metrics, metrics["rmse"] / self.std

    def rank(self, metrics, val_loss, epoch):
        return (metrics["rmse"],)

    def epoch_message(self, metrics, val_loss, best):
        unit = f" {self.units}" if self.units else ""
        return (f", val RMSE {metrics['rmse']:.4g}{unit}, MAE {metrics['mae']:.4g}, R² {metrics['r2']:.3f} "
                f"(the training mean: RMSE {metrics['baseline_rmse']:.4g}; best RMSE {best['metrics']['rmse']:.4g} "
                f"at epoch {best['epoch']})")

    def network(self):
        return f"{self.builder['architecture']}/{self.builder.get('encoder')} (regression, {self.loss.upper()} loss)"

    def training_info(self, best_metrics):
        return {"val": best_metrics, "target_mean": self.mean, "target_std": self.std, "loss": self.loss}

    def package_extra(self, best_metrics=None):
        return {"rs_deep:value_scale": self.std, "rs_deep:value_offset": self.mean, "rs_deep:units": self.units}


def train_regression(image_path, target_path, out_dir, *, target_band=1, target_name="value", units="", bands=None,
                     band_names=None, builder=None, tile_size=128, val_fraction=0.2, val_side="bottom", loss="l1",
                     augment=None, package_tile_size=256, package_overlap=32, **options):
    """Train a regression network on ``image_path`` against ``target_path`` (band ``target_band``, resampled onto
    the image's grid; its nodata is left out) and write a model package (task regression) to ``out_dir``.

    ``target_name`` names the output channel and ``units`` its units (package metadata). ``loss``: "l1" or "mse".
    ``val_fraction`` of the image along ``val_side`` is held out for validation (RMSE, MAE, R², and the RMSE of the
    training mean). ``augment``: flips, rotations and the photometric jitter (see :func:`.segmentation.
    train_segmentation`). ``options``: the run settings of :class:`.loop.TrainParams` (defaults: 30 epochs, batch
    size 16, patience 8, name "regression-model"). Returns the training report (:func:`.loop.fit`).
    """
    params = TrainParams.of(options, epochs=30, batch_size=16, weight_decay=1e-4, patience=8, name="regression-model")
    import_torch()
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    check_tile(tile_size, "tile_size")
    check_package_tiling(package_tile_size, package_overlap)
    augment = check_augment(augment)
    prog = params.prog
    prog.message(f"Reading {image_path}")
    ds, bands, data, valid = read_image(image_path, bands)
    try:
        h, w = ds.height, ds.width
        names = image_band_names(ds, bands, band_names)
        target = read_target(target_path, ds, target_band)
        gsd = pixel_size_metres(ds.crs, ds.transform, w, h)
    finally:
        ds.close()
    target[~valid] = np.nan
    scaling = compute_value_scaling(data, valid, seed=params.seed)
    scale_image(data, valid, scaling)
    train_win, val_win = validation_split(w, h, val_fraction, val_side)
    rows, cols = window_slices(train_win)
    known = target[rows, cols][np.isfinite(target[rows, cols])]
    if known.size < 100:
        raise InputError(f"The target raster covers {known.size} valid pixel(s) of the training part of the image; "
                         "it must overlap the image (any CRS: it is resampled onto the image's grid) with values "
                         "that are not nodata")
    mean, std = float(known.mean()), float(known.std())
    std = std if std > 1e-12 else 1.0
    z = ((target - mean) / std)[None].astype(np.float32)
    train = [(data[:, rows, cols], z[:, rows, cols], valid[rows, cols])]
    val = []
    if val_win is not None:
        r2, c2 = window_slices(val_win)
        val = [(np.ascontiguousarray(data[:, r2, c2]), z[:, r2, c2], valid[r2, c2])]
    params.log(f"Target {target_name}: mean {mean:.4g}, standard deviation {std:.4g}{' ' + units if units else ''} "
               f"over {known.size} training pixels")
    task = RegressionTask(train, val, loss, mean, std, units)
    task.sampler_options = augment
    classes = model_classes([target_name], None, [DEFAULT_COLORS[1]])
    counts = {"train_pixels": int(known.size),
              "val_pixels": int(np.isfinite(val[0][1]).sum()) if val else 0}
    task.configure(
        classes=classes, band_names=names, band_numbers=bands, builder=builder, value_scaling=scaling, gsd=gsd,
        input_percentiles=input_percentiles(params, task.task), tile_size=tile_size, augment=augment,
        package_tile_size=package_tile_size, package_overlap=package_overlap,
        settings={"loss": loss, "target_band": target_band, "units": units},
        data={"image": os.path.basename(os.fspath(image_path)), "target": os.path.basename(os.fspath(target_path)),
              "image_size": {"width": w, "height": h},
              "validation": {"side": val_side if val_win else None, "fraction": val_fraction if val_win else 0.0,
                             "window": window_dict(val_win)}},
        samples=counts)
    return fit(task, params, out_dir)


__all__ = ["train_regression", "RegressionTask", "TargetTask", "TargetCropSampler", "read_target", "regression_metrics", "LOSSES"]
