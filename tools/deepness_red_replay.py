#!/usr/bin/env python3
"""Replays how Deepness counts the red pixels of its `test_map_processor_segmentation_sigmoid` case (expected 25,002
± 50), with QGIS's own raster provider, to show what its count hinges on (RS Deep's: 25,034 since 0.19.0, 24,945
before).

    .venv/bin/python tools/deepness_red_replay.py      (QT_QPA_PLATFORM=offscreen when there is no display)

Deepness reads the 2 cm test raster in 3 cm tiles through the layer's data provider with bilinear resampling
switched on, scales the bytes by 1/255, runs the one-output sigmoid model, keeps probabilities >= 0.6 and
median-blurs the class image (5 px, edges replicated). The 3 cm grid starts at the raster's top-left corner: 829 x
561 px. Prints the count for bilinear and nearest-neighbour reading, before and after the blur. Not a test of RS
Deep: it explains a number of the README's Deepness table.
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "deepness")
RES, WIDTH, HEIGHT, TILE = 0.03, 829, 561, 512


def read(layer, bilinear):
    """The raster's bands 1-3 on the 3 cm grid (uint8 [3, HEIGHT, WIDTH]), read by QGIS's provider."""
    from qgis.core import QgsRectangle
    prov = layer.dataProvider()
    if bilinear:
        prov.enableProviderResampling(True)
        prov.setZoomedInResamplingMethod(prov.ResamplingMethod.Bilinear)
        prov.setZoomedOutResamplingMethod(prov.ResamplingMethod.Bilinear)
    ext = layer.extent()
    grid = QgsRectangle(ext.xMinimum(), ext.yMaximum() - HEIGHT * RES, ext.xMinimum() + WIDTH * RES, ext.yMaximum())
    bands = [np.frombuffer(bytes(prov.block(b, grid, WIDTH, HEIGHT).data()), dtype=np.uint8).reshape(HEIGHT, WIDTH)
             for b in (1, 2, 3)]
    return np.stack(bands)


def probabilities(session, img):
    """The model's probability for every pixel, tile by tile (it is a per-pixel model: tiling changes nothing)."""
    out = np.zeros(img.shape[1:], np.float32)
    for y in range(0, img.shape[1], TILE):
        for x in range(0, img.shape[2], TILE):
            part = img[:, y:y + TILE, x:x + TILE]
            tile = np.zeros((1, 3, TILE, TILE), np.float32)
            tile[0, :, :part.shape[1], :part.shape[2]] = part / 255.0
            prob = np.squeeze(session.run(None, {session.get_inputs()[0].name: tile})[0])
            out[y:y + TILE, x:x + TILE] = prob[:part.shape[1], :part.shape[2]]
    return out


def main():
    import onnxruntime as ort
    from qgis.core import QgsApplication, QgsRasterLayer
    from scipy.ndimage import median_filter
    app = QgsApplication([], False)
    app.initQgis()
    session = ort.InferenceSession(os.path.join(DATA, "one_output_sigmoid_red_detector.onnx"),
                                   providers=["CPUExecutionProvider"])
    for bilinear in (True, False):
        layer = QgsRasterLayer(os.path.join(DATA, "dummy_fotomap_small.tif"), "fotomap")
        classes = (probabilities(session, read(layer, bilinear)) >= 0.6).astype(np.uint8) + 1
        blurred = median_filter(classes, size=5, mode="nearest")
        print(f"{'bilinear' if bilinear else 'nearest'}: {int((classes == 2).sum())} red pixels, "
              f"{int((blurred == 2).sum())} after the 5-px median (Deepness expects 25,002 +- 50)")
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
