"""Labels as classes, shared by the RS Deep algorithms that train, export chips and assess: labelled polygons to
class values and names, class colours from the labels layer's style, the classes of a label raster."""
import os

from qgis.core import QgsProcessingException

from ..rs_deep_plugin.engine.tasks import BACKGROUND_NAMES, CHANGE, TASKS
from .layers import class_value_or_name


def sorted_values(values):
    """Class values in label order: the integers ascending, then the names alphabetically (any case)."""
    ints = [v for v in values if isinstance(v, int)]
    texts = [v for v in values if not isinstance(v, int)]
    return sorted(ints) + sorted(texts, key=lambda t: t.lower())


def map_classes(task, pairs, field, layer_name):
    """(class names, ``[(geometry, class value)]``) from labelled polygons, as the trainers take them.

    Segmentation and change: the background / no change is class 0 (a polygon whose class is named
    'background' - or 'no change' for change - marks it), the other values are 1..K in sorted
    order. Detection: the sorted values are 0..K-1. Without a class field every polygon is one
    class named after the layer (change: 'change')."""
    if field:
        values = [class_value_or_name(v) for _, v in pairs]
    else:
        values = [("change" if task == CHANGE.name else layer_name)] * len(pairs)
    classes = sorted_values(set(values))
    background = TASKS[task].background
    if not background:  # detection: no background class
        index = {c: i for i, c in enumerate(classes)}
        return [str(c) for c in classes], [(g, index[v]) for (g, _), v in zip(pairs, values)]
    fg = [c for c in classes if str(c).strip().lower() not in background]
    if not fg:
        raise QgsProcessingException("LABELS only holds background polygons; label the objects (or changes) to learn")
    index = {c: i + 1 for i, c in enumerate(fg)}
    return [background[0]] + [str(c) for c in fg], [(g, index.get(v, 0)) for (g, _), v in zip(pairs, values)]


def label_colors(layer, field, class_names, task):
    """Class colours from the labels layer's style, when it has one: a categorized renderer on ``field`` (its
    categories' colours, matched by value or name), or, without a class field, a single-symbol renderer (the
    one labelled class). Classes the style does not name keep RS Deep's default colours; None without a style."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsSingleSymbolRenderer
    from ..rs_deep_plugin.engine.models.package import DEFAULT_COLORS
    renderer = layer.renderer() if layer is not None and hasattr(layer, "renderer") else None
    found = {}
    if isinstance(renderer, QgsCategorizedSymbolRenderer) and field and renderer.classAttribute() == field:
        for cat in renderer.categories():
            if cat.symbol() is not None and cat.value() is not None:
                found[str(class_value_or_name(cat.value())).strip().lower()] = cat.symbol().color().name()
    elif isinstance(renderer, QgsSingleSymbolRenderer) and not field and renderer.symbol() is not None:
        found = {str(n).strip().lower(): renderer.symbol().color().name() for n in class_names
                 if str(n).strip().lower() not in TASKS[task].background}
    if not found:
        return None
    offset = TASKS[task].first_color
    colors = []
    for i, name in enumerate(class_names):
        c = found.get(str(name).strip().lower())
        colors.append(c[1:].upper() if c else DEFAULT_COLORS[(i + offset) % len(DEFAULT_COLORS)])
    return colors


def label_raster_classes(path, task):
    """Class names of a label raster: its category names, else 'class N' for each value up to the largest."""
    import numpy as np
    import rasterio
    from ..rs_deep_plugin.engine.evaluation.accuracy import raster_category_names
    if task == CHANGE.name:
        return [CHANGE.background[0], "change"]
    top = 0
    with rasterio.open(path) as ds:
        for _, win in ds.block_windows(1):
            a = ds.read(1, window=win, masked=True)
            vals = a.compressed()
            vals = vals[(vals != 255) & np.isfinite(vals)] if vals.size else vals
            if vals.size:
                top = max(top, int(vals.max()))
    if top < 1:
        raise QgsProcessingException(f"The label raster {os.path.basename(path)} holds no class above 0 (0 is the "
                                     "background, 255 not labelled); label the objects to learn")
    names = raster_category_names(path)
    return [names.get(0, "background")] + [names.get(v, f"class {v}") for v in range(1, top + 1)]


def class_value(raw, names, field):
    """A reference attribute as a class value: the value itself, or the value of the class ``names`` ({value:
    name}) gives that name (any case)."""
    value = class_value_or_name(raw)
    if isinstance(value, int):
        return value
    lookup = {n.strip().lower(): v for v, n in names.items()}
    hit = lookup.get(value.lower())
    if hit is None:
        known = ", ".join(f"{v}={n}" for v, n in sorted(names.items())) or "none (the prediction names no classes)"
        raise QgsProcessingException(
            f"Class {value!r} in field {field!r} is neither a class value nor one of the prediction's class names "
            f"({known}); use class values, or give the MODEL that names the classes")
    return hit


def only_foreground_class(names):
    """The class of reference polygons without a class field: the prediction's one class that is not the
    background (1 when ``names`` has none); refused when there are several."""
    fg = [v for v, n in names.items() if v != 0 and n.strip().lower() not in BACKGROUND_NAMES]
    if len(fg) > 1:
        raise QgsProcessingException(
            f"The prediction has {len(fg)} non-background classes "
            f"({', '.join(names[v] for v in fg)}): choose the CLASS_FIELD that holds each polygon's class")
    return fg[0] if fg else 1


def map_patch_classes(pairs, field, layer_name, feedback):
    """Patch classes from labelled polygons ``[(geometry, value)]``: ``(class_names, [(geometry, index)],
    background)``. One class: pixels outside the polygons are a "background" class 0; several: they are not
    labelled (``background`` None)."""
    values = [class_value_or_name(v) for _, v in pairs] if field else [layer_name] * len(pairs)
    classes = sorted_values(set(values))
    if len(classes) == 1:
        feedback.pushInfo(f"One class ({classes[0]}): pixels outside the polygons are 'background'")
        return ["background", str(classes[0])], [(g, 1) for g, _ in pairs], 0
    index = {c: i for i, c in enumerate(classes)}
    class_names = [str(c) for c in classes]
    if any(n.strip().lower() in BACKGROUND_NAMES for n in class_names):
        feedback.pushInfo("Pixels outside the polygons are not labelled")
    return class_names, [(g, index[v]) for (g, _), v in zip(pairs, values)], None


def map_multilabel_classes(pairs, field, layer_name):
    """Multi-label patch classes from labelled polygons ``[(geometry, value)]``: ``(class_names, [(geometry,
    index)])``, the sorted unique values of ``field`` (every value is a class: pixels outside the polygons belong to
    none). Without a field or with one value there is nothing to tell apart: refused, naming the fix."""
    values = [class_value_or_name(v) for _, v in pairs] if field else [layer_name] * len(pairs)
    classes = sorted_values(set(values))
    if len(classes) < 2:
        raise QgsProcessingException(
            f"Multi-label patch classification needs at least two classes; LABELS has {len(classes)} "
            f"({', '.join(map(str, classes)) or 'none'}). Set CLASS_FIELD to the field holding each polygon's class, "
            "or train a single-label classifier (MULTI_LABEL off)")
    index = {c: i for i, c in enumerate(classes)}
    return [str(c) for c in classes], [(g, index[v]) for (g, _), v in zip(pairs, values)]
