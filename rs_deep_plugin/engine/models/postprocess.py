"""Post-processing of network outputs in numpy (no torch, so that a run of an ONNX model never loads it):
bilinear resizing of class maps (:func:`resize_bilinear`, as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``) and non-maximum suppression of boxes (:func:`nms`, :func:`batched_nms`, the same boxes
as ``torchvision.ops.nms`` / ``batched_nms``)."""
import numpy as np


def linear_taps(n_in, n_out):
    """``(i0, i1, w1)``: output pixel k of a 1-D linear resize from ``n_in`` to ``n_out`` pixels is
    ``x[i0[k]] * (1 - w1[k]) + x[i1[k]] * w1[k]`` (pixel centres aligned, ``align_corners=False``, no
    antialiasing): torch's source index ``(k + 0.5) * (n_in / n_out) - 0.5``, clamped at 0, computed as torch
    computes it for float32 tensors on the CPU (float32, the multiply-add fused: exact in float64, rounded once)."""
    f32 = np.float32
    k = (np.arange(n_out, dtype=f32) + f32(0.5)).astype(np.float64)
    src = np.maximum((k * np.float64(f32(n_in) / f32(n_out)) - 0.5).astype(f32), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    return i0, i1, w1


def resize_bilinear(a, size):
    """``a`` [..., h, w] resized to [..., size[0], size[1]] (float32), as torch's bilinear ``interpolate`` with
    ``align_corners=False`` (to float rounding): along the rows, then the columns, as torch does on the CPU."""
    a = np.asarray(a, dtype=np.float32)
    h, w = a.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return a
    j0, j1, wx = linear_taps(w, out_w)
    a = a[..., j0] * (1.0 - wx) + a[..., j1] * wx
    i0, i1, wy = linear_taps(h, out_h)
    wy = wy[:, None]
    return np.ascontiguousarray(a[..., i0, :] * (1.0 - wy) + a[..., i1, :] * wy, dtype=np.float32)


def box_areas(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def greedy_nms(boxes, areas, order, iou_threshold):
    """Greedy NMS over the boxes ``order`` lists (best first): the kept indices, in that order. A box is
    dropped when its IoU with a kept box is above ``iou_threshold`` (torchvision's arithmetic: an IoU of 0/0,
    between empty boxes, suppresses nothing)."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while len(order):
            i = order[0]
            keep.append(i)
            rest = order[1:]
            w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
            h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
            inter = w * h
            order = rest[~(inter / (areas[i] + areas[rest] - inter) > iou_threshold)]
    return keep


def nms(boxes, scores, iou_threshold):
    """Indices of the boxes [N, 4] (x0, y0, x1, y1) that non-maximum suppression keeps, highest score first
    (equal scores: lower index first), as ``torchvision.ops.nms``."""
    return batched_nms(boxes, scores, np.zeros(len(scores), np.int64), iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold):
    """Class-wise NMS: boxes of different ``idxs`` never suppress each other. Indices kept, highest score first
    (equal scores: lower index first): the boxes ``torchvision.ops.batched_nms`` keeps."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idxs = np.asarray(idxs).reshape(-1)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64)
    areas = box_areas(boxes)
    # by class, then by score (stable: equal scores keep their order, as torchvision's sort)
    order = np.lexsort((np.arange(n), -scores, idxs))
    starts = np.flatnonzero(np.r_[True, idxs[order][1:] != idxs[order][:-1], True])
    sizes = np.diff(starts)
    keep = [order[starts[:-1][sizes == 1]]]  # a class with one box keeps it
    for s, e in zip(starts[:-1][sizes > 1].tolist(), starts[1:][sizes > 1].tolist()):
        keep.append(np.asarray(greedy_nms(boxes, areas, order[s:e], iou_threshold), np.int64))
    keep = np.concatenate(keep).astype(np.int64)
    return keep[np.lexsort((keep, -scores[keep]))]


def nms_over_pairs(scores, candidates, i, j):
    """Greedy NMS when the pairs that suppress each other are known: ``(i[k], j[k])`` for every two of the
    ``candidates`` (indices) whose IoU is above the threshold (same class). The candidates kept, highest
    ``scores`` first (equal scores: lower index first): a box is kept unless a kept box that comes before it is
    paired with it, which is what :func:`batched_nms` keeps, in a time that grows with the pairs, not the
    square of the boxes."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    candidates = np.asarray(candidates, dtype=np.int64).reshape(-1)
    i, j = np.asarray(i, dtype=np.int64).reshape(-1), np.asarray(j, dtype=np.int64).reshape(-1)
    keep = candidates
    if len(i):
        a, b = np.concatenate([i, j]), np.concatenate([j, i])  # both directions, grouped by the first box
        by = np.argsort(a, kind="stable")
        a, b = a[by], b[by]
        linked = np.unique(a)
        first = np.searchsorted(a, linked)
        last = np.r_[first[1:], len(a)]
        rank = np.lexsort((linked, -scores[linked]))
        suppressed = np.zeros(len(scores), dtype=bool)
        kept = []
        for box, f, e in zip(linked[rank].tolist(), first[rank].tolist(), last[rank].tolist()):
            if not suppressed[box]:
                kept.append(box)
                suppressed[b[f:e]] = True
        keep = np.concatenate([np.setdiff1d(candidates, linked), np.asarray(kept, dtype=np.int64)])
    return keep[np.lexsort((keep, -scores[keep]))].astype(np.int64)


def rotated_nms(rboxes, scores, labels, iou_threshold):
    """Class-wise greedy NMS of rotated boxes: the indices kept, highest score first (a box is dropped when its
    rotated IoU with a kept box of its class is above ``iou_threshold``)."""
    from ..geo.rotated import intersecting_pairs, pair_overlaps, rbox_polygons
    rb = np.asarray(rboxes, dtype=np.float64).reshape(-1, 5)
    labels = np.asarray(labels).reshape(-1)
    polys = rbox_polygons(rb)
    i, j = intersecting_pairs(polys)
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    iou, _, _ = pair_overlaps(polys, i, j)
    link = iou > iou_threshold
    return nms_over_pairs(scores, np.arange(len(rb)), i[link], j[link])


__all__ = ["rotated_nms", "resize_bilinear", "nms", "batched_nms", "nms_over_pairs"]
