"""Model package format: round trip, validation messages that name the field, hostile files."""
import json
import pickle
import shutil
import zipfile

import pytest

from rs_deep.rs_deep_plugin.engine.errors import ModelPackageError
from rs_deep.rs_deep_plugin.engine.models.loading import load_package
from rs_deep.rs_deep_plugin.engine.models.package import package_summary

from conftest import DEMO_MODEL, make_package


def _edit(pkg_dir, tmp_path, fn):
    dst = tmp_path / "edited"
    shutil.copytree(pkg_dir, dst)
    meta = json.loads((dst / "model.json").read_text())
    fn(meta["properties"])
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def test_round_trip_and_stac_mlm_fields(rgb_package):
    pkg = load_package(rgb_package, task="segmentation")
    meta = json.loads((rgb_package / "model.json").read_text())
    props = meta["properties"]
    assert meta["type"] == "Feature" and any("mlm" in e for e in meta["stac_extensions"])
    for key in ("mlm:name", "mlm:architecture", "mlm:tasks", "mlm:framework", "mlm:input", "mlm:output"):
        assert key in props
    assert props["mlm:input"][0]["input"]["shape"] == [-1, 3, 64, 64]
    assert props["rs_deep:builder"]["encoder_weights"] is None
    assert [c.name for c in pkg.classes] == ["background", "building"]
    assert pkg.classes[1].color == "E31A1C"
    assert pkg.tile_size == 64 and pkg.overlap == 16 and pkg.in_channels == 3
    model = pkg.load_model()
    assert sum(p.numel() for p in model.parameters()) > 1000
    assert "rgb_test" in package_summary(pkg)


def test_zip_package_loads_like_the_folder(rgb_package, tmp_path):
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in ("model.json", "model.safetensors"):
            zf.write(rgb_package / f, f"rgb_test/{f}")
    pkg = load_package(z)
    assert pkg.name == "rgb_test"
    pkg.load_model()


def test_demo_package_is_valid_and_small():
    pkg = load_package(DEMO_MODEL, task="segmentation")
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert size <= 10 * 1024 * 1024
    assert pkg.bands == ["pan"] and pkg.gsd == pytest.approx(0.5)
    assert [c.name for c in pkg.classes] == ["background", "building"]
    pkg.load_model()


@pytest.mark.parametrize("path", ["", "/nonexistent/model"])
def test_missing_package(path):
    with pytest.raises(ModelPackageError, match="(not found|No model package)"):
        load_package(path)


def test_folder_without_weights(tmp_path, rgb_package):
    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(rgb_package / "model.json", d)
    with pytest.raises(ModelPackageError, match="model.safetensors is missing"):
        load_package(d)


def test_invalid_json(tmp_path, rgb_package):
    d = tmp_path / "p"
    shutil.copytree(rgb_package, d)
    (d / "model.json").write_text("{ not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_package(d)


@pytest.mark.parametrize("edit,field", [
    (lambda p: p.pop("mlm:name"), "mlm:name"),
    (lambda p: p.update({"rs_deep:task": "painting"}), "rs_deep:task"),
    (lambda p: p.update({"rs_deep:tile_size": 100}), "rs_deep:tile_size"),
    (lambda p: p.update({"rs_deep:overlap": 40}), "rs_deep:overlap"),
    (lambda p: p.update({"rs_deep:gsd": -1}), "rs_deep:gsd"),
    (lambda p: p["mlm:input"][0].update({"bands": []}), "bands"),
    (lambda p: p["mlm:input"][0]["value_scaling"][0].update({"type": "magic"}), "value_scaling"),
    (lambda p: p["mlm:input"][0]["value_scaling"][0].pop("maximum"), "maximum"),
    (lambda p: p["mlm:output"][0]["classification:classes"][1].update({"color_hint": "red"}), "color_hint"),
    (lambda p: p["mlm:output"][0]["classification:classes"][1].update({"value": 5}), "value"),
    (lambda p: p["rs_deep:builder"].update({"architecture": "EvilNet"}), "architecture"),
    (lambda p: p["rs_deep:builder"].update({"encoder_weights": "imagenet"}), "encoder_weights"),
    (lambda p: p["rs_deep:builder"]["params"].update({"__class__": "os.system"}), "params"),
    (lambda p: p["rs_deep:builder"].update({"in_channels": 4}), "in_channels"),
    (lambda p: p.update({"rs_deep:format_version": 99}), "format_version"),
])
def test_malformed_metadata_names_the_field(rgb_package, tmp_path, edit, field):
    d = _edit(rgb_package, tmp_path, edit)
    with pytest.raises(ModelPackageError) as err:
        load_package(d)
    assert field in str(err.value)


def test_unknown_architecture_lists_valid_names(rgb_package, tmp_path):
    d = _edit(rgb_package, tmp_path, lambda p: p["rs_deep:builder"].update({"architecture": "EvilNet"}))
    with pytest.raises(ModelPackageError, match="Unet.*FPN"):
        load_package(d)


def test_unknown_encoder_lists_valid_names(rgb_package, tmp_path):
    d = _edit(rgb_package, tmp_path, lambda p: p["rs_deep:builder"].update({"encoder": "resnet9000"}))
    with pytest.raises(ModelPackageError, match="resnet18"):
        load_package(d).load_model()


def test_checksum_mismatch(rgb_package, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(rgb_package, d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="checksum"):
        load_package(d)


def test_weights_of_another_shape(rgb_package, tmp_path):
    other = make_package(tmp_path / "four_class", classes=("a", "b", "c", "d"))
    d = tmp_path / "p"
    shutil.copytree(rgb_package, d)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    import hashlib
    sha = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    d = _edit(d, tmp_path / "x", lambda p: p.update({"rs_deep:weights_sha256": sha}))
    with pytest.raises(ModelPackageError, match="wrong shape"):
        load_package(d).load_model()


class _Boom:
    """Unpickling this would create a marker file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_posing_as_weights_is_never_executed(rgb_package, tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "p"
    shutil.copytree(rgb_package, d)
    payload = pickle.dumps(_Boom(str(marker)))
    (d / "model.safetensors").write_bytes(payload)
    import hashlib
    sha = hashlib.sha256(payload).hexdigest()
    d = _edit(d, tmp_path / "x", lambda p: p.update({"rs_deep:weights_sha256": sha}))
    with pytest.raises(ModelPackageError, match="not a valid safetensors file"):
        load_package(d).load_model()  # refused by its header when the package is loaded
    assert not marker.exists()
