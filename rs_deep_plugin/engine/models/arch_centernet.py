"""CenterNet: an anchor-free object detector on an smp encoder-decoder (builder library ``rs_deep``).

After "Objects as Points" (Zhou et al., 2019), with the dense box regression of TTFNet (Liu et
al., 2020). A builder::

    {"library": "rs_deep", "architecture": "CenterNet", "encoder": "resnet18", "encoder_weights": null,
     "in_channels": 3, "classes": 1,
     "params": {"base": "Unet", "encoder_depth": 4, "output_stride": 2, "decoder_channels": [128, 64, 32],
                "head_channels": 64}}

The network is an smp encoder (any smp encoder name, or ``tu-<timm model>``; never pretrained)
with an smp U-Net (``base`` "Unet": ``encoder_depth - log2(output_stride)`` decoder blocks) or
FPN decoder (``base`` "FPN": stride ``2 ** (encoder_depth - 3)``, upsampled to ``output_stride``),
and two heads (3 x 3 convolution, ReLU, 1 x 1 convolution) on its features at ``output_stride``:

* ``heatmap``: ``classes`` channels (sigmoid): a peak at the centre of every object;
* ``box``: 4 channels: the object's centre relative to the cell centre (dx, dy, in cells) and its
  log width and height in pixels.

It has the interface of torchvision's detectors, so the engine treats both alike:
``model.train(); model(images, targets)`` returns a dict of losses (targets: ``boxes`` [N, 4]
pixels x0, y0, x1, y1 and ``labels`` 1-based, class 0 is the background) and
``model.eval(); model(images)`` returns per image ``{"boxes", "labels" (1-based), "scores"}``
after peak picking (3 x 3 max pooling of the heatmap), the score cut, the ``max_detections``
best peaks and class-wise NMS (:meth:`CenterNet.configure_inference` sets the three).

Training targets: an elliptical Gaussian per object on its class's heatmap (sigma = 0.54 x box
size / 6, peak 1 at the object's centre cell), penalty-reduced focal loss (alpha 2, beta 4); the
box is regressed at every cell of the object's Gaussian inside its box (weighted by the
Gaussian, each object weighing the same) with a GIoU loss plus an L1 loss on the log size.
"""
import math

from ..errors import ModelPackageError, require

ARCHITECTURE = "CenterNet"
#: the oriented variant: rotated boxes (centre, length, width, angle of the long side)
ORIENTED_ARCHITECTURE = "CenterNetOBB"
ARCHITECTURES = (ARCHITECTURE, ORIENTED_ARCHITECTURE)
BASES = ("Unet", "FPN")
OUTPUT_STRIDES = (1, 2, 4)
INTERPOLATIONS = ("nearest", "bilinear")
#: params with their JSON types (the bases' own are checked against ``base``)
PARAMS = {
    "base": str,
    "encoder_depth": int,
    "output_stride": int,
    "head_channels": int,
    "decoder_channels": list,       # Unet
    "decoder_interpolation": str,   # Unet, FPN
    "decoder_pyramid_channels": int,        # FPN
    "decoder_segmentation_channels": int,   # FPN
}
DEFAULTS = {"base": "Unet", "encoder_depth": 5, "output_stride": 1, "head_channels": 64,
            "decoder_interpolation": "nearest", "decoder_pyramid_channels": 128, "decoder_segmentation_channels": 64}
UNET_CHANNELS = (256, 128, 64, 32, 16)

#: training target and loss settings (not part of the weights)
GAUSSIAN_ALPHA = 0.54
REG_MIN_GAUSSIAN = 0.1
HEAT_PRIOR_BIAS = -2.19  # sigmoid -> 0.1, as CenterNet
BOX_WEIGHT = 2.0
SIZE_WEIGHT = 0.5
#: CenterNetOBB's regression weights: centre offset (cells), log length and width, (sin 2 theta, cos 2 theta)
OBB_OFFSET_WEIGHT = 1.0
OBB_SIZE_WEIGHT = 1.0
OBB_ANGLE_WEIGHT = 1.0


def is_oriented(builder):
    """Whether a builder describes the oriented detector (rotated boxes)."""
    return isinstance(builder, dict) and builder.get("library") == "rs_deep" and \
        builder.get("architecture") == ORIENTED_ARCHITECTURE


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _smp():
    return require("segmentation_models_pytorch", "segmentation-models-pytorch")


def unet_blocks(depth, stride):
    return depth - int(round(math.log2(stride)))


def fpn_stride(depth):
    return 2 ** (depth - 3)


def validate(builder, where="rs_deep:builder", registries=True):
    """Check a CenterNet builder (called by :func:`.arch_rs_deep.validate`); returns a normalised copy.
    ``registries`` False: the encoder name is not checked against smp's (:func:`.architectures.validate_builder`)."""
    for key in ("encoder_weights", "weights", "weights_backbone"):
        if builder.get(key) is not None:
            raise ModelPackageError(f"{where}.{key}: must be null (weights come from model.safetensors; nothing "
                                    f"is downloaded), got {builder.get(key)!r}")
    encoder = builder.get("encoder")
    if not isinstance(encoder, str) or not encoder:
        raise ModelPackageError(f"{where}.encoder: expected an smp encoder name such as 'resnet18', 'mobilenet_v2' "
                                f"or 'efficientnet-b0', got {encoder!r}")
    if registries:  # smp's encoder names (imports smp and torch); build_model always checks them
        from .arch_smp import check_encoder
        check_encoder(encoder, where, "smp encoder")
    params = builder.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in PARAMS:
            raise ModelPackageError(f"{where}.params.{key}: not an allowed parameter of CenterNet; allowed: "
                                    f"{', '.join(sorted(PARAMS))}")
        if not isinstance(value, PARAMS[key]) or (PARAMS[key] is int and isinstance(value, bool)):
            kind = {str: "a string", int: "an integer", list: "a list"}[PARAMS[key]]
            raise ModelPackageError(f"{where}.params.{key}: expected {kind}, got {value!r}")
    p = dict(DEFAULTS, **params)
    if p["base"] not in BASES:
        raise ModelPackageError(f"{where}.params.base: {p['base']!r} is not a CenterNet decoder; valid names: "
                                f"{', '.join(BASES)}")
    depth = p["encoder_depth"]
    if not 3 <= depth <= 5:
        raise ModelPackageError(f"{where}.params.encoder_depth: expected 3, 4 or 5, got {depth}")
    stride = p["output_stride"]
    if stride not in OUTPUT_STRIDES:
        raise ModelPackageError(f"{where}.params.output_stride: expected one of "
                                f"{', '.join(map(str, OUTPUT_STRIDES))} (pixels per heatmap cell), got {stride}")
    if not 1 <= p["head_channels"] <= 1024:
        raise ModelPackageError(f"{where}.params.head_channels: expected an integer in 1..1024, got "
                                f"{p['head_channels']}")
    if p["decoder_interpolation"] not in INTERPOLATIONS:
        raise ModelPackageError(f"{where}.params.decoder_interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                                f"got {p['decoder_interpolation']!r}")
    if p["base"] == "Unet":
        for key in ("decoder_pyramid_channels", "decoder_segmentation_channels"):
            if key in params:
                raise ModelPackageError(f"{where}.params.{key}: a parameter of the FPN base, not of Unet; Unet takes "
                                        "decoder_channels, decoder_interpolation")
        n = unet_blocks(depth, stride)
        channels = p.get("decoder_channels", list(UNET_CHANNELS[:n]))
        if len(channels) != n or not all(_positive_int(c) and c <= 4096 for c in channels):
            raise ModelPackageError(f"{where}.params.decoder_channels: expected {n} positive integers (one per "
                                    f"decoder block: encoder_depth {depth} - log2(output_stride {stride})), got "
                                    f"{channels!r}")
    else:
        if "decoder_channels" in params:
            raise ModelPackageError(f"{where}.params.decoder_channels: a parameter of the Unet base, not of FPN; FPN "
                                    "takes decoder_pyramid_channels, decoder_segmentation_channels, "
                                    "decoder_interpolation")
        native = fpn_stride(depth)
        if stride > native:
            raise ModelPackageError(f"{where}.params.output_stride: the FPN base with encoder_depth {depth} gives "
                                    f"features at stride {native}; expected an output_stride of at most {native}, "
                                    f"got {stride}")
        if not 1 <= p["decoder_pyramid_channels"] <= 4096:
            raise ModelPackageError(f"{where}.params.decoder_pyramid_channels: expected an integer in 1..4096, got "
                                    f"{p['decoder_pyramid_channels']}")
        seg = p["decoder_segmentation_channels"]
        if not 32 <= seg <= 4096 or seg % 32:
            raise ModelPackageError(f"{where}.params.decoder_segmentation_channels: expected a multiple of 32 (group "
                                    f"normalisation in groups of 32), got {seg}")
    out = dict(builder)
    out.update(encoder_weights=None, params=dict(params))
    for key in ("weights", "weights_backbone"):
        out.pop(key, None)
    return out


# --------------------------------------------------------------------------------------------
# building


def _prune_unused(module, probe):
    """Replace the sub-modules that ``probe()`` never calls by Identity (an encoder built with a
    reduced depth keeps its deeper stages, which would only add dead weights to the package)."""
    import torch.nn as nn
    called = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in module.modules()]
    try:
        probe()
    finally:
        for h in hooks:
            h.remove()
    unused = []

    def used(m):  # called itself, or holds a called module (containers may be iterated, not called)
        return any(id(d) in called for d in m.modules())

    def walk(parent):
        for name, child in parent.named_children():
            if not used(child):
                if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                    unused.append((parent, name))
            else:
                walk(child)

    walk(module)
    for parent, name in unused:
        setattr(parent, name, nn.Identity())
    return len(unused)


def build(builder, where="rs_deep:builder"):
    """Construct the (untrained) CenterNet of a validated builder."""
    torch = require("torch", "PyTorch")
    nn = torch.nn
    smp = _smp()
    from segmentation_models_pytorch.base import initialization as init

    p = dict(DEFAULTS, **(builder.get("params") or {}))
    depth, stride, base = p["encoder_depth"], p["output_stride"], p["base"]
    c_in, k = builder["in_channels"], builder["classes"]
    try:
        encoder = smp.encoders.get_encoder(builder["encoder"], in_channels=c_in, depth=depth, weights=None)
    except Exception as exc:
        raise ModelPackageError(f"{where}.encoder: cannot build the smp encoder {builder['encoder']!r} with "
                                f"encoder_depth {depth} ({exc}); use an smp encoder name such as resnet18, resnet34, "
                                "mobilenet_v2, efficientnet-b0") from exc
    # deeper stages than encoder_depth are never run: drop their weights
    encoder.eval()
    try:
        with torch.no_grad():
            size = max(64, 2 ** depth * 2)
            _prune_unused(encoder, lambda: encoder(torch.zeros(1, c_in, size, size)))
    except Exception:  # pragma: no cover - an encoder that cannot run on a probe keeps all its weights
        pass
    encoder.train()
    enc_channels = list(encoder.out_channels)
    try:
        if base == "Unet":
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
            n = unet_blocks(depth, stride)
            channels = list(p.get("decoder_channels", UNET_CHANNELS[:n]))
            decoder = UnetDecoder(encoder_channels=enc_channels, decoder_channels=channels, n_blocks=n,
                                  use_norm="batchnorm", interpolation_mode=p["decoder_interpolation"])
            feat_channels, upsample = channels[-1], 1
        else:
            from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
            decoder = FPNDecoder(encoder_channels=enc_channels, encoder_depth=depth,
                                 pyramid_channels=p["decoder_pyramid_channels"],
                                 segmentation_channels=p["decoder_segmentation_channels"], dropout=0.0,
                                 merge_policy="add", interpolation_mode=p["decoder_interpolation"])
            feat_channels, upsample = decoder.out_channels, fpn_stride(depth) // stride
    except Exception as exc:
        raise ModelPackageError(f"{where}.params: cannot build the CenterNet {base} decoder with {p} ({exc})") from exc
    init.initialize_decoder(decoder)
    hc = p["head_channels"]

    def head(out_channels):
        return nn.Sequential(nn.Conv2d(feat_channels, hc, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(hc, out_channels, 1))

    oriented = builder.get("architecture") == ORIENTED_ARCHITECTURE
    heatmap, box = head(k), head(6 if oriented else 4)
    for h in (heatmap, box):
        for m in h.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
    nn.init.constant_(heatmap[-1].bias, HEAT_PRIOR_BIAS)
    with torch.no_grad():
        box[-1].bias[2:4] = math.log(32.0)  # boxes start at 32 px
    cls = centernet_obb_class() if oriented else centernet_class()
    return cls(encoder, decoder, heatmap, box, classes=k, stride=stride, pad_multiple=2 ** depth, upsample=upsample)


_CLASS = None
_OBB_CLASS = None


def centernet_class():
    """The CenterNet module class (defined on first use: importing this module needs no torch)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def centernet_obb_class():
    """The CenterNetOBB module class (rotated boxes; defined on first use)."""
    global _OBB_CLASS
    if _OBB_CLASS is None:
        _OBB_CLASS = _make_obb_class(centernet_class())
    return _OBB_CLASS


def _make_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class CenterNet(nn.Module):
        """Heatmap of object centres + box regression on an smp encoder-decoder (see the module doc)."""

        def __init__(self, encoder, decoder, heatmap, box, classes, stride, pad_multiple, upsample=1):
            super().__init__()
            self.encoder = encoder
            self.decoder = decoder
            self.heatmap = heatmap
            self.box = box
            self.classes = int(classes)
            self.stride = int(stride)
            self.pad_multiple = int(pad_multiple)
            self.upsample = int(upsample)
            # inference settings (the engine sets them: configure_inference)
            self.score_thresh = 0.3
            self.nms_thresh = 0.5
            self.detections_per_img = 100

        def configure_inference(self, score_threshold, iou_threshold, max_detections):
            self.score_thresh = float(score_threshold)
            self.nms_thresh = float(iou_threshold)
            self.detections_per_img = int(max_detections)
            return self

        # ---- network ------------------------------------------------------------------
        def _batch(self, images):
            """Images (list of [C, H, W] or a tensor [B, C, H, W]) -> padded batch, their sizes."""
            if torch.is_tensor(images) and images.dim() == 4:
                sizes = [tuple(images.shape[-2:])] * images.shape[0]
                x = images
            else:
                images = list(images)
                if not images:
                    raise ValueError("CenterNet: expected at least one image")
                sizes = [tuple(im.shape[-2:]) for im in images]
                if len(set(sizes)) == 1:
                    x = torch.stack(images)
                else:
                    hh, ww = max(s[0] for s in sizes), max(s[1] for s in sizes)
                    x = images[0].new_zeros((len(images), images[0].shape[0], hh, ww))
                    for i, im in enumerate(images):
                        x[i, :, :im.shape[-2], :im.shape[-1]] = im
            m = self.pad_multiple
            h, w = x.shape[-2:]
            ph, pw = (-h) % m, (-w) % m
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
            return x.contiguous(memory_format=torch.channels_last), sizes

        def forward_maps(self, x):
            """Heatmap logits [B, K, h, w] and box maps [B, 4, h, w] of a padded batch."""
            feats = self.decoder(self.encoder(x))
            if isinstance(feats, (list, tuple)):
                feats = feats[-1]
            if self.upsample > 1:
                feats = F.interpolate(feats, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            return self.heatmap(feats), self.box(feats)

        def forward(self, images, targets=None):
            x, sizes = self._batch(images)
            heat, box = self.forward_maps(x)
            if self.training:
                if targets is None:
                    raise ValueError("CenterNet: targets should not be None in training mode")
                return self.loss(heat, box, targets)
            return self.decode(heat, box, sizes)

        # ---- geometry -----------------------------------------------------------------
        def _cell_boxes(self, box, ys, xs):
            """Pixel boxes [n, 4] from box maps values [n, 4] at cells (ys, xs)."""
            s = self.stride
            cx = (xs.to(box.dtype) + 0.5 + box[:, 0]) * s
            cy = (ys.to(box.dtype) + 0.5 + box[:, 1]) * s
            wh = torch.exp(box[:, 2:4].clamp(-2.0, 9.0))
            return torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], dim=1)

        def peaks(self, prob, i, sizes):
            """(scores, 0-based labels, rows, columns) of the best heatmap peaks of image ``i`` above the score cut."""
            peaks = prob[i] * (F.max_pool2d(prob[i][None], 3, stride=1, padding=1)[0] == prob[i])
            k, h, w = prob.shape[1:]
            ih, iw = sizes[i]
            # cells beyond the image (padding) hold no objects
            hv, wv = min(h, -(-ih // self.stride)), min(w, -(-iw // self.stride))
            p = peaks[:, :hv, :wv].reshape(-1)
            n = min(int(self.detections_per_img), p.numel())
            scores, idx = p.topk(n)
            keep = scores >= self.score_thresh
            scores, idx = scores[keep], idx[keep]
            labels = idx // (hv * wv)
            cell = idx % (hv * wv)
            return scores, labels, cell // wv, cell % wv

        def decode(self, heat, box, sizes):
            from torchvision.ops import batched_nms
            prob = torch.sigmoid(heat.float())
            box = box.float()
            out = []
            for i in range(prob.shape[0]):
                ih, iw = sizes[i]
                scores, labels, ys, xs = self.peaks(prob, i, sizes)
                boxes = self._cell_boxes(box[i, :, ys, xs].t(), ys, xs)
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, iw)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ih)
                ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
                kept = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
                out.append({"boxes": boxes[kept], "labels": labels[kept] + 1, "scores": scores[kept]})
            return out

        # ---- training -----------------------------------------------------------------
        def targets_for(self, target, shape, device):
            """Heatmap [K, h, w], box regression targets [h, w, 4] (pixels) and weights [h, w] of one image."""
            k, h, w = shape
            s = self.stride
            heat = torch.zeros((k, h, w), device=device)
            tbox = torch.zeros((h, w, self.regression_width), device=device)
            weight = torch.zeros((h, w), device=device)
            boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            labels = target["labels"].to(device=device, dtype=torch.int64).reshape(-1) - 1
            if not len(boxes):
                return heat, tbox, weight
            bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
            bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            # the centre cell (peak exactly 1 there)
            px = (cx / s).floor().clamp(0, w - 1)
            py = (cy / s).floor().clamp(0, h - 1)
            sx = (GAUSSIAN_ALPHA * bw / (6 * s)).clamp(min=0.3)
            sy = (GAUSSIAN_ALPHA * bh / (6 * s)).clamp(min=0.3)
            xs = torch.arange(w, device=device, dtype=torch.float32)
            ys = torch.arange(h, device=device, dtype=torch.float32)
            gx = torch.exp(-((xs[None, :] - px[:, None]) ** 2) / (2 * sx[:, None] ** 2))  # [N, w]
            gy = torch.exp(-((ys[None, :] - py[:, None]) ** 2) / (2 * sy[:, None] ** 2))  # [N, h]
            g = gy[:, :, None] * gx[:, None, :]  # [N, h, w]
            for c in labels.unique().tolist():
                heat[c] = g[labels == c].amax(dim=0)
            # box regression: cells of an object's Gaussian inside its box; the strongest object wins a cell
            ccx, ccy = (xs + 0.5) * s, (ys + 0.5) * s
            inside = ((ccx[None, None, :] >= boxes[:, 0, None, None]) & (ccx[None, None, :] <= boxes[:, 2, None, None])
                      & (ccy[None, :, None] >= boxes[:, 1, None, None]) & (ccy[None, :, None] <= boxes[:, 3, None, None]))
            gr = torch.where(inside | (g >= 0.999), g, torch.zeros_like(g))
            gr = torch.where(gr >= REG_MIN_GAUSSIAN, gr, torch.zeros_like(gr))
            best, owner = gr.max(dim=0)  # [h, w]
            mask = best > 0
            # each object weighs the same: its weights sum to 1
            owned = torch.zeros_like(gr).scatter_(0, owner[None], best[None]) * mask[None]
            totals = owned.sum(dim=(1, 2)).clamp(min=1e-6)
            weight = (owned / totals[:, None, None]).sum(dim=0)
            tbox = self.regression_targets(target, boxes, device)[owner]  # [h, w, 4] (CenterNetOBB: 9)
            return heat, tbox, weight

        #: columns of :meth:`regression_targets`
        regression_width = 4

        def regression_targets(self, target, boxes, device):
            """What the box head regresses, per object: its box."""
            return boxes

        def heatmap_loss(self, heat, t_heat):
            """Penalty-reduced focal loss (CenterNet) of heatmap logits against the Gaussian targets."""
            pos = t_heat >= 0.999
            logp, log1mp = F.logsigmoid(heat), F.logsigmoid(-heat)
            prob = torch.sigmoid(heat)
            pos_loss = (logp * (1 - prob) ** 2 * pos).sum()
            neg_loss = (log1mp * prob ** 2 * (1 - t_heat) ** 4 * (~pos)).sum()
            n_pos = pos.sum().clamp(min=1).float()
            return -(pos_loss + neg_loss) / n_pos

        def all_targets(self, heat, targets):
            """The stacked targets of a batch: heatmaps [B, K, h, w], regression [B, h, w, r], weights [B, h, w]."""
            b, k, h, w = heat.shape
            t_heat, t_box, t_w = [], [], []
            for i in range(b):
                th, tb, tw = self.targets_for(targets[i], (k, h, w), heat.device)
                t_heat.append(th)
                t_box.append(tb)
                t_w.append(tw)
            return torch.stack(t_heat), torch.stack(t_box), torch.stack(t_w)

        #: the regression losses (:meth:`regression_losses`) and their weights
        regression_weights = {"loss_box": BOX_WEIGHT, "loss_size": SIZE_WEIGHT}

        def loss(self, heat, box, targets):
            t_heat, t_box, t_w = self.all_targets(heat, targets)
            losses = {"loss_heatmap": self.heatmap_loss(heat.float(), t_heat)}
            # boxes at the weighted cells, each object weighing the same
            sel = t_w > 0
            if bool(sel.any()):
                bi, yi, xi = sel.nonzero(as_tuple=True)
                wts = t_w[bi, yi, xi]
                n_obj = wts.sum().clamp(min=1.0)
                parts = self.regression_losses(box.float()[bi, :, yi, xi], t_box[bi, yi, xi], yi, xi)
                for name, weight in self.regression_weights.items():
                    losses[name] = weight * (parts[name] * wts).sum() / n_obj
            else:
                zero = box.sum() * 0.0
                losses.update({name: zero for name in self.regression_weights})
            return losses

        def regression_losses(self, pred, tboxes, yi, xi):
            """Per-cell losses of the box maps ``pred`` [n, 4] against the owners' boxes [n, 4]: GIoU, L1 of the
            log size."""
            from torchvision.ops import generalized_box_iou_loss
            giou = generalized_box_iou_loss(self._cell_boxes(pred, yi, xi), tboxes, reduction="none")
            tsize = torch.log(torch.stack([tboxes[:, 2] - tboxes[:, 0], tboxes[:, 3] - tboxes[:, 1]], 1).clamp(min=1.0))
            return {"loss_box": giou, "loss_size": (pred[:, 2:4] - tsize).abs().sum(dim=1)}

    return CenterNet


def _make_obb_class(base):
    import torch

    class CenterNetOBB(base):
        """CenterNet with rotated boxes: the box head regresses the centre offset (dx, dy, cells), the log length
        and log width (pixels) and (sin 2 theta, cos 2 theta) of the long side's angle theta (pixels: x right, y
        down; theta in [0, pi)). Training targets: ``rboxes`` [N, 5] (cx, cy, length, width, theta; pixels) with
        ``boxes`` their envelopes (the heatmap Gaussians are those of the envelopes). Inference returns
        ``rboxes`` [n, 5] and their envelopes as ``boxes``, without NMS (the engine's rotated NMS merges them,
        :func:`..inference.detect.merge_detections`)."""

        def cell_rboxes(self, box, ys, xs):
            """Rotated boxes [n, 5] (pixels) from box map values [n, 6] at cells (ys, xs)."""
            s = self.stride
            cx = (xs.to(box.dtype) + 0.5 + box[:, 0]) * s
            cy = (ys.to(box.dtype) + 0.5 + box[:, 1]) * s
            size = torch.exp(box[:, 2:4].clamp(-2.0, 9.0))
            theta = torch.remainder(torch.atan2(box[:, 4], box[:, 5]) / 2, math.pi)
            return torch.stack([cx, cy, size[:, 0], size[:, 1], theta], dim=1)

        def encode_rboxes(self, rb, ys, xs):
            """What the box head should give [n, 6] at cells (ys, xs) for rotated boxes [n, 5] (pixels): the
            inverse of :meth:`cell_rboxes` (sizes below 1 px are taken as 1 px)."""
            s = self.stride
            return torch.stack([rb[:, 0] / s - (xs.to(rb.dtype) + 0.5), rb[:, 1] / s - (ys.to(rb.dtype) + 0.5),
                                torch.log(rb[:, 2].clamp(min=1.0)), torch.log(rb[:, 3].clamp(min=1.0)),
                                torch.sin(2 * rb[:, 4]), torch.cos(2 * rb[:, 4])], dim=1)

        def decode(self, heat, box, sizes):
            prob = torch.sigmoid(heat.float())
            box = box.float()
            out = []
            for i in range(prob.shape[0]):
                scores, labels, ys, xs = self.peaks(prob, i, sizes)
                rb = self.cell_rboxes(box[i, :, ys, xs].t(), ys, xs)
                out.append({"rboxes": rb, "boxes": rbox_envelopes_torch(rb), "labels": labels + 1, "scores": scores})
            return out

        regression_width = 9  # the envelope and the rotated box

        def regression_targets(self, target, boxes, device):
            rb = target["rboxes"].to(device=device, dtype=torch.float32).reshape(-1, 5)
            return torch.cat([boxes, rb], dim=1)

        regression_weights = {"loss_offset": OBB_OFFSET_WEIGHT, "loss_size": OBB_SIZE_WEIGHT,
                              "loss_angle": OBB_ANGLE_WEIGHT}

        def regression_losses(self, pred, tboxes, yi, xi):
            """L1 losses of the box maps ``pred`` [n, 6] against the owners' rotated boxes (columns 4: of the
            regression targets): centre offset, log sizes, (sin 2 theta, cos 2 theta)."""
            enc = self.encode_rboxes(tboxes[:, 4:], yi, xi)
            diff = (pred - enc).abs()
            return {"loss_offset": diff[:, 0:2].sum(1), "loss_size": diff[:, 2:4].sum(1),
                    "loss_angle": diff[:, 4:6].sum(1)}

    return CenterNetOBB


def rbox_envelopes_torch(rb):
    """Axis-aligned envelopes [n, 4] of rotated boxes [n, 5] (torch)."""
    import torch
    c, s = torch.cos(rb[:, 4]).abs(), torch.sin(rb[:, 4]).abs()
    hw = (rb[:, 2] * c + rb[:, 3] * s) / 2
    hh = (rb[:, 2] * s + rb[:, 3] * c) / 2
    return torch.stack([rb[:, 0] - hw, rb[:, 1] - hh, rb[:, 0] + hw, rb[:, 1] + hh], dim=1)


__all__ = ["ARCHITECTURE", "ORIENTED_ARCHITECTURE", "ARCHITECTURES", "BASES", "validate", "build", "is_oriented",
           "centernet_class", "centernet_obb_class"]
