"""Shared fixtures. The repo is imported as the package `rs_deep` through the dev link, exactly as
QGIS imports the installed plugin."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
import pytest

# the ONNX cache of RS Deep's own packages (engine/models/onnx/cache.py): a folder of this test session, inherited by
# the processes it starts (qgis_process), never the user's cache; removed at the end
_CACHE = tempfile.mkdtemp(prefix="rs_deep_test_cache_")
os.environ["RS_DEEP_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

ROOT = Path(__file__).resolve().parents[1]
DEV_PLUGINS = ROOT / "build" / "dev-plugins"
if not (DEV_PLUGINS / "rs_deep").exists():
    DEV_PLUGINS.mkdir(parents=True, exist_ok=True)
    os.symlink("../..", DEV_PLUGINS / "rs_deep")
sys.path.insert(0, str(DEV_PLUGINS))
sys.path.insert(0, str(ROOT / "tools"))

# Real samples that may ship, in the repo (tests/data/*/ATTRIBUTION.md). The two images the plugin bundles as
# samples are not duplicated: the Atlanta image and the NEON tree image are those of resources/sample.
DATA = ROOT / "tests" / "data"
DEMO_MODEL = ROOT / "resources" / "models" / "buildings_demo"
SAMPLE = ROOT / "resources" / "sample" / "atlanta_pan.tif"
ATLANTA_IMAGE = SAMPLE  # SpaceNet Atlanta, 600 x 900 px, 0.5 m, EPSG:32616, UInt16
ATLANTA_LABELS = DATA / "buildings_atlanta" / "buildings.geojson"  # 32 building footprints, same CRS
TREES_IMAGE = ROOT / "resources" / "sample" / "osbs_029.tif"  # NEON OSBS_029, 400 x 400 RGB, 0.1 m, EPSG:32617
TREES = DATA / "trees_neon"  # OSBS_029_boxes.geojson (map coordinates) and OSBS_029.xml (Pascal VOC)
LANDSAT = DATA / "landsat_smoke" / "RGB.byte.tif"
CHANGE = DATA / "change_atlanta"  # change pairs simulated from the Atlanta image (tools/make_change_pair.py)


class ChangePair:
    """A before/after pair with its change mask (0/255) and change polygons: ``<stem>_A.tif``, ``<stem>_B.tif``,
    ``<stem>_label.tif``, ``<stem>_change.geojson`` in ``folder``."""

    def __init__(self, folder, stem):
        self.before, self.after = folder / f"{stem}_A.tif", folder / f"{stem}_B.tif"
        self.label, self.polygons = folder / f"{stem}_label.tif", folder / f"{stem}_change.geojson"


ATLANTA_EAST, ATLANTA_WEST = ChangePair(CHANGE, "east"), ChangePair(CHANGE, "west")


@pytest.fixture(autouse=True, scope="session")
def _delete_leaked_layers(qgis_app):
    """Delete, while QGIS is still up, the layers that Python still holds at the end of the session.

    QGIS 3.22's bindings never release an exception raised out of a Python ``processAlgorithm``; its
    traceback keeps the frames alive and, through ``f_back``, the frames of the test that ran the
    algorithm, with their layers. An OGR layer destroyed at interpreter exit, after ``exitQgis()``
    shut OGR down, crashes the process after the results are printed. This fixture is torn down
    before pytest-qgis's ``qgis_app`` (it depends on it), so the layers die in the right order.
    """
    yield
    import gc
    import warnings
    from qgis.core import QgsMapLayer
    from qgis.PyQt import sip
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on lazy module attributes (torch) may warn
        layers = [o for o in gc.get_objects() if isinstance(o, QgsMapLayer)]
    for layer in layers:
        if not sip.isdeleted(layer) and sip.ispyowned(layer):
            sip.delete(layer)


_PROVIDER = []


@pytest.fixture(scope="module")
def provider(qgis_processing):
    """The rs_deep Processing provider, registered when missing (a test module may unload the plugin, which
    removes it); a reference is kept: the registry does not keep the Python object alive."""
    from qgis.core import QgsApplication
    from rs_deep.processing_algorithms.provider import RSDeepProvider
    reg = QgsApplication.processingRegistry()
    if reg.providerById("rs_deep") is None:
        _PROVIDER.append(RSDeepProvider())
        reg.addProvider(_PROVIDER[-1])
    return reg.providerById("rs_deep")


def make_package(path, in_channels=3, classes=("background", "building"), tile=64, overlap=16, gsd=None,
                 seed=0, scaling=None, bands=None):
    """A small untrained U-Net package (real weights, real format) for engine and QGIS tests."""
    import torch
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.package import ModelClass, save_package
    torch.manual_seed(seed)
    builder = dict(library="smp", architecture="Unet", encoder="resnet18", in_channels=in_channels,
                   classes=len(classes), encoder_weights=None,
                   params={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    model = build_model(builder)
    colors = ["000000", "E31A1C", "1F78B4", "33A02C"]
    save_package(model, path, name=Path(path).name, task="segmentation",
                 bands=bands or [f"b{i + 1}" for i in range(in_channels)],
                 classes=[ModelClass(i, n, colors[i % 4]) for i, n in enumerate(classes)], builder=builder,
                 tile_size=tile, overlap=overlap, gsd=gsd,
                 value_scaling=scaling or [{"type": "min-max", "minimum": 0, "maximum": 255}],
                 description="test model")
    return Path(path)


@pytest.fixture(scope="session")
def rgb_package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "rgb_test")


@pytest.fixture(scope="session")
def gray_package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "gray_test", in_channels=1,
                        scaling=[{"type": "min-max", "minimum": 0, "maximum": 2047}])


def write_raster(path, array, transform=None, crs="EPSG:32618", nodata=None, dtype=None):
    import rasterio
    from rasterio.transform import from_origin
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    profile = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=dtype or array.dtype, transform=transform or from_origin(500000.123456789, 4100000.987654321,
                                                                                 0.5, 0.5),
                   nodata=nodata)
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array.astype(profile["dtype"]))
    return Path(path)


@pytest.fixture
def rgb_raster(tmp_path):
    """A crop of the real Landsat sample (with its nodata border), 300 x 260 px."""
    import rasterio
    from rasterio.windows import Window
    with rasterio.open(LANDSAT) as src:
        win = Window(0, 0, 300, 260)
        arr = src.read(window=win)
        return write_raster(tmp_path / "rgb.tif", arr, transform=src.window_transform(win), crs=src.crs,
                            nodata=0)


def model_output(model, name):
    """The parameter (and result) name of a model's output ``name``: ``child:name`` up to QGIS 3.24, ``name`` from
    3.26 on; taken from the model itself, so a test of the model builder runs on every QGIS version."""
    names = [d.name() for d in model.destinationParameterDefinitions()]
    for n in names:
        if n == name or n.endswith(":" + name):
            return n
    raise KeyError(f"model output {name!r} not in {names}")
