"""Device choice and the model runner (batching, autocast, inference mode)."""
import os

from .errors import InputError, MissingDependency

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(f"PyTorch is not installed ({exc}); install the plugin's dependencies "
                                "(README, 'make setup')") from exc
    return torch


def select_device(requested="auto"):
    """CUDA, then Apple MPS, then CPU; ``requested`` overrides ('cpu', 'cuda', 'cuda:1', 'mps')."""
    torch = _torch()
    requested = (requested or "auto").strip().lower()
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
    if requested == "cpu":
        return torch.device("cpu")
    raise InputError(f"DEVICE {requested!r} is unknown; use one of {', '.join(DEVICE_CHOICES)}")


def device_description(device):
    torch = _torch()
    if device.type == "cuda":
        return f"CUDA GPU: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


def default_batch_size(device):
    return 8 if device.type in ("cuda", "mps") else 2


class ModelRunner:
    """Runs a network on batches of float32 numpy tiles; returns class probabilities as numpy."""

    def __init__(self, model, device, activation="softmax", half=None):
        torch = _torch()
        self.torch = torch
        self.device = device
        self.activation = activation
        if device.type == "cpu":
            threads = int(os.environ.get("RS_DEEP_THREADS", "0") or 0)
            if threads > 0:
                torch.set_num_threads(threads)
        # channels_last is faster for convolutions on CPU (oneDNN) and on tensor-core GPUs
        self.memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
        self.model = model.to(device).eval().to(memory_format=self.memory_format)
        self.half = (device.type == "cuda") if half is None else half

    def __call__(self, batch):
        """batch: float32 array [B, C, H, W] -> float32 probabilities [B, K, H, W] on the CPU."""
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
            if self.activation == "sigmoid":
                p = torch.sigmoid(logits)
                if p.shape[1] == 1:
                    p = torch.cat([1 - p, p], dim=1)
            else:
                p = torch.softmax(logits, dim=1)
            return p.contiguous().cpu().numpy()
