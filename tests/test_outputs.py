"""One output transaction per algorithm run: a failure or a cancel at any stage leaves every earlier output byte for
byte and no file of the run; no output may be an input (or another output); folders are replaced only when RS Deep
made them; temporary files of killed runs are removed by the next run; SIGTERM cancels a qgis_process run cleanly."""
import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import rasterio

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS, LANDSAT, write_raster
from test_accuracy import RecordingFeedback, _run
from test_change import make_change_package
from test_detect import make_detection_package
from test_patches import IMAGE as FIELDS_IMAGE
from test_patches import make_patch_package

TINY = {"ARCHITECTURE": 1, "ENCODER": "resnet18", "EPOCHS": 2, "BATCH_SIZE": 2, "LEARNING_RATE": 0.002,
        "TILE_SIZE": 64, "STEPS_PER_EPOCH": 2, "DEVICE": 1}


def _snapshot(folder):
    """Every entry of ``folder``, hidden ones included, with the bytes of the files."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = None
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _fails(alg, params, feedback=None, match=None):
    from qgis.core import QgsProcessingException
    with pytest.raises(QgsProcessingException, match=match) as info:
        _run(alg, params, feedback)
    return str(info.value)


@pytest.fixture(scope="module")
def det_package(tmp_path_factory):
    return make_detection_package(tmp_path_factory.mktemp("det") / "det_test")


@pytest.fixture(scope="module")
def patch_package(tmp_path_factory):
    return make_patch_package(tmp_path_factory.mktemp("pc") / "patch_test")


@pytest.fixture(scope="module")
def change_package(tmp_path_factory):
    return make_change_package(tmp_path_factory.mktemp("chg") / "change_test")


@pytest.fixture
def inputs(tmp_path):
    """An input folder apart from the output folder: whatever a run writes beside its inputs is not counted."""
    d = tmp_path / "in"
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------------
# segment: a late failure and a cancel at each stage


def _segment_params(rgb_raster, rgb_package, out_dir, **kw):
    return dict({"INPUT": str(rgb_raster), "MODEL": str(rgb_package), "OUTPUT": str(out_dir / "o.tif"),
                 "OUTPUT_VECTOR": str(out_dir / "o.gpkg"), "PROBABILITIES": str(out_dir / "p.tif"),
                 "MIN_AREA": 0}, **kw)


@pytest.fixture
def earlier_segment(provider, rgb_package, rgb_raster, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _run("rs_deep:segment", _segment_params(rgb_raster, rgb_package, out_dir))
    assert {"o.tif", "o.qml", "o.gpkg", "p.tif"} <= set(os.listdir(out_dir))
    assert not [n for n in os.listdir(out_dir) if n.startswith(".")]
    return out_dir, _snapshot(out_dir)


def test_failing_vector_output_after_the_raster_keeps_every_earlier_output(earlier_segment, rgb_package,
                                                                            rgb_raster, tmp_path):
    out_dir, earlier = earlier_segment
    params = _segment_params(rgb_raster, rgb_package, out_dir, OUTPUT_VECTOR=str(tmp_path / "no" / "v.gpkg"))
    _fails("rs_deep:segment", params)
    assert _snapshot(out_dir) == earlier  # o.tif, o.qml, o.tif.aux.xml, p.tif byte for byte, nothing added
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("cancel_on", ["Loading model", "tiles of", "Writing overviews", "Polygonising",
                                       "polygons"])
def test_cancelled_segment_leaves_the_earlier_outputs(earlier_segment, rgb_package, rgb_raster, cancel_on):
    out_dir, earlier = earlier_segment
    fb = RecordingFeedback(cancel_on=cancel_on)
    message = _fails("rs_deep:segment", _segment_params(rgb_raster, rgb_package, out_dir), fb)
    assert "cancel" in message.lower() and "no output was written" in message
    assert _snapshot(out_dir) == earlier


def test_segment_without_vector_commits_raster_style_and_probabilities_together(provider, rgb_package, rgb_raster,
                                                                                  tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _run("rs_deep:segment", _segment_params(rgb_raster, rgb_package, out_dir, OUTPUT_VECTOR=None))
    assert sorted(os.listdir(out_dir)) == ["o.qml", "o.tif", "o.tif.aux.xml", "p.tif"]
    assert "paletted" in (out_dir / "o.qml").read_text()


# --------------------------------------------------------------------------------------------
# detect, classify_patches, detect_change: cancel at each stage


def test_cancelled_detect_leaves_the_earlier_outputs(provider, det_package, rgb_raster, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    params = {"INPUT": str(rgb_raster), "MODEL": str(det_package), "OUTPUT": str(out_dir / "b.gpkg"),
              "OUTPUT_CENTROIDS": str(out_dir / "c.gpkg"), "SCORE_THRESHOLD": 0.0}
    _run("rs_deep:detect", params)
    earlier = _snapshot(out_dir)
    for cancel_on in ("Loading model", "tiles of", "objects from"):
        _fails("rs_deep:detect", params, RecordingFeedback(cancel_on=cancel_on), match="(?i)cancel")
        assert _snapshot(out_dir) == earlier, cancel_on


def test_cancelled_classify_patches_leaves_the_earlier_output(provider, patch_package, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    params = {"INPUT": str(FIELDS_IMAGE), "MODEL": str(patch_package), "OUTPUT": str(out_dir / "p.gpkg")}
    _run("rs_deep:classify_patches", params)
    earlier = _snapshot(out_dir)
    for cancel_on in ("Loading model", "patches of", "patches classified"):
        _fails("rs_deep:classify_patches", params, RecordingFeedback(cancel_on=cancel_on), match="(?i)cancel")
        assert _snapshot(out_dir) == earlier, cancel_on


def _change_pair(folder):
    """A before/after pair cut from the Landsat sample, with a bright block added after."""
    from rasterio.windows import Window
    with rasterio.open(LANDSAT) as src:
        win = Window(300, 250, 200, 160)
        arr, transform, crs = np.maximum(src.read(window=win), 1), src.window_transform(win), src.crs
    after = arr.copy()
    after[:, 40:90, 50:120] = np.array([250, 240, 230], np.uint8)[:, None, None]
    return (write_raster(folder / "before.tif", arr, transform=transform, crs=crs),
            write_raster(folder / "after.tif", after, transform=transform, crs=crs))


def test_cancelled_detect_change_leaves_the_earlier_outputs(provider, change_package, inputs, tmp_path):
    b, a = _change_pair(inputs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    params = {"BEFORE": str(b), "AFTER": str(a), "MODEL": str(change_package), "OUTPUT": str(out_dir / "c.tif"),
              "OUTPUT_VECTOR": str(out_dir / "c.gpkg"), "PROBABILITIES": str(out_dir / "p.tif"), "MIN_AREA": 0}
    _run("rs_deep:detect_change", params)
    earlier = _snapshot(out_dir)
    assert "c.qml" in earlier
    for cancel_on in ("Loading model", "Polygonising", "change polygons"):
        _fails("rs_deep:detect_change", params, RecordingFeedback(cancel_on=cancel_on), match="(?i)cancel")
        assert _snapshot(out_dir) == earlier, cancel_on


# --------------------------------------------------------------------------------------------
# export_training_data and train


def _export_params(out):
    return {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TASK": 0, "TILE_SIZE": 128,
            "VALIDATION": 0.25, "BLOCK_SIZE": 256, "OUTPUT": str(out)}


def test_export_folder_replaced_only_when_ours_and_only_our_files(provider, tmp_path):
    chips = tmp_path / "chips"
    _run("rs_deep:export_training_data", _export_params(chips))
    assert (chips / ".rs_deep-output").is_file()
    (chips / "notes.txt").write_text("mine")  # a file of the user's in our folder: kept on re-export
    before = _snapshot(tmp_path)
    for cancel_on in ("Classes:", "Moving the chips into place"):
        _fails("rs_deep:export_training_data", _export_params(chips), RecordingFeedback(cancel_on=cancel_on),
               match="(?i)cancel")
        assert _snapshot(tmp_path) == before, cancel_on
    res = _run("rs_deep:export_training_data", _export_params(chips))
    assert (chips / "notes.txt").read_text() == "mine" and json.loads(open(res["MANIFEST"]).read())["chips"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_export_refuses_a_folder_with_an_unrelated_manifest(provider, tmp_path):
    web = tmp_path / "webapp"
    (web / "src").mkdir(parents=True)
    (web / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (web / "thesis.txt").write_text("four years of work")
    (web / "src" / "main.py").write_text("print('hi')")
    before = _snapshot(tmp_path)
    message = _fails("rs_deep:export_training_data", _export_params(web), match="not written by RS Deep")
    assert "OUTPUT" in message and "nothing in it was changed" in message
    assert _snapshot(tmp_path) == before


def test_cancelled_training_leaves_the_earlier_package(provider, tmp_path, inputs):
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    chips = inputs / "chips"
    _run("rs_deep:export_training_data", _export_params(chips))
    out = tmp_path / "model"
    params = dict(TINY, TASK=0, CHIPS=str(chips), OUTPUT=str(out))
    _run("rs_deep:train", params)
    before = _snapshot(tmp_path)
    for cancel_on in ("Augmentations:", "Chips:"):  # before the first epoch: nothing to keep
        _fails("rs_deep:train", params, RecordingFeedback(cancel_on=cancel_on), match="(?i)cancel")
        assert _snapshot(tmp_path) == before, cancel_on
    # cancelled after an epoch: the best model so far replaces the earlier package as a whole (documented)
    _fails("rs_deep:train", params, RecordingFeedback(cancel_on="Epoch 1/"), match="best model so far")
    assert load_package(str(out)).name == "model"  # weights and model.json of the same run: the checksum holds
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_train_refuses_a_folder_with_someone_elses_model_json(provider, tmp_path, inputs):
    chips = inputs / "chips"
    _run("rs_deep:export_training_data", _export_params(chips))
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "model.json").write_text('{"framework": "other"}')
    before = _snapshot(tmp_path)
    _fails("rs_deep:train", dict(TINY, TASK=0, CHIPS=str(chips), OUTPUT=str(out)), match="not written by RS Deep")
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# every algorithm that writes files, cancelled at every step of a run: no file of the run is left


def _step_feedback(cancel_at=None):
    """A feedback that counts the steps of a run (each progress report and each message), remembers the steps
    that were messages (the starts of stages) and cancels at step ``cancel_at``."""
    from qgis.core import QgsProcessingFeedback

    class _Feedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.steps, self.message_steps = 0, []
            self.progressChanged.connect(self.step)

        def step(self, *_):
            self.steps += 1
            if cancel_at is not None and self.steps >= cancel_at:
                self.cancel()

        def pushInfo(self, info):  # noqa: N802 (QGIS API)
            self.step()
            self.message_steps.append(self.steps)
            super().pushInfo(info)

    return _Feedback()


def _cancel_points(feedback, most=12):
    """Steps to cancel at: every stage start and steps in between, ``most`` of them spread over the run."""
    points = sorted(set(feedback.message_steps) | set(range(1, feedback.steps + 1, max(1, feedback.steps // most)))
                    | {feedback.steps})
    if len(points) > most:
        points = [points[round(i * (len(points) - 1) / (most - 1))] for i in range(most)]
    return sorted(set(points))


def _file_writing_runs(name, inputs, out, packages):
    """The parameters of a run of algorithm ``name`` that writes every file output it has into ``out``."""
    if name == "segment":
        raster = write_raster(inputs / "rgb.tif", rasterio.open(LANDSAT).read(window=((0, 160), (0, 200))),
                              transform=rasterio.open(LANDSAT).transform, crs="EPSG:32618", nodata=0)
        return {"INPUT": str(raster), "MODEL": str(packages["rgb"]), "OUTPUT": str(out / "o.tif"),
                "OUTPUT_VECTOR": str(out / "o.gpkg"), "PROBABILITIES": str(out / "p.tif"), "MIN_AREA": 0}
    if name == "detect_change":
        b, a = _change_pair(inputs)
        return {"BEFORE": str(b), "AFTER": str(a), "MODEL": str(packages["change"]), "OUTPUT": str(out / "c.tif"),
                "OUTPUT_VECTOR": str(out / "c.gpkg"), "PROBABILITIES": str(out / "p.tif"), "MIN_AREA": 0}
    if name == "detect":
        raster = write_raster(inputs / "rgb.tif", rasterio.open(LANDSAT).read(window=((0, 160), (0, 200))),
                              transform=rasterio.open(LANDSAT).transform, crs="EPSG:32618", nodata=0)
        return {"INPUT": str(raster), "MODEL": str(packages["det"]), "OUTPUT": str(out / "b.gpkg"),
                "OUTPUT_CENTROIDS": str(out / "c.gpkg"), "SCORE_THRESHOLD": 0.0}
    if name == "classify_patches":
        return {"INPUT": str(FIELDS_IMAGE), "MODEL": str(packages["patch"]), "OUTPUT": str(out / "p.gpkg")}
    if name == "export_training_data":
        return _export_params(out / "chips")
    if name == "assess_accuracy":
        with rasterio.open(ATLANTA_IMAGE) as ds:
            classes = (ds.read(1) > np.percentile(ds.read(1), 70)).astype(np.uint8)
            pred = write_raster(inputs / "pred.tif", classes[None], transform=ds.transform, crs=ds.crs)
        return {"PREDICTION": str(pred), "REFERENCE": str(ATLANTA_LABELS), "OUTPUT_HTML": str(out / "a.html"),
                "OUTPUT_TABLE": str(out / "a.gpkg")}
    if name == "export_onnx":
        return {"INPUT": str(packages["rgb"]), "OUTPUT": str(out / "m.onnx")}
    assert name == "train"
    return dict(TINY, TASK=0, INPUT=str(ATLANTA_IMAGE), LABELS=str(ATLANTA_LABELS), OUTPUT=str(out / "model"))


@pytest.mark.parametrize("name", ["segment", "detect_change", "detect", "classify_patches", "export_training_data",
                                  "assess_accuracy", "export_onnx", "train"])
def test_a_cancel_at_any_step_leaves_no_file_of_the_run(provider, name, rgb_package, det_package, patch_package,
                                                        change_package, inputs, tmp_path):
    import glob
    import shutil
    from qgis.core import QgsProcessingException, QgsProcessingUtils
    from rs_deep.rs_deep_plugin.engine.models.loading import load_package
    out = tmp_path / "out"
    out.mkdir()
    packages = {"rgb": rgb_package, "det": det_package, "patch": patch_package, "change": change_package}
    params = _file_writing_runs(name, inputs, out, packages)
    full = _step_feedback()
    _run(f"rs_deep:{name}", params, full)
    written = sorted(os.listdir(out))
    assert written and not [n for n in written if n.startswith(".")], written
    temp = os.path.join(QgsProcessingUtils.tempFolder(), "**", "rs_deep_*confidence*")
    for at in _cancel_points(full):
        shutil.rmtree(out)
        out.mkdir()
        try:
            _run(f"rs_deep:{name}", params, _step_feedback(cancel_at=at))
        except QgsProcessingException as exc:
            assert "cancel" in str(exc).lower(), (at, str(exc))
            if name == "train" and "so far" in str(exc):  # after an epoch the best model is kept, whole (documented)
                assert load_package(str(out / "model")).name == "model"
                assert not [n for n in os.listdir(out) if n.startswith(".")], (at, os.listdir(out))
            else:
                assert os.listdir(out) == [], (at, str(exc), os.listdir(out))
        else:  # cancelled after the outputs were committed: the run is complete
            assert sorted(os.listdir(out)) == written, (at, os.listdir(out))
        assert not glob.glob(temp, recursive=True), at  # the temporary confidence rasters are gone too


# --------------------------------------------------------------------------------------------
# an output is never an input, nor another output


def test_outputs_that_are_inputs_or_each_other_are_refused(provider, rgb_package, rgb_raster, tmp_path):
    from qgis.core import QgsFeature, QgsGeometry, QgsRectangle, QgsVectorFileWriter, QgsVectorLayer
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with rasterio.open(rgb_raster) as ds:
        b = ds.bounds
    mask = QgsVectorLayer("Polygon?crs=EPSG:32618", "m", "memory")
    f = QgsFeature()
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(b.left, b.bottom, (b.left + b.right) / 2, b.top)))
    mask.dataProvider().addFeatures([f])
    gpkg = str(tmp_path / "mask.gpkg")
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    QgsVectorFileWriter.writeAsVectorFormatV2(mask, gpkg, mask.transformContext(), opts)
    raster_sha, mask_sha = _sha(rgb_raster), _sha(gpkg)
    base = _segment_params(rgb_raster, rgb_package, out_dir)
    cases = [
        (dict(base, OUTPUT=str(rgb_raster)), r"OUTPUT .* the input INPUT"),
        (dict(base, PROBABILITIES=base["OUTPUT"]), "OUTPUT and PROBABILITIES"),
        (dict(base, MASK=gpkg, OUTPUT_VECTOR=gpkg), r"OUTPUT_VECTOR .* the input MASK"),
        (dict(base, OUTPUT=str(tmp_path / "mask.tif"), MASK=gpkg,  # mask.qml beside mask.tif: not the gpkg
              OUTPUT_VECTOR=str(out_dir / "o.gpkg")), None),
        (dict(base, OUTPUT=str(out_dir / "o.jpg")), r"OUTPUT: .*o\.jpg is not a GeoTIFF name"),
        (dict(base, MODEL=str(rgb_package), OUTPUT_VECTOR=str(rgb_package / "model.json")),
         r"OUTPUT_VECTOR .* the input MODEL"),
    ]
    for params, match in cases:
        if match is None:
            _run("rs_deep:segment", params)
            continue
        _fails("rs_deep:segment", params, match=match)
    assert _sha(rgb_raster) == raster_sha and _sha(gpkg) == mask_sha
    # assess: the report is the prediction raster
    pred = tmp_path / "mask.tif"  # written by the accepted case above
    pred_sha = _sha(pred)
    _fails("rs_deep:assess_accuracy", {"PREDICTION": str(pred), "REFERENCE": gpkg, "OUTSIDE": 0,
                                       "OUTPUT_HTML": str(pred)}, match=r"OUTPUT_HTML .* the input PREDICTION")
    assert _sha(pred) == pred_sha


# --------------------------------------------------------------------------------------------
# killed runs: stale temporary files, SIGTERM


def test_stale_temporary_files_are_removed_by_the_next_run(provider, rgb_package, rgb_raster, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale, fresh, folder = out_dir / ".o.rsdeep-0123abcd.tif", out_dir / ".o.rsdeep-89abcdef.tif", \
        out_dir / ".chips.rsdeep-00ff00ff"
    mine = out_dir / ".o.mine-0123abcd.tif"  # not our naming pattern: never touched
    for p in (stale, fresh, mine):
        p.write_bytes(b"partial")
    folder.mkdir()
    (folder / "x.tif").write_bytes(b"x")
    old = time.time() - 2 * 3600
    for p in (stale, folder, mine):
        os.utime(p, (old, old))
    _run("rs_deep:segment", _segment_params(rgb_raster, rgb_package, out_dir, OUTPUT_VECTOR=None))
    names = set(os.listdir(out_dir))
    assert stale.name not in names and folder.name not in names
    assert {fresh.name, mine.name} <= names


def test_sigterm_cancels_a_qgis_process_run_and_cleans_up(provider, rgb_package, tmp_path):
    from qgis_env import qgis_env, qgis_process_cmd, run_qgis_process
    big = write_raster(tmp_path / "big.tif", np.random.default_rng(0).integers(1, 255, (3, 2400, 2400), np.uint8))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.tif").write_bytes(b"earlier result")
    earlier = _snapshot(out_dir)
    profile = str(tmp_path / "profile")
    run_qgis_process(["help", "rs_deep:segment"], profile=profile, check=False)  # enables the plugin in the profile
    env = qgis_env(None, profile)
    args = [qgis_process_cmd(), "run", "rs_deep:segment", "--", f"INPUT={big}", f"MODEL={rgb_package}",
            f"OUTPUT={out_dir / 'o.tif'}", "OUTPUT_VECTOR=", "DEVICE=cpu"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and \
                not [n for n in os.listdir(out_dir) if n.startswith(".o.rsdeep-")]:
            time.sleep(0.05)  # the run has started writing: its hidden temporary file exists
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, log
    assert "cancel" in log.lower() and "SIGTERM" in log, log
    assert _snapshot(out_dir) == earlier  # no hidden temporary file left, the earlier result untouched
