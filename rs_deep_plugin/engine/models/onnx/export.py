"""Export of RS Deep packages to single-file ONNX models that RS Deep, Deepness and GeoDeep run
(:func:`export_onnx`), with Deepness's metadata (:func:`deepness_metadata`)."""
import io
import json
import os

from ...errors import InputError
from ...files import write_atomic
from ..loading import load_package
from ..package import METADATA_NAME, ModelPackage
from .package import MODEL_JSON_KEY, OUTPUT_KEY
from .session import require_onnx


def deepness_standardization(value_scaling):
    """(mean, std) lists such that Deepness's ``(x / 255 - mean) / std`` equals our value scaling, or None
    when a band's scaling cannot be written so (clipping, several steps)."""
    mean, std = [], []
    for s in value_scaling:
        if s is None:
            m, d = 0.0, 1.0
        elif s["type"] == "min-max":
            m, d = s["minimum"], s["maximum"] - s["minimum"]
        elif s["type"] == "z-score":
            m, d = s["mean"], s["stddev"]
        elif s["type"] == "scale":
            m, d = 0.0, s["value"]
        elif s["type"] == "offset":
            m, d = s["value"], 1.0
        else:
            return None
        mean.append(float(m) / 255.0)
        std.append(float(d) / 255.0)
    return mean, std


def deepness_metadata(pkg):
    """The Deepness/GeoDeep metadata_props (JSON-encoded values) for a segmentation or detection package."""
    props = {
        "model_type": json.dumps("Detector" if pkg.task == "detection" else "Segmentor"),
        "class_names": json.dumps({str(c.value): c.name for c in pkg.classes}),
        "tile_size": json.dumps(int(pkg.tile_size)),
        "tiles_overlap": json.dumps(int(round(100.0 * pkg.overlap / pkg.tile_size))),
    }
    if pkg.gsd:
        props["resolution"] = json.dumps(round(pkg.gsd * 100.0, 6))
    if pkg.task == "detection":
        meta = pkg.metadata.get("properties", {})
        props["det_type"] = json.dumps("YOLO_v5_or_v7_default")
        props["det_conf"] = json.dumps(float(meta.get("rs_deep:score_threshold", 0.3)))
        props["det_iou_thresh"] = json.dumps(float(meta.get("rs_deep:iou_threshold", 0.5)))
    std = deepness_standardization(pkg.value_scaling)
    if std is not None:
        props["standardization_mean"] = json.dumps(std[0])
        props["standardization_std"] = json.dumps(std[1])
    return props


def _centernet_as_yolo(net, tile):
    """A module: CenterNet -> YOLO v5-style output [batch, cells, 5 + classes] (cx, cy, w, h, score, class scores).

    Every heatmap cell is a row; its score is the class peak (sigmoid of the heatmap where it is the
    3 x 3 maximum, else 0), so a YOLO decoder (score cut, class-wise NMS) finds exactly the peaks
    that :meth:`CenterNet.decode` finds, with the same boxes, clamped to the tile."""
    import torch
    import torch.nn.functional as F

    class CenterNetYolo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            heat, box = self.net.forward_maps(x)
            prob = torch.sigmoid(heat)
            peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob).to(prob.dtype)
            b, k, h, w = prob.shape
            s = float(self.net.stride)
            xs = (torch.arange(w, dtype=prob.dtype, device=x.device) + 0.5).view(1, 1, w)
            ys = (torch.arange(h, dtype=prob.dtype, device=x.device) + 0.5).view(1, h, 1)
            cx = (xs + box[:, 0]) * s
            cy = (ys + box[:, 1]) * s
            wh = torch.exp(box[:, 2:4].clamp(-2.0, 9.0))
            x0 = (cx - wh[:, 0] / 2).clamp(0.0, float(tile))
            y0 = (cy - wh[:, 1] / 2).clamp(0.0, float(tile))
            x1 = (cx + wh[:, 0] / 2).clamp(0.0, float(tile))
            y1 = (cy + wh[:, 1] / 2).clamp(0.0, float(tile))
            score = peaks.max(dim=1, keepdim=True).values
            rows = torch.cat([((x0 + x1) / 2)[:, None], ((y0 + y1) / 2)[:, None], (x1 - x0)[:, None],
                              (y1 - y0)[:, None], score, peaks], dim=1)
            return rows.reshape(b, 5 + k, h * w).transpose(1, 2)

    return CenterNetYolo()


def static_resizes(onnx, proto, in_channels, tile):
    """``proto`` (changed in place) with each Resize whose output size the graph computes from tensor shapes given
    that size as constant scales, where the tile size fixes it; returns how many were changed. smp's U-Net decoders
    upsample each feature map to its skip connection's size, which torch exports as Shape -> Gather -> Concat ->
    Resize(sizes) because the batch is dynamic; onnxruntime cannot fold that, runs such a Resize in the plain NCHW
    layout and moves every decoder feature out of its blocked (NCHWc) layout and back for it. With constant integer
    scales it upsamples in the blocked layout: the same probabilities to the bit, about 2-3 % less CPU time a 512-px
    tile of the bench U-Net (README, "Speed"). Only when onnxruntime gives the same outputs on a random batch of 2
    for both graphs; otherwise ``proto`` is left as it was."""
    import numpy as np
    from onnx import numpy_helper, shape_inference
    try:
        import onnxruntime as ort
        inferred = shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # no onnxruntime to check the result with, or shapes not inferable: the graph as exported
        return 0
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in inferred.graph.value_info}
    constants = {t.name for t in proto.graph.initializer}
    before = proto.SerializeToString()
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "Resize" or len(node.input) != 4 or node.input[3] in constants:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("coordinate_transformation_mode") == b"tf_crop_and_resize" or "axes" in attrs or \
                attrs.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
            continue
        src, dst = dims.get(node.input[0], []), dims.get(node.output[0], [])
        if len(src) != 4 or len(dst) != 4 or None in src[1:] + dst[1:] or src[1] != dst[1] or \
                any(d % s for s, d in zip(src[2:], dst[2:])):
            continue
        name = f"{node.output[0]}_scales"
        proto.graph.initializer.append(numpy_helper.from_array(
            np.array([1, 1, dst[2] // src[2], dst[3] // src[3]], dtype=np.float32), name))
        node.input[2] = name
        del node.input[3]
        changed += 1
    if not changed:
        return 0
    live, kept = {o.name for o in proto.graph.output}, []  # the nodes that computed the sizes are left unused
    for node in reversed(proto.graph.node):
        if any(o in live for o in node.output) or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            kept.append(node)
            live.update(i for i in node.input if i)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(kept))
    x = np.random.default_rng(0).random((2, in_channels, tile, tile), dtype=np.float32)
    outputs = []
    try:
        for data in (before, proto.SerializeToString()):
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {session.get_inputs()[0].name: x}))
        same = all(np.array_equal(a, b) for a, b in zip(*outputs))
    except Exception:  # a graph onnxruntime cannot run here: written as exported
        same = False
    if not same:
        proto.ParseFromString(before)
        return 0
    return changed


def tiled_metadata(pkg):
    """``pkg``'s model.json with its tile size and overlap as the package has them now (the graph is exported for
    that tile size: :meth:`..package.ModelPackage.with_tiling`)."""
    props = pkg.metadata.get("properties", {})
    if (props.get("rs_deep:tile_size"), props.get("rs_deep:overlap")) == (pkg.tile_size, pkg.overlap):
        return pkg.metadata
    meta = json.loads(json.dumps(pkg.metadata))
    meta["properties"].update({"rs_deep:tile_size": pkg.tile_size, "rs_deep:overlap": pkg.overlap})
    return meta


#: an exported embedding holds the mean features of the encoder's deepest stages, this many: on the Atlanta sample's
#: unseen part (tools/eval_similar.py) three find more building patches than the deepest alone (average precision
#: 0.65 vs 0.63 with 64-px patches, 0.47 vs 0.45 with 32 px; building patches among the 5 best 0.67 vs 0.62, 0.56 vs
#: 0.47)
EMBEDDING_STAGES = 3


def embedding_metadata(pkg, patch_size):
    """The Deepness metadata_props of a package's encoder exported as an embedding ("Recognition") model: patches of
    ``patch_size`` px, no overlap, the package's resolution and value scaling (refused when Deepness's
    standardization cannot hold it)."""
    std = deepness_standardization(pkg.value_scaling)
    if std is None:
        raise InputError(f"'{pkg.name}' scales its input in a way Deepness's standardization_mean/std cannot hold "
                         "(clipping or several steps), so an embedding model of it would read other values; it is "
                         "not exported")
    props = {"model_type": json.dumps("Recognition"), "tile_size": json.dumps(int(patch_size)),
             "tiles_overlap": json.dumps(0), "standardization_mean": json.dumps(std[0]),
             "standardization_std": json.dumps(std[1]),
             "description": json.dumps(f"Encoder of the RS Deep package {pkg.name} (weights sha256 "
                                       f"{pkg.weights_sha256[:16]}...): the mean features of its "
                                       f"{EMBEDDING_STAGES} deepest stages")}
    if pkg.gsd:
        props["resolution"] = json.dumps(round(pkg.gsd * 100.0, 6))
    return props


def export_onnx(package_path, out_path, opset=17, log=None, embedding=False, patch_size=None):
    """Export a segmentation or CenterNet detection package (folder, zip or ModelPackage) to one ONNX file.

    The graph takes float32 [batch, channels, tile, tile] (dynamic batch) scaled like the package's
    value scaling. Segmentation returns class probabilities [batch, classes, tile, tile] (softmax,
    or sigmoid for a 1-channel model); detection returns YOLO v5-style rows [batch, cells, 5 +
    classes] (``det_type`` ``YOLO_v5_or_v7_default``, see :func:`_centernet_as_yolo`), which RS Deep,
    Deepness and GeoDeep decode alike. ``metadata_props`` carry our model.json
    (``rs_deep:model_json``) and the Deepness keys. Written to a temp file, then renamed. Returns
    the output path.

    ``embedding``: export only the encoder of a segmentation package (a U-Net's), as an embedding model for
    similarity search (rs_deep:find_similar; Deepness's ``Recognition``): [batch, channels, H, W] -> [batch,
    features], the means over the image of its :data:`EMBEDDING_STAGES` deepest feature maps, each scaled to length
    1 and put side by side (deepest first), for patches of ``patch_size`` px (a multiple of 32; None: the package's
    tile size) at the package's resolution.
    """
    log = log or (lambda msg: None)
    pkg = package_path if isinstance(package_path, ModelPackage) else load_package(package_path)
    if getattr(pkg, "backend", "torch") == "onnx":
        raise InputError(f"{pkg.source} is already an ONNX model")
    if pkg.multi_label:
        raise InputError(f"'{pkg.name}' is a multi-label patch classifier; ONNX export supports segmentation and "
                         "detection packages: an exported graph would lose its per-class thresholds "
                         "(rs_deep:class_thresholds), so it is not written. Use the package itself with "
                         "rs_deep:classify_patches")
    if embedding:
        return _export_embedding(pkg, out_path, opset, log, patch_size)
    if pkg.task not in ("segmentation", "detection"):
        raise InputError(f"'{pkg.name}' is a {pkg.task} model; ONNX export supports segmentation and detection "
                         "packages (change and patch classification packages cannot be exported yet)")
    if getattr(pkg, "oriented", False):
        raise InputError(f"'{pkg.name}' is an oriented detector (CenterNetOBB: rotated boxes); ONNX export writes "
                         "Deepness's axis-aligned detector format, which would lose the boxes' angles. Run it with "
                         "rs_deep:detect (rotated rectangles with angle, width, length), or export an axis-aligned "
                         "CenterNet")
    if pkg.task == "detection" and (pkg.builder.get("library"), pkg.builder.get("architecture")) != \
            ("rs_deep", "CenterNet"):
        raise InputError(f"'{pkg.name}' is a {pkg.builder.get('architecture')} detector; ONNX export supports "
                         "RS Deep's CenterNet detectors (the default of rs_deep:train)")
    out_path = check_onnx_output(out_path)
    onnx = require_onnx()
    import torch

    model = pkg.load_model().float().eval()
    activation = pkg.activation

    class WithActivation(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            if activation == "sigmoid":
                return torch.sigmoid(y)
            # the softmax over the classes, written out: onnxruntime's Softmax on axis 1 of [B, C, H, W] moves the
            # classes last and back (about 5 % of a light U-Net's CPU time on a 512-px tile); these element-wise
            # ops and reductions give the same probabilities (within 1e-7) in about 0.95 of the time (make bench)
            e = torch.exp(y - y.amax(dim=1, keepdim=True))
            return e / e.sum(dim=1, keepdim=True)

    wrapped = (_centernet_as_yolo(model, pkg.tile_size) if pkg.task == "detection" else WithActivation(model)).eval()
    log(f"Exporting {pkg.name} to ONNX (opset {opset})")
    proto = torch_to_onnx(wrapped, pkg.in_channels, pkg.tile_size, opset)
    static_resizes(onnx, proto, pkg.in_channels, pkg.tile_size)
    props = deepness_metadata(pkg)
    props[MODEL_JSON_KEY] = json.dumps(tiled_metadata(pkg), separators=(",", ":"))
    if pkg.task == "segmentation":
        props[OUTPUT_KEY] = json.dumps("probabilities")
    write_onnx(proto, props, f"RS Deep package {pkg.name} ({pkg.task}); {METADATA_NAME} in metadata_props "
               f"{MODEL_JSON_KEY}", out_path, log)
    percentiles_warning(pkg, log)
    return out_path


def check_onnx_output(out_path):
    """``out_path`` as a string, refused unless it is a .onnx file in an existing folder."""
    out_path = os.fspath(out_path)
    if not out_path.lower().endswith(".onnx"):
        raise InputError(f"OUTPUT must be a .onnx file; got {out_path}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"OUTPUT folder does not exist: {out_dir}")
    return out_path


def torch_to_onnx(module, in_channels, size, opset, spatial_axes=False):
    """The ONNX graph (a ModelProto) of the torch ``module`` traced on a [1, in_channels, size, size] batch: input
    "input", output "output", the batch dynamic (and the height and width with ``spatial_axes``)."""
    import warnings
    import torch
    onnx = require_onnx()
    dummy = torch.zeros(1, in_channels, size, size, dtype=torch.float32)
    axes = {0: "batch", 2: "height", 3: "width"} if spatial_axes else {0: "batch"}
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), dummy, buf, dynamo=False, opset_version=int(opset), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": axes, "output": {0: "batch"}},
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def write_onnx(proto, props, doc, out_path, log):
    """``proto`` with the metadata_props ``props`` (key -> JSON text) and ``doc``, written atomically to
    ``out_path``."""
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "rs_deep"
    proto.doc_string = doc
    data = proto.SerializeToString()
    write_atomic(out_path, data)
    log(f"Wrote {out_path} ({len(data) / 1e6:.1f} MB)")


def percentiles_warning(pkg, log):
    """Logs that Deepness and GeoDeep apply the stored scaling where ``pkg`` scales each input by its own
    percentiles."""
    if pkg.input_percentiles:
        log(f"Warning: '{pkg.name}' scales each input by its own {pkg.input_percentiles[0]:g}th-"
            f"{pkg.input_percentiles[1]:g}th percentiles. RS Deep does so with the exported model too; Deepness and "
            "GeoDeep apply the training data's scaling (standardization_mean/std), so their results differ from RS "
            "Deep's on a scene darker or brighter than the training data.")


def _export_embedding(pkg, out_path, opset, log, patch_size):
    """:func:`export_onnx` with ``embedding``: the package's encoder and a mean over the image, Deepness Recognition
    metadata (:func:`embedding_metadata`), no model.json (the file is a model of another task than the package)."""
    patch = int(patch_size) if patch_size else pkg.tile_size
    if patch < 32 or patch % 32:
        raise InputError(f"PATCH_SIZE must be a multiple of 32 (the encoder halves the image 5 times); got {patch}")
    if pkg.task != "segmentation":
        raise InputError(f"'{pkg.name}' is a {pkg.task} model; an embedding model is exported from a segmentation "
                         "package's encoder (a U-Net's)")
    out_path = check_onnx_output(out_path)
    props = embedding_metadata(pkg, patch)
    import torch
    encoder = getattr(pkg.load_model().float().eval(), "encoder", None)
    if encoder is None:
        raise InputError(f"'{pkg.name}' ({pkg.builder.get('architecture')}) has no encoder RS Deep can export as an "
                         "embedding model; U-Net packages (the default of rs_deep:train) have one")

    class Embedding(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            parts = [f.mean(dim=(2, 3)) for f in self.enc(x)[-EMBEDDING_STAGES:]]
            return torch.cat([p / (p.norm(dim=1, keepdim=True) + 1e-6) for p in parts[::-1]], dim=1)

    log(f"Exporting the encoder of {pkg.name} as an embedding model for patches of {patch} px (opset {opset})")
    proto = torch_to_onnx(Embedding(encoder), pkg.in_channels, patch, opset, spatial_axes=True)
    write_onnx(proto, props, f"Embedding model from the encoder of RS Deep package {pkg.name}", out_path, log)
    percentiles_warning(pkg, log)
    return out_path
