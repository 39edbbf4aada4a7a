"""Deepness conformance: Deepness's own dummy ONNX models and test raster (tests/data/deepness, Apache-2.0, see
ATTRIBUTION.md) through RS Deep's engine and Processing algorithms, against the values Deepness's tests assert
(test/test_map_processor_*.py of PUTvision/qgis-plugin-deepness)."""
import numpy as np
import pytest
import rasterio

from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.onnx.package import load_onnx_package

from conftest import DATA

DEEPNESS = DATA / "deepness"
FOTOMAP = DEEPNESS / "dummy_fotomap_small.tif"  # 1243 x 841 px at 2 cm
SEG = DEEPNESS / "segmentation"
RED = DEEPNESS / "one_output_sigmoid_red_detector.onnx"


def _run(alg, params):
    import processing
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=QgsProcessingFeedback())


def _names(path):
    return [c.name for c in load_onnx_package(path).classes]


def test_class_names_one_dict_per_output():
    # test_map_processor_segmentation_many_output_types: get_channel_name(0, 0) == 'background', (0, 1) == 'Coffee'
    assert _names(SEG / "one_output_sigmoid_bsx1x512x512.onnx") == ["background", "Coffee"]


def _with_metadata(src, dst, **meta):
    """A copy of the Deepness model ``src`` with ``meta`` (key -> JSON text) added to its metadata_props."""
    import onnx
    proto = onnx.load(str(src))
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(dst))
    return dst


def _deepness_count(raster, shape=(561, 829)):
    """Class-1 pixels of a class raster read on Deepness's 3 cm grid (829 x 561 px for the test raster)."""
    from rasterio.enums import Resampling
    with rasterio.open(raster) as ds:
        return int((ds.read(1, out_shape=shape, resampling=Resampling.nearest) == 1).sum())


# test_map_processor_segmentation_sigmoid: 3 cm/px, threshold 0.6, "abs(pixels[1][1] - 25002) < 50", Deepness's own
# tolerance. RS Deep processes a Deepness model as Deepness does: the 2 cm raster read at 3 cm with bilinear
# resampling in its own 8-bit type, the classes back on the 2 cm grid as they are; counted on Deepness's 3 cm grid
# that gives 25,034 (Deepness also median-blurs its classes over 5 px; tools/deepness_red_replay.py).
RED_PIXELS, RED_TOLERANCE = 25002, 50


def test_classify_threshold_as_deepness():
    from rs_deep.rs_deep_plugin.engine.inference.segment import classify
    p = np.array([0.2, 0.4, 0.55, 0.7])
    binary = np.stack([1 - p, p])[:, None, :]
    assert classify(binary, 0.3, binary=True).ravel().tolist() == [0, 1, 1, 1]  # Deepness: p >= threshold
    assert classify(binary, 0.6, binary=True).ravel().tolist() == [0, 0, 0, 1]
    assert classify(binary).ravel().tolist() == [0, 0, 1, 1]  # no threshold: argmax, as before
    three = np.array([[0.5, 0.1], [0.3, 0.2], [0.2, 0.7]])[:, None, :]
    assert classify(three, 0.6).ravel().tolist() == [0, 2]  # winning probability below the threshold: class 0


def test_red_detector_threshold_engine(tmp_path):
    import dataclasses
    pkg = dataclasses.replace(load_onnx_package(RED), gsd=0.03)  # the test's resolution_cm_per_px=3
    assert pkg.binary_output and pkg.threshold is None
    out = tmp_path / "red.tif"
    result = segment(FOTOMAP, pkg, out, threshold=0.6)
    assert (result.width, result.height) == (1243, 841)  # the raster's grid (Deepness: 829 x 561 at 3 cm)
    assert abs(_deepness_count(out) - RED_PIXELS) < RED_TOLERANCE
    assert abs(result.class_pixels[1] * result.pixel_area_m2 / 0.03 ** 2 - RED_PIXELS) < RED_TOLERANCE
    argmax = segment(FOTOMAP, pkg, tmp_path / "argmax.tif", threshold=-1)  # no threshold: ~8x more
    assert argmax.class_pixels[1] > 7 * result.class_pixels[1]


def test_red_detector_threshold_processing(provider, tmp_path):
    # the model's own seg_thresh is honoured; THRESHOLD overrides it
    model = _with_metadata(RED, tmp_path / "red.onnx", model_type='"Segmentor"', resolution="3", seg_thresh="0.6",
                           class_names='[{"0": "red"}]')
    assert load_onnx_package(model).threshold == 0.6
    res = _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(model), "OUTPUT": str(tmp_path / "a.tif"),
                                   "OUTPUT_VECTOR": "TEMPORARY_OUTPUT"})
    assert abs(_deepness_count(res["OUTPUT"]) - RED_PIXELS) < RED_TOLERANCE
    res = _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(model), "OUTPUT": str(tmp_path / "b.tif"),
                                   "THRESHOLD": 0.9, "OUTPUT_VECTOR": "TEMPORARY_OUTPUT"})
    assert _deepness_count(res["OUTPUT"]) < RED_PIXELS - RED_TOLERANCE


# test_map_processor_segmentation_many_output_types: result shape (outputs, 561, 829) and the class names of each
# output. RS Deep writes one class band per output, on the raster's grid (1243 x 841 px here).
@pytest.mark.parametrize("model, names, bands", [
    ("one_output_sigmoid_bsx512x512.onnx", ["background", "Coffee"], 1),  # [B, H, W] sigmoid, batch fixed in-graph
    ("one_output_softmax_bsx2x512x512.onnx", ["class_0", "class_1"], 1),
    ("two_outputs_sigmoid_bsx1x512x512.onnx", ["background", "Coffee", "background (output2)", "Juice"], 2),
    ("two_outputs_sigmoid_bsx512x512.onnx", ["background", "foreground", "background (output2)",
                                             "foreground (output2)"], 2),
    ("two_outputs_softmax_bsx2x512x512.onnx", ["Coffee", "Tea", "Juice", "Beer"], 2),
])
def test_output_layouts(model, names, bands, tmp_path):
    pkg = load_onnx_package(SEG / model)
    assert [c.name for c in pkg.classes] == names
    out = tmp_path / "c.tif"
    result = segment(FOTOMAP, pkg, out, batch_size=3)  # batches of 3, whatever batch the graph takes
    with rasterio.open(out) as ds:
        assert (ds.count, ds.height, ds.width) == (bands, 841, 1243)
        cls = ds.read()
    assert sum(result.class_pixels.values()) == bands * 841 * 1243
    if bands == 2:  # each band holds only its own output's classes
        first = len(pkg.classes) - pkg.output_groups[1][0]
        assert cls[0].max() < first <= cls[1].min()


def test_batch_fixed_inside_the_graph():
    # the input says "batch_size" but a Reshape fixes the output to batch 1: the batch comes from the graph
    assert load_onnx_package(SEG / "one_output_sigmoid_bsx512x512.onnx").fixed_batch == 1
    assert load_onnx_package(SEG / "dummy_model.onnx").fixed_batch == 1
    assert load_onnx_package(SEG / "one_output_softmax_bsx2x512x512.onnx").fixed_batch is None


def test_two_outputs_processing(provider, tmp_path):
    res = _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(SEG / "two_outputs_softmax_bsx2x512x512.onnx"),
                                   "OUTPUT": str(tmp_path / "two.tif"), "BATCH_SIZE": 2,
                                   "OUTPUT_VECTOR": "TEMPORARY_OUTPUT"})
    with rasterio.open(res["OUTPUT"]) as ds:
        assert (ds.count, ds.height, ds.width) == (2, 841, 1243)
        assert ds.descriptions == ("class (output 1)", "class (output 2)")


def test_smaller_output_placed_in_the_tile_centre(tmp_path):
    # test_map_processor_segmentation_different_output_size: a 512 -> 484 px model (shape (1, 561, 829) at 3 cm).
    # Its output covers the tile's centre (14 px margins): placed there, not stretched over the tile.
    import onnxruntime as ort
    model = SEG / "different_output_size_512_to_484.onnx"
    out, probs = tmp_path / "c.tif", tmp_path / "p.tif"
    result = segment(FOTOMAP, load_onnx_package(model), out, probabilities=probs)
    with rasterio.open(FOTOMAP) as ds:
        tile = ds.read((1, 2, 3), window=((0, 512), (0, 512))).astype(np.float32)[None] / 255
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    direct = sess.run(None, {sess.get_inputs()[0].name: tile})[0][0]  # [2, 484, 484], scores not summing to 1
    direct = np.exp(direct) / np.exp(direct).sum(axis=0)  # read as logits
    with rasterio.open(probs) as ds:
        ours = ds.read(window=((14, 340), (14, 460)))  # the first tile only (the next ones start at 329 and 461)
    np.testing.assert_allclose(ours, direct[:, :326, :446], atol=1e-4)
    # the raster's outer 14 px have no prediction (nodata); everything else is classified
    assert sum(result.class_pixels.values()) == (1243 - 28) * (841 - 28)


def test_resolution_parameter_red_detector(provider, tmp_path):
    # the test's own parameters on its own file: resolution_cm_per_px=3, threshold 0.6 (the model has no metadata)
    assert load_onnx_package(RED).gsd is None
    res = _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(RED), "OUTPUT": str(tmp_path / "r.tif"),
                                   "RESOLUTION": 3, "THRESHOLD": 0.6, "OUTPUT_VECTOR": "TEMPORARY_OUTPUT"})
    assert abs(_deepness_count(res["OUTPUT"]) - RED_PIXELS) < RED_TOLERANCE
    res = _run("rs_deep:segment", {"INPUT": str(FOTOMAP), "MODEL": str(RED), "OUTPUT": str(tmp_path / "n.tif"),
                                   "THRESHOLD": 0.6, "OUTPUT_VECTOR": "TEMPORARY_OUTPUT"})  # at the raster's 2 cm
    assert abs(_deepness_count(res["OUTPUT"]) - RED_PIXELS) > RED_TOLERANCE
    with pytest.raises(InputError, match="RESOLUTION must be positive"):
        segment(FOTOMAP, RED, tmp_path / "x.tif", gsd=-0.01)


def test_resolution_and_threshold_parameters(provider):
    for alg, names in (("rs_deep:segment", ("RESOLUTION", "THRESHOLD")), ("rs_deep:detect", ("RESOLUTION",))):
        algorithm = provider.algorithm(alg.split(":")[1])
        for name in names:
            param = algorithm.parameterDefinition(name)
            assert param is not None and param.help() and param.flags() & param.FlagAdvanced


# test_map_processor_recognition: Deepness's dummy recognition model (224 x 224 px in, [B, 224] out: 1 minus the
# column sums of the image) on its 512 x 512 map (1 m pixels, a white 6 x 6 px square) at 50 cm/px, tiles of 224 px
# without overlap, query dummy_recognition_image.png. Deepness: result (1120, 1120) at 50 cm (5 x 5 tiles, padded),
# minimum -0.06747727 (atol 1e-6) on 50,176 px (one tile: the square's), maximum 1.0 on 891 px: the outline it
# draws into the map around the best tile (the first of the equal all-black tiles, the top-left one). The dummy's
# metadata says "Regression" (Deepness's test builds a Recognition from it by hand), so the test relabels it; the
# map has no CRS (Deepness takes its units for metres), so the test gives a copy of it a metric CRS.
REC_MAP = DEEPNESS / "dummy_recognition_map.tif"
REC_QUERY = DEEPNESS / "dummy_recognition_image.png"
REC_MIN = -0.06747727


def _relabelled(src, dst, model_type):
    """A copy of the ONNX model ``src`` whose metadata_props say ``model_type``."""
    import onnx
    proto = onnx.load(str(src))
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != "model_type"]
    del proto.metadata_props[:]
    for k, v in kept + [("model_type", model_type)]:
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(dst))
    return dst


def _metric_map(tmp_path):
    """The recognition map with 1 m pixels in UTM 33N (its pixels unchanged)."""
    with rasterio.open(REC_MAP) as src:
        profile, data = src.profile, src.read()
    profile.update(crs="EPSG:32633", transform=rasterio.Affine(1, 0, 500000, 0, -1, 5000000))
    path = tmp_path / "map.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_recognition_as_deepness(provider, tmp_path):
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    pkg = load_onnx_package(model)
    assert (pkg.task, pkg.tile_size, pkg.builder["classes"]) == ("recognition", 224, 224)
    res = _run("rs_deep:find_similar", {"INPUT": str(_metric_map(tmp_path)), "MODEL": str(model),
                                        "QUERY": str(REC_QUERY), "RESOLUTION": 50,
                                        "OUTPUT": str(tmp_path / "patches.gpkg"),
                                        "OUTPUT_RASTER": str(tmp_path / "similarity.tif")})
    with rasterio.open(res["OUTPUT_RASTER"]) as ds:
        sim, nodata = ds.read(1), ds.nodata
    assert sim.shape == (512, 512)  # the input's grid: Deepness's 1120 x 1120 px at 50 cm hold its 1024 x 1024
    valid = sim != nodata
    low = sim[valid].min()
    assert np.isclose(low, REC_MIN, atol=1e-6)
    # Deepness's 50,176 px at 50 cm are one tile, 224 x 224 px: 112 x 112 px of the 1 m map, the square's
    assert (sim == low).sum() == 112 * 112
    ys, xs = np.nonzero(sim == low)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (224, 335, 224, 335)  # the square: rows 249-254, cols 284-289
    from qgis.core import QgsVectorLayer
    layer = QgsVectorLayer(res["OUTPUT"], "patches", "ogr")
    feats = {f["rank"]: f for f in layer.getFeatures()}
    # 24 of the 5 x 5 patches: the bottom-right one holds 64 x 64 px of the map, under half of its 112 x 112
    assert len(feats) == 24 and sorted(feats) == list(range(1, 25))
    best, worst = feats[1], feats[24]
    # Deepness's best tile (where it draws its outline): the top-left; the worst is the square's, as on the raster
    assert (best["row"], best["col"]) == (0, 0) and (worst["row"], worst["col"]) == (2, 2)
    assert np.isclose(worst["similarity"], REC_MIN, atol=1e-6)
    assert best.geometry().boundingBox().toString(0) == "500000,4999888 : 500112,5000000"
    assert not valid[448:, 448:].any() and valid.sum() == 512 * 512 - 64 * 64


def test_recognition_refusals(provider, tmp_path):
    from qgis.core import QgsProcessingException
    rec = DEEPNESS / "dummy_recognition_model.onnx"
    # declared "Regression", it returns a vector per image: refused by predict_raster with the way to run it
    with pytest.raises(ModelPackageError, match=r"a regression model returns an image .*not a per-pixel output .*"
                                                r"Recognition .*rs_deep:find_similar"):
        load_onnx_package(rec)
    model = _relabelled(rec, tmp_path / "rec.onnx", '"Recognition"')
    with pytest.raises(InputError, match=r"recognition model; segmentation needs a segmentation model "
                                         r"\(similarity search \(recognition\) models run with rs_deep:find_similar\)"):
        segment(FOTOMAP, model, tmp_path / "x.tif")
    # a Recognition model must return [batch, values]
    seg = _relabelled(SEG / "one_output_softmax_bsx2x512x512.onnx", tmp_path / "seg.onnx", '"Recognition"')
    with pytest.raises(ModelPackageError, match=r"a Recognition model returns one embedding per image"):
        load_onnx_package(seg)
    # a segmentation model in find_similar, a query with other bands, no query file: clear messages, no output
    params = {"INPUT": str(_metric_map(tmp_path)), "MODEL": str(model), "QUERY": str(REC_QUERY), "RESOLUTION": 50,
              "OUTPUT": str(tmp_path / "p.gpkg"), "OUTPUT_RASTER": str(tmp_path / "s.tif")}
    with pytest.raises(QgsProcessingException, match=r"segmentation model; this tool needs a recognition model"):
        _run("rs_deep:find_similar", dict(params, MODEL=str(RED)))
    grey = tmp_path / "grey.tif"
    with rasterio.open(grey, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8",
                       transform=rasterio.Affine(1, 0, 0, 0, -1, 32)) as dst:
        dst.write(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(QgsProcessingException, match=r"QUERY: .*grey.tif has 1 band\(s\) and the model takes 3"):
        _run("rs_deep:find_similar", dict(params, QUERY=str(grey)))
    with pytest.raises(QgsProcessingException, match=r"QUERY: .*none.png does not exist"):
        _run("rs_deep:find_similar", dict(params, QUERY=str(tmp_path / "none.png")))
    huge = tmp_path / "huge.tif"  # 5000 x 5000 px, never read whole: refused from its size
    with rasterio.open(huge, "w", driver="GTiff", width=5000, height=5000, count=3, dtype="uint8", sparse_ok=True,
                       tiled=True, transform=rasterio.Affine(1, 0, 0, 0, -1, 5000)):
        pass
    with pytest.raises(QgsProcessingException, match=r"QUERY: .*huge.tif is 5000 x 5000 px, more than a query"):
        _run("rs_deep:find_similar", dict(params, QUERY=str(huge)))
    huge.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.tif", "map.tif", "rec.onnx", "seg.onnx"]


def test_regression_map_is_not_read_as_boxes(provider, tmp_path):
    # a [B, 512, 512] sigmoid map without metadata was read by rs_deep:detect as YOLO rows (1,094 boxes)
    from qgis.core import QgsProcessingException
    model = DEEPNESS / "regression" / "one_output_sigmoid_bsx512x512.onnx"
    assert load_onnx_package(model).task == "segmentation"
    with pytest.raises(QgsProcessingException, match="segmentation model"):
        _run("rs_deep:detect", {"INPUT": str(FOTOMAP), "MODEL": str(model), "OUTPUT": str(tmp_path / "b.gpkg")})
    # declared a Detector, the map is refused as a detector output
    typed = _with_metadata(model, tmp_path / "det.onnx", model_type='"Detector"')
    with pytest.raises(ModelPackageError, match=r"map of the input's 512 x 512 pixels, not YOLO rows"):
        load_onnx_package(typed)
    import onnx
    proto = onnx.load(str(DEEPNESS / "dummy_recognition_model.onnx"))  # output [B, 224], declared a Detector
    del proto.metadata_props[:]
    flat = tmp_path / "flat.onnx"
    onnx.save(proto, str(flat))
    flat = _with_metadata(flat, flat, model_type='"Detector"')
    with pytest.raises(ModelPackageError, match=r"of 3 dimensions; the first output is .* \(2 dimensions\)"):
        load_onnx_package(flat)


def test_dock_runs_a_recognition_model_with_find_similar(provider, qgis_iface, tmp_path):
    from qgis.core import QgsRasterLayer
    from rs_deep.rs_deep_plugin.gui.dock import RSDeepDock
    from test_dock import wait_done
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    layer = QgsRasterLayer(str(_metric_map(tmp_path)), "map")
    QgsProject.instance().addMapLayer(layer)
    dock = RSDeepDock(qgis_iface)
    try:
        dock.set_model(str(model))
        assert dock.algorithm_id == "rs_deep:find_similar" and "cannot run" not in dock.card.text()
        assert "Similarity search" in dock.card.text() and "Embedding: 224 values a patch" in dock.card.text()
        assert {"QUERY", "QUERY_EXTENT", "STRIDE", "RESOLUTION"} <= set(dock.option_widgets)
        dock.layer_combos["INPUT"].setLayer(layer)
        dock.option_widgets["QUERY"][1].setFilePath(str(REC_QUERY))
        dock.option_widgets["RESOLUTION"][1].setValue(50)
        run = dock.start_run()
        wait_done(run)
        assert run.status == run.DONE, run.message
        group = QgsProject.instance().layerTreeRoot().findGroup(run.name)
        patches = [t.layer() for t in group.findLayers() if t.layer().type() == t.layer().VectorLayer]
        assert len(patches) == 1 and patches[0].featureCount() == 24
        assert patches[0].renderer().type() == "graduatedSymbol"
        # the query drawn on the map instead, with QGIS's extent map tool: the square's patch comes first
        from qgis.core import QgsRectangle
        from qgis.gui import QgsMapToolExtent
        from qgis.PyQt.QtWidgets import QPushButton
        dock.option_widgets["QUERY"][1].setFilePath("")
        area = dock.option_widgets["QUERY_EXTENT"][1]
        canvas = qgis_iface.mapCanvas()
        canvas.setDestinationCrs(layer.crs())
        area.findChild(QPushButton).click()
        tool = canvas.mapTool()
        assert isinstance(tool, QgsMapToolExtent)
        tool.extentChanged.emit(QgsRectangle(500224, 4999664, 500336, 4999776))
        assert canvas.mapTool() is not tool and dock.drawn_extent is None
        assert "112 × 112 (EPSG:32633)" in area.label.text()
        run = dock.start_run()
        wait_done(run)
        assert run.status == run.DONE, run.message
        group = QgsProject.instance().layerTreeRoot().findGroup(run.name)
        patches = [t.layer() for t in group.findLayers() if t.layer().type() == t.layer().VectorLayer]
        best = [f for f in patches[0].getFeatures() if f["rank"] == 1][0]
        assert (best["row"], best["col"]) == (2, 2)
    finally:
        dock.deleteLater()
        QgsProject.instance().removeAllMapLayers()


def test_recognition_overlapping_patches_average_and_cancel(tmp_path):
    """STRIDE half the patch: each pixel of the similarity raster is the mean of the patches that cover it (checked
    against the patch values at every pixel); a cancel after the first batch leaves no raster and no temporary file."""
    from rs_deep.rs_deep_plugin.engine.errors import Cancelled
    from rs_deep.rs_deep_plugin.engine.inference.similar import find_similar
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    image = _metric_map(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = find_similar(image, model, REC_QUERY, stride=112, gsd=0.5, batch_size=4, raster_output=out / "s.tif")
    assert result.native_stride == 56 and result.patches == 10 * 10
    total = np.zeros((512, 512))
    count = np.zeros((512, 512))
    for f in result:
        x, y, w, h = f["window"]
        total[y:y + h, x:x + w] += f["similarity"]
        count[y:y + h, x:x + w] += 1
    with rasterio.open(out / "s.tif") as ds:
        sim, nodata = ds.read(1), ds.nodata
    assert np.array_equal(sim != nodata, count > 0)
    assert np.allclose(sim[count > 0], (total / np.maximum(count, 1))[count > 0], atol=1e-6)
    ranks = sorted(f["rank"] for f in result)
    assert ranks == list(range(1, len(result) + 1))
    assert min(f["similarity"] for f in result) < REC_MIN  # a patch centred nearer the square scores lower still
    calls = []
    with pytest.raises(Cancelled):
        find_similar(image, model, REC_QUERY, stride=112, gsd=0.5, batch_size=4, raster_output=out / "c.tif",
                     is_cancelled=lambda: bool(calls.append(1)) or len(calls) > 3)
    assert sorted(p.name for p in out.iterdir()) == ["s.tif"]


def test_recognition_through_qgis_process(tmp_path):
    import json
    from qgis_env import run_qgis_process
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    proc = run_qgis_process(["run", "rs_deep:find_similar", "--json", "--", f"INPUT={_metric_map(tmp_path)}",
                             f"MODEL={model}", f"QUERY={REC_QUERY}", "RESOLUTION=50",
                             f"OUTPUT={tmp_path / 'p.gpkg'}", f"OUTPUT_RASTER={tmp_path / 's.tif'}"])
    assert "ERROR" not in proc.stdout + proc.stderr
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT_RASTER"] == str(tmp_path / "s.tif")
    with rasterio.open(tmp_path / "s.tif") as ds:
        sim = ds.read(1)
    assert np.isclose(sim[sim > -1].min(), REC_MIN, atol=1e-6)
    assert "rank 1: similarity 0.2619" in proc.stdout


def test_similarity_blocks_equal_the_mean_of_covering_patches_across_blocks():
    """similarity_blocks in blocks of 37 px (each taking only the patches that reach into it) gives, at every pixel,
    the mean score of the patches that cover it; patches not run (NaN) count for nothing, pixels no run patch covers
    are not valid."""
    from rs_deep.rs_deep_plugin.engine.inference.similar import similarity_blocks
    rng = np.random.default_rng(0)
    region, n = (5, 3, 205, 163), 30
    ys, xs = list(range(3, 163, 20)), list(range(5, 205, 20))
    scores = rng.uniform(-1, 1, (len(ys), len(xs))).astype(np.float32)
    scores[2, 3] = scores[-1, -1] = np.nan
    total, count = np.zeros((160, 200)), np.zeros((160, 200))
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            if np.isfinite(scores[r, c]):
                total[y - 3:y - 3 + n, x - 5:x - 5 + n] += scores[r, c]
                count[y - 3:y - 3 + n, x - 5:x - 5 + n] += 1
    got, valid = np.zeros((160, 200)), np.zeros((160, 200), bool)
    blocks = 0
    for bx, by, values, ok in similarity_blocks(ys, xs, n, scores, region, block=37):
        got[by - 3:by - 3 + values.shape[0], bx - 5:bx - 5 + values.shape[1]] = values
        valid[by - 3:by - 3 + ok.shape[0], bx - 5:bx - 5 + ok.shape[1]] = ok
        blocks += 1
    assert blocks == 5 * 6
    assert np.array_equal(valid, count > 0) and not valid.all()
    assert np.allclose(got[valid], total[valid] / count[valid], atol=1e-6)


def test_recognition_query_from_an_area_of_the_map(provider, tmp_path):
    """QUERY_EXTENT: the query is read from the input layer, as the patches are: the square's patch area finds that
    patch first (similarity 1), the all-black patches last; QUERY and QUERY_EXTENT together, or neither, are
    refused with a message naming both, and nothing is written."""
    from qgis.core import QgsProcessingException, QgsVectorLayer
    from rs_deep.rs_deep_plugin.engine.inference.similar import find_similar
    model = _relabelled(DEEPNESS / "dummy_recognition_model.onnx", tmp_path / "rec.onnx", '"Recognition"')
    image = _metric_map(tmp_path)
    square = (500224, 4999664, 500336, 4999776)  # patch (2, 2): map pixels 224-335, the white square inside
    result = find_similar(image, model, query_bounds=square, gsd=0.5)
    best = result.best()[0]
    assert (best["row"], best["col"]) == (2, 2) and np.isclose(best["similarity"], 1.0, atol=1e-6)
    assert result.query_size == (112, 112) and max(f["rank"] for f in result) == 24
    out = tmp_path / "out"
    out.mkdir()
    params = {"INPUT": str(image), "MODEL": str(model), "RESOLUTION": 50, "OUTPUT": str(out / "p.gpkg"),
              "QUERY_EXTENT": "500224,500336,4999664,4999776 [EPSG:32633]"}
    res = _run("rs_deep:find_similar", params)
    ranks = {f["rank"]: (f["row"], f["col"]) for f in QgsVectorLayer(res["OUTPUT"], "p", "ogr").getFeatures()}
    assert ranks[1] == (2, 2)
    for bad in (dict(params, QUERY=str(REC_QUERY)), {k: v for k, v in params.items() if k != "QUERY_EXTENT"}):
        bad["OUTPUT"] = str(out / "bad.gpkg")
        with pytest.raises(QgsProcessingException, match=r"Give QUERY .* or QUERY_EXTENT .*one of the two"):
            _run("rs_deep:find_similar", bad)
    with pytest.raises(QgsProcessingException, match=r"QUERY_EXTENT \(600000, .*does not overlap the raster"):
        _run("rs_deep:find_similar", dict(params, OUTPUT=str(out / "bad.gpkg"),
                                          QUERY_EXTENT="600000,600100,4999664,4999776 [EPSG:32633]"))
    assert sorted(p.name for p in out.iterdir()) == ["p.gpkg"]
