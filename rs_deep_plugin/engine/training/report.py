"""The training report: one schema for every task (:func:`.loop.fit` writes it), its curves as a PNG
(matplotlib's Agg backend) and a short text summary (QGIS-free).

Matplotlib comes with QGIS's Python on every platform (Debian's python3-qgis-common depends on
it); where it is missing the curves are skipped and the JSON report still has every number.
"""
import io
import os

from ..files import write_atomic, write_json

REPORT_NAME = "training_report.json"
CURVES_NAME = "training_curves.png"

#: the validation metrics of a report's history, as the curves name them
METRIC_LABELS = {"iou": "validation IoU", "accuracy": "validation accuracy", "f1": "validation F1",
                 "ap": "validation AP50", "precision": "precision", "recall": "recall", "r2": "validation R²",
                 "rmse": "validation RMSE"}


def metric_series(history):
    """[(label, values by epoch)] of the validation metrics in a report's ``history``."""
    keys = []
    for h in history:
        for key in (h.get("val") or {}):
            if key not in keys:
                keys.append(key)
    return [(METRIC_LABELS.get(key, key), [(h.get("val") or {}).get(key) for h in history]) for key in keys]


def lineage_text(lineage):
    """One line saying what a run started from (a report's ``lineage``, :class:`.transfer.Transfer`), or None for a
    network trained from scratch with the run's settings."""
    if not lineage:
        return None
    parts = []
    init, weights = lineage.get("init_from"), lineage.get("encoder_weights")
    if init:
        parts.append(f"fine-tuned from {init['name']} (sha256 {init['sha256'][:12]}, {init['tensors_copied']} tensors "
                     f"copied, {init['tensors_new']} new)")
    if weights:
        parts.append(f"encoder weights {weights['file']} (sha256 {weights['sha256'][:12]})")
    if lineage.get("freeze_encoder_epochs"):
        parts.append(f"encoder frozen {lineage['freeze_encoder_epochs']} epoch(s)")
    if lineage.get("encoder_lr_factor", 1.0) != 1.0:
        parts.append(f"encoder lr x{lineage['encoder_lr_factor']:g}")
    return "; ".join(parts) or None


def plot_training_curves(report, path):
    """Draw the training loss (and the validation loss) and the validation metrics of the report's ``history``
    by epoch into ``path``, with the epoch kept (``best.epoch``) marked.

    Returns ``path``, or None when matplotlib is not installed or the report has no epoch."""
    history = report.get("history") or []
    losses = [h["train_loss"] for h in history]
    if not losses:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except Exception:
        return None
    epochs = list(range(1, len(losses) + 1))
    metrics = metric_series(history)
    fig = Figure(figsize=(9 if metrics else 5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if metrics else 1, 1)
    ax.plot(epochs, losses, marker="o", ms=3, label="training loss")
    val_loss = [h.get("val_loss") for h in history]
    if any(v is not None for v in val_loss):
        ax.plot(epochs[:len(val_loss)], [float("nan") if v is None else v for v in val_loss], marker="o", ms=3,
                label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    best = (report.get("best") or {}).get("epoch")
    if metrics:
        ax2 = fig.add_subplot(1, 2, 2)
        for label, vals in metrics:
            ax2.plot(epochs[:len(vals)], [float("nan") if v is None else v for v in vals], marker="o", ms=3,
                     label=label)
        ax2.set_xlabel("epoch")
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3)
        if best:
            ax2.axvline(best, color="grey", ls="--", lw=1, label=f"kept: epoch {best}")
        ax2.legend(fontsize=8)
    title = report.get("name") or "training"
    extra = []
    if report.get("stopped_early"):
        extra.append("stopped early")
    if report.get("cancelled"):
        extra.append("cancelled")
    start = lineage_text(report.get("lineage"))
    fig.suptitle(title + (f" ({', '.join(extra)})" if extra else "") + (f"\n{start}" if start else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_atomic(path, buf.getvalue())


def write_training_report(path, report, log=None):
    """Write the training report (JSON) and, next to it, ``training_curves.png`` (when matplotlib is there).
    Returns the path of the curves, or None."""
    write_json(path, report)
    png = os.path.join(os.path.dirname(path), CURVES_NAME)
    try:
        written = plot_training_curves(report, png)
    except Exception as exc:  # a plot must never lose a trained model
        written = None
        if log:
            log(f"Warning: the training curves could not be drawn ({exc})")
    return written


def report_summary(report):
    """A few lines describing a training report (for logs and scripts)."""
    lines = [f"{report['name']}: {report['epochs_run']} epochs"
             + (" (stopped early)" if report.get("stopped_early") else "")
             + (" (cancelled)" if report.get("cancelled") else "")
             + f", {report['seconds']:.0f} s on {report['device']}, seed {report['seed']}"]
    lines.append(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["samples"].items()
                           if not isinstance(v, dict)))
    start = lineage_text(report.get("lineage"))
    if start:
        lines.append(start)
    best = report.get("best") or {}
    metrics = best.get("metrics")
    monitor = report["monitor"]["metric"]
    label = METRIC_LABELS.get(monitor, monitor)
    if metrics:
        lines.append(f"kept epoch {best['epoch']} ({report['monitor']['keep']}): {label} {_f(best['value'])}"
                     + "".join(f", {key} {_f(metrics[key])}" for key in ("f1", "precision", "recall")
                               if key != monitor and isinstance(metrics.get(key), float)))
        classes = metrics.get("classes")
        for m in classes if isinstance(classes, list) else []:
            if m["value"] > 0:
                lines.append(f"  {m['name']}: IoU {_f(m['iou'])}, F1 {_f(m['f1'])}, precision {_f(m['precision'])}, "
                             f"recall {_f(m['recall'])} ({m['support']} labelled px)")
    else:
        lines.append(f"kept epoch {best.get('epoch')} (the last; no validation)")
    values = [(h.get("val") or {}).get(monitor) for h in report["history"]]
    lines.append(f"{label} by epoch: " + " ".join("-" if v is None else f"{v:.2f}" for v in values))
    return "\n".join(lines)


def _f(value):
    return "-" if value is None else f"{value:.3f}"


__all__ = ["plot_training_curves", "lineage_text", "metric_series", "write_training_report", "report_summary", "REPORT_NAME",
           "CURVES_NAME", "METRIC_LABELS"]
