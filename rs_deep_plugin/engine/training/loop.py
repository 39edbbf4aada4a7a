"""The training loop of every trainer (QGIS-free), after torchgeo's ``trainers/base.py`` without Lightning.

A task (:class:`TrainingTask`) says what differs between segmentation, detection, change and patch
classification: how its network is built, its training loss, its validation and the metric that picks the
best epoch. :func:`fit` does the rest, the same for all: seeding, the thread count (restored at the end), the
device and memory format, AdamW with a one-cycle learning rate, the epochs and their steps, a moving average of
the weights that is validated and packaged (:class:`WeightAverage`), the history of the report, the best network by
the monitored metric, early stopping after ``patience`` epochs without a
better one, cancelling (the best network so far is written when an epoch finished), and at the end the model
package (:func:`.package.save_package`), ``training_report.json`` and ``training_curves.png``
(:mod:`.report`). The run settings every trainer shares are one :class:`TrainParams`; its transfer settings (what
the network starts from, the encoder frozen or slower) are applied here for every task (:class:`.transfer.Transfer`).
"""
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field, fields

import numpy as np

from ..errors import Cancelled, InputError, require
from ..models.package import INPUT_PERCENTILES
from ..progress import Progress
from .report import REPORT_NAME, write_training_report
from .transfer import Transfer, check_transfer_options


#: the fewest steps of an epoch when the caller gives no steps_per_epoch: on a small image "two passes over the
#: data" is a handful of steps, and an epoch is also when validation, the log line and early stopping happen
MIN_STEPS = 25
#: the default decay of the weights' exponential moving average (:class:`WeightAverage`)
EMA_DECAY = 0.995
#: the choices of TrainParams.precision (:func:`training_dtype`)
PRECISIONS = ("auto", "float32", "bfloat16")
#: early stopping counts epochs without a better validation metric only from this share of the schedule on (the
#: learning rate is then coming down); before it, the metric of a small validation area jumps from epoch to epoch
PATIENCE_FROM = 0.5


def native_bfloat16(torch, dev):
    """Whether ``dev`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (where oneDNN runs bfloat16 convolutions about twice as fast as float32; elsewhere bfloat16 is no faster)."""
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except Exception:  # pragma: no cover - a torch without these checks
        return False


def training_dtype(torch, dev, precision, auto_bfloat16=True):
    """The dtype the forward passes of training compute in under autocast (None: float32, no autocast), for
    ``precision``: "float32", "bfloat16" (refused on a device that cannot) or "auto" (bfloat16 where ``dev``
    computes it natively, :func:`native_bfloat16`, for a task whose ``auto_bfloat16`` allows it). The weights,
    their optimiser and the package stay float32; the validation runs in float32, as inference does."""
    native = native_bfloat16(torch, dev)
    if precision == "bfloat16" and not (native or dev.type == "cpu"):  # any CPU can (slowly, without support)
        raise InputError(f"precision 'bfloat16' is not available on {dev.type}; use 'auto' or 'float32'")
    if precision == "float32" or (precision == "auto" and not (native and auto_bfloat16)):
        return None
    return torch.bfloat16


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global random generators."""
    import torch
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def check_tile(value, name):
    """Refuse a tile size that is not a multiple of 32 (at least 32)."""
    if not isinstance(value, int) or value < 32 or value % 32:
        raise InputError(f"{name} must be a multiple of 32, at least 32; got {value!r}")


def check_package_tiling(tile_size, overlap):
    """Refuse a package tile size or overlap the engine cannot run."""
    check_tile(tile_size, "package_tile_size")
    if not 0 <= overlap < tile_size // 2:
        raise InputError(f"package_overlap must be in [0, {tile_size // 2}); got {overlap}")


def import_torch():
    """torch, or :class:`MissingDependency` with the fix."""
    return require("torch", "PyTorch")


#: the tasks whose packages scale each input by its own percentiles unless told otherwise: none since 0.18.0. Per-input
#: scaling keeps a model's score on a darker or brighter scene (held-out buildings_atlanta x0.6 .. x1.5: building IoU
#: 0.26 against 0.13-0.24 with the stored scaling), but an input whose content differs moves its percentiles: the
#: held-out right 30 % of fields_denmark holds brighter fields than the training part (99th percentiles 1,686-2,600
#: against 1,328-1,384), and the same crop-type U-Net scored kappa 0.05 with that part's own percentiles against 0.61
#: with its training data's (the per-pixel random forest: 0.56). Absolute values are what every peer feeds a model,
#: and a wrong class everywhere is worse than a weaker one on a darker scene (README, "Training that generalises").
PER_INPUT_TASKS = ()


def input_percentiles(params, task):
    """:data:`INPUT_PERCENTILES` when ``task``'s package is to scale each input by its own percentiles
    (``params.input_scaling``, None: :data:`PER_INPUT_TASKS`), else None."""
    on = params.input_scaling if params.input_scaling is not None else task in PER_INPUT_TASKS
    return INPUT_PERCENTILES if on else None


@dataclass
class TrainParams:
    """The run settings every trainer takes as keyword arguments, besides its data and network.

    ``epochs``; ``time_budget`` (minutes of training, None: no limit; the run stops after ``epochs`` or the
    budget, whichever comes first, and the learning-rate schedule runs over whichever is shorter, so a budgeted
    run still ends annealed); ``steps_per_epoch`` (None: the task's default, about one or two passes over the
    training data); ``batch_size``; ``lr`` (the peak of the one-cycle schedule) and ``weight_decay`` (AdamW);
    ``seed``; ``patience`` (stop after that many epochs without a better validation metric, counted in the second
    half of the schedule, :data:`PATIENCE_FROM`; 0: never);
    ``device`` ("auto", "cpu", "cuda", "mps"); ``num_threads`` (torch CPU threads during the run); ``precision``
    of the training steps (:func:`training_dtype`: "auto", bfloat16 where the device computes it natively, 1.6
    times the crops per second of float32 on such a CPU, ``make bench-train``; "float32"; "bfloat16");
    ``name`` and ``description`` of the package; ``weights_dtype`` of its weights; ``progress(fraction,
    message)``, ``is_cancelled()`` and ``log(message)`` callbacks.

    Transfer learning (:mod:`.transfer`): ``init_from`` (an RS Deep package of the task to start from: its
    network when the builder is None, every tensor that fits), ``encoder_weights`` (a local ``.safetensors`` file
    of the encoder's weights; never a pickle), ``freeze_encoder_epochs`` (the encoder is not trained during the
    first N epochs) and ``encoder_lr_factor`` (the encoder's learning rate is ``lr`` times it).

    ``ema_decay``: validation, the choice of the best epoch and the package use an exponential moving average of
    the weights (:class:`WeightAverage`) with this decay; 0: the weights of the last step.

    ``input_scaling``: True, the package scales every input by its own 1st..99th percentiles
    (rs_deep:input_percentiles, :data:`INPUT_PERCENTILES`; each training image, date or sample is scaled by its own
    too); False, by those of the training data (stored in the package); None: the task's default
    (:func:`input_percentiles`)."""

    epochs: int = 20
    time_budget: float = None
    steps_per_epoch: int = None
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    patience: int = 0
    device: str = "auto"
    num_threads: int = None
    precision: str = "auto"
    name: str = "model"
    description: str = ""
    weights_dtype: str = "float16"
    progress: object = None
    is_cancelled: object = None
    log: object = None
    init_from: object = None
    encoder_weights: object = None
    freeze_encoder_epochs: int = 0
    encoder_lr_factor: float = 1.0
    ema_decay: float = EMA_DECAY
    input_scaling: bool = None
    started: float = field(init=False, repr=False)
    prog: Progress = field(init=False, repr=False)

    def __post_init__(self):
        self.started = time.time()
        self.prog = Progress(self.progress, self.is_cancelled)
        if self.log is None:
            self.log = _quiet

    @classmethod
    def of(cls, options, **defaults):
        """The settings from a trainer's keyword arguments ``options`` over the trainer's ``defaults``."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; the run settings are "
                            f"{', '.join(sorted(known))}")
        params = cls(**{**defaults, **options})
        if params.batch_size < 1 or params.epochs < 1:
            raise InputError("batch_size and epochs must be at least 1")
        if params.time_budget is not None and not params.time_budget > 0:
            raise InputError(f"time_budget is in minutes and must be above 0 (None: no limit); got "
                             f"{params.time_budget!r}")
        if not 0 <= params.ema_decay < 1:
            raise InputError(f"ema_decay must be in [0, 1) (0: no weight averaging); got {params.ema_decay!r}")
        if params.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}; got {params.precision!r}")
        check_transfer_options(params)
        return params


def _quiet(message):
    pass


def one_cycle(progress, warmup, div_factor=10.0, final_div_factor=100.0):
    """The learning-rate factor (of the peak) at ``progress`` (0..1) of a one-cycle schedule: a cosine rise from
    1/div_factor over the first ``warmup`` share, then a cosine fall to 1/(div_factor * final_div_factor), as
    torch's OneCycleLR, but driven by progress so that a time budget can drive it."""
    p = min(max(float(progress), 0.0), 1.0)
    lo, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    if p < warmup:
        return lo + (1.0 - lo) * (1 - math.cos(math.pi * p / warmup)) / 2
    q = (p - warmup) / max(1e-9, 1.0 - warmup)
    return end + (1.0 - end) * (1 + math.cos(math.pi * q)) / 2


class Clock:
    """The progress of a run planned as ``total_steps`` steps and, optionally, ``budget_s`` seconds: the larger of
    the two shares used, so the schedule runs over whichever limit comes first."""

    def __init__(self, total_steps, budget_s=None):
        self.total, self.budget, self.steps, self.t0 = max(1, int(total_steps)), budget_s, 0, None

    def start(self):
        self.t0 = time.perf_counter()

    def elapsed(self):
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def step(self):
        self.steps += 1

    def out_of_time(self):
        return self.budget is not None and self.elapsed() >= self.budget

    def done(self):
        return self.steps >= self.total or self.out_of_time()

    def progress(self):
        p = self.steps / self.total
        if self.budget:
            p = max(p, self.elapsed() / self.budget)
        return min(p, 1.0)


class WeightAverage:
    """An exponential moving average of a network's weights and buffers, updated after every optimiser step
    (Polyak averaging, as timm's ``ModelEmaV2`` and Ultralytics' ``ModelEMA``): a copy of the network whose
    tensors follow the trained ones with ``decay``, ramped up as ``min(decay, (1 + n) / (10 + n))`` after ``n``
    steps so that early weights do not linger. The averaged network is what validation sees and what is packaged:
    on small label sets the weights of single steps jump (so does a small validation area's metric), and their
    average generalises better. Integer buffers (BatchNorm's batch counts) are copied."""

    def __init__(self, model, decay):
        import copy
        self.decay, self.steps = float(decay), 0
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        ours, theirs = self.model.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        self._avg = [ours[k] for k in floats]
        self._src = [theirs[k] for k in floats]
        self._copy = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]

    def update(self):
        import torch
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            for avg, src in zip(self._avg, self._src):
                avg.lerp_(src, 1.0 - d)
            for dst, src in self._copy:
                dst.copy_(src)


class TrainingTask:
    """What one task adds to :func:`fit`. A trainer reads its data, fills the attributes below and overrides
    the hooks; everything else is the loop's.

    ``monitor`` is the validation metric that picks the best epoch (larger is better; ``mode`` "max") and
    ``monitor_label`` its name in messages; ``select_best`` False keeps the last epoch instead (so does a run
    without validation data); ``clip_grad_norm`` clips the gradients; ``curves`` are the validation metrics
    (0..1) kept per epoch in the report's history and drawn in the curves; ``auto_bfloat16`` False keeps
    ``precision`` "auto" in float32 for the task (:func:`training_dtype`)."""

    task = None  # the package task: segmentation, detection, change, patch_classification
    monitor = "iou"
    monitor_label = "IoU"
    mode = "max"
    select_best = True
    clip_grad_norm = None
    curves = ("iou",)
    activation = "softmax"  # the package's rs_deep:activation ("none": raw values, regression)
    auto_bfloat16 = True  # precision "auto" may train the task in bfloat16

    # set by the trainer before fit()
    classes = None  # [ModelClass]
    band_names = None
    band_numbers = None
    builder = None  # as given; build_model() stores the resolved one
    value_scaling = None
    input_percentiles = None  # (low, high): the package scales each input by its own percentiles
    gsd = None
    tile_size = None  # training crops (px)
    package_tile_size = None
    package_overlap = None
    augment = None
    settings = None  # the report's "settings": the task's own choices
    data = None  # the report's "data": what it trained and validated on
    samples = None  # the report's "samples": counts; fit adds crops_seen

    def configure(self, **attributes):
        """Set the data and network attributes above (a name that is not one of them is refused). Returns
        the task."""
        for key, value in attributes.items():
            if not hasattr(TrainingTask, key):
                raise AttributeError(f"{type(self).__name__} has no attribute {key!r} to configure")
            setattr(self, key, value)
        return self

    def build_model(self, device, memory_format):
        """The network on ``device`` (resolve and store ``self.builder`` here)."""
        raise NotImplementedError

    def parameters(self, model):
        """What the optimiser updates."""
        return model.parameters()

    def default_steps(self, batch_size):
        """Steps per epoch when the caller gives none."""
        raise NotImplementedError

    def make_sampler(self, rng):
        """The training crop sampler (``rng``: the run's seeded numpy Generator)."""
        raise NotImplementedError

    def training_loss(self, model, batch, device, memory_format):
        """(loss tensor, {part: tensor} or None) of one training batch from the sampler."""
        raise NotImplementedError

    def validate(self, model, device, memory_format):
        """(metrics dict, validation loss or None) of the network in eval mode; (None, None) without
        validation data."""
        return None, None

    def rank(self, metrics, val_loss, epoch):
        """A tuple ordering epochs by validation (the best is the largest for ``mode`` "max")."""
        return (metrics[self.monitor],)

    def epoch_message(self, metrics, val_loss, best):
        """What the epoch's log line adds after the training loss (``best``: the best epoch so far)."""
        return f", validation {self.monitor_label} {metrics[self.monitor]:.3f}"

    def describe(self, device, steps, batch_size, epochs):
        """The log line that starts the training."""
        return (f"Training {self.builder['architecture']} on {device}: {epochs} epochs x {steps} steps x "
                f"{batch_size} crops of {self.tile_size} px")

    def training_info(self, best_metrics):
        """The task's part of the package's ``rs_deep:training`` (after best_epoch, epochs_run, seed)."""
        return {}

    def package_extra(self, best_metrics=None):
        """More package metadata of the task (e.g. ``mlm:output``); ``best_metrics``: the validation metrics of the
        epoch packaged (None without validation)."""
        return {}


def fit(task, params, out_dir):
    """Train ``task`` with the run settings ``params`` (:class:`TrainParams`) and write the package to ``out_dir``.

    Returns the training report (written to ``out_dir/training_report.json`` without the local paths) with
    ``package``, ``report_path`` and ``curves_path``. When ``is_cancelled()`` turns true, the best network so far
    (if an epoch finished) is written before :class:`Cancelled` is raised.

    The report (one schema for every task): name, task, classes, bands, band_numbers, builder, value_scaling,
    gsd, seed, device, threads, tile_size, batch_size, lr, weight_decay, epochs_planned, steps_per_epoch,
    patience, augment, ``monitor`` ``{metric, mode, keep: "best" | "last"}``, ``settings`` and ``data`` (the
    task's), ``samples`` (counts and ``crops_seen``), ``history`` (per epoch ``{epoch, train_loss, loss_parts,
    lr, progress, seconds, val_loss, val}``; ``lr`` and ``progress``: the learning rate and the schedule's position
    (0..1, :class:`Clock`) at the epoch's last step; ``val`` holds the metrics of ``task.curves``, None without validation), epochs_run,
    ``best`` ``{epoch, metric, value, metrics}`` (the epoch packaged and its full validation metrics),
    stopped_early, cancelled, seconds, ``lineage`` (what the network started from: :meth:`.transfer.Transfer`'s
    ``lineage``, also in the package's ``rs_deep:training``).
    """
    torch = import_torch()
    from ..models.package import save_package
    from ..models.runners import device_description, select_device
    log, prog = params.log, params.prog
    old_threads = torch.get_num_threads()
    if params.num_threads:
        torch.set_num_threads(int(params.num_threads))
    try:
        seed_everything(params.seed)
        rng = np.random.default_rng(params.seed)
        dev = select_device(params.device)
        # channels_last: much faster convolutions on CPU (oneDNN) and on tensor-core GPUs
        fmt = torch.channels_last if dev.type in ("cpu", "cuda") else torch.contiguous_format
        transfer = Transfer(params, task.task)
        transfer.prepare(task, log)
        amp = training_dtype(torch, dev, params.precision, task.auto_bfloat16)
        precision = "bfloat16" if amp is not None else "float32"
        model = task.build_model(dev, fmt)
        transfer.initialise(model, task.builder, log)
        epochs, batch_size = params.epochs, params.batch_size
        steps = int(params.steps_per_epoch if params.steps_per_epoch is not None else task.default_steps(batch_size))
        total_steps = epochs * steps
        trained = list(task.parameters(model))
        opt = torch.optim.AdamW(transfer.param_groups(model, trained, params.lr), lr=params.lr,
                                weight_decay=params.weight_decay)
        budget_s = params.time_budget * 60.0 if params.time_budget else None
        warmup = min(0.3, max(0.05, 2.0 / epochs)) if budget_s is None else 0.1
        clock = Clock(total_steps, budget_s)
        ema = WeightAverage(model, params.ema_decay) if params.ema_decay > 0 else None
        judged = ema.model if ema is not None else model  # the network validated and packaged
        sampler = task.make_sampler(rng)
        log(task.describe(device_description(dev), steps, batch_size, epochs))
        log(f"Training steps in {precision}"
            + (" mixed precision (the device computes it natively; float32 weights)" if amp is not None else ""))
        report = {
            "name": params.name, "task": task.task, "classes": [c.name for c in task.classes],
            "bands": task.band_names, "band_numbers": task.band_numbers, "builder": task.builder,
            "value_scaling": task.value_scaling,
            "input_percentiles": list(task.input_percentiles) if task.input_percentiles else None,
            "gsd": task.gsd, "seed": params.seed,
            "device": device_description(dev), "threads": torch.get_num_threads(),
            "precision": precision, "tile_size": task.tile_size,
            "batch_size": batch_size, "lr": params.lr, "weight_decay": params.weight_decay,
            "ema_decay": params.ema_decay, "epochs_planned": epochs,
            "time_budget_minutes": params.time_budget, "steps_per_epoch": steps, "patience": params.patience, "augment": task.augment,
            "monitor": {"metric": task.monitor, "mode": task.mode, "keep": "best" if task.select_best else "last"},
            "settings": task.settings or {}, "data": task.data or {}, "samples": dict(task.samples or {}, crops_seen=0),
            "history": [], "epochs_run": 0, "best": None, "stopped_early": False, "stopped_by_budget": False,
            "cancelled": False, "seconds": None, "training_seconds": None, "lineage": transfer.lineage,
        }
        best = {"key": None, "state": None, "epoch": None, "metrics": None}

        def finish(cancelled):
            if best["state"] is None:
                return None
            model.load_state_dict(best["state"])
            model.eval()
            info = {"best_epoch": best["epoch"], "epochs_run": report["epochs_run"], "seed": params.seed}
            extra = dict(task.package_extra(best["metrics"]), **transfer.package_metadata())
            extra["rs_deep:training"] = dict(info, **task.training_info(best["metrics"]), lineage=transfer.lineage)
            if task.input_percentiles:
                extra["rs_deep:input_percentiles"] = list(task.input_percentiles)
            save_package(model.cpu(), out_dir, weights_dtype=params.weights_dtype, name=params.name, task=task.task,
                         bands=task.band_names, classes=task.classes, builder=task.builder,
                         tile_size=task.package_tile_size, overlap=task.package_overlap, gsd=task.gsd,
                         value_scaling=task.value_scaling, description=params.description, extra=extra,
                         activation=task.activation)
            metrics = best["metrics"]
            report.update(best={"epoch": best["epoch"], "metric": task.monitor,
                                "value": metrics.get(task.monitor) if metrics else None, "metrics": metrics},
                          cancelled=cancelled, seconds=round(time.time() - params.started, 2),
                          training_seconds=round(clock.elapsed(), 2))
            package = os.path.abspath(os.fspath(out_dir))
            path = os.path.join(package, REPORT_NAME)
            # no local paths in the file: it may be shipped with the package
            curves = write_training_report(path, report, log)
            return dict(report, package=package, report_path=path, curves_path=curves)

        train_prog = prog.sub(0.02, 0.97)
        since_best = 0
        try:
            clock.start()
            for epoch in range(1, epochs + 1):
                model.train()
                transfer.start_epoch(model, epoch, log)
                losses, parts = [], {}
                for step in range(steps):
                    train_prog.check()
                    if clock.done():
                        break
                    progress = clock.progress()  # the schedule's position at this step (the report keeps the last)
                    factor = one_cycle(progress, warmup)
                    for group in opt.param_groups:
                        group["lr"] = group.get("base_lr", params.lr) * factor
                    crops = sampler.batch(batch_size)
                    with torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                        loss, loss_parts = task.training_loss(model, crops, dev, fmt)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if task.clip_grad_norm:
                        torch.nn.utils.clip_grad_norm_(trained, task.clip_grad_norm)
                    opt.step()
                    if ema is not None:
                        ema.update()
                    clock.step()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise InputError(f"Training diverged at epoch {epoch}, step {step + 1} (loss {value}); "
                                         f"lower lr (now {params.lr:g}) or check the image values")
                    losses.append(value)
                    for kk, v in (loss_parts or {}).items():
                        parts.setdefault(kk, []).append(float(v.detach()))
                    report["samples"]["crops_seen"] += batch_size
                    train_prog.update(clock.progress())
                if not losses:  # the budget ran out just after the last epoch
                    report["stopped_by_budget"] = clock.out_of_time()
                    break
                train_loss = float(np.mean(losses))
                report["epochs_run"] = epoch
                model.eval()
                metrics, val_loss = task.validate(judged, dev, fmt)
                report["history"].append({
                    "epoch": epoch, "train_loss": round(train_loss, 5),
                    "loss_parts": {kk: round(float(np.mean(v)), 5) for kk, v in parts.items()},
                    "lr": float(opt.param_groups[0]["lr"]), "progress": round(progress, 6),
                    "seconds": round(clock.elapsed(), 1),
                    "val_loss": round(val_loss, 5) if val_loss is not None and math.isfinite(val_loss) else None,
                    "val": {kk: round(float(metrics[kk]), 5) for kk in task.curves} if metrics else None})
                if metrics is not None and task.select_best:
                    key = task.rank(metrics, val_loss, epoch)
                    improved = best["key"] is None or (key > best["key"] if task.mode == "max" else key < best["key"])
                else:
                    key, improved = None, True  # the last epoch is kept
                if improved:
                    best.update(key=key, epoch=epoch, metrics=metrics,
                                state={kk: v.detach().cpu().clone() for kk, v in judged.state_dict().items()})
                    since_best = 0
                elif clock.progress() >= PATIENCE_FROM:
                    since_best += 1  # patience runs in the second half only: at the peak learning rate the metric jumps
                msg = f"Epoch {epoch}/{epochs}: loss {train_loss:.4f}"
                if metrics is not None:
                    msg += task.epoch_message(metrics, val_loss, best)
                log(msg)
                train_prog.update(clock.progress(), msg)
                if clock.out_of_time():
                    report["stopped_by_budget"] = epoch < epochs
                    if epoch < epochs:
                        log(f"Stopping: the time budget of {params.time_budget:g} min is used "
                            f"({epoch} epochs, {clock.steps} steps)")
                    break
                if metrics is not None and task.select_best and params.patience and since_best >= params.patience \
                        and epoch < epochs:
                    report["stopped_early"] = True
                    log(f"Stopping early: no better validation {task.monitor_label} for {params.patience} epochs")
                    break
        except Cancelled:
            saved = finish(cancelled=True)
            if saved is not None:
                raise Cancelled(f"Training was cancelled after {report['epochs_run']} epoch(s); the best model "
                                f"so far (epoch {best['epoch']}) was written to {out_dir}") from None
            raise Cancelled("Training was cancelled before the first epoch finished; nothing was written.") \
                from None
        prog.message("Writing the model package")
        result = finish(cancelled=False)
        if params.progress is not None:  # not prog.update: a late cancel must not hide a written package
            params.progress(1.0, f"Model package written to {out_dir}")
        return result
    finally:
        if params.num_threads:
            torch.set_num_threads(old_threads)


__all__ = ["PRECISIONS", "training_dtype", "native_bfloat16", "MIN_STEPS", "EMA_DECAY", "PER_INPUT_TASKS",
           "input_percentiles", "fit", "TrainParams", "TrainingTask", "WeightAverage", "seed_everything", "check_tile",
           "check_package_tiling", "import_torch"]
