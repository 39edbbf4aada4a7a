"""Training-data export (chips + manifest, split by spatial blocks) and training from the chips, on real data."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from shapely.geometry import box as sbox

from rs_deep.rs_deep_plugin.engine.training.chips import (MANIFEST, export_training_data, is_chip_set, load_manifest,
                                                 split_chips)
from rs_deep.rs_deep_plugin.engine.errors import Cancelled, InputError
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation

from conftest import ATLANTA_EAST, ATLANTA_IMAGE, ATLANTA_LABELS, CHANGE, TREES, TREES_IMAGE


def _atlanta_labels():
    return read_vector_labels(ATLANTA_LABELS, class_value=1)


@pytest.fixture(scope="module")
def atlanta_chips(tmp_path_factory):
    out = tmp_path_factory.mktemp("chips") / "atlanta"
    m = export_training_data(ATLANTA_IMAGE, _atlanta_labels(), out, task="segmentation",
                             class_names=["background", "building"], tile_size=128, stride=128, only_labelled=True,
                             val_fraction=0.25, block_size=256, seed=3)
    return out, m


def test_segmentation_chips_are_georeferenced_and_match_the_source(atlanta_chips):
    out, m = atlanta_chips
    assert m["path"] == str(out / MANIFEST) and is_chip_set(out) and is_chip_set(out / MANIFEST)
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["format"] == "rs_deep-chips" and on_disk["task"] == "segmentation"
    assert [c["name"] for c in on_disk["classes"]] == ["background", "building"]
    assert on_disk["gsd"] == pytest.approx(0.5)
    chips = on_disk["chips"]
    assert len(chips) >= 4
    with rasterio.open(ATLANTA_IMAGE) as src:
        for e in chips[:6]:
            with rasterio.open(out / e["image"]) as chip, rasterio.open(out / e["label"]) as lab:
                assert (chip.width, chip.height) == (128, 128) and chip.crs == src.crs
                assert chip.dtypes[0] == src.dtypes[0]
                # the chip's pixels are the source's pixels at the place its georeferencing says
                col, row = ~src.transform * (chip.transform.c, chip.transform.f)
                assert (round(col), round(row)) == (e["col"], e["row"])
                win = rasterio.windows.Window(e["col"], e["row"], 128, 128)
                np.testing.assert_array_equal(chip.read(), src.read(window=win))
                labels = lab.read(1)
                assert lab.nodata == 255 and lab.transform == chip.transform
                # only chips that touch labels: every chip has building pixels, counted in the manifest
                assert (labels == 1).sum() == e["class_pixels"]["building"] > 0


def test_split_is_by_spatial_blocks_without_shared_pixels(atlanta_chips):
    out, m = atlanta_chips
    train, val = split_chips(m)
    assert train and val
    bs = m["split"]["block_size"]
    val_blocks = {tuple(b) for b in m["split"]["val_blocks"]}

    def blocks(e):
        return {(bx, by) for bx in range(e["col"] // bs, (e["col"] + e["width"] - 1) // bs + 1)
                for by in range(e["row"] // bs, (e["row"] + e["height"] - 1) // bs + 1)}

    for e in val:
        assert blocks(e) <= val_blocks
    for e in train:
        assert not blocks(e) & val_blocks
    # no training pixel is a validation pixel
    for e in val:
        assert all(_overlap(t["bounds"], e["bounds"]) == 0 for t in train)
    assert m["split"]["train_chips"] == len(train) and m["split"]["val_chips"] == len(val)


def test_export_is_reproducible_and_replaces_an_earlier_export(tmp_path):
    kw = dict(task="segmentation", class_names=["background", "building"], tile_size=128, val_fraction=0.25,
              block_size=256, seed=3)
    a = export_training_data(ATLANTA_IMAGE, _atlanta_labels(), tmp_path / "a", **kw)
    b = export_training_data(ATLANTA_IMAGE, _atlanta_labels(), tmp_path / "a", **kw)  # over itself
    assert [(e["row"], e["col"], e["split"]) for e in a["chips"]] == [(e["row"], e["col"], e["split"])
                                                                      for e in b["chips"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left
    # all chips (also those without buildings) when only_labelled is off
    c = export_training_data(ATLANTA_IMAGE, _atlanta_labels(), tmp_path / "c", **dict(kw, seed=0),
                             only_labelled=False)
    assert len(c["chips"]) + c["split"]["dropped_on_block_edges"] == 5 * 8  # 600x900 px in 128 px chips
    assert len(c["chips"]) > len(a["chips"])


def test_export_refuses_a_foreign_folder_and_a_cancel_leaves_nothing(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        export_training_data(ATLANTA_IMAGE, _atlanta_labels(), other, class_names=["background", "b"])
    assert (other / "notes.txt").read_text() == "keep me"
    calls = []
    with pytest.raises(Cancelled):
        export_training_data(ATLANTA_IMAGE, _atlanta_labels(), tmp_path / "cut",
                             class_names=["background", "building"], tile_size=64,
                             is_cancelled=lambda: len(calls) > 5, progress=lambda f, m: calls.append(f))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    with pytest.raises(InputError, match="overlap"):
        far = [(sbox(0, 0, 10, 10), 1)]
        export_training_data(ATLANTA_IMAGE, far, tmp_path / "far", class_names=["background", "building"])
    assert not (tmp_path / "far").exists()


def test_train_segmentation_from_chips(atlanta_chips, tmp_path):
    out, m = atlanta_chips
    report = train_segmentation(out, None, tmp_path / "pkg", tile_size=96, batch_size=2, steps_per_epoch=3,
                                epochs=2, seed=0, num_threads=2, package_tile_size=256, package_overlap=32,
                                augment={"flip": False, "rotate": True, "brightness": 0.0, "contrast": 0.0,
                                         "gamma": 0.0, "noise": 0.0})
    pkg = load_package(tmp_path / "pkg", task="segmentation")
    assert [c.name for c in pkg.classes] == ["background", "building"] and pkg.gsd == pytest.approx(0.5)
    assert report["data"]["validation"]["chips"] == len(split_chips(m)[1])
    assert len(report["history"]) == 2 and all(h["val"]["iou"] is not None for h in report["history"])
    assert report["augment"]["flip"] is False
    # the curves PNG beside the JSON
    png = Path(report["curves_path"])
    assert png.name == "training_curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000
    with pytest.raises(InputError, match="for segmentation, not detection"):
        from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
        train_detection(out, tmp_path / "det", epochs=1)


def test_detection_chips_hold_the_boxes_and_train(tmp_path):
    from rs_deep.rs_deep_plugin.engine.training.detection import train_detection
    with rasterio.open(TREES_IMAGE) as ds:
        crs = ds.crs
    feats = json.loads((TREES / "OSBS_029_boxes.geojson").read_text())["features"]
    labels = [(sbox(*_bounds(f["geometry"])), 0) for f in feats]
    m = export_training_data(TREES_IMAGE, labels, tmp_path / "trees", task="detection",
                             class_names=["tree"], tile_size=128, stride=128, val_fraction=0.25, block_size=128,
                             seed=1)
    assert crs is not None
    assert m["task"] == "detection" and m["boxes"]["train"] > 20 and m["boxes"]["val"] > 0
    assert not any("label" in e for e in m["chips"])
    # every box in chip pixels lies inside the chip and maps back onto a reference box
    refs = [g for g, _ in labels]
    for e in m["chips"]:
        with rasterio.open(tmp_path / "trees" / e["image"]) as chip:
            t = chip.transform
            for x0, y0, x1, y1, cls in e["boxes"]:
                assert 0 <= x0 < x1 <= e["width"] and 0 <= y0 < y1 <= e["height"] and cls == 0
                mx0, my1 = t * (x0, y0)
                mx1, my0 = t * (x1, y1)
                # the chip's box is the part of one reference box inside the chip (up to the 2-decimal rounding)
                assert any(_overlap(r.bounds, (mx0, my0, mx1, my1)) > 0.95 * (mx1 - mx0) * (my1 - my0)
                           for r in refs)
    report = train_detection(tmp_path / "trees", tmp_path / "pkg", epochs=2, steps_per_epoch=2, batch_size=2,
                             tile_size=128, num_threads=2, patience=1,
                             builder={"library": "rs_deep", "architecture": "CenterNet", "encoder": "resnet18",
                                      "encoder_weights": None,
                                      "params": {"base": "Unet", "encoder_depth": 3, "output_stride": 2,
                                                 "decoder_channels": [64, 32], "head_channels": 64}})
    pkg = load_package(tmp_path / "pkg", task="detection")
    assert [c.name for c in pkg.classes] == ["tree"]
    assert len(report["history"]) == report["epochs_run"] >= 1 and all(h["val"] for h in report["history"])
    assert report["data"]["val_images"]
    assert Path(report["curves_path"]).is_file()


def _overlap(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _bounds(geom):
    from shapely.geometry import shape
    return shape(geom).bounds


def test_change_chips_from_a_label_raster_train_a_change_model(tmp_path):
    """A change pair simulated from the real Atlanta image (buildings removed in the after date; a 0/255 mask, as
    LEVIR-CD's): 256 x 768 px, a removed building in each 256 px block. tests/eval/test_levir.py: the same on
    LEVIR-CD."""
    check_change_chips_train_a_change_model(tmp_path, ATLANTA_EAST)


def check_change_chips_train_a_change_model(tmp_path, pair):
    from rs_deep.rs_deep_plugin.engine.training.change import train_change
    m = export_training_data(pair.before, str(pair.label), tmp_path / "chg",
                             task="change", after_path=pair.after, class_names=["no change", "change"],
                             tile_size=256, val_fraction=0.25, block_size=256, seed=0)
    train, val = split_chips(m)
    assert train and val
    e = m["chips"][0]
    with rasterio.open(tmp_path / "chg" / e["after"]) as a, rasterio.open(pair.after) as src:
        win = rasterio.windows.Window(e["col"], e["row"], e["width"], e["height"])
        np.testing.assert_array_equal(a.read(), src.read(window=win))
    with rasterio.open(tmp_path / "chg" / e["label"]) as lab:
        assert set(np.unique(lab.read(1))) <= {0, 1, 255} and (lab.read(1) == 1).sum() == e["class_pixels"]["change"]
    report = train_change(tmp_path / "chg", tmp_path / "pkg", epochs=1, steps_per_epoch=2, batch_size=2,
                          tile_size=64, num_threads=2)
    pkg = load_package(tmp_path / "pkg", task="change")
    assert [c.name for c in pkg.classes] == ["no change", "change"]
    assert report["history"][0]["val"]["iou"] is not None
    # a chip folder of one task is refused by another task's manifest reader, with the fix
    with pytest.raises(InputError, match="for change, not segmentation"):
        load_manifest(tmp_path / "chg", "segmentation")


def test_non_overlapping_change_pair_is_refused(tmp_path):
    # another place in the same CRS (the west crop of the Atlanta image, 12 m beside the east one)
    with pytest.raises(InputError, match="do not overlap"):
        export_training_data(CHANGE / "west_A.tif", str(CHANGE / "east_label.tif"), tmp_path / "x", task="change",
                             after_path=CHANGE / "east_B.tif", class_names=["no change", "change"])
    # another CRS (the NEON image, EPSG:32617 in Florida; the pair is EPSG:32616 in Atlanta)
    with pytest.raises(InputError, match="do not overlap"):
        export_training_data(TREES_IMAGE, str(CHANGE / "east_label.tif"), tmp_path / "x", task="change",
                             after_path=CHANGE / "east_B.tif", class_names=["no change", "change"], bands=[1])
    assert not (tmp_path / "x").exists()
