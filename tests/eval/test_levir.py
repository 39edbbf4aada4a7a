"""Change detection on LEVIR-CD (research use only: never shipped, not in the repo). Run with ``make eval``.

The default run (``make test``) covers the same on a change pair simulated from the shippable Atlanta sample
(tests/data/change_atlanta); these are the original tests on real before/after imagery: two 1024 x 1024 px RGB
pairs in EPSG:4326 with their 0/255 change masks and change polygons, read from ``../shared/data/change_levir``
beside this checkout. Without them these tests fail (they do not skip)."""
import pytest

from rs_deep.rs_deep_plugin.engine.training.chips import export_training_data
from rs_deep.rs_deep_plugin.engine.errors import InputError

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS, ROOT, ChangePair
from test_accuracy import _run
from test_chips import check_change_chips_train_a_change_model
from test_training_data import (check_assess_change_raster, check_change_chips_from_a_label_raster,
                                check_change_trains_from_two_rasters_and_polygons)

LEVIR = ROOT.parent / "shared" / "data" / "change_levir"
LEVIR_7, LEVIR_12 = ChangePair(LEVIR, "test_7"), ChangePair(LEVIR, "test_12")
TINY = {"ARCHITECTURE": 1, "ENCODER": "resnet18", "EPOCHS": 2, "BATCH_SIZE": 2, "LEARNING_RATE": 0.002,
        "TILE_SIZE": 64, "STEPS_PER_EPOCH": 2, "DEVICE": 1}


@pytest.fixture(autouse=True, scope="module")
def _levir():
    missing = [n for n in ("test_7_A.tif", "test_7_B.tif", "test_7_label.tif", "test_7_change.geojson",
                           "test_12_A.tif", "test_12_B.tif") if not (LEVIR / n).is_file()]
    if missing:
        pytest.fail(f"The LEVIR-CD samples are missing: {LEVIR} ({', '.join(missing)}). They are research-only and "
                    "not in the repo: put the shared/ folder beside this checkout (../shared/data/change_levir).",
                    pytrace=False)


# --------------------------------------------------------------------------------------------
# engine (from tests/test_chips.py)


def test_change_chips_from_a_label_raster_train_a_change_model(tmp_path):
    check_change_chips_train_a_change_model(tmp_path, LEVIR_7)


def test_non_overlapping_change_pair_is_refused(tmp_path):
    with pytest.raises(InputError, match="do not overlap"):
        export_training_data(ATLANTA_IMAGE, str(LEVIR / "test_7_label.tif"), tmp_path / "x", task="change",
                             after_path=LEVIR / "test_7_B.tif", class_names=["no change", "change"])
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# QGIS Processing (from tests/test_training_data.py)


def test_change_trains_from_two_rasters_and_polygons(provider, tmp_path):
    """LEVIR-CD pair + the change polygons (WGS 84): the algorithm exports chips itself, trains a Siamese U-Net,
    and rs_deep:detect_change runs the package on another pair."""
    check_change_trains_from_two_rasters_and_polygons(tmp_path, LEVIR_7, LEVIR_12, (1024, 1024))


def test_change_chips_from_a_label_raster(provider, tmp_path):
    check_change_chips_from_a_label_raster(tmp_path, LEVIR_7, 16)  # 1024 px in 256 px chips, all kept


def test_change_pair_bad_input_is_clear(provider, tmp_path):
    """The LEVIR-CD parts of tests/test_training_data.py::test_training_data_bad_input_is_clear."""
    from qgis.core import QgsProcessingException
    base = {"INPUT": str(ATLANTA_IMAGE), "OUTPUT": str(tmp_path / "x")}
    with pytest.raises(QgsProcessingException, match="not both"):
        _run("rs_deep:export_training_data", dict(base, LABELS=str(ATLANTA_LABELS),
                                                  LABEL_RASTER=str(LEVIR / "test_7_label.tif")))
    with pytest.raises(QgsProcessingException, match="needs boxes"):
        _run("rs_deep:export_training_data", dict(base, TASK=1, LABEL_RASTER=str(LEVIR / "test_7_label.tif")))
    with pytest.raises(QgsProcessingException, match="do not overlap"):
        _run("rs_deep:export_training_data", dict(base, TASK=2, INPUT_AFTER=str(LEVIR / "test_7_B.tif"),
                                                  LABEL_RASTER=str(LEVIR / "test_7_label.tif")))
    assert not (tmp_path / "x").exists()
    with pytest.raises(QgsProcessingException, match="two dates"):
        _run("rs_deep:train", dict(TINY, TASK=3, ARCHITECTURE=0, INPUT=str(LEVIR / "test_7_A.tif"),
                                   LABELS=str(LEVIR / "test_7_change.geojson"), OUTPUT=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_assess_change_raster(provider, tmp_path):
    """The LEVIR-CD mask as the change raster, scored against its own change polygons (WGS 84) and raster."""
    check_assess_change_raster(tmp_path, LEVIR_7)
