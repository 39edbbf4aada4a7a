"""Multi-label patch classification (BigEarthNet-style: every crop group present in a 160 m patch) on the Sentinel-2
fields sample (may ship): training through rs_deep:train on the left part of the image, inference on the right part
checked against the network's own sigmoid scores, thresholds, assessment against a hand computation on the written
layer, the package fields and their refusals, and one qgis_process run.

Labels: the crop type of each field parcel (``Afgroede``) merged into four groups with make_eval_models' rule
(cereals, grass, maize, other crops); a patch's labels are the groups whose parcels cover at least 20 % of it."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import InputError, ModelPackageError
from rs_deep.rs_deep_plugin.engine.geo.labels import read_gpkg_polygons
from rs_deep.rs_deep_plugin.engine.inference.patches import classify_patches, score_fields
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.package import parse_metadata

from conftest import DATA

FIELDS = DATA / "fields_denmark"
IMAGE = FIELDS / "image.tif"  # 452 x 276 px, 10 m, EPSG:32632, UInt16
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
# the repository's crop grouping, and the evaluation's split: columns 0..271 train (a multiple of the 16 px
# patch), the rest is scored
from eval_multilabel import GROUPS, SPLIT, crop  # noqa: E402
from make_eval_models import crop_group  # noqa: E402

TRAIN = {"TASK": "patch_classification", "MULTI_LABEL": True, "ENCODER": "resnet10t", "EPOCHS": 2,
         "TIME_BUDGET": 0, "BATCH_SIZE": 16, "STEPS_PER_EPOCH": 3, "TILE_SIZE": 16, "VALIDATION": 0.3,
         "PATIENCE": 0, "DEVICE": "cpu"}


def _run(alg, params, feedback=None):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(alg, params, context=context, feedback=feedback or QgsProcessingFeedback())


@pytest.fixture(scope="module")
def fields():
    """[(shapely polygon, crop group name)] of the 174 parcels."""
    return [(g, GROUPS[crop_group(v)]) for g, v in read_gpkg_polygons(str(FIELDS / "fields.gpkg"), "fields",
                                                                      "Afgroede")]


@pytest.fixture(scope="module")
def data(tmp_path_factory, fields):
    from shapely.geometry import mapping
    d = tmp_path_factory.mktemp("ml")
    labels = d / "groups.geojson"
    labels.write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32632"}},
        "features": [{"type": "Feature", "geometry": mapping(g), "properties": {"crop": n}} for g, n in fields]}))
    return {"labels": labels, "train": crop(IMAGE, d / "left.tif", 0, SPLIT),
            "test": crop(IMAGE, d / "right.tif", SPLIT, 452),
            "dir": d}


@pytest.fixture(scope="module")
def trained(provider, data):
    out = data["dir"] / "crops_ml"
    res = _run("rs_deep:train", dict(TRAIN, INPUT=str(data["train"]), LABELS=str(data["labels"]), CLASS_FIELD="crop",
                                     OUTPUT=str(out)))
    return {"package": Path(res["OUTPUT"]), "report": json.loads(Path(res["REPORT"]).read_text())}


@pytest.fixture(scope="module")
def written(trained, data):
    """The held-out patches written by rs_deep:classify_patches (package thresholds)."""
    out = data["dir"] / "right_patches.gpkg"
    res = _run("rs_deep:classify_patches", {"INPUT": str(data["test"]), "MODEL": str(trained["package"]),
                                            "DEVICE": "cpu", "OUTPUT": str(out)})
    return res["OUTPUT"]


def _features(path):
    from qgis.core import QgsVectorLayer
    layer = QgsVectorLayer(str(path), "p")
    assert layer.isValid()
    return layer, list(layer.getFeatures())


# --------------------------------------------------------------------------------------------
# training


def test_training_through_processing_writes_a_multilabel_package(trained):
    pkg = load_package(trained["package"], task="patch_classification")
    props = pkg.metadata["properties"]
    report = trained["report"]
    assert pkg.multi_label and pkg.activation == "sigmoid" and [c.name for c in pkg.classes] == GROUPS
    assert props["rs_deep:multi_label"] is True and props["mlm:output"][0]["result"]["shape"] == [-1, 4]
    # the thresholds were chosen on the validation rows of the epoch the package holds
    best = report["best"]
    assert best["metric"] == "macro_f1" and pkg.class_thresholds == best["metrics"]["thresholds"]
    assert all(0 < t < 1 for t in pkg.class_thresholds)
    val = best["metrics"]
    assert set(val["classes"]) == set(GROUPS) and val["patches"] == report["samples"]["val_patches"] > 0
    for name, c in val["classes"].items():  # the validation counts add up
        assert c["tp"] + c["fn"] == c["support"] == report["samples"]["val_class_patches"][name]
        if c["f1"] is not None:
            assert c["f1"] == pytest.approx(2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]))
    f1s = [c["f1"] for c in val["classes"].values() if c["f1"] is not None]
    assert val["macro_f1"] == pytest.approx(np.mean(f1s))
    assert report["settings"]["cover"] == 0.2 and report["settings"]["multi_label"] is True
    assert [h["val"]["macro_f1"] is not None for h in report["history"]] == [True, True]
    assert props["rs_deep:training"]["val_macro_f1"] == val["macro_f1"]


def test_training_labels_are_the_groups_covering_a_fifth_of_a_patch(fields):
    import shapely
    from rs_deep.rs_deep_plugin.engine.training.multilabel import class_masks, grid_targets
    from shapely.geometry import box
    with rasterio.open(IMAGE) as ds:
        masks, labelled = class_masks([(g, GROUPS.index(n)) for g, n in fields], ds, 4)
        t = ds.transform
    cells, truth = grid_targets(masks, labelled, 16, 16, 0.2)
    assert len(cells) == 28 * 17 and labelled.all()
    # each patch's labels against the polygons' areas (pixel centres vs. exact areas: allow the borderline cases)
    union = {n: shapely.union_all([g for g, m in fields if m == n]) for n in GROUPS}
    agree = 0
    for (r, c), row in zip(cells, truth):
        x0, y0 = t * (c, r)
        cell = box(x0, y0 - 160, x0 + 160, y0)
        shares = [cell.intersection(union[n]).area / cell.area for n in GROUPS]
        agree += all(row[k] == (s >= 0.2) for k, s in enumerate(shares) if abs(s - 0.2) > 0.05)
    assert agree == len(cells)
    assert truth.any(axis=1).mean() > 0.5 and (truth.sum(axis=1) >= 2).sum() > 20  # multi-label indeed


def test_training_refusals(provider, data):
    from qgis.core import QgsProcessingException
    base = dict(TRAIN, INPUT=str(data["train"]), LABELS=str(data["labels"]), OUTPUT=str(data["dir"] / "bad"))
    with pytest.raises(QgsProcessingException, match="MULTI_LABEL is for patch classification.*TASK is segmentation"):
        _run("rs_deep:train", dict(base, TASK="segmentation", CLASS_FIELD="crop"))
    with pytest.raises(QgsProcessingException, match="at least two classes.*Set CLASS_FIELD"):
        _run("rs_deep:train", base)
    with pytest.raises(QgsProcessingException, match="cover .* must be in"):
        _run("rs_deep:train", dict(base, CLASS_FIELD="crop", LABEL_COVER=0))


# --------------------------------------------------------------------------------------------
# inference


def _sigmoid_scores(pkg, image, cells, size):
    """The network's own scores of the patches ``cells`` [(col, row)]: read, scaled by model.json's min-max scaling,
    sigmoid (numpy + torch, not the engine's reader)."""
    import torch
    with rasterio.open(image) as ds:
        x = ds.read().astype(np.float32)
    for b, s in enumerate(pkg.metadata["properties"]["mlm:input"][0]["value_scaling"]):
        assert s["type"] == "min-max"
        x[b] = (x[b] - s["minimum"]) / (s["maximum"] - s["minimum"])
    batch = np.stack([x[:, r:r + size, c:c + size] for c, r in cells])
    with torch.no_grad():
        return torch.sigmoid(pkg.load_model()(torch.from_numpy(batch))).numpy()


def test_output_fields_and_scores_are_the_models_sigmoid(trained, written, data):
    pkg = load_package(trained["package"])
    layer, feats = _features(written)
    names = score_fields(GROUPS)
    assert names == ["score_cereals", "score_grass", "score_maize", "score_other_crops"]
    assert [f.name() for f in layer.fields()][-6:] == ["labels", "n_labels"] + names
    # 180 x 276 px = 11 x 16 + 4 by 17 x 16 + 4: the last column and row of patches are a quarter inside, not classified
    assert len(feats) == 11 * 17
    with rasterio.open(data["test"]) as ds:
        inv = ~ds.transform
    thresholds = pkg.class_thresholds
    cells = []
    for feat in feats:
        bb = feat.geometry().boundingBox()
        assert bb.width() == pytest.approx(160) and bb.height() == pytest.approx(160)
        cells.append(tuple(round(v) for v in inv * (bb.xMinimum(), bb.yMaximum())))
    checked = 0
    for feat, scores in zip(feats, _sigmoid_scores(pkg, data["test"], cells, 16)):
        written_scores = [feat[n] for n in names]
        assert written_scores == pytest.approx(scores.tolist(), abs=2e-5)
        labels = [n for n in feat["labels"].split(",") if n]
        assert feat["n_labels"] == len(labels)
        assert labels == [g for g, s, t in zip(GROUPS, written_scores, thresholds) if s >= t]
        checked += 1
    assert checked == len(feats)


def test_threshold_override_and_its_refusals(trained, data, tmp_path):
    from qgis.core import QgsProcessingException
    from conftest import make_package
    base = {"INPUT": str(data["test"]), "MODEL": str(trained["package"]), "DEVICE": "cpu"}
    counts = {}
    for t in (0.1, 0.9):
        _, feats = _features(_run("rs_deep:classify_patches", dict(base, THRESHOLD=t,
                                                                   OUTPUT=str(tmp_path / f"t{t}.gpkg")))["OUTPUT"])
        for feat in feats:
            scores = [feat[n] for n in score_fields(GROUPS)]
            assert [n for n in feat["labels"].split(",") if n] == [g for g, s in zip(GROUPS, scores) if s >= t]
        counts[t] = sum(f["n_labels"] for f in feats)
    assert counts[0.1] > counts[0.9]
    with pytest.raises(QgsProcessingException, match=r"THRESHOLD must be a probability between 0 and 1.*1\.5"):
        _run("rs_deep:classify_patches", dict(base, THRESHOLD=1.5, OUTPUT=str(tmp_path / "x.gpkg")))
    # a single-label classifier has no score to threshold
    sys.path.insert(0, str(Path(__file__).parent))
    from test_patches import make_patch_package
    single = make_patch_package(tmp_path / "single")
    with pytest.raises(QgsProcessingException, match="THRESHOLD .* is for multi-label classifiers; 'single' is a "
                                                     "single-label classifier"):
        _run("rs_deep:classify_patches", dict(base, MODEL=str(single), THRESHOLD=0.5,
                                              OUTPUT=str(tmp_path / "y.gpkg")))
    with pytest.raises(InputError, match="is for multi-label"):
        classify_patches(str(IMAGE), str(single), threshold=0.3)
    # a segmentation model is refused by the patch tool, naming both tasks
    with pytest.raises(QgsProcessingException, match="patch_classification"):
        _run("rs_deep:classify_patches", dict(base, MODEL=str(make_package(tmp_path / "seg")), THRESHOLD=0.5,
                                              OUTPUT=str(tmp_path / "z.gpkg")))
    assert not any(p.suffix == ".gpkg" and p.stem in ("x", "y", "z") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# assessment


def test_assessment_matches_a_hand_computation_on_the_written_layer(written, fields, data, tmp_path):
    import shapely
    from qgis.core import QgsVectorLayer
    out_table = tmp_path / "per_class.gpkg"
    res = _run("rs_deep:assess_accuracy", {"TASK": "patch_classification", "PREDICTION_BOXES": str(written),
                                           "REFERENCE": str(data["labels"]), "CLASS_FIELD": "crop",
                                           "OUTPUT_HTML": str(tmp_path / "r.html"), "OUTPUT_TABLE": str(out_table)})
    # by hand: each written patch's true groups (parcels covering >= 20 % of its area) and its written labels
    _, feats = _features(written)
    union = {n: shapely.union_all([g for g, m in fields if m == n]) for n in GROUPS}
    tp, fp, fn = ({n: 0 for n in GROUPS} for _ in range(3))
    for feat in feats:
        cell = shapely.from_wkb(bytes(feat.geometry().asWkb()))
        truth = {n for n in GROUPS if cell.intersection(union[n]).area / cell.area >= 0.2}
        pred = {n for n in feat["labels"].split(",") if n}
        for n in GROUPS:
            tp[n] += n in truth and n in pred
            fp[n] += n not in truth and n in pred
            fn[n] += n in truth and n not in pred
    f1 = {n: 2 * tp[n] / (2 * tp[n] + fp[n] + fn[n]) for n in GROUPS if tp[n] + fp[n] + fn[n]}
    T, P, N = sum(tp.values()), sum(fp.values()), sum(fn.values())
    assert res["MICRO_F1"] == pytest.approx(2 * T / (2 * T + P + N)) and res["F1"] == res["MICRO_F1"]
    assert res["PRECISION"] == pytest.approx(T / (T + P)) and res["RECALL"] == pytest.approx(T / (T + N))
    assert res["MACRO_F1"] == pytest.approx(np.mean(list(f1.values())))
    table = QgsVectorLayer(res["OUTPUT_TABLE"], "t")
    rows = {f["class_name"]: f for f in table.getFeatures()}
    assert sorted(rows) == sorted(GROUPS)
    for n in GROUPS:
        assert (rows[n]["tp"], rows[n]["fp"], rows[n]["fn"]) == (tp[n], fp[n], fn[n])
        if n in f1:
            assert rows[n]["f1"] == pytest.approx(f1[n])
    html = Path(res["OUTPUT_HTML"]).read_text()
    assert "Macro F1" in html and "cover at least 0.20" in html


# --------------------------------------------------------------------------------------------
# the package


def test_package_round_trip_and_refusals(trained, tmp_path):
    from rs_deep.rs_deep_plugin.engine.evaluation.baselines import evaluate_patches
    from rs_deep.rs_deep_plugin.engine.models.onnx.export import export_onnx
    src = trained["package"]
    meta = json.loads((src / "model.json").read_text())
    props = meta["properties"]
    fields = parse_metadata(meta)
    assert fields["multi_label"] and fields["class_thresholds"] == props["rs_deep:class_thresholds"]
    # zipped, the package reads back with its thresholds and gives the same scores
    archive = shutil.make_archive(str(tmp_path / "crops"), "zip", src)
    a = classify_patches(str(IMAGE), str(src), device="cpu", threshold=None)
    b = classify_patches(str(IMAGE), archive, device="cpu")
    assert load_package(archive).class_thresholds == props["rs_deep:class_thresholds"]
    assert [f["scores"] for f in a] == [f["scores"] for f in b] and [f["labels"] for f in a] == [f["labels"]
                                                                                                  for f in b]

    from rs_deep.rs_deep_plugin.gui.model_card import ModelInfo
    card = ModelInfo(str(src), load_package(src)).card_html()
    assert "multi-label" in card and all(f"{n} &ge; {t:g}" in card for n, t in zip(GROUPS, fields["class_thresholds"]))

    def broken(**changes):
        m = json.loads(json.dumps(meta))
        for k, v in changes.items():
            if v is None:
                m["properties"].pop(k)
            else:
                m["properties"][k] = v
        return m

    cases = [(dict(**{"rs_deep:activation": "softmax"}), "needs 'sigmoid'"),
             ({"rs_deep:class_thresholds": [0.5, 0.5]}, "expected 4 probabilities"),
             ({"rs_deep:class_thresholds": [0.5, 0.5, 1.0, 0.5]}, "between 0 and 1"),
             ({"rs_deep:multi_label": "yes"}, "expected true or false"),
             ({"rs_deep:multi_label": None}, "only used with rs_deep:multi_label true")]
    for changes, message in cases:
        with pytest.raises(ModelPackageError, match=message):
            parse_metadata(broken(**changes))
    seg = broken(**{"rs_deep:task": "segmentation", "mlm:tasks": ["semantic-segmentation"]})
    with pytest.raises(ModelPackageError, match="only patch_classification models can be multi-label"):
        parse_metadata(seg)
    # the wrong output layout: a network of 4 outputs declared with 3 classes
    wrong = json.loads(json.dumps(meta))
    wrong["properties"]["mlm:output"][0]["classification:classes"].pop()
    wrong["properties"]["rs_deep:class_thresholds"].pop()
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "model.json").write_text(json.dumps(wrong))
    with pytest.raises(ModelPackageError, match="builder.classes is 4 but classification:classes lists 3"):
        classify_patches(str(IMAGE), str(bad), device="cpu")
    # tools that cannot use a multi-label package say so
    with pytest.raises(InputError, match="multi-label patch classifier; ONNX export .* thresholds"):
        export_onnx(src, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(InputError, match="multi-label classifier .*assess_multilabel_patches"):
        evaluate_patches(src, str(IMAGE), [])


def test_qgis_process_subprocess(trained, data, tmp_path):
    import sqlite3
    from qgis_env import run_qgis_process
    out = tmp_path / "q.gpkg"
    proc = run_qgis_process(["run", "rs_deep:classify_patches", "--json", "--", f"INPUT={data['test']}",
                             f"MODEL={trained['package']}", "THRESHOLD=0.3", "DEVICE=cpu", f"OUTPUT={out}"])
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert res["results"]["OUTPUT"].startswith(str(out))
    con = sqlite3.connect(out)
    table = con.execute("select table_name from gpkg_contents where data_type='features'").fetchone()[0]
    rows = con.execute(f'select labels, score_cereals, score_grass, score_maize, score_other_crops from "{table}"'
                       ).fetchall()
    con.close()
    engine = classify_patches(str(data["test"]), str(trained["package"]), threshold=0.3, device="cpu")
    assert len(rows) == len(engine)
    assert sorted(r[0] for r in rows) == sorted(",".join(f["labels"]) for f in engine)
    for r in rows:
        assert (r[0].split(",") if r[0] else []) == [g for g, s in zip(GROUPS, r[1:]) if s >= 0.3]
