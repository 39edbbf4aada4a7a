"""Render demo_output over the sample with QGIS's own renderer into docs/demo.png (for the README)."""
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from qgis.core import (QgsApplication, QgsFillSymbol, QgsMapRendererParallelJob, QgsMapSettings,  # noqa: E402
                       QgsRasterLayer, QgsSingleSymbolRenderer, QgsVectorLayer)
from qgis.PyQt.QtCore import QSize  # noqa: E402
from qgis.PyQt.QtGui import QColor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(out=os.path.join(ROOT, "docs", "demo.png")):
    app = QgsApplication([], False)
    app.initQgis()
    sample = QgsRasterLayer(os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif"), "sample")
    classes = QgsRasterLayer(os.path.join(ROOT, "demo_output", "segmentation.tif"), "classes")
    classes.setOpacity(0.45)
    polys = QgsVectorLayer(os.path.join(ROOT, "demo_output", "segmentation.gpkg"), "polygons")
    sym = QgsFillSymbol.createSimple({"style": "no", "outline_color": "#ffff00", "outline_width": "0.5"})
    polys.setRenderer(QgsSingleSymbolRenderer(sym))
    settings = QgsMapSettings()
    settings.setLayers([polys, classes, sample])
    settings.setDestinationCrs(sample.crs())
    settings.setExtent(sample.extent())
    settings.setOutputSize(QSize(600, 900))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(out, "PNG")
    print(f"wrote {out}")
    del job, settings, polys, classes, sample  # before exitQgis: layers freed after it crash QGIS 3.22 at exit
    app.exitQgis()


if __name__ == "__main__":
    main(*sys.argv[1:])
