"""Test-time augmentation (TTA): a wrapper of a probability runner (:class:`.runners.ModelRunner`, the ONNX
:class:`.onnx.runners.OnnxSegmentationRunner`) that runs each batch of tiles several times, flipped and rotated,
and averages the class probabilities, each undone back onto the tile's grid first.

The one place where TTA happens: the inference pipelines (segmentation, change, patch classification) take
``with_tta(pkg.make_runner(device), tta)`` and see the runner's call unchanged (batch [B, C, H, W] -> probabilities
[B, K, H, W], or [B, K] for a patch classifier), so blending, thresholds, the probabilities output and the polygons
work as without TTA. Choices (:data:`TTA_CHOICES`):

* ``none``: the runner itself, one pass;
* ``flips``: the tile as it is, flipped left-right and flipped upside down (3 passes);
* ``d4``: the 8 flips and rotations by 90° of the square (4 rotations, each with and without a left-right flip).

The variants run one after another on the whole batch, so memory stays bounded by the batch size: the batch,
one transformed copy of it and a sum of its probabilities. Probabilities are averaged after the activation
(softmax or sigmoid), on what the pipeline blends; they still sum to 1. Dense outputs are transformed back with
the inverse flip or rotation; a patch classifier's scores [B, K] have no grid and are averaged as they are.
Rotations by 90° swap height and width: on a tile that is not square (the pipelines always run square tiles)
only the variants that keep its shape apply (``flips``; for ``d4``, also the half turn). A pixel without a
prediction in one variant (NaN: an ONNX model that predicts the tile's centre only) has none in the average.
"""
import numpy as np

from ..errors import InputError

#: the TTA choices, in the order the Processing parameter lists them
TTA_CHOICES = ("none", "flips", "d4")
#: what each choice is, for the run log
TTA_DESCRIPTIONS = {"none": "none (one pass per tile)",
                    "flips": "flips (3 passes per tile: as it is, flipped left-right, flipped upside down)",
                    "d4": "d4 (8 passes per tile: the 4 rotations by 90°, each with and without a flip)"}

# a variant is (k, flip): flip left-right (the last axis) when ``flip``, then rotate by k x 90° (counter-clockwise)
_VARIANTS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True)),  # rotating a left-right flip by 180° flips it upside down
    "d4": tuple((k, flip) for k in range(4) for flip in (False, True)),
}


def check_tta(tta):
    """``tta`` as one of :data:`TTA_CHOICES` (None: "none"); anything else is refused with the choices."""
    name = "none" if tta is None else str(tta).strip().lower()
    if name not in TTA_CHOICES:
        raise InputError(f"TTA {tta!r} is unknown; use one of {', '.join(TTA_CHOICES)} (none: no test-time "
                         "augmentation, flips: 3 passes, d4: 8 flips and rotations)")
    return name


def tta_variants(tta, square=True):
    """The variants ``(k, flip)`` of a choice: left-right flip when ``flip``, then k rotations by 90°. Without
    ``square`` (a tile whose height and width differ), only those that keep the shape (k even)."""
    variants = _VARIANTS[check_tta(tta)]
    return variants if square else tuple(v for v in variants if v[0] % 2 == 0)


def forward(x, k, flip):
    """Variant ``(k, flip)`` of arrays [..., H, W]: a view."""
    if flip:
        x = x[..., ::-1]
    return np.rot90(x, k, axes=(-2, -1)) if k % 4 else x


def inverse(y, k, flip):
    """The inverse of :func:`forward`: ``inverse(forward(x, k, flip), k, flip)`` is ``x``. A view."""
    if k % 4:
        y = np.rot90(y, -k, axes=(-2, -1))
    return y[..., ::-1] if flip else y


class TTARunner:
    """A probability runner's call with test-time augmentation: the mean of the probabilities of each variant
    of :func:`tta_variants`, transformed back (module docstring)."""

    def __init__(self, runner, tta):
        self.runner = runner
        self.tta = check_tta(tta)
        self.concurrent_batches = getattr(runner, "concurrent_batches", 1)

    def __call__(self, batch):
        variants = tta_variants(self.tta, square=batch.shape[-1] == batch.shape[-2])
        total = None
        for k, flip in variants:
            probs = self.runner(np.ascontiguousarray(forward(batch, k, flip)))
            if probs.ndim >= 4:  # dense [B, K, H, W]: back onto the tile's grid
                probs = inverse(probs, k, flip)
            if total is None:
                total = np.array(probs, dtype=np.float32)  # a copy: the runner's array is not ours to change
            else:
                total += probs
        total /= len(variants)
        return total


def with_tta(runner, tta):
    """``runner`` with test-time augmentation ``tta`` (:data:`TTA_CHOICES`): the runner itself for "none"."""
    tta = check_tta(tta)
    return runner if tta == "none" else TTARunner(runner, tta)


__all__ = ["TTA_CHOICES", "TTA_DESCRIPTIONS", "TTARunner", "check_tta", "tta_variants", "with_tta"]
