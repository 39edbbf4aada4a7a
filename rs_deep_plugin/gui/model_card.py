"""A model package's card for the dock (name, task, bands, GSD, classes) and the devices a run can use."""
import html
import os

from ..engine.tasks import TASKS

#: model task -> Processing algorithm that runs it, and the task's name for users (the engine's task table)
TASK_ALGORITHMS = {name: task.algorithm for name, task in TASKS.items()}
TASK_NAMES = {name: task.label for name, task in TASKS.items()}


class ModelInfo:
    """A model package's card, read once per path and modification time."""

    _cache = {}

    def __init__(self, path, pkg=None, error=None):
        self.path, self.pkg, self.error = path, pkg, error

    @classmethod
    def load(cls, path):
        try:
            key = (path, os.path.getmtime(path))
        except OSError:
            key = (path, None)
        if key not in cls._cache:
            from ..engine.models.loading import load_package
            try:
                cls._cache[key] = cls(path, load_package(path))
            except Exception as exc:  # a broken package: show why
                cls._cache[key] = cls(path, error=str(exc))
        return cls._cache[key]

    @property
    def algorithm_id(self):
        return TASK_ALGORITHMS.get(self.pkg.task) if self.pkg else None

    def card_html(self):
        if self.pkg is None:
            return f"<b>Cannot use this model package</b><br>{html.escape(self.error or '')}"
        pkg = self.pkg
        gsd = f"{pkg.gsd:g} m" if pkg.gsd else "any"
        rows = [f"<b>{html.escape(pkg.name)}</b>"]
        if pkg.description:
            rows.append(f"<i>{html.escape(pkg.description)}</i>")
        task = html.escape(TASK_NAMES.get(pkg.task, pkg.task))
        if pkg.multi_label:
            task += " (multi-label: every class whose score reaches its threshold)"
        rows.append(f"Task: {task}")
        rows.append(f"Bands: {html.escape(', '.join(pkg.bands))}")
        rows.append(f"GSD: {gsd} &nbsp; Tile: {pkg.tile_size} px")
        if pkg.task == "recognition":
            rows.append(f"Embedding: {pkg.builder.get('classes')} values a patch; the query is an image file or an "
                        "area drawn on the map")
        swatches = "".join(
            f"<tr><td style='background-color:#{c.color}' width='18'>&nbsp;</td>"
            f"<td>&nbsp;{html.escape(c.name)}{threshold}</td></tr>" for c, threshold in zip(pkg.classes, (
                [f" &ge; {t:g}" for t in pkg.class_thresholds] if pkg.multi_label else [""] * len(pkg.classes))))
        return "<br>".join(rows) + f"<table cellspacing='2'>{swatches}</table>"


# ------------------------------------------------------------------------------------------ device list
def device_choices():
    """[(label, DEVICE value)] for the dock's device list (:func:`..engine.models.runners.available_devices`)."""
    from ..engine.models.runners import available_devices
    return available_devices()


__all__ = ["ModelInfo", "TASK_ALGORITHMS", "TASK_NAMES", "device_choices"]
