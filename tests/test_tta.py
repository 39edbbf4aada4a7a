"""Test-time augmentation (models/tta.py): the runner wrapper on its own, then segmentation with the bundled demo model
on a crop of the Atlanta sample (grid, probabilities, equivariance of d4 under a left-right flip of the raster),
change detection on the Atlanta change pair, patch classification, rs_deep:segment through processing.run and a bad
value."""
import dataclasses

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.inference.change import detect_change
from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.tta import TTA_CHOICES, TTARunner, check_tta, tta_variants, with_tta

from conftest import ATLANTA_EAST, DEMO_MODEL, SAMPLE, write_raster
from test_accuracy import RecordingFeedback
from test_change import make_change_package
from test_patches import IMAGE as FIELDS_IMAGE
from test_patches import make_patch_package

CROP, TILE, OVERLAP = 192, 128, 32  # 2 x 2 tiles at 0 and 64 px: a grid that flips and rotates onto itself


# -- the runner wrapper ----------------------------------------------------------------------------------------------

class PixelSoftmax:
    """A runner that sees each pixel alone (softmax of its bands): any flip or rotation, undone, gives its own
    output back, so TTA must return exactly what it returns; it records the shapes it ran."""

    def __init__(self):
        self.shapes = []

    def __call__(self, batch):
        assert batch.flags.c_contiguous  # torch.from_numpy takes no negative strides
        self.shapes.append(batch.shape)
        e = np.exp(batch - batch.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("tta,square,passes", [("flips", True, 3), ("d4", True, 8), ("flips", False, 3),
                                               ("d4", False, 4)])
def test_every_transform_is_undone(tta, square, passes):
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(2, 3, 8, 8 if square else 6)).astype(np.float32)
    inner = PixelSoftmax()
    probs = TTARunner(inner, tta)(batch)
    np.testing.assert_allclose(probs, PixelSoftmax()(batch), atol=1e-6)  # a wrong inverse moves the pixels
    assert len(inner.shapes) == passes == len(tta_variants(tta, square))
    assert {s[-2:] for s in inner.shapes} == ({(8, 8)} if square else {(8, 6)})  # no rotation of a non-square tile


def test_patch_scores_are_averaged_as_they_are():
    """A classifier's [B, K] scores have no grid: the mean over the variants of what each one returns."""
    def corner_score(batch):  # depends on where the content is: the top-left pixel
        s = batch[:, :, 0, 0]
        return np.stack([s[:, 0], 1 - s[:, 0]], axis=1).astype(np.float32)

    batch = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4) / 32
    corners = batch[:, 0, [0, 0, 3, 3], [0, 3, 0, 3]]  # top-left, top-right, bottom-left, bottom-right
    out = TTARunner(corner_score, "d4")(batch)  # each corner comes to the top-left twice among the 8
    np.testing.assert_allclose(out[:, 0], corners.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


def test_choices_and_a_bad_value():
    runner = PixelSoftmax()
    assert with_tta(runner, None) is runner and with_tta(runner, "none") is runner  # "none": one code path
    assert TTA_CHOICES == ("none", "flips", "d4") and check_tta(" D4 ") == "d4"
    with pytest.raises(InputError, match="TTA 'rotate' is unknown; use one of none, flips, d4"):
        with_tta(runner, "rotate")


# -- segmentation with the demo model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A square crop of the Atlanta sample with buildings, and the same pixels flipped left-right and transposed
    (same transform): rasters whose tiles are the crop's, flipped or rotated. {name: path}."""
    folder = tmp_path_factory.mktemp("tta")
    with rasterio.open(SAMPLE) as src:
        win = Window(150, 350, CROP, CROP)
        arr, transform, crs = src.read(window=win), src.window_transform(win), src.crs
    views = {"crop": arr, "flipped": arr[:, :, ::-1], "transposed": arr.transpose(0, 2, 1)}
    return {name: write_raster(folder / f"{name}.tif", a, transform=transform, crs=crs, nodata=0)
            for name, a in views.items()}


@pytest.fixture(scope="module")
def probabilities(crops, tmp_path_factory):
    """``probabilities(raster, tta)``: the segmentation result and its probabilities [K, H, W], run once each."""
    folder, done = tmp_path_factory.mktemp("tta_out"), {}
    pkg = load_package(DEMO_MODEL)

    def run(raster, tta):
        if (raster, tta) not in done:
            out, probs, said = folder / f"{raster.stem}_{tta}.tif", folder / f"{raster.stem}_{tta}_p.tif", []
            res = segment(str(raster), pkg, str(out), probabilities=str(probs), tile_size=TILE, overlap=OVERLAP,
                          batch_size=2, device="cpu", tta=tta, log=said.append)
            with rasterio.open(probs) as ds:
                done[raster, tta] = res, ds.read(), said
        return done[raster, tta]
    return run


@pytest.mark.parametrize("tta", TTA_CHOICES)
def test_segment_with_tta_keeps_the_grid_and_gives_probabilities(crops, probabilities, tta):
    crop = crops["crop"]
    res, p, said = probabilities(crop, tta)
    assert res.tta == tta and f"Test-time augmentation: {tta} (" in "\n".join(said)
    assert res.tiles == res.tiles_run == 4
    with rasterio.open(crop) as src, rasterio.open(res.output) as ds:
        assert (ds.width, ds.height, ds.transform, ds.crs) == (src.width, src.height, src.transform, src.crs)
        cls = ds.read(1)
    assert p.shape == (2, CROP, CROP) and p.dtype == np.float32
    assert p.min() >= 0 and p.max() <= 1
    np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(cls, np.argmax(p, axis=0))
    assert 0 < (cls == 1).mean() < 0.9  # buildings found, not everywhere


def test_d4_probabilities_follow_a_flipped_raster(crops, probabilities):
    """d4 averages over the group of the square's flips and rotations: on the raster flipped left-right, or
    transposed, its probabilities are the raster's, flipped or transposed, to float rounding. An inverse transform
    that is wrong breaks this (the transpose catches rotations undone the wrong way, which the flip alone does not).
    Without TTA the network alone is not flip-equivariant, and they differ."""
    d4 = probabilities(crops["crop"], "d4")[1]
    np.testing.assert_allclose(probabilities(crops["flipped"], "d4")[1][:, :, ::-1], d4, atol=2e-4)
    np.testing.assert_allclose(probabilities(crops["transposed"], "d4")[1].transpose(0, 2, 1), d4, atol=2e-4)
    plain, plain_flipped = probabilities(crops["crop"], "none")[1], probabilities(crops["flipped"], "none")[1]
    assert np.abs(plain_flipped[:, :, ::-1] - plain).max() > 1e-2
    flips = probabilities(crops["crop"], "flips")[1]
    assert np.abs(flips - plain).max() > 1e-3 and np.abs(d4 - flips).max() > 1e-3  # each choice does something


def test_bad_tta_is_refused_before_any_work(crops, tmp_path):
    out = tmp_path / "c.tif"
    with pytest.raises(InputError, match="TTA 'd8' is unknown"):
        segment(str(crops["crop"]), str(DEMO_MODEL), str(out), tta="d8")
    assert not list(tmp_path.iterdir())


# -- change and patches ----------------------------------------------------------------------------------------------

def test_change_with_flips_on_the_atlanta_pair(tmp_path):
    pkg = load_package(make_change_package(tmp_path / "chg", in_channels=1))
    pkg = dataclasses.replace(pkg, value_scaling=[{"type": "min-max", "minimum": 111, "maximum": 1273}])
    with rasterio.open(ATLANTA_EAST.before) as src:
        crs, window_transform = src.crs, src.window_transform(Window(64, 256, 128, 128))
    left, top = window_transform * (0, 0)
    right, bottom = window_transform * (128, 128)
    out, probs, said = tmp_path / "c.tif", tmp_path / "p.tif", []
    res = detect_change(ATLANTA_EAST.before, ATLANTA_EAST.after, pkg, str(out), probabilities=str(probs),
                        bounds=(left, bottom, right, top), device="cpu", tta="flips", log=said.append)
    assert res.tta == "flips" and "Test-time augmentation: flips (3 passes" in "\n".join(said)
    with rasterio.open(out) as ds, rasterio.open(probs) as pds:
        assert (ds.width, ds.height, ds.crs, ds.transform) == (128, 128, crs, window_transform)
        cls, p = ds.read(1), pds.read()
    valid = cls != 255
    assert valid.all()  # the pair has no nodata there
    assert p[:, valid].min() >= 0 and p[:, valid].max() <= 1
    np.testing.assert_allclose(p[:, valid].sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(cls, np.argmax(p, axis=0))


def test_patch_scores_with_d4_follow_a_flipped_raster(tmp_path):
    """Patch classification takes the same wrapper: d4 scores of a raster flipped left-right are those of the
    mirrored patches of the raster."""
    pkg = make_patch_package(tmp_path / "pc")
    with rasterio.open(FIELDS_IMAGE) as src:
        win = Window(0, 0, 64, 32)  # 4 x 2 patches of 16 px
        arr, transform, crs = src.read(window=win), src.window_transform(win), src.crs
    crop = write_raster(tmp_path / "crop.tif", arr, transform=transform, crs=crs)
    flipped = write_raster(tmp_path / "flipped.tif", arr[:, :, ::-1], transform=transform, crs=crs)

    def scores(raster, tta):
        res = classify_patches(str(raster), str(pkg), device="cpu", tta=tta)
        assert res.tta == tta and res.patches_run == 8
        return {(f["row"], f["col"]): [s for _, _, s in sorted(f["top"])] for f in res}

    d4, d4_flipped = scores(crop, "d4"), scores(flipped, "d4")
    for (r, c), s in d4.items():
        np.testing.assert_allclose(d4_flipped[r, 3 - c], s, atol=1e-5)
        assert 0 <= min(s) and sum(s) <= 1 + 1e-5
    plain, plain_flipped = scores(crop, "none"), scores(flipped, "none")
    assert max(np.abs(np.subtract(plain_flipped[r, 3 - c], s)).max() for (r, c), s in plain.items()) > 1e-4


# -- Processing ------------------------------------------------------------------------------------------------------

def test_segment_algorithm_takes_tta(provider, crops, probabilities, tmp_path):
    import processing
    from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingParameterDefinition, QgsProject
    registry = QgsApplication.processingRegistry()
    for name in ("rs_deep:segment", "rs_deep:detect_change", "rs_deep:classify_patches"):
        param = registry.algorithmById(name).parameterDefinition("TTA")
        assert param.names == ["none", "flips", "d4"] and param.defaultValue() == 0, name
        assert param.flags() & QgsProcessingParameterDefinition.FlagAdvanced
        assert "8×" in registry.algorithmById(name).shortHelpString()
    assert registry.algorithmById("rs_deep:detect").parameterDefinition("TTA") is None  # boxes: no TTA

    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    out, probs = tmp_path / "c.tif", tmp_path / "p.tif"
    feedback = RecordingFeedback()
    res = processing.run("rs_deep:segment", {"INPUT": str(crops["crop"]), "MODEL": "buildings_demo", "OUTPUT": str(out),
                                             "PROBABILITIES": str(probs), "OUTPUT_VECTOR": str(tmp_path / "o.gpkg"),
                                             "TTA": "flips", "TILE_SIZE": TILE, "OVERLAP": OVERLAP, "DEVICE": "cpu"},
                         context=context, feedback=feedback)
    assert res["OUTPUT"] == str(out)
    text = "\n".join(feedback.messages)
    assert "Test-time augmentation: flips (3 passes" in text and "test-time augmentation flips" in text
    with rasterio.open(probs) as ds:
        np.testing.assert_allclose(ds.read(), probabilities(crops["crop"], "flips")[1], atol=1e-5)  # the engine's
