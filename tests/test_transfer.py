"""Transfer learning (engine/training/transfer.py, rs_deep:train INIT_FROM, ENCODER_WEIGHTS, FREEZE_ENCODER,
ENCODER_LR) on the real Atlanta sample: tiny runs (a step or two of 96-px crops)."""
import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from rs_deep.rs_deep_plugin.engine.errors import InputError
from rs_deep.rs_deep_plugin.engine.geo.labels import read_vector_labels
from rs_deep.rs_deep_plugin.engine.models.architectures import build_model
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.training.builders import resolve_builder, toolbox_builder
from rs_deep.rs_deep_plugin.engine.training.report import report_summary
from rs_deep.rs_deep_plugin.engine.training.segmentation import train_segmentation
from rs_deep.rs_deep_plugin.engine.training.transfer import (BAND_RULE, Transfer, adapt_bands, init_from_package,
                                                             load_encoder_weights, read_encoder_weights)
from rs_deep.rs_deep_plugin.engine.training.loop import TrainParams

from conftest import ATLANTA_EAST, ATLANTA_IMAGE, ATLANTA_LABELS, DEMO_MODEL, ROOT

TINY = dict(class_names=["background", "building"], band_names=["pan"], tile_size=96, batch_size=2,
            steps_per_epoch=1, epochs=1, seed=0, num_threads=2, package_tile_size=256, package_overlap=32)
#: a small U-Net on a ResNet-18 encoder (3 levels used)
SMALL_RESNET = {"library": "smp", "architecture": "Unet", "encoder": "resnet18",
                "params": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
THREE = ["background", "house", "shed"]


def labels(classes=2):
    return [(g, 1 + i % (classes - 1)) for i, (g, _) in enumerate(read_vector_labels(ATLANTA_LABELS))]


def weights(path):
    """The package's tensors, as float32."""
    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def props(path):
    return json.loads((path / "model.json").read_text())["properties"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny trained segmentation package (the engine's default light U-Net on MobileNetV2)."""
    out = tmp_path_factory.mktemp("transfer") / "source"
    train_segmentation(ATLANTA_IMAGE, labels(), out, name="source", **TINY)
    return out


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """ResNet-18 weights as timm publishes them (conv1.weight, layer1.0.conv1.weight, bn1.running_mean, fc.*),
    3 bands, randomly initialised here (nothing is downloaded), under a ``model.`` prefix."""
    import timm
    torch.manual_seed(7)
    net = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():  # non-trivial statistics, so that loading them is seen
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("weights") / "resnet18_rgb.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------------------------------
# INIT_FROM


def test_fine_tune_with_the_same_classes_copies_every_tensor(source, tmp_path):
    out = tmp_path / "tuned"
    report = train_segmentation(ATLANTA_IMAGE, labels(), out, init_from=source, name="tuned", **TINY)
    pkg = load_package(out, task="segmentation")
    assert pkg.builder == load_package(source).builder  # ARCHITECTURE auto: the package's network
    n = len(weights(out))
    lineage = report["lineage"]
    init = lineage["init_from"]
    assert init["name"] == "source" and init["task"] == "segmentation"
    assert init["architecture"] == "Unet" and init["encoder"] == "mobilenet_v2"
    assert init["sha256"] == sha256(source / "model.safetensors") == props(source)["rs_deep:weights_sha256"]
    assert init["tensors_copied"] == n and init["tensors_new"] == 0 and init["band_adaptation"] is None
    assert lineage["encoder_weights"] is None
    assert lineage["freeze_encoder_epochs"] == 0 and lineage["encoder_lr_factor"] == 1.0
    # the same lineage in model.json, the report on disk and its summary; MLM says the model is pretrained
    p = props(out)
    assert p["rs_deep:training"]["lineage"] == lineage
    assert json.loads((out / "training_report.json").read_text())["lineage"] == lineage
    assert p["mlm:pretrained"] is True and init["sha256"] in p["mlm:pretrained_source"]
    assert "fine-tuned from source" in report_summary(report)
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    # a run from scratch says so
    scratch = props(source)
    assert scratch["rs_deep:training"]["lineage"]["init_from"] is None and scratch["mlm:pretrained"] is False


def test_fine_tune_with_other_classes_keeps_encoder_and_decoder_and_renews_the_head(source, tmp_path):
    pkg = load_package(source)
    src = weights(source)
    builder = resolve_builder("segmentation", dict(pkg.builder, in_channels=None, classes=None), 1, 3)
    torch.manual_seed(0)
    model = build_model(builder)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    messages = []
    entry = init_from_package(model, builder, pkg, messages.append)
    head = ["segmentation_head.0.weight", "segmentation_head.0.bias"]
    assert entry["tensors_new"] == 2 and entry["new_tensors"] == head
    assert entry["tensors_copied"] == len(fresh) - 2
    state = model.state_dict()
    for k, v in state.items():  # at init: every copied tensor is the source's, the head its fresh initialisation
        if k in head:
            assert torch.equal(v, fresh[k]) and v.shape[0] == 3 and src[k].shape[0] == 2
        else:
            assert torch.equal(v.float(), src[k]), k
    assert any("keep their fresh initialisation" in m and "segmentation_head.0.weight" in m for m in messages)

    out = tmp_path / "three"
    report = train_segmentation(ATLANTA_IMAGE, labels(3), out, init_from=source / "model.json", name="three",
                                **dict(TINY, class_names=THREE))
    init = report["lineage"]["init_from"]
    assert init["tensors_new"] == 2 and init["new_tensors"] == head and init["sha256"] == pkg.weights_sha256
    assert [c.name for c in load_package(out).classes] == THREE
    assert props(out)["rs_deep:training"]["lineage"]["init_from"]["tensors_copied"] == entry["tensors_copied"]


def test_init_from_adapts_the_first_convolution_to_the_bands():
    """The bundled 1-band buildings model onto 3 bands: each band gets the pan weights / 3."""
    pkg = load_package(DEMO_MODEL)
    builder = resolve_builder("segmentation", dict(pkg.builder, in_channels=None, classes=None), 3, 2)
    model = build_model(builder)
    entry = init_from_package(model, builder, pkg)
    conv = "encoder.features.0.0.weight"
    assert entry["band_adaptation"] == {"tensor": conv, "from_bands": 1, "to_bands": 3, "dates": 1}
    assert entry["tensors_new"] == 0
    pan = pkg.load_model().state_dict()[conv]
    assert torch.allclose(model.state_dict()[conv], pan.repeat(1, 3, 1, 1) / 3)


def test_freeze_encoder_keeps_the_encoder_while_the_decoder_learns(source, tmp_path):
    out = tmp_path / "frozen"
    messages = []
    report = train_segmentation(ATLANTA_IMAGE, labels(), out, init_from=source, freeze_encoder_epochs=1,
                                log=messages.append, name="frozen", **dict(TINY, steps_per_epoch=2))
    before, after = weights(source), weights(out)
    encoder = [k for k in after if k.startswith("encoder.")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)  # BatchNorm statistics too
    changed = [k for k in after if k.startswith("decoder.") and k.endswith(".weight")
               and not torch.equal(after[k], before[k])]
    assert changed and report["lineage"]["freeze_encoder_epochs"] == 1
    assert any("encoder is frozen for 1 epoch" in m for m in messages)


def test_encoder_lr_factor_gives_the_encoder_its_own_base_lr(source):
    params = TrainParams.of({"encoder_lr_factor": 0.1, "lr": 0.002})
    pkg = load_package(source)
    model = build_model(pkg.builder)
    transfer = Transfer(params, "segmentation")
    transfer.initialise(model, pkg.builder, print)
    groups = transfer.param_groups(model, model.parameters(), params.lr)
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith("encoder.")}
    assert len(groups) == 2 and "base_lr" not in groups[0]
    assert groups[1]["base_lr"] == pytest.approx(0.0002)
    assert {id(p) for p in groups[1]["params"]} == encoder
    assert not encoder & {id(p) for p in groups[0]["params"]}


# ------------------------------------------------------------------------------------------------------------------
# ENCODER_WEIGHTS


def test_encoder_weights_are_loaded_with_the_band_rule(resnet_file, tmp_path):
    """timm ResNet-18 weights (3 bands, ``model.`` prefix, fc) into a U-Net's ResNet-18 encoder on the 1-band
    panchromatic image; the encoder frozen for the one epoch, so the package holds the file's weights."""
    out = tmp_path / "pretrained"
    messages = []
    report = train_segmentation(ATLANTA_IMAGE, labels(), out, builder=SMALL_RESNET, encoder_weights=resnet_file,
                                freeze_encoder_epochs=1, weights_dtype="float32", log=messages.append,
                                name="pretrained", **TINY)
    file = {k[len("model."):]: v for k, v in load_file(str(resnet_file)).items()}
    got = weights(out)
    encoder = [k for k in got if k.startswith("encoder.")]
    assert len(encoder) == 120  # the file's fc is not used
    for k in encoder:
        name = k[len("encoder."):]
        if name == "conv1.weight":  # 1 band from RGB: the sum of the three channels (the mean times 3)
            assert got[k].shape == (64, 1, 7, 7)
            assert torch.allclose(got[k], file[name].sum(dim=1, keepdim=True), atol=1e-6)
        else:
            assert torch.equal(got[k], file[name].float()), k
    entry = report["lineage"]["encoder_weights"]
    assert entry == {"file": "resnet18_rgb.safetensors", "sha256": sha256(resnet_file), "tensors_copied": 120,
                     "tensors_unused": 2,
                     "band_adaptation": {"tensor": "encoder.conv1.weight", "from_bands": 3, "to_bands": 1,
                                         "dates": 1}}
    assert props(out)["rs_deep:training"]["lineage"]["encoder_weights"] == entry
    assert report["lineage"]["init_from"] is None and props(out)["mlm:pretrained"] is True
    assert any("120 tensors loaded into the resnet18 encoder" in m for m in messages)


def test_band_rule():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    assert torch.equal(adapt_bands(w, 3), w)
    assert torch.allclose(adapt_bands(w, 1), w.sum(dim=1, keepdim=True))
    assert torch.allclose(adapt_bands(w, 4), w[:, [0, 1, 2, 0]] * 3 / 4)
    assert torch.allclose(adapt_bands(w, 2), torch.stack([(w[:, 0] + w[:, 2]) / 2, w[:, 1]], dim=1) * 3 / 2)
    assert "mean times 3" in BAND_RULE


def test_encoder_weights_into_a_timm_classifier_and_a_centernet(resnet_file):
    """Keys under ``encoder.`` (an smp checkpoint) into a timm patch classifier: the network is its own encoder,
    its classifier (fc) stays new. Into CenterNet's 3-level encoder: the file's layer3 and layer4 are not used."""
    state = {k.replace("model.", "encoder.", 1): v for k, v in load_file(str(resnet_file)).items()
             if not k.startswith("model.fc.")}
    builder = resolve_builder("patch_classification", None, 3, 4)
    model = build_model(builder)
    fc = model.state_dict()["fc.weight"].clone()
    entry = load_encoder_weights(model, builder, state, "w.safetensors")
    assert entry["tensors_copied"] == 120 and entry["band_adaptation"] is None
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], state["encoder.layer4.1.conv2.weight"])
    assert torch.equal(model.state_dict()["fc.weight"], fc)

    builder = resolve_builder("detection", toolbox_builder("detection"), 3, 1)
    model = build_model(builder)
    entry = load_encoder_weights(model, builder, load_file(str(resnet_file)), resnet_file.name)
    assert entry["tensors_copied"] == 60 and entry["tensors_unused"] == 62  # layer3, layer4, fc
    assert torch.equal(model.state_dict()["encoder.layer2.1.bn2.running_mean"],
                       load_file(str(resnet_file))["model.layer2.1.bn2.running_mean"])


def test_change_networks_find_their_encoder_and_adapt_each_date(resnet_file, tmp_path):
    """The same code path for a change run: a Siamese U-Net's shared encoder loads the file (1-band dates from RGB:
    the sum rule); an early-fusion network stacks both dates, each getting half of the adapted weights."""
    from rs_deep.rs_deep_plugin.engine.training.change import train_change
    file = load_file(str(resnet_file))
    rgb = file["model.conv1.weight"]
    pair = [(str(ATLANTA_EAST.before), str(ATLANTA_EAST.after), str(ATLANTA_EAST.label))]
    siamese = {"library": "rs_deep", "architecture": "SiameseUnet", "encoder": "resnet18",
               "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}
    out = tmp_path / "change"
    report = train_change(pair, out, val_pairs=pair, builder=siamese, tile_size=64, epochs=1, steps_per_epoch=1,
                          batch_size=2, package_tile_size=64, package_overlap=8, encoder_weights=resnet_file,
                          freeze_encoder_epochs=1, weights_dtype="float32", num_threads=2)
    got = weights(out)
    assert torch.allclose(got["encoder.conv1.weight"], rgb.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(got["encoder.layer1.0.conv1.weight"], file["model.layer1.0.conv1.weight"])
    assert report["lineage"]["encoder_weights"]["band_adaptation"]["dates"] == 1
    assert props(out)["rs_deep:training"]["lineage"]["encoder_weights"]["file"] == resnet_file.name

    fusion = resolve_builder("change", toolbox_builder("change", "Unet"), 1, 2)
    model = build_model(fusion)
    entry = load_encoder_weights(model, fusion, file, resnet_file.name)
    conv = model.state_dict()["net.encoder.conv1.weight"]
    assert conv.shape == (64, 2, 7, 7) and entry["band_adaptation"]["dates"] == 2
    half = rgb.sum(dim=1) / 2
    assert torch.allclose(conv[:, 0], half, atol=1e-6) and torch.allclose(conv[:, 1], half, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# refusals


class _Marker:
    """Unpickling this creates a file: a loaded pickle would leave a trace."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name, write", [
    ("w.pth", lambda p, obj: torch.save(obj, p)),
    ("zip.safetensors", lambda p, obj: torch.save(obj, p)),
    ("legacy.safetensors", lambda p, obj: torch.save(obj, p, _use_new_zipfile_serialization=False)),
    ("pickle.safetensors", lambda p, obj: p.write_bytes(pickle.dumps(obj, protocol=4))),
])
def test_pickles_are_never_loaded(tmp_path, name, write):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    write(path, {"conv1.weight": torch.zeros(64, 3, 7, 7), "evil": _Marker(marker)})
    with pytest.raises(InputError) as info:
        train_segmentation(ATLANTA_IMAGE, labels(), tmp_path / "out", builder=SMALL_RESNET, encoder_weights=path,
                           **TINY)
    message = str(info.value)
    assert "never unpickles" in message and "save_file" in message and "weights_only=True" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_weights_file_of_another_encoder_is_refused_with_its_name(tmp_path):
    import segmentation_models_pytorch as smp
    mobilenet = smp.encoders.get_encoder("mobilenet_v2", in_channels=3, depth=5, weights=None)
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in mobilenet.state_dict().items()},
              str(path))
    state, _ = read_encoder_weights(path)
    builder = resolve_builder("segmentation", SMALL_RESNET, 1, 2)
    with pytest.raises(InputError) as info:
        load_encoder_weights(build_model(builder), builder, state, path.name)
    message = str(info.value)
    assert "does not fit the resnet18 encoder" in message and "0 of 120 encoder tensors" in message
    assert "100 missing tensors (e.g. conv1.weight" in message and "unexpected tensors (e.g. features." in message
    assert "seems to hold a mobilenet_v2 encoder" in message


def test_a_deeper_resnet_is_not_loaded_into_a_resnet18(tmp_path):
    """A ResNet-34 holds every ResNet-18 tensor (same names and shapes) and more: refused, not half-loaded."""
    import segmentation_models_pytorch as smp
    resnet34 = smp.encoders.get_encoder("resnet34", in_channels=3, depth=5, weights=None)
    state = {k: v.half() if v.is_floating_point() else v for k, v in resnet34.state_dict().items()}
    builder = resolve_builder("segmentation", dict(SMALL_RESNET, params={}), 3, 2)
    with pytest.raises(InputError, match="seems to hold a resnet34 encoder"):
        load_encoder_weights(build_model(builder), builder, state, "resnet34.safetensors")


def test_init_from_refusals(source, tmp_path):
    image, labs = ATLANTA_IMAGE, labels()
    with pytest.raises(InputError, match="is a detection model but this run trains a segmentation model"):
        train_segmentation(image, labs, tmp_path / "a", init_from=ROOT / "resources/models/trees_demo", **TINY)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read")
    with pytest.raises(InputError, match="is an ONNX model"):
        train_segmentation(image, labs, tmp_path / "b", init_from=onnx, **TINY)
    with pytest.raises(InputError, match="Unet/mobilenet_v2 network but the run asks for FPN/resnet18: choose "
                                         "ARCHITECTURE auto"):
        train_segmentation(image, labs, tmp_path / "c", init_from=source,
                           builder={"library": "smp", "architecture": "FPN", "encoder": "resnet18"}, **TINY)
    with pytest.raises(InputError, match="not both"):
        train_segmentation(image, labs, tmp_path / "d", init_from=source, encoder_weights=onnx, **TINY)
    with pytest.raises(InputError, match="encoder_lr_factor"):
        train_segmentation(image, labs, tmp_path / "e", encoder_lr_factor=0, **TINY)
    # a network the package barely fits (called directly: the trainers build the package's own network)
    builder = resolve_builder("segmentation", SMALL_RESNET, 1, 2)
    with pytest.raises(InputError, match=r"does not fit this network \(Unet/resnet18\): 8 of 158 tensors match; "
                                         "choose ARCHITECTURE auto"):
        init_from_package(build_model(builder), builder, load_package(source))


# ------------------------------------------------------------------------------------------------------------------
# rs_deep:train


def test_train_algorithm_fine_tunes_through_processing(provider, source, tmp_path):
    from qgis.core import QgsApplication, QgsProcessingException
    from test_accuracy import RecordingFeedback, _run
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:train")
    names = {p.name() for p in alg.parameterDefinitions()}
    assert {"INIT_FROM", "ENCODER_WEIGHTS", "FREEZE_ENCODER", "ENCODER_LR", "PRECISION"} <= names
    help_text = alg.shortHelpString()
    assert "mean times 3" in help_text and "0.1" in help_text and "nothing is downloaded" in help_text
    base = {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TASK": 0, "ARCHITECTURE": 0, "EPOCHS": 1,
            "BATCH_SIZE": 2, "TILE_SIZE": 96, "STEPS_PER_EPOCH": 1, "DEVICE": 1}
    fb = RecordingFeedback()
    res = _run("rs_deep:train", dict(base, INIT_FROM=str(source), FREEZE_ENCODER=1, ENCODER_LR=0.1,
                                     PRECISION="bfloat16", OUTPUT=str(tmp_path / "tuned")), fb)
    lineage = props(tmp_path / "tuned")["rs_deep:training"]["lineage"]
    assert lineage["init_from"]["sha256"] == sha256(source / "model.safetensors")
    assert lineage["freeze_encoder_epochs"] == 1 and lineage["encoder_lr_factor"] == pytest.approx(0.1)
    assert json.loads(open(res["REPORT"]).read())["lineage"] == lineage
    assert json.loads(open(res["REPORT"]).read())["precision"] == "bfloat16"  # PRECISION reaches the engine
    assert load_package(res["OUTPUT"]).builder == load_package(source).builder
    assert any("INIT_FROM source" in m for m in fb.messages)
    pth = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, pth)
    with pytest.raises(QgsProcessingException, match="safetensors"):
        _run("rs_deep:train", dict(base, ARCHITECTURE=1, ENCODER_WEIGHTS=str(pth), OUTPUT=str(tmp_path / "bad")))


def test_train_with_init_from_through_qgis_process(source, tmp_path):
    from qgis_env import run_qgis_process
    out = tmp_path / "cli"
    run_qgis_process(["run", "rs_deep:train", "--", f"INPUT={ATLANTA_IMAGE}", f"LABELS={ATLANTA_LABELS}",
                      "TASK=segmentation", f"INIT_FROM={source / 'model.json'}", "EPOCHS=1", "BATCH_SIZE=2",
                      "TILE_SIZE=96", "STEPS_PER_EPOCH=1", "DEVICE=cpu", "ENCODER_LR=0.5", f"OUTPUT={out}"])
    lineage = props(out)["rs_deep:training"]["lineage"]
    assert lineage["init_from"]["name"] == "source" and lineage["init_from"]["tensors_new"] == 0
    assert lineage["encoder_lr_factor"] == pytest.approx(0.5)


def test_train_defaults_per_task_encoder_and_time_budget(provider, tmp_path):
    """ENCODER empty: a segmentation U-Net on MobileNetV2 (measured better on the held-out Atlanta areas, README);
    TIME_BUDGET's default is 10 minutes."""
    from qgis.core import QgsApplication
    from test_accuracy import _run
    alg = QgsApplication.processingRegistry().algorithmById("rs_deep:train")
    assert alg.parameterDefinition("ENCODER").defaultValue() in ("", None)
    assert alg.parameterDefinition("TIME_BUDGET").defaultValue() == 10
    res = _run("rs_deep:train", {"INPUT": str(ATLANTA_IMAGE), "LABELS": str(ATLANTA_LABELS), "TASK": 0, "EPOCHS": 1,
                                 "BATCH_SIZE": 2, "TILE_SIZE": 64, "STEPS_PER_EPOCH": 1, "DEVICE": 1,
                                 "OUTPUT": str(tmp_path / "seg")})
    builder = load_package(res["OUTPUT"]).builder
    assert (builder["architecture"], builder["encoder"]) == ("Unet", "mobilenet_v2")
    from rs_deep.rs_deep_plugin.engine.training.builders import toolbox_builder
    assert toolbox_builder("detection")["encoder"] == toolbox_builder("change")["encoder"] == "resnet18"


def encoder_file(package, path):
    """The encoder of a trained package saved on its own, as the README's one-liner does (``encoder.`` names, the
    package's float16 as stored): the way a user keeps a pretrained encoder for ENCODER_WEIGHTS."""
    stored = load_file(str(package / "model.safetensors"))
    save_file({k: v for k, v in stored.items() if k.startswith("encoder.")}, str(path))
    return path


def transfer_model():
    """A model-builder model: raster, labels, a package to start from and an encoder weights file in; rs_deep:train
    twice (INIT_FROM; ENCODER_WEIGHTS with the encoder frozen for its one epoch), then rs_deep:segment with the
    package the first training wrote, chained by its OUTPUT."""
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource as Source, QgsProcessingModelOutput,
                           QgsProcessingModelParameter, QgsProcessingParameterFile,
                           QgsProcessingParameterRasterLayer, QgsProcessingParameterVectorLayer)
    model = QgsProcessingModelAlgorithm("fine-tune then segment", "rs_deep tests")
    for definition in (QgsProcessingParameterRasterLayer("raster", "raster"),
                       QgsProcessingParameterVectorLayer("labels", "labels"),
                       QgsProcessingParameterFile("start", "start", behavior=QgsProcessingParameterFile.Folder),
                       QgsProcessingParameterFile("encoder", "encoder")):
        model.addModelParameter(definition, QgsProcessingModelParameter(definition.name()))

    def child(alg, child_id, sources, output, static):
        c = QgsProcessingModelChildAlgorithm(alg)
        c.setChildId(child_id)
        for name, param in sources.items():
            c.addParameterSources(name, [Source.fromModelParameter(param)])
        for name, value in static.items():
            c.addParameterSources(name, [Source.fromStaticValue(value)])
        out = QgsProcessingModelOutput(output[1], output[1])
        out.setChildOutputName(output[0])
        c.setModelOutputs({output[1]: out})
        return c

    tiny = {"TASK": 0, "ARCHITECTURE": 0, "EPOCHS": 1, "BATCH_SIZE": 2, "TILE_SIZE": 96, "STEPS_PER_EPOCH": 1,
            "DEVICE": 1}
    model.addChildAlgorithm(child("rs_deep:train", "tune", {"INPUT": "raster", "LABELS": "labels",
                                                            "INIT_FROM": "start"}, ("OUTPUT", "tuned"), tiny))
    model.addChildAlgorithm(child("rs_deep:train", "pre", {"INPUT": "raster", "LABELS": "labels",
                                                           "ENCODER_WEIGHTS": "encoder"}, ("OUTPUT", "pretrained"),
                                  dict(tiny, FREEZE_ENCODER=1)))
    seg = child("rs_deep:segment", "seg", {"INPUT": "raster"}, ("OUTPUT", "classes"), {"MIN_AREA": 0})
    seg.addParameterSources("MODEL", [Source.fromChildOutput("tune", "OUTPUT")])
    model.addChildAlgorithm(seg)
    return model


def test_init_from_and_encoder_weights_in_a_model_builder_model(provider, source, tmp_path):
    """The model builder (issue 12): a model saved as .model3 and read back, run in QGIS and by qgis_process, trains
    from a package (INIT_FROM) and from an encoder saved out of that package (ENCODER_WEIGHTS), and segments with
    the package its first step wrote; both packages record their lineage."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProcessingModelAlgorithm, QgsProject
    from conftest import model_output
    from qgis_env import run_qgis_process
    encoder = encoder_file(source, tmp_path / "source_encoder.safetensors")
    file = load_file(str(encoder))
    saved = tmp_path / "fine_tune.model3"
    assert transfer_model().toFile(str(saved))
    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(saved))
    names = {n: model_output(model, n) for n in ("tuned", "pretrained", "classes")}
    inputs = {"raster": str(ATLANTA_IMAGE), "labels": str(ATLANTA_LABELS), "start": str(source),
              "encoder": str(encoder)}

    def check(results, folder):
        tuned, pretrained = props(folder / "tuned")["rs_deep:training"], props(folder / "pretrained")
        assert tuned["lineage"]["init_from"]["sha256"] == sha256(source / "model.safetensors")
        assert tuned["lineage"]["init_from"]["tensors_new"] == 0  # the same classes: every tensor reused
        entry = pretrained["rs_deep:training"]["lineage"]["encoder_weights"]
        assert entry["file"] == encoder.name and entry["sha256"] == sha256(encoder)
        assert entry["tensors_copied"] == len(file) - entry["tensors_unused"] > 100
        assert pretrained["mlm:pretrained"] is True and entry["band_adaptation"] is None
        frozen = weights(folder / "pretrained")
        conv = next(k for k in file if k.endswith("weight") and file[k].dim() == 4)
        assert torch.allclose(frozen[conv], file[conv].float(), atol=2e-3)  # frozen for its one epoch: the file's weights
        import rasterio
        with rasterio.open(results[names["classes"]]) as ds, rasterio.open(ATLANTA_IMAGE) as src:
            assert ds.transform == src.transform and ds.shape == src.shape

    inside = tmp_path / "in_qgis"
    inside.mkdir()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    res = processing.run(model, dict(inputs, **{names["tuned"]: str(inside / "tuned"),
                                                names["pretrained"]: str(inside / "pretrained"),
                                                names["classes"]: str(inside / "classes.tif")}),
                         context=context, feedback=QgsProcessingFeedback())
    check(res, inside)
    cli = tmp_path / "cli"
    cli.mkdir()
    proc = run_qgis_process(["run", str(saved), "--json", "--"] + [f"{k}={v}" for k, v in inputs.items()]
                            + [f"{names['tuned']}={cli / 'tuned'}", f"{names['pretrained']}={cli / 'pretrained'}",
                               f"{names['classes']}={cli / 'classes.tif'}"])
    check(json.loads(proc.stdout[proc.stdout.index("{"):])["results"], cli)
