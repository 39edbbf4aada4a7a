"""RS Deep's super-resolution network (builder library ``rs_deep``, architecture ``ESPCN``): a small EDSR-style
network after ESPCN (Shi et al. 2016, sub-pixel convolution) and EDSR (Lim et al. 2017, residual blocks without
normalisation).

``[B, C, H, W]`` -> ``[B, classes, s x H, s x W]``: a 3 x 3 convolution to ``features`` channels, ``blocks`` residual
blocks (conv, ReLU, conv, added back), a convolution to ``classes x s²`` channels rearranged into an image ``s`` times
finer (``PixelShuffle``). When the output has the input's channels, the network learns the difference to the
bicubic upsampling of its input, which is added back: an untrained network is bicubic interpolation.

Builder ``params``: ``scale`` (2..8, required), ``features`` (default 32), ``blocks`` (default 4). No encoder,
nothing downloaded.
"""
from ..errors import ModelPackageError

PARAMS = {"scale": (2, 8, None), "features": (4, 256, 32), "blocks": (0, 32, 4)}


def validate(builder, where="rs_deep:builder", registries=True):
    params = builder.get("params") or {}
    if not isinstance(params, dict):
        raise ModelPackageError(f"{where}.params: expected an object, got {type(params).__name__}")
    for key in params:
        if key not in PARAMS:
            raise ModelPackageError(f"{where}.params.{key}: not an allowed parameter of ESPCN; allowed: "
                                    f"{', '.join(PARAMS)}")
    out = {}
    for key, (lo, hi, default) in PARAMS.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ModelPackageError(f"{where}.params.{key}: expected an integer {lo}..{hi}, got {value!r}")
        out[key] = value
    if builder.get("encoder_weights") is not None:
        raise ModelPackageError(f"{where}.encoder_weights: must be null (weights come from model.safetensors)")
    return dict(builder, encoder=builder.get("encoder") or "none", encoder_weights=None, params=out)


def build(builder, where="rs_deep:builder"):
    import torch
    from torch import nn
    import torch.nn.functional as F

    p = validate(builder, where)["params"]
    s, f, c_in, c_out = p["scale"], p["features"], builder["in_channels"], builder["classes"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(f, f, 3, padding=1)
            self.conv2 = nn.Conv2d(f, f, 3, padding=1)

        def forward(self, x):
            return x + self.conv2(torch.relu(self.conv1(x)))

    class ESPCN(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(c_in, f, 3, padding=1)
            self.body = nn.Sequential(*[Block() for _ in range(p["blocks"])])
            self.tail = nn.Conv2d(f, c_out * s * s, 3, padding=1)
            self.shuffle = nn.PixelShuffle(s)
            nn.init.zeros_(self.tail.weight)  # starts as the bicubic upsampling (or zeros)
            nn.init.zeros_(self.tail.bias)

        def forward(self, x):
            h = torch.relu(self.head(x))
            out = self.shuffle(self.tail(h + self.body(h)))
            if c_in == c_out:
                out = out + F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
            return out

    return ESPCN()


__all__ = ["validate", "build", "PARAMS"]
