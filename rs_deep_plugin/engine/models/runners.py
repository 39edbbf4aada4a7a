"""Device choice and the model runners: class probabilities (:class:`ModelRunner`) and boxes
(:class:`DetectionRunner`) from batches of tiles (inference mode, channels-last, autocast on CUDA).
ONNX packages have runners with the same call (:mod:`.onnx.runners`); a package makes its own
(``ModelPackage.make_runner`` / ``make_detection_runner``)."""
import os

import numpy as np

from ..errors import InputError, require
from .onnx.session import OnnxDevice, select_onnx_device

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _torch():
    return require("torch", "PyTorch")


def select_device(requested="auto", backend="torch"):
    """CUDA, then Apple MPS, then CPU; ``requested`` overrides ('cpu', 'cuda', 'cuda:1', 'mps'). A
    ``torch.device``; for ``backend`` "onnx" (an ONNX model: ``ModelPackage.backend``), an
    :class:`.onnx.session.OnnxDevice` chosen without importing torch (:func:`.onnx.session.select_onnx_device`)."""
    requested = (requested or "auto").strip().lower()
    if requested not in DEVICE_CHOICES and not requested.startswith("cuda"):
        raise InputError(f"DEVICE {requested!r} is unknown; use one of {', '.join(DEVICE_CHOICES)}")
    if backend == "onnx":
        return select_onnx_device(requested)
    torch = _torch()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("DEVICE is 'cuda' but PyTorch sees no CUDA GPU (no driver, or a CPU-only "
                             "build of torch); choose 'auto' or 'cpu'")
        return torch.device(requested)
    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("DEVICE is 'mps' but Apple Metal is not available here; choose 'auto' or 'cpu'")
        return torch.device("mps")
    return torch.device("cpu")


def available_devices():
    """[(label, DEVICE value)]: automatic, the CPU, and every accelerator torch finds (with its name)."""
    try:
        import torch
    except Exception:
        return [("CPU (PyTorch is not installed)", "cpu")]
    items = []
    try:
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            items.append((f"GPU: {', '.join(names)} (CUDA)", "cuda"))
    except Exception:
        pass
    mps = getattr(torch.backends, "mps", None)
    try:
        if mps is not None and mps.is_available():
            items.append(("Apple GPU (MPS)", "mps"))
    except Exception:
        pass
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    auto = f"Automatic: {items[0][0] if items else cpu}"
    return [(auto, "auto")] + items + [(cpu, "cpu")]


def device_description(device):
    if isinstance(device, OnnxDevice):
        return device.description()
    torch = _torch()
    if device.type == "cuda":
        return f"CUDA GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


def default_batch_size(device):
    return 8 if device.type in ("cuda", "mps") else 2


def _fuse_module(module):
    """``module`` with every Conv2d -> BatchNorm2d pair folded into one convolution (torch.fx), or None when
    the module cannot be traced symbolically."""
    import warnings
    try:
        from torch.fx.experimental.optimization import fuse
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(module.eval())
    except Exception:  # data-dependent control flow, unsupported ops...: keep the module as it is
        return None


def fuse_for_inference(model):
    """Fold batch normalisation into the preceding convolutions, for inference only.

    A BatchNorm in eval mode is an affine map per channel, so it can be merged into the weights and
    bias of the convolution before it: the same outputs (to float rounding, ~1e-7) with one pass over
    the activations less; about 30 % less time for a MobileNetV2 or ResNet U-Net on the CPU. The whole
    network is traced with torch.fx; when that fails (detectors whose forward decodes boxes), each
    child module is tried on its own, and what cannot be traced is kept as it is. Returns
    ``(model, fused_modules)``; the model passed in is never modified."""
    fused = _fuse_module(model)
    if fused is not None:
        return fused, 1
    import copy
    out = copy.deepcopy(model).eval()
    count = 0
    for name, child in list(out.named_children()):
        if not any(True for _ in child.parameters()):
            continue
        f = _fuse_module(child)
        if f is not None:
            setattr(out, name, f)
            count += 1
    return (out, count) if count else (model, 0)


def prepare_device(torch, device):
    """Apply ``RS_DEEP_THREADS`` (CPU threads, when set) and return the memory format for ``device``:
    channels_last is faster for convolutions on the CPU (oneDNN) and on tensor-core GPUs."""
    if device.type == "cpu":
        threads = int(os.environ.get("RS_DEEP_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


class ModelRunner:
    """Runs a network on batches of float32 numpy tiles; returns class probabilities as numpy."""

    def __init__(self, model, device, activation="softmax", half=None, fuse=True):
        torch = self.torch = _torch()
        self.device = device
        self.activation = activation
        self.memory_format = prepare_device(torch, device)
        if fuse:
            model, _ = fuse_for_inference(model.eval())
        self.model = model.to(device).eval().to(memory_format=self.memory_format)
        self.half = (device.type == "cuda") if half is None else half

    def __call__(self, batch):
        """batch: float32 array [B, C, H, W] -> float32 probabilities [B, K, H, W] on the CPU (activation "none":
        the network's raw values, [B, K, s x H, s x W] for a super-resolution network)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self.memory_format)
            if self.half:
                with torch.autocast(device_type=self.device.type, dtype=torch.float16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            logits = logits.float()
            if self.activation == "none":  # raw values: regression, super-resolution
                p = logits
            elif self.activation == "sigmoid":
                p = torch.sigmoid(logits)
                if p.shape[1] == 1:
                    p = torch.cat([1 - p, p], dim=1)
            else:
                p = torch.softmax(logits, dim=1)
            return p.contiguous().cpu().numpy()


class DetectionRunner:
    """Runs a torchvision detection network on batches of float32 tiles [B, C, T, T].

    Returns, per tile, (boxes [n, 4] float64 in tile pixels x0, y0, x1, y1, or rotated boxes [n, 5] cx, cy,
    length, width, theta of an oriented detector; labels [n] as 0-based object classes; scores [n])."""

    def __init__(self, model, device, score_threshold, iou_threshold, max_detections):
        from .arch_torchvision import configure_inference
        torch = self.torch = _torch()
        self.device = device
        fmt = prepare_device(torch, device)
        self.model = configure_inference(model, score_threshold, iou_threshold, max_detections).to(device).eval()
        self.model = self.model.to(memory_format=fmt)

    def outputs(self, batch):
        """The network's own outputs (a dict per tile)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            return self.model(list(x.unbind(0)))

    def __call__(self, batch):
        # an oriented detector (CenterNetOBB) gives rotated boxes [n, 5] (cx, cy, length, width, theta)
        return [(o.get("rboxes", o["boxes"]).double().cpu().numpy(), o["labels"].cpu().numpy().astype(np.int64) - 1,
                 o["scores"].double().cpu().numpy()) for o in self.outputs(batch)]


class InstanceRunner(DetectionRunner):
    """Runs a Mask R-CNN on batches of float32 tiles [B, C, T, T]: per tile (boxes [n, 4], labels [n], scores [n],
    masks [n, T, T] bool: the object's pixels, its mask probability >= ``mask_threshold``)."""

    mask_threshold = 0.5

    def __call__(self, batch):
        out = []
        for o in self.outputs(batch):
            masks = o.get("masks")
            if masks is None:
                raise InputError("this network gives no masks: instance segmentation needs a Mask R-CNN "
                                 "(maskrcnn_mobilenet_v3_large_fpn)")
            out.append((o["boxes"].double().cpu().numpy(), o["labels"].cpu().numpy().astype(np.int64) - 1,
                        o["scores"].double().cpu().numpy(), (masks[:, 0] >= self.mask_threshold).cpu().numpy()))
        return out
