"""Detection thresholds: the engine's defaults, the ones a package stores (``rs_deep:score_threshold``,
``rs_deep:iou_threshold``, ``rs_deep:max_detections``) and their checks (used when a package is read and when a
run or a training resolves its options)."""
import math

from ..errors import InputError, ModelPackageError

#: defaults when a package does not store its own (``rs_deep:score_threshold`` ...)
SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 300
PROP_KEYS = {"score_threshold": "rs_deep:score_threshold", "iou_threshold": "rs_deep:iou_threshold",
             "max_detections": "rs_deep:max_detections"}


def _number(value, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if integer and value != int(value):
        return None
    return value


def validate_detection_metadata(props, n_classes, builder_classes, where="model.json: properties"):
    """Checks of model.json specific to detection packages (called by :func:`.package.parse_metadata`)."""
    if builder_classes != n_classes:
        raise ModelPackageError(f"{where}.rs_deep:builder.classes is {builder_classes} but "
                                f"mlm:output[0].classification:classes lists {n_classes} object classes (for "
                                "detection both count the objects only; the background is implicit)")
    for key, lo, hi, integer in (("rs_deep:score_threshold", 0.0, 1.0, False),
                                 ("rs_deep:iou_threshold", 0.0, 1.0, False),
                                 ("rs_deep:max_detections", 1, 100_000, True)):
        if key not in props or props[key] is None:
            continue
        v = _number(props[key], integer)
        if v is None or not lo <= v <= hi or (key == "rs_deep:iou_threshold" and v == 0):
            kind = "an integer" if integer else "a number"
            raise ModelPackageError(f"{where}.{key}: expected {kind} in {lo}..{hi}"
                                    f"{' (above 0)' if key == 'rs_deep:iou_threshold' else ''}, got {props[key]!r}")


def package_defaults(pkg):
    """(score_threshold, iou_threshold, max_detections) stored in the package, or the engine's defaults."""
    props = (pkg.metadata or {}).get("properties", pkg.metadata or {})
    score = props.get(PROP_KEYS["score_threshold"])
    iou = props.get(PROP_KEYS["iou_threshold"])
    maxd = props.get(PROP_KEYS["max_detections"])
    return (float(score) if score is not None else SCORE_THRESHOLD,
            float(iou) if iou is not None else IOU_THRESHOLD,
            int(maxd) if maxd is not None else MAX_DETECTIONS)


def check_thresholds(score, iou, maxd):
    """Validated (score_threshold, iou_threshold, max_detections), or an InputError naming the fix."""
    if _number(score) is None or not 0.0 <= score <= 1.0:
        raise InputError(f"SCORE_THRESHOLD must be between 0 and 1 (boxes scoring less are dropped); got {score!r}")
    if _number(iou) is None or not 0.0 < iou <= 1.0:
        raise InputError(f"IOU_THRESHOLD must be above 0 and at most 1 (overlapping boxes of one class with a "
                         f"larger intersection over union are merged); got {iou!r}")
    if _number(maxd, integer=True) is None or not 1 <= maxd <= 100_000:
        raise InputError(f"MAX_DETECTIONS must be a whole number from 1 to 100000 (objects kept per tile); "
                         f"got {maxd!r}")
    return float(score), float(iou), int(maxd)


def resolve_detection_options(pkg, score_threshold=None, iou_threshold=None, max_detections=None):
    """The thresholds to use: the arguments where given (None = the package's), validated."""
    d_score, d_iou, d_max = package_defaults(pkg)
    return check_thresholds(d_score if score_threshold is None else score_threshold,
                            d_iou if iou_threshold is None else iou_threshold,
                            d_max if max_detections is None else max_detections)
