"""Scores from confusion matrices and boxes (numpy only; any layer of the engine may import this module).

* :func:`confusion_matrix` and :func:`metrics_from_confusion`: the pixel metrics of segmentation and
  change, used by training (validation, best epoch) and by the accuracy assessment alike;
* :func:`change_scores`: changed (every class but the first) against not changed;
* :func:`classification_metrics`: patch (scene) classification;
* :func:`multilabel_metrics`, :func:`choose_thresholds`: multi-label patch classification;
* :func:`box_iou`, :func:`detection_metrics`, :func:`average_precision`: boxes.

Conventions: the confusion matrix has the truth (reference) in its rows and the prediction in its columns.
"""
import numpy as np

NOT_LABELLED = 255  # the label value confusion_matrix skips by default (geo.labels.IGNORE)


# --------------------------------------------------------------------------------------------
# pixels


def confusion_matrix(pred, target, n_classes, ignore=NOT_LABELLED):
    """[K, K] counts (rows: truth, columns: prediction) over pixels whose target is not ``ignore``."""
    ok = target != ignore
    idx = target[ok].astype(np.int64) * n_classes + pred[ok].astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(a, b):
    return float(a) / float(b) if b else None


def metrics_from_confusion(cm, class_names=None, values=None, background=0):
    """Per-class and overall metrics from a confusion matrix (rows truth, columns prediction).

    ``values``: the class value of each row (default 0..K-1); ``class_names``: a list (one name per row)
    or a dict ``{value: name}`` (default ``class <value>``). Returns a dict:

    * ``classes``: per row ``{value, name, iou, f1, precision, recall, support (truth pixels), predicted,
      tp, fp, fn}``; a ratio whose denominator is 0 is None (IoU and F1 are None for a class absent from
      both the truth and the prediction);
    * ``class_values``, ``class_names``, ``confusion_matrix`` (lists), ``pixels``;
    * ``overall_accuracy``, ``kappa`` (Cohen's), ``mean_iou`` and ``mean_f1`` over the classes present in
      the truth or the prediction (the accuracy assessment's summary);
    * ``iou``, ``f1``, ``precision``, ``recall``: means over the foreground classes, every class but the
      value ``background`` (all classes when that leaves none): what training watches. There a class
      absent from both the truth and the prediction scores 1 (nothing to find, nothing falsely found)
      and an undefined precision or recall scores 0.
    """
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    values = list(range(k)) if values is None else [int(v) for v in values]
    if isinstance(class_names, dict):
        names = {int(v): str(n) for v, n in class_names.items()}
    else:
        names = {v: str(n) for v, n in zip(values, class_names or [])}
    total = int(cm.sum())
    classes, fg = [], []
    for i, v in enumerate(values):
        tp = int(cm[i, i])
        support, predicted = int(cm[i, :].sum()), int(cm[:, i].sum())
        fp, fn = predicted - tp, support - tp
        present = support + predicted > 0
        classes.append({"value": v, "name": names.get(v, f"class {v}"),
                        "iou": _ratio(tp, tp + fp + fn) if present else None,
                        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if present else None,
                        "precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
                        "support": support, "predicted": predicted, "tp": tp, "fp": fp, "fn": fn})
        if v != background:
            fg.append(_training_scores(tp, fp, fn))
    if not fg:
        fg = [_training_scores(c["tp"], c["fp"], c["fn"]) for c in classes]
    po = float(np.trace(cm)) / total if total else 0.0
    if total:
        pe = float((cm.sum(axis=1).astype(np.float64) * cm.sum(axis=0)).sum()) / (float(total) ** 2)
    else:
        pe = 0.0
    kappa = (po - pe) / (1.0 - pe) if pe < 1.0 else (1.0 if po == 1.0 else 0.0)
    ious = [c["iou"] for c in classes if c["iou"] is not None]
    f1s = [c["f1"] for c in classes if c["f1"] is not None]
    out = {"classes": classes, "class_values": values, "class_names": [c["name"] for c in classes],
           "confusion_matrix": cm.tolist(), "overall_accuracy": po, "kappa": kappa,
           "mean_iou": float(np.mean(ious)) if ious else None, "mean_f1": float(np.mean(f1s)) if f1s else None,
           "pixels": total}
    for j, key in enumerate(("iou", "f1", "precision", "recall")):
        out[key] = float(np.mean([s[j] for s in fg]))
    return out


def _training_scores(tp, fp, fn):
    """(IoU, F1, precision, recall) of one class as training counts them (see :func:`metrics_from_confusion`)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0, 1.0
    return (tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn), tp / (tp + fp) if tp + fp > 0 else 0.0,
            tp / (tp + fn) if tp + fn > 0 else 0.0)


def change_scores(confusion_matrix, class_names=None):
    """Precision, recall, F1 and IoU of "changed" (every class but the first, "no change") against "not
    changed", from a confusion matrix (lists or array; rows truth). Returns ``{precision, recall, f1, iou, tp,
    fp, fn, classes}`` (a ratio with a denominator of 0 is None; ``classes`` names the change classes)."""
    cm = confusion_matrix
    n = len(cm)
    tp = sum(cm[i][j] for i in range(1, n) for j in range(1, n))
    fp = sum(cm[0][j] for j in range(1, n))
    fn = sum(cm[i][0] for i in range(1, n))

    def ratio(a, b):
        return a / b if b else None

    names = list(class_names or [])
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn), "tp": tp, "fp": fp, "fn": fn,
            "classes": ", ".join(names[1:]) or "change"}


# --------------------------------------------------------------------------------------------
# patches


def classification_metrics(cm, class_names):
    """Overall accuracy, macro F1 and per-class precision/recall/F1 from a patch confusion matrix."""
    total = int(cm.sum())
    per = {}
    for i, name in enumerate(class_names):
        tp = float(cm[i, i])
        fp, fn = float(cm[:, i].sum() - tp), float(cm[i, :].sum() - tp)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        per[name] = {"precision": precision, "recall": recall, "f1": f1, "patches": int(cm[i, :].sum())}
    present = [v["f1"] for v in per.values() if v["patches"]] or [0.0]
    return {"accuracy": float(np.trace(cm) / total) if total else 0.0, "macro_f1": float(np.mean(present)),
            "patches": total, "classes": per, "confusion": cm.tolist()}


def multilabel_metrics(truth, predicted, class_names):
    """Multi-label scores of ``predicted`` against ``truth`` (bool [N patches, K classes]).

    Returns ``{classes: {name: {precision, recall, f1, tp, fp, fn, support, predicted}}, micro_precision,
    micro_recall, micro_f1, macro_f1, exact_match, hamming_accuracy, patches}``. Per class a ratio whose
    denominator is 0 is None (F1 None: the class is neither in the truth nor predicted); ``macro_f1`` is the mean
    F1 over the classes where it is defined (0.0 when none is); micro scores pool the counts of every class;
    ``exact_match``: the share of patches whose whole label set is right; ``hamming_accuracy``: the share of
    (patch, class) decisions that are right."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if t.shape != p.shape or t.ndim != 2 or t.shape[1] != len(class_names):
        raise ValueError(f"truth {t.shape} and predicted {p.shape} must both be [patches, {len(class_names)}]")
    tp = (t & p).sum(axis=0)
    fp = (~t & p).sum(axis=0)
    fn = (t & ~p).sum(axis=0)
    per = {}
    for i, name in enumerate(class_names):
        a, b, c = int(tp[i]), int(fp[i]), int(fn[i])
        per[str(name)] = {"precision": _ratio(a, a + b), "recall": _ratio(a, a + c), "f1": _ratio(2 * a, 2 * a + b + c),
                          "tp": a, "fp": b, "fn": c, "support": a + c, "predicted": a + b}
    a, b, c = int(tp.sum()), int(fp.sum()), int(fn.sum())
    f1s = [v["f1"] for v in per.values() if v["f1"] is not None]
    n = t.shape[0]
    return {"classes": per, "micro_precision": _ratio(a, a + b), "micro_recall": _ratio(a, a + c),
            "micro_f1": _ratio(2 * a, 2 * a + b + c) or 0.0, "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "exact_match": float((t == p).all(axis=1).mean()) if n else 0.0,
            "hamming_accuracy": float((t == p).mean()) if n else 0.0, "patches": int(n)}


THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def choose_thresholds(scores, truth, grid=THRESHOLD_GRID, default=0.5):
    """One threshold per class (the column of ``scores`` [N, K] in 0..1): the value of ``grid`` with the best F1 of
    ``scores >= threshold`` against ``truth`` (bool [N, K]); on ties the one closest to ``default``. A class
    without a positive patch in ``truth`` keeps ``default`` (no F1 to choose by)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    out = []
    for k in range(s.shape[1]):
        if not t[:, k].any():
            out.append(float(default))
            continue
        best = None
        for g in grid:
            pred = s[:, k] >= g
            a = int((pred & t[:, k]).sum())
            f1 = 2 * a / (int(pred.sum()) + int(t[:, k].sum()))
            key = (round(f1, 12), -abs(g - default))
            if best is None or key > best[0]:
                best = (key, float(g))
        out.append(best[1])
    return out


# --------------------------------------------------------------------------------------------
# boxes


def box_iou(a, b):
    """[N, M] intersection over union of boxes ``a`` [N, 4] and ``b`` [M, 4] (xmin, ymin, xmax, ymax)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detection_metrics(predictions, truths, iou=0.5, score_threshold=0.0, rotated=None, polygons=None):
    """Precision, recall, F1 (predictions scoring >= ``score_threshold``) and average precision at ``iou``.

    ``predictions``: per image (boxes [N, 4], scores [N], labels [N]); ``truths``: per image
    (boxes [M, 4], labels [M]), in the same coordinates. A prediction is a true positive when
    it overlaps a not yet matched true box of its class with IoU >= ``iou`` (greedy, highest
    score first, as in Pascal VOC). AP is the mean over the classes present in the truth.
    ``rotated``: for rotated boxes [N, 5], the function giving their [N, M] IoU (:func:`..geo.rotated.rotated_iou`;
    this module stays numpy-only); None: axis-aligned boxes. ``polygons``: the objects are outlines (sequences of
    geometries, an instance segmentation's mask polygons) and this function gives their [N, M] IoU
    (:func:`..geo.rotated.polygon_iou`)."""
    iou_of = polygons or rotated or box_iou
    cols = 5 if rotated else 4

    def rows(boxes):
        if polygons:
            return np.asarray(list(boxes), dtype=object).reshape(-1)
        return np.asarray(boxes).reshape(-1, cols)

    records = {}  # class -> list of (score, is_tp)
    n_truth = {}
    for (pb, ps, pl), (tb, tl) in zip(predictions, truths):
        pb, ps, pl = rows(pb), np.asarray(ps).reshape(-1), np.asarray(pl).reshape(-1)
        tb, tl = rows(tb), np.asarray(tl).reshape(-1)
        for c in set(pl.tolist()) | set(tl.tolist()):
            p_idx = np.flatnonzero(pl == c)
            t_idx = np.flatnonzero(tl == c)
            n_truth[c] = n_truth.get(c, 0) + len(t_idx)
            order = p_idx[np.argsort(-ps[p_idx], kind="stable")]
            ious = iou_of(pb[order], tb[t_idx]) if len(t_idx) else np.zeros((len(order), 0))
            matched = np.zeros(len(t_idx), dtype=bool)
            recs = records.setdefault(c, [])
            for r, k in enumerate(order):
                hit = False
                if len(t_idx):
                    cand = np.where(matched, -1.0, ious[r])
                    best = int(np.argmax(cand))
                    if cand[best] >= iou:
                        matched[best] = True
                        hit = True
                recs.append((float(ps[k]), hit))
    tp = fp = 0
    aps = []
    for c, recs in records.items():
        sel = [h for s, h in recs if s >= score_threshold]
        tp += sum(sel)
        fp += len(sel) - sum(sel)
        if n_truth.get(c, 0) > 0:
            aps.append(average_precision(recs, n_truth[c]))
    total = sum(n_truth.values())
    fn = total - tp
    precision = tp / (tp + fp) if tp + fp else (1.0 if total == 0 else 0.0)
    recall = tp / total if total else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "ap": float(np.mean(aps)) if aps else 0.0,
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "truth": int(total), "iou": iou,
            "score_threshold": score_threshold, "rotated": bool(rotated), "masks": bool(polygons)}


def average_precision(records, n_truth):
    """All-point interpolated AP (Pascal VOC 2010+) of ``[(score, is true positive)]`` against ``n_truth`` boxes."""
    if not records:
        return 0.0
    records = sorted(records, key=lambda r: -r[0])
    hits = np.array([h for _, h in records], dtype=np.float64)
    tp = np.cumsum(hits)
    fp = np.cumsum(1 - hits)
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, 1e-9)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


__all__ = ["confusion_matrix", "metrics_from_confusion", "change_scores", "classification_metrics",
           "multilabel_metrics", "choose_thresholds", "box_iou", "detection_metrics", "average_precision"]
