"""The training curves of a training report as a PNG (matplotlib's Agg backend; QGIS-free).

Matplotlib comes with QGIS's Python on every platform (Debian's python3-qgis-common depends on
it); where it is missing the curves are skipped and the JSON report still has every number.
"""
import io
import os

from ..files import write_atomic, write_json

REPORT_NAME = "training_report.json"
CURVES_NAME = "training_curves.png"

# the validation metrics a report may carry, per trainer: key -> label
_METRICS = (("val_iou", "validation IoU"), ("val_accuracy", "validation accuracy"))
_DET_METRICS = (("f1", "validation F1"), ("ap", "validation AP50"), ("precision", "precision"), ("recall", "recall"))


def _series(report):
    """[(label, values)] of the validation metrics found in ``report``."""
    out = []
    for key, label in _METRICS:
        vals = report.get(key)
        if vals and any(v is not None for v in vals):
            out.append((label, vals))
    det = report.get("val")
    if isinstance(det, list) and det and isinstance(det[0], dict):
        for key, label in _DET_METRICS:
            vals = [d.get(key) if isinstance(d, dict) else None for d in det]
            if any(v is not None for v in vals):
                out.append((label, vals))
    return out


def plot_training_curves(report, path):
    """Draw loss (and validation loss) and the validation metrics by epoch into ``path``.

    Returns ``path``, or None when matplotlib is not installed or the report has no epoch."""
    losses = report.get("train_loss") or []
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
    metrics = _series(report)
    fig = Figure(figsize=(9 if metrics else 5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if metrics else 1, 1)
    ax.plot(epochs, losses, marker="o", ms=3, label="training loss")
    val_loss = report.get("val_loss") or []
    if any(v is not None for v in val_loss):
        ax.plot(epochs[:len(val_loss)], [float("nan") if v is None else v for v in val_loss], marker="o", ms=3,
                label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    best = report.get("best_epoch")
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
    fig.suptitle(title + (f" ({', '.join(extra)})" if extra else ""), fontsize=10)
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
    """A few lines describing a segmentation training report (for logs and scripts)."""
    lines = [f"{report['name']}: {report['epochs_run']} epochs"
             + (" (stopped early)" if report.get("stopped_early") else "")
             + (" (cancelled)" if report.get("cancelled") else "")
             + f", {report['seconds']:.0f} s on {report['device']}, seed {report['seed']}"]
    s = report["samples"]
    lines.append(f"training pixels {s['train_pixels']}, validation pixels {s['val_pixels']}, "
                 f"crops seen {s['crops_seen']}")
    best = report.get("best")
    if best:
        lines.append(f"best epoch {report['best_epoch']}: validation IoU {best['iou']:.3f}, F1 {best['f1']:.3f}, "
                     f"precision {best['precision']:.3f}, recall {best['recall']:.3f}")
        for m in best["classes"]:
            if m["value"] > 0:
                lines.append(f"  {m['name']}: IoU {_f(m['iou'])}, F1 {_f(m['f1'])}, precision {_f(m['precision'])}, "
                             f"recall {_f(m['recall'])} ({m['support']} labelled px)")
    lines.append("val IoU by epoch: " + " ".join("-" if v is None else f"{v:.2f}" for v in report["val_iou"]))
    return "\n".join(lines)


def _f(value):
    return "-" if value is None else f"{value:.3f}"


__all__ = ["plot_training_curves", "write_training_report", "report_summary", "REPORT_NAME", "CURVES_NAME"]
