"""rs_deep:export_training_data and rs_deep:train from chips, change training from two rasters, augmentation and
early-stopping parameters, the curves PNG; through QGIS Processing on the real samples of tests/data."""
import json
from pathlib import Path

import pytest
import rasterio

from conftest import ATLANTA_EAST, ATLANTA_IMAGE, ATLANTA_LABELS, ATLANTA_WEST, CHANGE, LANDSAT, TREES, TREES_IMAGE
from test_accuracy import RecordingFeedback, _run

TINY = {"ARCHITECTURE": 1, "ENCODER": "resnet18", "EPOCHS": 2, "BATCH_SIZE": 2, "LEARNING_RATE": 0.002,
        "TILE_SIZE": 64, "STEPS_PER_EPOCH": 2, "DEVICE": 1}


def test_export_algorithm_is_registered_with_help(provider):
    from qgis.core import QgsApplication
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:export_training_data")
    assert alg is not None
    names = {p.name() for p in alg.parameterDefinitions()}
    assert {"INPUT", "LABELS", "CLASS_FIELD", "LABEL_RASTER", "TASK", "INPUT_AFTER", "TILE_SIZE", "STRIDE",
            "ONLY_LABELLED", "VALIDATION", "BLOCK_SIZE", "OUTPUT"} <= names
    assert {o.name() for o in alg.outputDefinitions()} >= {"MANIFEST", "CHIPS", "TRAIN_CHIPS", "VAL_CHIPS"}
    assert all(p.description() for p in alg.parameterDefinitions()) and "spatial blocks" in alg.shortHelpString()
    train = QgsApplication.processingRegistry().algorithmById("rs_deep:train")
    names = {p.name() for p in train.parameterDefinitions()}
    assert {"CHIPS", "INPUT_AFTER", "AUGMENT", "PATIENCE"} <= names
    assert "CURVES" in {o.name() for o in train.outputDefinitions()}


def test_export_then_train_from_chips_then_segment(provider, tmp_path):
    """Buildings polygons in their own CRS -> chips with a block split -> rs_deep:train CHIPS -> rs_deep:segment."""
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    fb = RecordingFeedback()
    res = _run("rs_deep:export_training_data", {
        "INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TASK": 0,
        "TILE_SIZE": 128, "STRIDE": 0, "ONLY_LABELLED": True, "VALIDATION": 0.25, "BLOCK_SIZE": 256,
        "OUTPUT": str(tmp_path / "chips")}, fb)
    manifest = json.loads(Path(res["MANIFEST"]).read_text())
    assert res["CHIPS"] == len(manifest["chips"]) == res["TRAIN_CHIPS"] + res["VAL_CHIPS"]
    assert res["TRAIN_CHIPS"] > 0 and res["VAL_CHIPS"] > 0
    # no class field: one class named after the layer, background first
    assert [c["name"] for c in manifest["classes"]] == ["background", "buildings"]
    assert any(m.startswith("Classes: 0=background, 1=buildings") for m in fb.messages)
    with rasterio.open(ATLANTA_IMAGE) as src, rasterio.open(Path(res["OUTPUT"]) / manifest["chips"][0]["image"]) as c:
        assert c.crs == src.crs and c.res == src.res

    fb = RecordingFeedback()
    out = tmp_path / "model"
    trained = _run("rs_deep:train", dict(TINY, TASK=0, CHIPS=res["OUTPUT"], AUGMENT=[1], PATIENCE=3,
                                         OUTPUT=str(out)), fb)
    pkg = load_package(trained["OUTPUT"], task="segmentation")
    assert [c.name for c in pkg.classes] == ["background", "buildings"] and pkg.gsd == pytest.approx(0.5)
    report = json.loads(Path(trained["REPORT"]).read_text())
    assert report["data"]["validation"]["chips"] == res["VAL_CHIPS"] and report["patience"] == 3
    assert report["augment"] == {"flip": False, "rotate": True, "brightness": 0.0, "contrast": 0.0, "gamma": 0.0,
                                 "noise": 0.0}
    assert Path(trained["CURVES"]).read_bytes()[:4] == b"\x89PNG"
    assert any("Augmentations: 90-degree rotations; early stopping patience: 3" in m for m in fb.messages)
    seg = _run("rs_deep:segment", {"INPUT": str(ATLANTA_IMAGE), "MODEL": trained["OUTPUT"],
                                   "OUTPUT": str(tmp_path / "seg.tif"), "OUTPUT_VECTOR": None, "DEVICE": 1})
    with rasterio.open(seg["OUTPUT"]) as ds:
        assert (ds.width, ds.height) == (600, 900)


def test_detection_chips_through_processing(provider, tmp_path):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    res = _run("rs_deep:export_training_data", {
        "INPUT": str(TREES_IMAGE), "LABELS": str(TREES / "OSBS_029_boxes.geojson"), "CLASS_FIELD": "label",
        "TASK": 1, "TILE_SIZE": 128, "VALIDATION": 0.25, "BLOCK_SIZE": 128, "OUTPUT": str(tmp_path / "trees")})
    manifest = json.loads(Path(res["MANIFEST"]).read_text())
    assert [c["name"] for c in manifest["classes"]] == ["Tree"]
    n_boxes = sum(len(e["boxes"]) for e in manifest["chips"])
    assert n_boxes >= 50  # OSBS_029 has 61 crowns; boxes cut by chip edges count where most of them lies
    fb = RecordingFeedback()
    trained = _run("rs_deep:train", dict(TINY, TASK=1, ARCHITECTURE=0, TILE_SIZE=128, CHIPS=res["MANIFEST"],
                                         OBJECT_CROPS=0.3, OUTPUT=str(tmp_path / "det")), fb)
    assert any("OBJECT_CROPS is for segmentation and change" in m for m in fb.messages)  # said, not fatal
    pkg = load_package(trained["OUTPUT"], task="detection")
    assert [c.name for c in pkg.classes] == ["Tree"] and pkg.builder["architecture"] == "CenterNet"
    assert json.loads(Path(trained["REPORT"]).read_text())["history"][-1]["val"]


def test_change_trains_from_two_rasters_and_polygons(provider, tmp_path):
    """A change pair simulated from the real Atlanta image (EPSG:32616) + the change polygons in WGS 84 (another
    CRS): the algorithm exports chips itself, trains a Siamese U-Net, and rs_deep:detect_change runs the package
    on a pair of another area. tests/eval/test_levir.py: the same on LEVIR-CD."""
    check_change_trains_from_two_rasters_and_polygons(tmp_path, ATLANTA_EAST, ATLANTA_WEST, (320, 384))


def check_change_trains_from_two_rasters_and_polygons(tmp_path, train, apply, shape):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    fb = RecordingFeedback()
    trained = _run("rs_deep:train", dict(TINY, TASK=3, ARCHITECTURE=0, EPOCHS=1, INPUT=str(train.before),
                                         INPUT_AFTER=str(train.after), LABELS=str(train.polygons),
                                         VALIDATION=0.25, OUTPUT=str(tmp_path / "chg")), fb)
    pkg = load_package(trained["OUTPUT"], task="change")
    assert [c.name for c in pkg.classes] == ["no change", "change"] and pkg.builder["architecture"] == "SiameseUnet"
    report = json.loads(Path(trained["REPORT"]).read_text())
    assert report["history"][0]["val"]["iou"] is not None  # the spatial-block validation chips were scored
    out = _run("rs_deep:detect_change", {"BEFORE": str(apply.before), "AFTER": str(apply.after),
                                         "MODEL": trained["OUTPUT"], "OUTPUT": str(tmp_path / "c.tif"),
                                         "OUTPUT_VECTOR": None, "DEVICE": 1})
    with rasterio.open(out["OUTPUT"]) as ds:
        assert (ds.width, ds.height) == shape
    # the temporary chips are gone
    assert not any("rs_deep_change_chips_" in p.name for p in tmp_path.iterdir())


def test_change_chips_from_a_label_raster(provider, tmp_path):
    check_change_chips_from_a_label_raster(tmp_path, ATLANTA_EAST, 3)  # 256 x 768 px in 256 px chips, all kept


def check_change_chips_from_a_label_raster(tmp_path, pair, chips):
    res = _run("rs_deep:export_training_data", {
        "INPUT": str(pair.before), "INPUT_AFTER": str(pair.after), "LABEL_RASTER": str(pair.label), "TASK": 2,
        "TILE_SIZE": 256, "ONLY_LABELLED": False, "VALIDATION": 0.25, "OUTPUT": str(tmp_path / "chg")})
    manifest = json.loads(Path(res["MANIFEST"]).read_text())
    assert res["CHIPS"] == chips and manifest["task"] == "change"
    assert all("after" in e and "label" in e for e in manifest["chips"])
    changed = sum(e["class_pixels"]["change"] for e in manifest["chips"])
    with rasterio.open(pair.label) as ds:
        assert changed == int((ds.read(1) > 0).sum()) > 0


def test_training_data_bad_input_is_clear(provider, tmp_path):
    from qgis.core import QgsProcessingException
    base = {"INPUT": str(ATLANTA_IMAGE), "OUTPUT": str(tmp_path / "x")}
    with pytest.raises(QgsProcessingException, match="Give the labels"):
        _run("rs_deep:export_training_data", base)
    with pytest.raises(QgsProcessingException, match="not both"):
        _run("rs_deep:export_training_data", dict(base, LABELS=str(ATLANTA_LABELS),
                                                  LABEL_RASTER=str(CHANGE / "east_label.tif")))
    with pytest.raises(QgsProcessingException, match="needs boxes"):
        _run("rs_deep:export_training_data", dict(base, TASK=1, LABEL_RASTER=str(CHANGE / "east_label.tif")))
    with pytest.raises(QgsProcessingException, match="INPUT_AFTER"):
        _run("rs_deep:export_training_data", dict(base, TASK=2, LABELS=str(ATLANTA_LABELS)))
    with pytest.raises(QgsProcessingException, match="do not overlap"):
        _run("rs_deep:export_training_data", dict(base, TASK=2, INPUT=str(CHANGE / "west_A.tif"),
                                                  INPUT_AFTER=str(CHANGE / "east_B.tif"),
                                                  LABEL_RASTER=str(CHANGE / "east_label.tif")))
    assert not (tmp_path / "x").exists()
    chips = _run("rs_deep:export_training_data", {
        "INPUT": str(TREES_IMAGE), "LABELS": str(TREES / "OSBS_029_boxes.geojson"), "TASK": 1,
        "TILE_SIZE": 128, "OUTPUT": str(tmp_path / "trees")})
    with pytest.raises(QgsProcessingException, match="for detection, not segmentation"):
        _run("rs_deep:train", dict(TINY, TASK=0, CHIPS=chips["OUTPUT"], OUTPUT=str(tmp_path / "m")))
    with pytest.raises(QgsProcessingException, match="patch classification trains from INPUT and LABELS"):
        _run("rs_deep:train", dict(TINY, TASK=2, ARCHITECTURE=0, CHIPS=chips["OUTPUT"], OUTPUT=str(tmp_path / "m")))
    with pytest.raises(QgsProcessingException, match="no manifest.json"):
        _run("rs_deep:train", dict(TINY, TASK=0, CHIPS=str(tmp_path), OUTPUT=str(tmp_path / "m")))
    with pytest.raises(QgsProcessingException, match="Give INPUT .* or CHIPS"):
        _run("rs_deep:train", dict(TINY, TASK=0, OUTPUT=str(tmp_path / "m")))
    with pytest.raises(QgsProcessingException, match="two dates"):
        _run("rs_deep:train", dict(TINY, TASK=3, ARCHITECTURE=0, INPUT=str(CHANGE / "east_A.tif"),
                                   LABELS=str(CHANGE / "east_change.geojson"), OUTPUT=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_labels_to_accuracy_report_through_qgis_process(tmp_path):
    """The whole batch workflow on real data, each step a qgis_process call: export chips -> train from them ->
    segment a held-out area -> assess against the reference polygons."""
    from qgis_env import run_qgis_process

    def run(alg, *params):
        proc = run_qgis_process(["run", alg, "--json", "--"] + list(params))
        return json.loads(proc.stdout[proc.stdout.index("{"):])["results"]

    chips = run("rs_deep:export_training_data", f"INPUT={ATLANTA_IMAGE}",
                f"LABELS={ATLANTA_LABELS}", "TASK=0", "TILE_SIZE=128", "BLOCK_SIZE=256",
                "VALIDATION=0.25", f"OUTPUT={tmp_path / 'chips'}")
    assert Path(chips["MANIFEST"]).is_file() and chips["CHIPS"] == chips["TRAIN_CHIPS"] + chips["VAL_CHIPS"] > 0
    # choices by name (TASK=segmentation, DEVICE=cpu, AUGMENT=flips,rotations) as well as by index (TASK=0 above)
    model = run("rs_deep:train", f"CHIPS={chips['OUTPUT']}", "TASK=segmentation", "ARCHITECTURE=Unet",
                "ENCODER=resnet18", "EPOCHS=1", "STEPS_PER_EPOCH=2", "BATCH_SIZE=2", "TILE_SIZE=64", "DEVICE=cpu",
                "AUGMENT=flips,rotations", f"OUTPUT={tmp_path / 'model'}")
    assert Path(model["REPORT"]).is_file() and Path(model["CURVES"]).is_file()
    report = json.loads(Path(model["REPORT"]).read_text())
    assert report["builder"]["architecture"] == "Unet" and report["device"].startswith("CPU"), report
    assert report["augment"]["flip"] and report["augment"]["rotate"] and report["augment"]["brightness"] == 0.0
    seg = run("rs_deep:segment", f"INPUT={ATLANTA_IMAGE}", f"MODEL={model['OUTPUT']}",
              f"OUTPUT={tmp_path / 'seg.tif'}", "DEVICE=1", "EXTENT=733601,733901,3724689,3724800 [EPSG:32616]")
    acc = run("rs_deep:assess_accuracy", f"PREDICTION={seg['OUTPUT']}", f"REFERENCE={ATLANTA_LABELS}",
              f"MODEL={model['OUTPUT']}", f"OUTPUT_HTML={tmp_path / 'acc.html'}", f"OUTPUT_TABLE={tmp_path / 'acc.csv'}")
    assert 0.0 <= acc["OVERALL_ACCURACY"] <= 1.0 and "Confusion matrix" in (tmp_path / "acc.html").read_text()
    assert (tmp_path / "acc.csv").read_text().startswith("class_id")


# --------------------------------------------------------------------------------------------
# rs_deep:assess_accuracy for detection and change


def _boxes_gpkg(path, rows, crs_wkt, with_class=True):
    """A polygon GeoPackage of boxes (xmin, ymin, xmax, ymax, class name, score)."""
    from osgeo import ogr, osr
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs_wkt)
    lyr = ds.CreateLayer("boxes", srs, ogr.wkbPolygon)
    lyr.CreateField(ogr.FieldDefn("class_name", ogr.OFTString))
    lyr.CreateField(ogr.FieldDefn("score", ogr.OFTReal))
    for x0, y0, x1, y1, name, score in rows:
        f = ogr.Feature(lyr.GetLayerDefn())
        f.SetGeometry(ogr.CreateGeometryFromWkt(f"POLYGON(({x0} {y0},{x1} {y0},{x1} {y1},{x0} {y1},{x0} {y0}))"))
        f.SetField("class_name", name)
        f.SetField("score", score)
        lyr.CreateFeature(f)
    lyr = ds = None
    return str(path)


def test_assess_detection_of_the_bundled_tree_detector(provider, tmp_path):
    """rs_deep:detect (trees_demo) -> rs_deep:assess_accuracy TASK=detection; the numbers are the engine's on the same
    boxes, a copy of the reference scores 1 and boxes moved off the crowns score 0."""
    from shapely.geometry import shape
    from rs_deep.rs_deep_plugin.engine.evaluation.accuracy import assess_detection
    found = _run("rs_deep:detect", {"INPUT": str(TREES_IMAGE), "MODEL": "trees_demo",
                                    "OUTPUT": str(tmp_path / "found.gpkg"), "DEVICE": 1})
    html, table = tmp_path / "det.html", tmp_path / "det.csv"
    fb = RecordingFeedback()
    res = _run("rs_deep:assess_accuracy", {"TASK": 1, "PREDICTION_BOXES": found["OUTPUT"],
                                            "REFERENCE": str(TREES / "OSBS_029_boxes.geojson"),
                                            "OUTPUT_HTML": str(html), "OUTPUT_TABLE": str(table)}, fb)
    from osgeo import ogr
    ds = ogr.Open(found["OUTPUT"])
    lyr = ds.GetLayer(0)
    pred = []
    for f in lyr:
        x0, x1, y0, y1 = f.GetGeometryRef().GetEnvelope()
        pred.append((x0, y0, x1, y1, 0, f.GetField("score")))
    lyr = ds = None
    ref = [shape(f["geometry"]).bounds for f in json.loads((TREES / "OSBS_029_boxes.geojson").read_text())["features"]]
    expected = assess_detection(pred, ref, iou=0.5)
    assert len(pred) > 10
    for key in ("precision", "recall", "f1", "ap"):
        assert res[key.upper()] == pytest.approx(expected[key], abs=1e-9)
    assert 0 < res["RECALL"] <= 1 and html.is_file() and "Detection metrics" in html.read_text()
    assert "precision" in table.read_text().splitlines()[0]
    with rasterio.open(TREES_IMAGE) as src:
        wkt = src.crs.to_wkt()
    same = _boxes_gpkg(tmp_path / "same.gpkg", [b + ("Tree", 0.9) for b in ref], wkt)
    res = _run("rs_deep:assess_accuracy", {"TASK": 1, "PREDICTION_BOXES": same, "CLASS_FIELD": "label",
                                            "REFERENCE": str(TREES / "OSBS_029_boxes.geojson"), "OUTPUT_HTML": None,
                                            "OUTPUT_TABLE": None})
    assert res["PRECISION"] == res["RECALL"] == res["F1"] == res["AP"] == 1.0
    moved = _boxes_gpkg(tmp_path / "moved.gpkg", [(b[0] + 30, b[1], b[2] + 30, b[3], "Tree", 0.9) for b in ref], wkt)
    res = _run("rs_deep:assess_accuracy", {"TASK": 1, "PREDICTION_BOXES": moved,
                                            "REFERENCE": str(TREES / "OSBS_029_boxes.geojson"), "OUTPUT_HTML": None,
                                            "OUTPUT_TABLE": None})
    assert res["RECALL"] == 0.0 and res["AP"] == 0.0


def test_assess_change_raster(provider, tmp_path):
    """The change mask of the simulated Atlanta pair (0/255, EPSG:32616) as the change raster, scored against its own
    change polygons (WGS 84: reprojected) and raster. tests/eval/test_levir.py: the same on LEVIR-CD."""
    check_assess_change_raster(tmp_path, ATLANTA_EAST)


def check_assess_change_raster(tmp_path, pair):
    import numpy as np
    with rasterio.open(pair.label) as src:
        prof = src.profile.copy()
        mask = (src.read(1) > 0).astype("uint8")
    prof.update(dtype="uint8", nodata=255)
    pred = tmp_path / "change.tif"
    with rasterio.open(pred, "w", **prof) as dst:
        dst.write(mask, 1)
    res = _run("rs_deep:assess_accuracy", {"TASK": 2, "PREDICTION": str(pred),
                                            "REFERENCE_RASTER": str(pair.label),
                                            "OUTPUT_HTML": str(tmp_path / "c.html"), "OUTPUT_TABLE": None})
    assert res["F1"] == res["PRECISION"] == res["RECALL"] == 1.0
    assert "Change detection accuracy" in (tmp_path / "c.html").read_text()
    res = _run("rs_deep:assess_accuracy", {"TASK": 2, "PREDICTION": str(pred),
                                            "REFERENCE": str(pair.polygons),
                                            "OUTPUT_HTML": None, "OUTPUT_TABLE": None})
    assert res["F1"] > 0.9  # polygon edges vs pixels
    # half the change missed: recall about 1/2, precision stays 1
    half = mask.copy()
    half[:, mask.shape[1] // 2:] = 0
    with rasterio.open(pred, "w", **prof) as dst:
        dst.write(half, 1)
    res = _run("rs_deep:assess_accuracy", {"TASK": 2, "PREDICTION": str(pred),
                                            "REFERENCE_RASTER": str(pair.label),
                                            "OUTPUT_HTML": None, "OUTPUT_TABLE": None})
    assert res["PRECISION"] == 1.0
    assert res["RECALL"] == pytest.approx(half.sum() / mask.sum(), abs=1e-12) and np.any(half)


def test_export_training_data_from_an_xyz_layer(provider, tmp_path):
    """A web (XYZ) layer: the algorithm fetches it through QGIS over the labels' extent at the asked pixel size."""
    import shutil
    import subprocess
    import numpy as np
    from qgis.core import QgsProject, QgsRasterLayer
    from shapely.geometry import box, mapping
    merc = tmp_path / "merc.tif"
    subprocess.run(["gdalwarp", "-q", "-t_srs", "EPSG:3857", "-dstalpha", str(LANDSAT),
                    str(merc)], check=True)
    subprocess.run([shutil.which("gdal2tiles.py"), "-q", "--xyz", "-z", "7-9", "-w", "none", str(merc),
                    str(tmp_path / "tiles")], check=True)
    with rasterio.open(merc) as ds:
        b = ds.bounds
    cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
    fields = [box(cx - 20000, cy - 20000, cx - 5000, cy - 5000), box(cx + 3000, cy + 3000, cx + 18000, cy + 18000)]
    labels = tmp_path / "fields.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection",
                                  "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
                                  "features": [{"type": "Feature", "geometry": mapping(g), "properties": {}}
                                               for g in fields]}))
    layer = QgsRasterLayer(f"type=xyz&url=file://{tmp_path}/tiles/{{z}}/{{x}}/{{y}}.png&zmax=9&zmin=7", "xyz", "wms")
    assert layer.isValid() and layer.providerType() == "wms"
    QgsProject.instance().addMapLayer(layer)
    fb = RecordingFeedback()
    try:
        res = _run("rs_deep:export_training_data", {"INPUT": layer.id(), "LABELS": str(labels), "TASK": 0,
                                                     "TILE_SIZE": 32, "GSD": 400, "VALIDATION": 0.0,
                                                     "OUTPUT": str(tmp_path / "chips")}, fb)
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
    assert any("fetching it over the labels' extent at 400 m" in m for m in fb.messages)
    manifest = json.loads(Path(res["MANIFEST"]).read_text())
    assert res["CHIPS"] >= 1
    with rasterio.open(Path(res["OUTPUT"]) / manifest["chips"][0]["image"]) as chip:
        assert chip.crs.to_epsg() == 3857
        ground = chip.res[0] * np.cos(np.radians(24.5))  # web-mercator metres -> ground metres at the scene
        assert 370 < ground < 430
        assert chip.read(1).max() > 0  # real imagery, not an empty fetch
    assert sum(e["class_pixels"]["fields"] for e in manifest["chips"]) > 0


def test_class_colours_come_from_the_labels_style(provider, tmp_path):
    """A labels layer styled by category in QGIS: the trained package and the exported chips use its colours."""
    from qgis.core import (QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsProject, QgsRendererCategory,
                           QgsVectorLayer)
    from shapely.geometry import mapping, shape
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    feats = json.loads((ATLANTA_LABELS).read_text())
    for i, f in enumerate(feats["features"]):
        f["properties"] = {"kind": "house" if i % 2 else "shed"}
        f["geometry"] = mapping(shape(f["geometry"]))
    path = tmp_path / "kinds.geojson"
    path.write_text(json.dumps(feats))
    layer = QgsVectorLayer(str(path), "kinds", "ogr")
    assert layer.isValid()
    cats = [QgsRendererCategory(v, QgsFillSymbol.createSimple({"color": c}), v)
            for v, c in (("house", "#123456"), ("shed", "#abcdef"))]
    layer.setRenderer(QgsCategorizedSymbolRenderer("kind", cats))
    QgsProject.instance().addMapLayer(layer)
    try:
        trained = _run("rs_deep:train", dict(TINY, TASK=0, EPOCHS=1, INPUT=str(ATLANTA_IMAGE),
                                             LABELS=layer.id(), CLASS_FIELD="kind", OUTPUT=str(tmp_path / "m")))
        chips = _run("rs_deep:export_training_data", {"INPUT": str(ATLANTA_IMAGE), "LABELS": layer.id(),
                                                      "CLASS_FIELD": "kind", "TILE_SIZE": 128,
                                                      "OUTPUT": str(tmp_path / "chips")})
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
    pkg = load_package(trained["OUTPUT"], task="segmentation")
    assert [(c.name, c.color) for c in pkg.classes] == [("background", "000000"), ("house", "123456"),
                                                         ("shed", "ABCDEF")]
    manifest = json.loads(Path(chips["MANIFEST"]).read_text())
    assert [(c["name"], c["color"]) for c in manifest["classes"]] == [("background", "000000"), ("house", "123456"),
                                                                       ("shed", "ABCDEF")]


def test_train_defaults_are_the_measured_recipe_and_time_budget_stops(provider, tmp_path):
    """rs_deep:train with only INPUT, LABELS, OUTPUT and a short TIME_BUDGET: the per-task defaults (tile, batch,
    learning rate: TOOLBOX_DEFAULTS), at most 100 epochs, patience 10; the run stops on its budget."""
    from qgis.core import QgsApplication
    from rs_deep.rs_deep_plugin.engine.training.builders import TOOLBOX_DEFAULTS
    from rs_deep.rs_deep_plugin.engine.training.samplers import COPY_PASTE, OBJECT_CROPS
    train = QgsApplication.processingRegistry().algorithmById("rs_deep:train")
    defaults = {p.name(): p.defaultValue() for p in train.parameterDefinitions()}
    assert defaults["TIME_BUDGET"] == 10 and defaults["EPOCHS"] == 100 and defaults["PATIENCE"] == 10
    fb = RecordingFeedback()
    res = _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TIME_BUDGET": 0.1,
                                 "OUTPUT": str(tmp_path / "pkg")}, fb)
    report = json.loads(Path(res["REPORT"]).read_text())
    seg = TOOLBOX_DEFAULTS["segmentation"]
    assert (report["tile_size"], report["batch_size"], report["lr"]) == (seg["tile_size"], seg["batch_size"], seg["lr"])
    assert report["epochs_planned"] == 100 and report["patience"] == 10 and report["time_budget_minutes"] == 0.1
    assert report["ema_decay"] == 0.995 and report["seed"] == 0  # weights averaged; the same run every time
    assert report["settings"]["foreground_prob"] == OBJECT_CROPS["segmentation"]  # OBJECT_CROPS empty: the default
    assert report["settings"]["paste_prob"] == COPY_PASTE > 0  # copy-paste is one of the default augmentations
    assert report["data"]["validation"]["side"] == "right"  # the strip most like the whole sample
    assert report["stopped_by_budget"] and report["epochs_run"] < 100 and report["steps_per_epoch"] >= 25
    assert report["best"]["epoch"] is not None and (Path(res["OUTPUT"]) / "model.safetensors").is_file()
