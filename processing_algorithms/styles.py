"""Class colours and names on the RS Deep result layers, shared by the algorithms: a paletted class raster (with a
``.qml`` written beside it, so any later load is styled) and categorized polygons, applied once Processing has
loaded the layers."""
import os

from qgis.core import (QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsGraduatedSymbolRenderer, QgsMarkerSymbol,
                       QgsPalettedRasterRenderer, QgsProcessingLayerPostProcessorInterface, QgsRasterLayer,
                       QgsRendererCategory, QgsRendererRange, QgsWkbTypes)
from qgis.PyQt.QtGui import QColor

from ..rs_deep_plugin.compat import save_default_style


def paletted_renderer(provider, classes, transparent_background=False):
    """The model's class colours and names; ``transparent_background``: class 0 transparent (change rasters: "no
    change" lets the imagery show through)."""
    items = []
    for c in classes:
        color = QColor("#" + c.color)
        if transparent_background and c.value == 0:
            color.setAlpha(0)
        items.append(QgsPalettedRasterRenderer.Class(c.value, color, c.name))
    return QgsPalettedRasterRenderer(provider, 1, items)


def categorized_renderer(classes):
    cats = []
    for c in classes:
        sym = QgsFillSymbol.createSimple({"color": "#" + c.color, "outline_color": "#" + c.color,
                                          "style": "solid", "outline_width": "0.4"})
        sym.setOpacity(0.6)
        cats.append(QgsRendererCategory(c.value, sym, c.name))
    return QgsCategorizedSymbolRenderer("class_id", cats)


class StyleClasses(QgsProcessingLayerPostProcessorInterface):
    """Applies class colours and names to a result layer once Processing has loaded it."""

    keep = []  # Processing does not own post-processors: keep them alive

    def __init__(self, classes, transparent_background=False):
        super().__init__()
        self.classes = classes
        self.transparent_background = transparent_background
        StyleClasses.keep.append(self)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        if isinstance(layer, QgsRasterLayer):
            layer.setRenderer(paletted_renderer(layer.dataProvider(), self.classes, self.transparent_background))
        elif layer.geometryType() == QgsWkbTypes.PolygonGeometry:
            layer.setRenderer(categorized_renderer(self.classes))
        layer.triggerRepaint()


def style_class_raster(path, classes, context, written=None, transparent_background=False):
    """Class colours and names of the class raster ``path``: a .qml beside the file and on the layer Processing
    loads. ``written``: where the raster is now (its temporary file: the style is written beside it and moves with
    it when the run's outputs are committed)."""
    styled = QgsRasterLayer(written or path, os.path.basename(path), "gdal")
    if styled.isValid():
        styled.setRenderer(paletted_renderer(styled.dataProvider(), classes, transparent_background))
        save_default_style(styled)
    del styled
    if context.willLoadLayerOnCompletion(path):
        context.layerToLoadOnCompletionDetails(path).setPostProcessor(StyleClasses(classes, transparent_background))


def outlined_renderer(classes, points=False):
    """Boxes drawn as outlines (the image stays visible), one colour per class; points as circles."""
    cats = []
    for c in classes:
        if points:
            sym = QgsMarkerSymbol.createSimple({"name": "circle", "color": "#" + c.color, "size": "2",
                                                "outline_color": "#000000", "outline_width": "0.2"})
        else:
            sym = QgsFillSymbol.createSimple({"style": "no", "outline_color": "#" + c.color, "outline_width": "0.5",
                                              "joinstyle": "miter"})
        cats.append(QgsRendererCategory(c.value, sym, c.name))
    return QgsCategorizedSymbolRenderer("class_id", cats)


class StyleObjects(QgsProcessingLayerPostProcessorInterface):
    """Styles a layer of objects (boxes, polygons or points) by class once Processing has loaded it."""

    keep = []  # Processing does not own post-processors: keep them alive

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        StyleObjects.keep.append(self)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        points = layer.geometryType() == QgsWkbTypes.PointGeometry
        layer.setRenderer(outlined_renderer(self.classes, points=points))
        layer.triggerRepaint()


#: the fills of the similarity classes, least to most similar (viridis)
SIMILARITY_COLOURS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")


def similarity_renderer(low, high, field="similarity"):
    """Polygons graduated by ``field`` in equal steps from ``low`` to ``high``, semi-transparent, most similar
    yellow."""
    n = len(SIMILARITY_COLOURS)
    high = high if high > low else low + 1e-6
    step = (high - low) / n
    ranges = []
    for i, colour in enumerate(SIMILARITY_COLOURS):
        lo, hi = low + i * step, (high if i == n - 1 else low + (i + 1) * step)
        sym = QgsFillSymbol.createSimple({"color": colour + "99", "outline_color": colour, "outline_width": "0.2"})
        ranges.append(QgsRendererRange(lo, hi, sym, f"{lo:.3f} - {hi:.3f}"))
    return QgsGraduatedSymbolRenderer(field, ranges)


class StyleSimilarity(QgsProcessingLayerPostProcessorInterface):
    """Styles the patches of rs_deep:find_similar by similarity (:func:`similarity_renderer`) once Processing has
    loaded them."""

    keep = []  # Processing does not own post-processors: keep them alive

    def __init__(self):
        super().__init__()
        StyleSimilarity.keep.append(self)

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS API)
        i = layer.fields().indexOf("similarity")
        if i < 0:
            return
        low, high = layer.minimumValue(i), layer.maximumValue(i)
        if low is None or high is None:
            return
        layer.setRenderer(similarity_renderer(float(low), float(high)))
        layer.triggerRepaint()
