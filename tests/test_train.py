"""Training a segmentation model on the real Atlanta sample (tiny runs): package, report, inference, cancel."""
import json

import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.errors import Cancelled, InputError
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.evaluation.metrics import confusion_matrix, metrics_from_confusion
from rs_deep.rs_deep_plugin.engine.geo.labels import IGNORE, read_vector_labels
from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation

from conftest import ATLANTA_IMAGE, ATLANTA_LABELS

IMAGE = ATLANTA_IMAGE
FOOTPRINTS = ATLANTA_LABELS

TINY = dict(class_names=["background", "building"], class_colors=["000000", "e31a1c"], band_names=["pan"],
            tile_size=96, batch_size=2, steps_per_epoch=2, epochs=2, seed=0, num_threads=2,
            package_tile_size=256, package_overlap=32, name="tiny_buildings")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "pkg"
    labels = read_vector_labels(FOOTPRINTS, class_value=1)
    messages = []
    report = train_segmentation(IMAGE, labels, out, progress=lambda f, m: messages.append((f, m)), **TINY)
    return out, report, messages


def test_read_vector_labels():
    labels = read_vector_labels(FOOTPRINTS, class_value=1)
    assert len(labels) == 32
    assert all(g.geom_type in ("Polygon", "MultiPolygon") and v == 1 for g, v in labels)
    with rasterio.open(IMAGE) as ds:
        b = ds.bounds
        same = read_vector_labels(FOOTPRINTS, class_value=2, dst_crs=ds.crs)  # already in the image CRS
    assert [g.bounds for g, _ in same] == [g.bounds for g, _ in labels] and same[0][1] == 2
    minx, miny, maxx, maxy = labels[0][0].bounds
    assert b.left <= minx and maxx <= b.right and b.bottom <= miny and maxy <= b.top


def test_training_writes_a_loadable_package_with_data_scaling(trained):
    out, report, messages = trained
    pkg = load_package(out, task="segmentation")
    assert [c.name for c in pkg.classes] == ["background", "building"]
    assert [c.color for c in pkg.classes] == ["000000", "E31A1C"]
    assert pkg.bands == ["pan"] and pkg.in_channels == 1
    assert pkg.tile_size == 256 and pkg.overlap == 32
    assert pkg.gsd == pytest.approx(0.5)
    assert pkg.builder["architecture"] == "Unet" and pkg.builder["encoder"] == "mobilenet_v2"
    (s,) = pkg.value_scaling
    with rasterio.open(IMAGE) as ds:
        arr = ds.read(1)
    vals = arr[arr != 0]  # nodata 0
    assert s["type"] == "min-max"
    assert vals.min() <= s["minimum"] < s["maximum"] <= vals.max()
    assert s["minimum"] == pytest.approx(np.percentile(vals, 1), rel=0.02)
    assert s["maximum"] == pytest.approx(np.percentile(vals, 99), rel=0.02)
    model = pkg.load_model()  # weights match the builder
    assert sum(p.numel() for p in model.parameters()) > 1e6
    # the progress callback heard about every epoch, with loss and IoU
    epoch_msgs = [m for f, m in messages if m and m.startswith("Epoch")]
    assert len(epoch_msgs) == 2 and "loss" in epoch_msgs[0] and "IoU" in epoch_msgs[0]
    assert messages[-1][0] == pytest.approx(1.0)


def test_training_report(trained):
    out, report, _ = trained
    on_disk = json.loads((out / "training_report.json").read_text())
    assert on_disk["epochs_run"] == report["epochs_run"] == 2
    history = on_disk["history"]
    series = {"train_loss": [h["train_loss"] for h in history], "val_iou": [h["val"]["iou"] for h in history],
              "val_loss": [h["val_loss"] for h in history]}
    for key, values in series.items():
        assert len(values) == 2, key
        assert all(isinstance(v, float) for v in values)
    assert on_disk["best"]["epoch"] in (1, 2) and on_disk["best"]["metric"] == "iou"
    best = on_disk["best"]["metrics"]
    assert on_disk["best"]["value"] == best["iou"]
    for key in ("iou", "f1", "precision", "recall"):
        assert 0.0 <= best[key] <= 1.0
    assert best["classes"][1]["name"] == "building" and best["classes"][1]["support"] > 0  # the held-out strip
    # has buildings
    assert on_disk["seed"] == 0 and on_disk["seconds"] > 0
    s = on_disk["samples"]
    assert s["train_pixels"] + s["val_pixels"] == 600 * 900
    assert s["val_pixels"] == 120 * 900  # the right 20 % of the columns: the strip most like the whole image
    assert s["crops_seen"] == 2 * 2 * 2
    assert on_disk["data"]["validation"]["side"] == "right"
    assert on_disk["data"]["validation"]["window"] == {"row_off": 0, "col_off": 480, "height": 900, "width": 120}
    assert not on_disk["cancelled"]


def test_segment_runs_with_the_trained_package(trained, tmp_path):
    out, _, _ = trained
    result = segment(str(IMAGE), str(out), str(tmp_path / "classes.tif"))
    with rasterio.open(IMAGE) as src, rasterio.open(tmp_path / "classes.tif") as ds:
        assert (ds.width, ds.height) == (src.width, src.height)
        assert ds.transform == src.transform and ds.crs == src.crs
        cls = ds.read(1)
    assert set(np.unique(cls)) <= {0, 1}
    assert sum(result.class_pixels.values()) == 600 * 900


def test_cancel_after_the_first_epoch_keeps_the_best_model(tmp_path):
    out = tmp_path / "cancelled"
    state = {"epochs": 0}

    def progress(fraction, message):
        if message and message.startswith("Epoch"):
            state["epochs"] += 1

    with pytest.raises(Cancelled) as info:
        train_segmentation(IMAGE, read_vector_labels(FOOTPRINTS), out, progress=progress,
                           is_cancelled=lambda: state["epochs"] >= 1, **dict(TINY, epochs=5))
    assert "epoch" in str(info.value)
    assert state["epochs"] == 1
    pkg = load_package(out)  # the best model so far is on disk and loadable
    pkg.load_model()
    report = json.loads((out / "training_report.json").read_text())
    assert report["cancelled"] and report["epochs_run"] == 1 and report["best"]["epoch"] == 1


def test_cancel_before_any_epoch_writes_nothing(tmp_path):
    out = tmp_path / "nothing"
    with pytest.raises(Cancelled):
        train_segmentation(IMAGE, read_vector_labels(FOOTPRINTS), out, is_cancelled=lambda: True, **TINY)
    assert not (out / "model.json").exists()


def test_label_raster_input_and_its_checks(tmp_path):
    from rasterio.features import rasterize
    with rasterio.open(IMAGE) as ds:
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8",
                       crs=ds.crs, transform=ds.transform)
        lab = rasterize(read_vector_labels(FOOTPRINTS), out_shape=(ds.height, ds.width), transform=ds.transform)
    lab[:50] = IGNORE  # not labelled: ignored by the loss
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as dst:
        dst.write(lab, 1)
    report = train_segmentation(IMAGE, str(tmp_path / "labels.tif"), tmp_path / "pkg", val_side="bottom",
                                **dict(TINY, epochs=1, steps_per_epoch=1))
    assert report["samples"]["train_pixels"] == 600 * 720 - 600 * 50  # an explicit side is kept
    assert report["data"]["validation"]["side"] == "bottom"
    assert load_package(tmp_path / "pkg").num_classes == 2

    bad = lab.copy()
    bad[100, 100] = 7
    with rasterio.open(tmp_path / "bad.tif", "w", **profile) as dst:
        dst.write(bad, 1)
    with pytest.raises(InputError, match="class values"):
        train_segmentation(IMAGE, str(tmp_path / "bad.tif"), tmp_path / "pkg2", **TINY)
    small = dict(profile, width=300, height=300)
    with rasterio.open(tmp_path / "small.tif", "w", **small) as dst:
        dst.write(lab[:300, :300], 1)
    with pytest.raises(InputError, match="pixel grid"):
        train_segmentation(IMAGE, str(tmp_path / "small.tif"), tmp_path / "pkg3", **TINY)
    with pytest.raises(InputError, match="overlap"):
        from shapely.geometry import box
        train_segmentation(IMAGE, [(box(0, 0, 10, 10), 1)], tmp_path / "pkg4", **TINY)


def test_metrics_from_confusion():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 1]], dtype=np.uint8)
    cm = confusion_matrix(pred, truth, 2)
    assert cm.tolist() == [[3, 1], [1, 2]]
    m = metrics_from_confusion(cm, ["background", "building"])
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["classes"][0]["name"] == "background" and m["classes"][0]["iou"] == pytest.approx(3 / 5)


def test_time_budget_stops_the_run_and_anneals_the_schedule(tmp_path):
    """A run of 1,000 planned epochs with a budget of 0.15 min stops on time, writes its package, and its learning
    rate follows the clock (the share of the budget used), not the 1,000 epochs."""
    from rs_deep.rs_deep_plugin.engine.training.loop import one_cycle
    out = tmp_path / "budget"
    report = train_segmentation(IMAGE, read_vector_labels(FOOTPRINTS), out, time_budget=0.15,
                                **dict(TINY, epochs=1000, patience=0))  # patience 8 could stop a fast run first
    assert report["stopped_by_budget"] and 1 <= report["epochs_run"] < 1000
    assert report["time_budget_minutes"] == 0.15
    assert report["training_seconds"] >= 9.0
    last = report["history"][-1]
    # the last step's learning rate is the one-cycle factor of its progress, and that progress is the share of the
    # budget used, far ahead of the share of the 1,000 planned epochs (no bound on the time a step takes: a loaded
    # machine runs fewer steps, and the last one may come well before the budget's end)
    assert last["lr"] == pytest.approx(report["lr"] * one_cycle(last["progress"], 0.1), rel=1e-3)
    assert last["progress"] > 10 * report["epochs_run"] / 1000
    load_package(out).load_model()
    assert one_cycle(0.0, 0.1) == pytest.approx(0.1) and one_cycle(0.1, 0.1) == pytest.approx(1.0)
    assert one_cycle(1.0, 0.1) == pytest.approx(0.001)
    with pytest.raises(InputError, match="time_budget"):
        train_segmentation(IMAGE, read_vector_labels(FOOTPRINTS), tmp_path / "bad", time_budget=0, **TINY)


def test_weight_average_follows_the_trained_weights():
    """WeightAverage: each update moves every float tensor (weights and BatchNorm statistics) towards the trained
    network's by 1 - min(decay, (1 + n) / (10 + n)), copies integer buffers, and never touches the trained one."""
    import torch
    from rs_deep.rs_deep_plugin.engine.training.loop import WeightAverage
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    avg = WeightAverage(net, 0.9)
    assert all(not p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    before = {k: v.clone() for k, v in avg.model.state_dict().items()}
    net(torch.randn(2, 1, 8, 8))  # train mode: BatchNorm statistics and its batch count move
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    avg.update()
    d = min(0.9, 2.0 / 11.0)
    for k, v in avg.model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, before[k] * d + trained[k] * (1 - d), atol=1e-6), k
        else:
            assert torch.equal(v, trained[k]), k
    for k, v in net.state_dict().items():
        assert torch.equal(v, trained[k])  # the trained network is untouched
    for _ in range(200):
        avg.update()
    assert avg.steps == 201
    for k, v in avg.model.state_dict().items():  # converges on weights that stay put
        assert torch.allclose(v.float(), trained[k].float(), atol=1e-4), k


def test_the_package_holds_the_averaged_weights_and_ema_zero_the_last(tmp_path):
    """The same seeded run with and without weight averaging: the packages differ (the averaged one is not the
    last step's), both load and segment, the report records the decay; a decay outside [0, 1) is refused."""
    import torch
    labels = read_vector_labels(FOOTPRINTS, class_value=1)
    runs = {}
    for decay in (0.0, 0.9):
        out = tmp_path / f"ema_{decay}"
        report = train_segmentation(IMAGE, labels, out, ema_decay=decay, **dict(TINY, patience=0))
        assert report["ema_decay"] == decay
        assert json.loads((out / "training_report.json").read_text())["ema_decay"] == decay
        runs[decay] = load_package(out).load_model().state_dict()
        segment(str(IMAGE), str(out), str(tmp_path / f"classes_{decay}.tif"))
    diff = [k for k, v in runs[0.0].items() if v.is_floating_point() and not torch.equal(v, runs[0.9][k])]
    assert len(diff) > 10
    with pytest.raises(InputError, match="ema_decay"):
        train_segmentation(IMAGE, labels, tmp_path / "bad", ema_decay=1.0, **TINY)


def test_the_validation_strip_is_the_one_most_like_the_whole_image():
    """val_side "auto" (the default): on the Atlanta sample the bottom strip is forest (1.9 % buildings against
    4.8 % in the image); the strip chosen holds at least the image's share and is the closest of those. An
    explicit side is kept; ignored pixels do not count; a class found only in one strip picks that strip."""
    from rs_deep.rs_deep_plugin.engine.geo.labels import labels_from_geometries
    from rs_deep.rs_deep_plugin.engine.training.data import representative_side, split_strip, window_slices
    with rasterio.open(IMAGE) as ds:
        lab = labels_from_geometries(read_vector_labels(FOOTPRINTS, class_value=1, dst_crs=ds.crs), ds, 2)
    whole = float((lab == 1).mean())
    share = {}
    for side in ("bottom", "top", "left", "right"):
        rows, cols = window_slices(split_strip(600, 900, 0.2, side)[1])
        share[side] = float((lab[rows, cols] == 1).mean())
    assert share["bottom"] < 0.5 * whole
    side = representative_side(lab, 0.2, 2, IGNORE)
    assert side == "right" and share[side] >= whole
    assert all(share[s] < whole or abs(share[s] - whole) >= abs(share[side] - whole) for s in share)
    masked = lab.copy()
    masked[:, 480:] = IGNORE  # the right strip unlabelled: it holds nothing to validate on
    assert representative_side(masked, 0.2, 2, IGNORE) != "right"
    three = np.zeros((100, 100), np.uint8)
    three[40:60, 40:60] = 1
    three[:5, :5] = 2  # class 2 only in the top-left corner: top and left hold it, top is preferred
    assert representative_side(three, 0.2, 3) == "top"


def test_bfloat16_training_steps(tmp_path):
    """precision: the same seeded run in float32 and in bfloat16 mixed precision (autocast, as "auto" chooses on a
    CPU with AVX512-BF16 or AMX and on CUDA): the first losses agree to about bfloat16's precision but are not the
    same numbers (the steps did run in bfloat16); both packages hold float32 networks that load and segment; the
    report and the log say which; an unknown precision, or bfloat16 where the device has none, is refused."""
    import torch
    from rs_deep.rs_deep_plugin.engine.training.loop import native_bfloat16, training_dtype
    labels = read_vector_labels(FOOTPRINTS, class_value=1)
    reports, logs = {}, {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        logs[precision] = []
        reports[precision] = train_segmentation(IMAGE, labels, out, precision=precision,
                                                log=logs[precision].append, **dict(TINY, patience=0))
        assert reports[precision]["precision"] == precision
        assert json.loads((out / "training_report.json").read_text())["precision"] == precision
        model = load_package(out).load_model()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        segment(str(IMAGE), str(out), str(tmp_path / f"classes_{precision}.tif"))
    first = [reports[p]["history"][0]["train_loss"] for p in ("float32", "bfloat16")]
    assert first[0] != first[1] and first[1] == pytest.approx(first[0], rel=0.05)
    assert "Training steps in float32" in logs["float32"]
    assert any(m.startswith("Training steps in bfloat16 mixed precision") for m in logs["bfloat16"])
    cpu = torch.device("cpu")
    assert training_dtype(torch, cpu, "float32") is None and training_dtype(torch, cpu, "bfloat16") == torch.bfloat16
    assert training_dtype(torch, cpu, "auto") == (torch.bfloat16 if native_bfloat16(torch, cpu) else None)
    assert training_dtype(torch, torch.device("meta"), "auto") is None  # neither CPU nor CUDA: float32
    with pytest.raises(InputError, match="'bfloat16' is not available on meta"):
        training_dtype(torch, torch.device("meta"), "bfloat16")
    with pytest.raises(InputError, match="precision must be one of auto, float32, bfloat16; got 'fp8'"):
        train_segmentation(IMAGE, labels, tmp_path / "bad", precision="fp8", **TINY)
    assert not (tmp_path / "bad").exists()


def test_the_same_seed_trains_the_same_network(tmp_path):
    """SEED's promise: the same seed and settings, without a time budget (the schedule then follows the steps, not
    the clock), train the same network on the same device, to the bit; another seed trains another."""
    import torch
    labels = read_vector_labels(FOOTPRINTS, class_value=1)
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_segmentation(IMAGE, labels, tmp_path / name, **dict(TINY, patience=0, seed=seed))
        weights.append(load_package(tmp_path / name).load_model().state_dict())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    assert not all(torch.equal(v, weights[2][k]) for k, v in weights[0].items())


def test_copy_paste_pastes_labelled_objects_with_their_labels(tmp_path):
    """Copy-paste (segmentation's default augmentation): the pasted pixels are labelled pixels of the real sample,
    with their class; nothing else of the crop changes; crops get more building pixels; a bad share is refused."""
    from rasterio.features import rasterize
    from rs_deep.rs_deep_plugin.engine.training.samplers import CropSampler
    with rasterio.open(IMAGE) as ds:
        img = ds.read(1).astype(np.float32)[None]
        lab = rasterize(read_vector_labels(FOOTPRINTS, class_value=1, dst_crs=ds.crs), out_shape=(ds.height, ds.width),
                        transform=ds.transform, dtype="uint8")
    img /= img.max()
    valid = np.ones(lab.shape, dtype=bool)
    sampler = CropSampler(img, lab, valid, 128, np.random.default_rng(0), paste_prob=1.0)
    roof_values = np.unique(img[0][lab == 1])
    for _ in range(5):
        crop, crop_lab, crop_valid = np.zeros((1, 128, 128), np.float32), np.zeros((128, 128), np.uint8), \
            np.zeros((128, 128), bool)
        sampler.paste(crop, crop_lab, crop_valid)
        pasted = crop_lab == 1
        assert pasted.sum() >= 20  # at least part of a house (1-3 objects of a 32-px window)
        assert np.isin(crop[0][pasted], roof_values).all()  # labelled pixels of the image, as they are
        assert not crop[0][~pasted].any() and (crop_valid == pasted).all()  # nothing else touched

    def building_share(paste_prob):
        s = CropSampler(img, lab, valid, 128, np.random.default_rng(1), paste_prob=paste_prob, foreground_prob=0.0)
        return np.mean([(s.sample()[1] == 1).mean() for _ in range(100)])
    assert building_share(1.0) > 1.5 * building_share(0.0)
    with pytest.raises(InputError, match="paste_prob"):
        train_segmentation(IMAGE, read_vector_labels(FOOTPRINTS, class_value=1), tmp_path / "x",
                           **dict(TINY, paste_prob=1.5))
    assert not (tmp_path / "x").exists()
