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


# test_map_processor_segmentation_sigmoid: 3 cm/px, threshold 0.6, "abs(pixels[1][1] - 25002) < 50". RS Deep reads
# the 2 cm raster at 3 cm by averaging (Deepness: QGIS's bilinear provider resampling, and a 5-px median blur of the
# classes; replayed with QGIS 3.22 and 3.44 that gives 25,002 exactly, 25,205 when read nearest-neighbour): 24,946 px,
# within 0.3 %.
RED_PIXELS, RED_TOLERANCE = 25002, 0.005 * 25002


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


# test_map_processor_recognition: a model type RS Deep does not run is refused with its type named, never run as
# another task. Its dummy says "Regression" but returns a vector per image, which no regressor does. (Deepness's
# regression and super-resolution cases run through rs_deep:predict_raster: tests/test_predict_raster.py.)
@pytest.mark.parametrize("model, message", [
    ("dummy_recognition_model.onnx", r"a regression model returns an image .*not a per-pixel output"),
])
def test_unsupported_model_types_are_refused(model, message, tmp_path):
    with pytest.raises(ModelPackageError, match=message):
        load_onnx_package(DEEPNESS / model)
    with pytest.raises(ModelPackageError, match=message):
        segment(FOTOMAP, DEEPNESS / model, tmp_path / "x.tif")
    proto = __import__("onnx").load(str(DEEPNESS / model))
    for e in proto.metadata_props:
        if e.key == "model_type":
            e.value = '"Recognition"'
    __import__("onnx").save(proto, str(tmp_path / "rec.onnx"))
    with pytest.raises(ModelPackageError, match=r"Recognition model .*does not run that model type yet"):
        load_onnx_package(tmp_path / "rec.onnx")


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
