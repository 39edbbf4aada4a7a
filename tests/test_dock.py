"""The RS Deep dock, driven like a user: pick a layer and a model, run (a real QgsTask with the real
algorithm), see styled layers in a group named after the run; cancel, queue, errors, settings."""
import json
import shutil
import time
from pathlib import Path

import pytest
from qgis.core import (Qgis, QgsApplication, QgsFeature, QgsGeometry, QgsPointXY, QgsProject, QgsRasterLayer,
                       QgsRectangle, QgsReferencedRectangle, QgsSettings, QgsVectorLayer)
from qgis.gui import QgsMapToolExtent
from qgis.PyQt.QtCore import QCoreApplication

from conftest import LANDSAT, ROOT


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("timed out waiting")
        QCoreApplication.processEvents()
        time.sleep(0.01)


def wait_done(run, timeout=120.0):
    wait_for(lambda: not run.is_active(), timeout)
    for _ in range(5):
        QCoreApplication.processEvents()


@pytest.fixture(scope="module")
def plugin(qgis_iface, qgis_parent, qgis_processing):
    QgsSettings().remove("rs_deep")
    qgis_parent.show()  # the dock's toggle action follows real visibility (offscreen platform)
    from rs_deep.rs_deep_plugin.plugin import RSDeepPlugin
    p = RSDeepPlugin(qgis_iface)
    p.initGui()
    yield p
    p.unload()
    qgis_parent.hide()
    QgsSettings().remove("rs_deep")


@pytest.fixture
def dock(plugin, qgis_new_project):
    if plugin.dock.isHidden():
        plugin.dock_action.trigger()
    assert not plugin.dock.isHidden()
    yield plugin.dock
    plugin.dock.cancel_all()
    for r in plugin.dock.runs:
        if r.is_active():
            wait_done(r)
    plugin.dock.clear_finished()


@pytest.fixture
def log_messages():
    msgs = []

    def got(message, tag, level):
        if tag == "RS Deep":
            msgs.append((message, level))
    QgsApplication.messageLog().messageReceived.connect(got)
    yield msgs
    QgsApplication.messageLog().messageReceived.disconnect(got)


_COPIES = []  # the folder that add_raster copies the repository's rasters to (set by _copies_folder)


@pytest.fixture(scope="module", autouse=True)
def _copies_folder(tmp_path_factory):
    _COPIES[:] = [tmp_path_factory.mktemp("layers")]
    yield


def add_raster(path, name):
    """``path`` added to the project as a layer. A raster of the repository is loaded from a copy: QGIS computes band
    statistics for a new layer and GDAL writes them beside the file (.aux.xml), which must not change the clone."""
    if ROOT in Path(path).resolve().parents:
        copy = _COPIES[0] / f"{name}_{Path(path).name}"
        shutil.copy(path, copy)
        path = copy
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def choose(dock, layer, package):
    dock.set_model(str(package))
    combo = dock.layer_combos["INPUT"]
    combo.setLayer(layer)
    assert combo.currentLayer() is layer


def test_toolbar_menu_and_dock_are_installed(plugin, qgis_iface):
    assert plugin.toolbar is not None and plugin.dock_action in plugin.toolbar.actions()
    assert plugin.dock.objectName() == "RSDeepDock"
    plugin.dock_action.trigger()
    assert not plugin.dock.isHidden() and plugin.dock_action.isChecked()
    plugin.dock_action.trigger()
    assert plugin.dock.isHidden() and not plugin.dock_action.isChecked()
    # every dependency is present here: no installer message
    assert plugin.deps_message is None and not plugin.dock.deps_banner.isVisible()


def test_model_card_task_and_generated_options(dock, rgb_package):
    dock.set_model(str(rgb_package))
    card = dock.card.text()
    for word in ("rgb_test", "Semantic segmentation", "b1, b2, b3", "background", "building", "#E31A1C",
                 "rs_deep:segment"):
        assert word in card
    assert dock.algorithm_id == "rs_deep:segment"
    from rs_deep.processing_algorithms.base import bundled_models
    listed = [dock.model_combo.itemText(i) for i in range(dock.model_combo.count())]
    assert all(any(name in t for t in listed) for name in bundled_models())
    # options: the algorithm's advanced parameters with their defaults; DEVICE is the device selector
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:segment")
    advanced = [p.name() for p in alg.parameterDefinitions() if p.flags() & p.FlagAdvanced and p.name() != "DEVICE"]
    assert set(advanced) <= set(dock.option_widgets)
    from rs_deep.rs_deep_plugin.gui.param_widgets import widget_value
    for name in advanced:  # numbers and enums (TTA: a list, on its first option); CLUSTER: text, empty
        p, widget = dock.option_widgets[name]
        if p.type() == "string":
            assert widget_value(widget) == p.defaultValue() == ""
            continue
        assert widget_value(widget) == pytest.approx(float(p.defaultValue()))
    assert dock.option_widgets["TTA"][1].itemText(2) == "Flips and 90° rotations"
    devices = [dock.device_combo.itemData(i) for i in range(dock.device_combo.count())]
    assert devices[0] == "auto" and "cpu" in devices
    assert dock.device_combo.itemText(0).startswith("Automatic: ")
    assert ["INPUT"] == list(dock.layer_combos)
    assert dock.destination_checks["OUTPUT"][1].isChecked() and not dock.destination_checks["OUTPUT"][1].isEnabled()
    assert not dock.destination_checks["PROBABILITIES"][1].isChecked()


def test_run_adds_styled_layers_in_a_group_named_after_the_run(dock, plugin, qgis_iface, rgb_raster, rgb_package,
                                                               tmp_path, log_messages):
    layer = add_raster(rgb_raster, "scene")
    choose(dock, layer, rgb_package)
    dock.option_widgets["MIN_AREA"][1].setValue(0)
    dock.output_dir.setFilePath(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    assert dock.run_button.isEnabled()
    dock.run_button.click()
    run = dock.runs[-1]
    assert run.name.startswith("rgb_test on scene")
    wait_done(run)
    assert run.status == run.DONE, run.message
    group = QgsProject.instance().layerTreeRoot().findGroup(run.name)
    assert group is not None
    layers = [n.layer() for n in group.findLayers()]
    assert {lay.name() for lay in layers} == {"Class raster", "Class polygons"}
    raster = next(lay for lay in layers if isinstance(lay, QgsRasterLayer))
    assert raster.source().startswith(str(tmp_path / "out"))
    assert raster.renderer().type() == "paletted"
    assert {c.label for c in raster.renderer().classes()} == {"background", "building"}
    vector = next(lay for lay in layers if isinstance(lay, QgsVectorLayer))
    assert vector.renderer().type() == "categorizedSymbol"
    assert [c.label() for c in vector.renderer().categories()] == ["background", "building"]
    # the widgets of the run: full bar, elapsed time, no Cancel any more
    widget = dock.runs_layout.itemAt(0).widget()
    assert widget.run is run and widget.bar.value() == 100 and not widget.cancel_button.isVisible()
    assert widget.elapsed.text().endswith("s")
    # the parameters are in the log as a processing.run call, and the settings remember the choices
    assert any("processing.run(\"rs_deep:segment\"" in m and "'MIN_AREA':0" in m.replace(" ", "")
               for m, _ in log_messages)
    assert QgsSettings().value("rs_deep/last_model") == str(rgb_package)
    assert float(QgsSettings().value("rs_deep/options/rs_deep_segment/MIN_AREA")) == 0
    assert any("Done" in m for m in qgis_iface.messageBar().get_messages(Qgis.Success))


def test_cancel_adds_no_layer(dock, rgb_package, tmp_path):
    layer = add_raster(LANDSAT, "landsat")
    choose(dock, layer, rgb_package)
    dock.option_widgets["TILE_SIZE"][1].setValue(32)  # many small tiles: a run long enough to cancel
    dock.option_widgets["OVERLAP"][1].setValue(8)
    dock.run_button.click()
    run = dock.runs[-1]
    widget = dock.runs_layout.itemAt(0).widget()
    wait_for(lambda: run.status == run.RUNNING and run.progress() > 1, 60)
    assert widget.cancel_button.isVisible()
    widget.cancel_button.click()
    wait_done(run)
    assert run.status == run.CANCELLED, run.message
    assert QgsProject.instance().layerTreeRoot().findGroup(run.name) is None
    assert [lay.name() for lay in QgsProject.instance().mapLayers().values()] == ["landsat"]
    dock.option_widgets["TILE_SIZE"][1].setValue(0)
    dock.option_widgets["OVERLAP"][1].setValue(-1)


def test_runs_queue_and_a_queued_run_can_be_cancelled(dock, rgb_raster, rgb_package):
    layer = add_raster(rgb_raster, "scene")
    choose(dock, layer, rgb_package)
    ext = layer.extent()
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("drawn"))  # a small area: quick runs
    dock.set_drawn_extent(QgsReferencedRectangle(QgsRectangle(ext.xMinimum(), ext.yMaximum() - 64 * 300,
                                                              ext.xMinimum() + 64 * 300, ext.yMaximum()), layer.crs()))
    dock.destination_checks["OUTPUT_VECTOR"][1].setChecked(False)
    try:
        first = dock.start_run()
        second = dock.start_run()
        third = dock.start_run()
        assert first.status == first.RUNNING and second.status == second.QUEUED and third.status == third.QUEUED
        third.cancel()
        assert third.status == third.CANCELLED
        wait_done(second)
        assert first.status == second.status == first.DONE
        root = QgsProject.instance().layerTreeRoot()
        assert [n.layer().name() for n in root.findGroup(second.name).findLayers()] == ["Class raster"]
        assert root.findGroup(first.name) is not None
        assert first.ended <= second.started  # one after the other
    finally:
        dock.destination_checks["OUTPUT_VECTOR"][1].setChecked(True)
        dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("layer"))


def test_a_large_run_asks_first_and_no_means_no_run(dock, rgb_raster, rgb_package, monkeypatch):
    """Above the confirm_pixels setting the dock asks (with the size and a time estimate) before it queues a run;
    declining queues nothing. The rgb_raster is 300 x 260 px; the package has no GSD, so pixels are the layer's."""
    from qgis.PyQt.QtWidgets import QMessageBox
    from rs_deep.rs_deep_plugin.gui.settings import set_setting
    layer = add_raster(rgb_raster, "scene")
    choose(dock, layer, rgb_package)
    asked = []

    def answer(parent, title, text, buttons, default):
        asked.append(text)
        return QMessageBox.StandardButton.No
    monkeypatch.setattr(QMessageBox, "question", answer)
    before = len(dock.runs)
    set_setting("confirm_pixels", 50_000.0)
    try:
        assert dock.run_pixels({}) == pytest.approx(300 * 260)
        assert dock.start_run() is None and len(dock.runs) == before
        assert len(asked) == 1 and "about 0.078 million pixels" in asked[0] and "minutes on a CPU" in asked[0]
        set_setting("confirm_pixels", 1e9)  # below the threshold: no question
        assert dock.confirm_size({}) and len(asked) == 1
    finally:
        set_setting("confirm_pixels", 400_000_000.0)


def test_algorithm_error_goes_to_the_message_bar(dock, qgis_iface, rgb_raster, gray_package):
    layer = add_raster(rgb_raster, "scene")
    choose(dock, layer, gray_package)  # a 1-band model on a 3-band raster: BANDS must be given
    qgis_iface.messageBar().clear_messages()
    run = dock.start_run()
    wait_done(run)
    assert run.status == run.FAILED and "BANDS" in run.message
    assert any("BANDS" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
    assert QgsProject.instance().layerTreeRoot().findGroup(run.name) is None


def test_drawn_rectangle_and_selected_features_limit_the_area(dock, rgb_raster, rgb_package):
    import rasterio
    layer = add_raster(rgb_raster, "scene")
    choose(dock, layer, rgb_package)
    ext = layer.extent()
    x0, y0 = ext.xMinimum(), ext.yMinimum()
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("drawn"))
    assert dock.draw_row.isVisibleTo(dock)
    canvas = dock.iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    dock.draw_button.click()  # the user drags a rectangle with QGIS's extent map tool
    tool = canvas.mapTool()
    assert isinstance(tool, QgsMapToolExtent)
    tool.extentChanged.emit(QgsRectangle(x0, y0, x0 + 30 * 300, y0 + 20 * 300))
    assert canvas.mapTool() is not tool and dock.drawn_extent.crs() == layer.crs()
    run = dock.start_run()
    wait_done(run)
    assert run.status == run.DONE, run.message
    with rasterio.open(run.results["OUTPUT"]) as ds:
        assert (ds.width, ds.height) == (30, 20)

    polys = QgsVectorLayer(f"Polygon?crs={layer.crs().authid()}", "areas", "memory")
    feats = []
    for dx in (0, 100 * 300):
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromPolygonXY([[QgsPointXY(x0 + dx, y0), QgsPointXY(x0 + dx + 40 * 300, y0),
                                                  QgsPointXY(x0 + dx + 40 * 300, y0 + 40 * 300),
                                                  QgsPointXY(x0 + dx, y0)]]))
        feats.append(f)
    polys.dataProvider().addFeatures(feats)
    QgsProject.instance().addMapLayer(polys)
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("selected"))
    dock.polygon_combo.setLayer(polys)
    assert dock.start_run() is None  # nothing selected yet: a message, no run
    polys.selectByIds([next(polys.getFeatures()).id()])
    run = dock.start_run()
    assert "MASK" in run.parameters
    wait_done(run)
    assert run.status == run.DONE, run.message
    with rasterio.open(run.results["OUTPUT"]) as ds:
        assert (ds.width, ds.height) == (40, 40)
        data = ds.read(1)
        assert (data[:20, :20] == 255).all()  # outside the selected triangle: nodata
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData("layer"))


def test_task_follows_the_model_and_unavailable_tasks_are_disabled(dock, rgb_package, tmp_path, monkeypatch):
    from rs_deep.rs_deep_plugin.gui import model_card
    pkg = tmp_path / "patches"
    shutil.copytree(rgb_package, pkg)
    meta = json.loads((pkg / "model.json").read_text())
    meta["properties"]["rs_deep:task"] = "patch_classification"
    meta["properties"]["mlm:tasks"] = ["scene-classification"]
    (pkg / "model.json").write_text(json.dumps(meta))
    monkeypatch.setitem(model_card.TASK_ALGORITHMS, "patch_classification", "rs_deep:not_registered")
    dock.set_model(str(pkg))
    assert "Patch classification" in dock.card.text() and "cannot run" in dock.card.text()
    assert not dock.run_button.isEnabled()
    dock.set_model(str(rgb_package))
    assert dock.algorithm_id == "rs_deep:segment"


def test_settings_are_restored_by_a_new_dock(plugin, qgis_iface, rgb_package):
    from rs_deep.rs_deep_plugin.gui.dock import RSDeepDock
    QgsSettings().setValue("rs_deep/last_model", str(rgb_package))
    QgsSettings().setValue("rs_deep/options/rs_deep_segment/BATCH_SIZE", 3)
    QgsSettings().setValue("rs_deep/device", "cpu")
    QgsSettings().setValue("rs_deep/cluster", "local:2")  # one Dask cluster for every algorithm
    other = RSDeepDock(qgis_iface)
    other.show()
    try:
        assert other.model_combo.currentData() == str(rgb_package)
        assert other.option_widgets["BATCH_SIZE"][1].value() == 3
        assert other.device_combo.currentData() == "cpu"
        assert other.option_widgets["CLUSTER"][1].text() == "local:2"
        assert other.parameters("run")["CLUSTER"] == "local:2"
    finally:
        QgsSettings().remove("rs_deep/cluster")
        other.deleteLater()
        QgsSettings().remove("rs_deep/options")
        QgsSettings().remove("rs_deep/device")


def test_missing_dependency_offers_the_installer(qgis_iface, monkeypatch):
    from rs_deep.rs_deep_plugin import deps, plugin as plugin_module
    monkeypatch.setitem(deps.REQUIRED, "rsdeep_not_installed_mod", "rsdeep-not-installed")
    assert deps.missing_dependencies() == ["rsdeep-not-installed"]
    p = plugin_module.RSDeepPlugin(qgis_iface)
    p.initProcessing = lambda: None  # the module's plugin already registered the provider
    p.initGui()
    try:
        assert p.deps_message is not None
        assert "rsdeep-not-installed" in p.deps_message.text()
        assert p.dock.refresh_dependencies() == ["rsdeep-not-installed"]
        dlg = p.open_installer(["rsdeep-not-installed"])
        assert "rsdeep-not-installed" in dlg.intro.text() and not dlg.is_running()
        dlg.close()
    finally:
        p.unload()


def test_unloading_during_a_run_cancels_it_safely(plugin, qgis_iface, qgis_new_project, rgb_package):
    from rs_deep.rs_deep_plugin import plugin as plugin_module
    from rs_deep.rs_deep_plugin.gui import dock as dock_module
    layer = add_raster(LANDSAT, "landsat")
    p = plugin_module.RSDeepPlugin(qgis_iface)
    p.initProcessing = lambda: None  # the module's plugin already registered the provider
    p.initGui()
    choose(p.dock, layer, rgb_package)
    run = p.dock.start_run()
    wait_for(lambda: run.progress() > 0, 60)
    p.unload()  # the dock goes away; the run is cancelled and finishes on its own
    assert run in dock_module._DETACHED
    wait_for(lambda: run not in dock_module._DETACHED, 60)
    assert run.status == run.CANCELLED
    assert [lay.name() for lay in QgsProject.instance().mapLayers().values()] == ["landsat"]


def test_change_model_gets_before_and_after_layers(dock, tmp_path):
    """A change model switches the dock to rs_deep:detect_change with one layer picker per date."""
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window
    from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
    from rs_deep.rs_deep_plugin.engine.models.package import ModelClass, save_package
    from conftest import write_raster
    if QgsApplication.processingRegistry().algorithmById("rs_deep:detect_change") is None:
        pytest.fail("rs_deep:detect_change is not registered")
    torch.manual_seed(0)
    builder = dict(library="rs_deep", architecture="SiameseUnet", encoder="resnet18", in_channels=3, classes=2,
                   encoder_weights=None, params={"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    pkg = tmp_path / "change_model"
    save_package(build_model(builder), pkg, name="change_model", task="change", bands=["r", "g", "b"],
                 classes=[ModelClass(0, "no change", "000000"), ModelClass(1, "change", "E31A1C")],
                 builder=builder, tile_size=64, overlap=16, gsd=None,
                 value_scaling=[{"type": "min-max", "minimum": 0, "maximum": 255}], extra={"rs_deep:dates": 2})
    with rasterio.open(LANDSAT) as src:
        win = Window(300, 250, 96, 96)
        arr, transform, crs = np.maximum(src.read(window=win), 1), src.window_transform(win), src.crs
    after = arr.copy()
    after[:, 30:60, 30:60] = 250
    before_layer = add_raster(write_raster(tmp_path / "before.tif", arr, transform=transform, crs=crs), "before")
    after_layer = add_raster(write_raster(tmp_path / "after.tif", after, transform=transform, crs=crs), "after")
    dock.set_model(str(pkg))
    assert dock.algorithm_id == "rs_deep:detect_change" and "Change detection" in dock.card.text()
    assert list(dock.layer_combos) == ["BEFORE", "AFTER"]
    labels = [dock.inputs_form.labelForField(c).text() for c in dock.layer_combos.values()]
    assert labels[0].startswith("Before") and labels[1].startswith("After")
    dock.layer_combos["BEFORE"].setLayer(before_layer)
    dock.layer_combos["AFTER"].setLayer(after_layer)
    run = dock.start_run()
    assert run.name.startswith("change_model on before → after")
    wait_done(run)
    assert run.status == run.DONE, run.message
    group = QgsProject.instance().layerTreeRoot().findGroup(run.name)
    assert group is not None and len(group.findLayers()) >= 1


def test_detection_run_adds_boxes_outlined_by_class(dock, tmp_path):
    """The bundled tree detector through the dock: a box layer in the run's group, outlined (no fill) by class."""
    from qgis.core import QgsWkbTypes
    from qgis.PyQt.QtCore import Qt
    layer = add_raster(ROOT / "resources" / "sample" / "osbs_029.tif", "osbs")
    choose(dock, layer, ROOT / "resources" / "models" / "trees_demo")
    assert dock.algorithm_id == "rs_deep:detect" and "Object detection" in dock.card.text()
    run = dock.start_run()
    wait_done(run)
    assert run.status == run.DONE, run.message
    group = QgsProject.instance().layerTreeRoot().findGroup(run.name)
    assert group is not None
    boxes = [lay for lay in (n.layer() for n in group.findLayers())
             if isinstance(lay, QgsVectorLayer) and lay.geometryType() == QgsWkbTypes.PolygonGeometry]
    assert len(boxes) == 1 and boxes[0].featureCount() > 0
    renderer = boxes[0].renderer()
    assert renderer.type() == "categorizedSymbol" and [c.label() for c in renderer.categories()] == ["tree"]
    assert renderer.categories()[0].symbol().symbolLayer(0).brushStyle() == Qt.BrushStyle.NoBrush
    assert boxes[0].crs() == layer.crs()
    ext = layer.extent()
    ext.grow(1.0)  # boxes are clipped to the raster (1 m of slack for rounding)
    assert ext.contains(boxes[0].extent())
    scores = [f["score"] for f in boxes[0].getFeatures()]
    assert all(0 < s <= 1 for s in scores)
