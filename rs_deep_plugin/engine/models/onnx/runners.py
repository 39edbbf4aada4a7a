"""Runners of ONNX models, with the call of :class:`..runners.ModelRunner` (probabilities),
:class:`..runners.DetectionRunner` (boxes; YOLO outputs decoded by :func:`decode_yolo`, the rotated boxes of YOLO OBB
models by :func:`decode_yolo_obb`) and :class:`..runners.InstanceRunner` (boxes and masks of YOLO segmentation
models, :func:`decode_yolo_seg`)."""
import re
import threading

import numpy as np

from ...errors import InputError, ModelPackageError
from ...limits import MAX_ONNX_WORKING_BYTES, size_text
from ...geo.rotated import normalise_rboxes
from ..postprocess import batched_nms, linear_taps, resize_bilinear, rotated_nms
from .session import SHRINK_EVERY, require_onnxruntime, run_options


#: tiles of a batch run side by side on the CPU (:func:`cpu_lanes`)
LANES = 2


def cpu_lanes(device, pkg):
    """How many tiles of a batch run side by side on ``device``, and the threads of each: on the CPU, a graph that
    takes any batch size runs :data:`LANES` tiles at once, each in its own session on cores / LANES threads
    (``RS_DEEP_THREADS`` or every core): two tiles on one thread each take about 15 % less time and CPU than the
    two tiles on two threads of one session, whose threads wait on each other at every layer (``make bench``,
    2 cores). ``(1, None)`` on a GPU, for fixed-batch graphs and with a single thread."""
    import os
    cores = int(os.environ.get("RS_DEEP_THREADS", "0") or 0) or os.cpu_count() or 1
    if getattr(device, "type", "cpu") != "cpu" or pkg.fixed_batch or cores < LANES:
        return 1, None
    return LANES, cores // LANES


class OnnxRunner:
    def __init__(self, pkg, device):
        self.pkg = pkg
        self.device = device
        self.lanes, self.threads = cpu_lanes(device, pkg)
        # the first lane's session now (it checks the graph runs); the others with the first batch of several
        # tiles: a raster of one tile never creates them (about 50 ms each)
        self.sessions = [pkg.session(device, self.threads)]
        self.pool = None
        self._lane = threading.local()  # per lane thread: its session (:meth:`_lane_run`)
        self._lock = threading.Lock()  # opening the lanes (batches may come from several threads)
        self.input_name = pkg.input_name
        ort = require_onnxruntime()
        self.run_options = (run_options(ort, shrink=False), run_options(ort))  # (most runs, shrinking)
        self.runs = 0

    def close(self):
        """Let the lanes' threads end and drop the sessions (also when the runner is garbage-collected). Until 0.20.1
        the lanes' threads held the runner, so every run of several tiles left two threads and their sessions
        alive: about 50 MB more resident memory per run of the same model in one QGIS session."""
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            pool.shutdown(wait=False)
        self.sessions = []

    def __del__(self):
        self.close()

    def _run_session(self, batch):
        """The session's raw outputs for ``batch``; with several lanes, its tiles split into parts that the lanes take
        from one queue (:meth:`_lane_run`), run at the same time (onnxruntime releases the GIL) and joined again."""
        self.runs += 1
        ro = self.run_options[self.runs == 1 or self.runs % SHRINK_EVERY == 0]
        n = 1 if len(batch) == 1 and self.pool is None else self._open_lanes()
        try:
            if n == 1:
                return self.sessions[0].run(None, {self.input_name: batch}, ro)
            parts = np.array_split(np.arange(len(batch)), min(n, len(batch)))
            futures = [self.pool.submit(self._lane_run, batch[p[0]:p[-1] + 1], ro) for p in parts]
            outs = [f.result() for f in futures]
            return [np.concatenate(o) for o in zip(*outs)]
        except Exception as exc:
            msg = str(exc).strip()
            if any(s in msg for s in ("Available memory of", "Failed to allocate", "bad_alloc")):
                asked = re.search(r"requested bytes of (\d+)", msg)
                node = re.search(r"while running (\w+) node", msg)
                what = f" (its {node.group(1)} node asks for {size_text(int(asked.group(1)))} at once)" \
                    if asked and node else ""
                raise ModelPackageError(
                    f"{self.pkg.source}: running the ONNX model on {len(batch)} tile(s) of {batch.shape[-1]} px needs "
                    f"more working memory than the limit of {size_text(MAX_ONNX_WORKING_BYTES)}{what}. Use "
                    "BATCH_SIZE 1 or a smaller TILE_SIZE; a graph that needs more at its own tile size is "
                    "refused") from exc
            raise ModelPackageError(f"{self.pkg.source}: onnxruntime cannot run the model on tiles of "
                                    f"{list(batch.shape)} ({msg[-300:]})") from exc

    @property
    def concurrent_batches(self):
        """How many batches may be run at once (from as many threads): one per lane. The lanes take the parts of
        every batch submitted from one queue, so a lane slowed by other work (reading, blending, writing on the
        same cores) leaves the next part to the other lane instead of holding its whole batch back."""
        return self.lanes

    def _open_lanes(self):
        """The sessions of every lane and their thread pool, created with the first batch of several tiles (from
        then on every batch runs on the lanes); returns the number of lanes."""
        with self._lock:
            if self.pool is None and self.lanes > 1:
                from concurrent.futures import ThreadPoolExecutor
                self.sessions += [self.pkg.session(self.device, self.threads) for _ in range(self.lanes - 1)]
                free, lane = list(self.sessions), self._lane

                def take_session():  # once in each of the pool's threads (list.pop is atomic); the threads hold this
                    lane.session = free.pop()  # function as long as they live, so it must not hold the runner

                self.pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="rs_deep-onnx", initializer=take_session)
        return self.lanes

    def _lane_run(self, part, ro):
        """Run ``part`` on the session of this lane thread (each of the pool's threads takes one session for good when
        it starts: two parts never share a session, and at most :attr:`lanes` run at once)."""
        return self._lane.session.run(None, {self.input_name: part}, ro)

    def raw(self, batch):
        """The graph's raw outputs (a list) for ``batch`` [B, C, T, T]: the forward pass alone (``make bench``)."""
        return self._run_all(batch)

    def _run(self, batch):
        """Raw first output for batch [B, C, T, T] (chunks of the model's fixed batch size)."""
        return self._run_all(batch)[0]

    def _run_all(self, batch):
        """Raw outputs (a list) for batch [B, C, T, T] (chunks of the model's fixed batch size)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        fixed = self.pkg.fixed_size
        if fixed and tuple(batch.shape[2:]) != tuple(fixed):
            raise InputError(f"This ONNX model takes tiles of exactly {fixed[0]} px; leave TILE_SIZE at the "
                             f"package's value (0), got {batch.shape[2]}")
        fb = self.pkg.fixed_batch
        if not fb or fb == len(batch):
            return self._run_session(batch)
        outs = []
        for i in range(0, len(batch), fb):
            chunk = batch[i:i + fb]
            n = len(chunk)
            if n < fb:
                chunk = np.concatenate([chunk, np.zeros((fb - n,) + chunk.shape[1:], np.float32)])
            outs.append([o[:n] for o in self._run_session(chunk)])
        return [np.concatenate(o) for o in zip(*outs)]


class OnnxSegmentationRunner(OnnxRunner):
    """batch float32 [B, C, T, T] -> class probabilities float32 [B, K, T, T] (like ModelRunner)."""

    def __init__(self, pkg, device=None):
        super().__init__(pkg, device)
        self.kind = pkg.output_kind
        self.activation = pkg.activation

    def __call__(self, batch):
        outs = self._run_all(batch)
        groups = self.pkg.output_groups or [(len(self.pkg.classes), self.pkg.binary_output)]
        if len(outs) < len(groups):
            raise ModelPackageError(f"{self.pkg.source}: the model returned {len(outs)} output(s); expected "
                                    f"{len(groups)}")
        probs = [self._probabilities(np.asarray(o, dtype=np.float32), k, batch.shape[2:])
                 for o, (k, _) in zip(outs, groups)]
        return probs[0] if len(probs) == 1 else np.ascontiguousarray(np.concatenate(probs, axis=1))

    def _probabilities(self, out, k, t):
        """One output [B, K, h, w] or [B, h, w] -> probabilities [B, k, T, T]."""
        if out.ndim == 3:
            out = out[:, None]  # [B, H, W]: one (sigmoid) channel
        if out.ndim != 4 or out.shape[1] not in (k, 1) or (out.shape[1] == 1 and k != 2):
            raise ModelPackageError(f"{self.pkg.source}: the model returned shape {list(out.shape)}; expected "
                                    f"[batch, {k}, height, width] for its {k} classes")
        if not is_centre(out.shape[2:], t) and tuple(out.shape[2:]) != tuple(t):
            out = resize_bilinear(out, t)  # a model predicting at a coarser resolution: its logits, resized
        kind = self.kind
        if kind == "auto":
            lo, hi = float(out.min()), float(out.max())
            probs = lo >= -1e-4 and hi <= 1 + 1e-4 and (
                out.shape[1] == 1 or bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3)))
            kind = "probabilities" if probs else "logits"
        if kind == "logits":
            if out.shape[1] == 1 or self.activation == "sigmoid":
                out = 1.0 / (1.0 + np.exp(-out))
            else:
                out = out if out.flags.writeable else out.copy()  # the runner's own array: in place
                out -= out.max(axis=1, keepdims=True)
                np.exp(out, out=out)
                out /= out.sum(axis=1, keepdims=True)
        if out.shape[1] == 1:
            p = np.clip(out, 0.0, 1.0)
            out = np.concatenate([1.0 - p, p], axis=1)
        return np.ascontiguousarray(place_output(out, t), dtype=np.float32)


class OnnxRasterRunner(OnnxRunner):
    """Regression and super-resolution: batch float32 [B, C, T, T] -> raw values float32 [B, K, s x T, s x T], the
    channels of every output side by side (an output [B, H, W] is one channel), ``s`` the package's scale; an
    output that covers only the tile's centre is placed there (NaN around it, :func:`place_output`)."""

    def __call__(self, batch):
        s = self.pkg.scale
        t = (batch.shape[2] * s, batch.shape[3] * s)
        channels = []
        for out in self._run_all(batch):
            out = np.asarray(out, dtype=np.float32)
            out = out[:, None] if out.ndim == 3 else out
            if out.ndim != 4 or len(out) != len(batch):
                raise ModelPackageError(f"{self.pkg.source}: the model returned shape {list(out.shape)}; a "
                                        f"{self.pkg.task} model returns [batch, channels, height, width] or [batch, "
                                        "height, width]")
            if tuple(out.shape[2:]) != t and not is_centre(out.shape[2:], t):
                out = resize_bilinear(out, t)
            channels.append(place_output(out, t))
        out = np.concatenate(channels, axis=1) if len(channels) > 1 else channels[0]
        if out.shape[1] != len(self.pkg.classes):
            raise ModelPackageError(f"{self.pkg.source}: the model returned {out.shape[1]} channel(s); its metadata "
                                    f"names {len(self.pkg.classes)}")
        return np.ascontiguousarray(out, dtype=np.float32)


class OnnxEmbeddingRunner(OnnxRunner):
    """Recognition: batch float32 [B, C, T, T] -> one embedding per image, float32 [B, D]."""

    def __call__(self, batch):
        out = np.asarray(self._run(batch), dtype=np.float32)
        d = self.pkg.builder["classes"]
        if out.ndim != 2 or len(out) != len(batch) or out.shape[1] != d:
            raise ModelPackageError(f"{self.pkg.source}: the model returned shape {list(out.shape)}; a recognition "
                                    f"model returns one embedding of {d} values per image [batch, {d}]")
        return np.ascontiguousarray(out)


def is_centre(size, t):
    """Whether an output of ``size`` (h, w) covers only the centre of a tile of ``t`` (T, T): smaller, and not a
    whole number of times smaller (that is a coarser prediction of the whole tile, resized)."""
    (h, w), (th, tw) = size, t
    return h < th and w < tw and bool(th % h or tw % w)


def place_output(out, t):
    """Probabilities [B, K, h, w] on the tile's grid [B, K, T, T]. A smaller output that is not a coarser prediction
    (:func:`is_centre`: a network without padding, e.g. 512 -> 484 px) covers the tile's centre, as in Deepness:
    it is placed there and its border is NaN (no prediction: the segmentation pipeline gives those pixels no
    weight, so the neighbouring tiles fill them)."""
    h, w = out.shape[2:]
    if not is_centre((h, w), t):
        return out
    th, tw = t
    placed = np.full(out.shape[:2] + (th, tw), np.nan, dtype=np.float32)
    y, x = (th - h) // 2, (tw - w) // 2
    placed[:, :, y:y + h, x:x + w] = out
    return placed


def decode_yolo(raw, det_type, score_threshold, iou_threshold, max_detections, n_classes=None):
    """One image's raw YOLO output -> (boxes [n, 4] x0, y0, x1, y1 float64, labels [n] 0-based, scores [n]).

    * ``YOLO_v5_or_v7_default``: [N, 5 + C] (cx, cy, w, h, objectness, class scores); the score is the
      objectness and the class the best class score (as Deepness decodes it);
    * ``YOLO_v6``: [N, 5 + C]; the score is the best class score (the objectness slot is ignored);
    * ``YOLO_Ultralytics`` / ``YOLO_v9`` (v8+): [4 + C, N] (cx, cy, w, h, class scores; no objectness).

    Boxes scoring at least ``score_threshold`` go through class-wise NMS (:func:`..postprocess.batched_nms`, the
    boxes of ``torchvision.ops.batched_nms``); the ``max_detections`` best are kept.
    """
    a = np.asarray(raw, dtype=np.float64)
    if det_type in ("YOLO_Ultralytics", "YOLO_v9"):
        a = a.T
        cls = a[:, 4:]
        scores = cls.max(axis=1) if cls.shape[1] else np.zeros(len(a))
    elif det_type == "YOLO_v6":
        cls = a[:, 5:]
        scores = cls.max(axis=1) if cls.shape[1] else a[:, 4]
    else:
        cls = a[:, 5:]
        scores = a[:, 4]
    labels = cls.argmax(axis=1) if cls.shape[1] else np.zeros(len(a), dtype=np.int64)
    keep = scores >= score_threshold
    if n_classes:
        keep &= labels < n_classes
    a, scores, labels = a[keep], scores[keep], labels[keep].astype(np.int64)
    boxes = np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2],
                     axis=1) if len(a) else np.zeros((0, 4))
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(axis=1)
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    if len(boxes):
        k = batched_nms(boxes, scores, labels, float(iou_threshold))[:int(max_detections)]
        boxes, scores, labels = boxes[k], scores[k], labels[k]
    return boxes.reshape(-1, 4), labels, scores


#: rows of a YOLO output kept for NMS at most, the best scores (Ultralytics' ``max_nms``)
MAX_NMS_ROWS = 30000


def ultralytics_candidates(raw, score_threshold, n_classes):
    """The rows of an Ultralytics (v8+) output [4 + C + extra, N] whose best class score is at least
    ``score_threshold``: ``(rows [n, 4 + C + extra], scores [n], labels [n] 0-based)``, at most
    :data:`MAX_NMS_ROWS`, best first. The C = ``n_classes`` class scores follow cx, cy, w, h."""
    a = np.asarray(raw, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 4 + n_classes:
        raise ModelPackageError(f"the YOLO output has shape {list(a.shape)}; expected [4 + {n_classes} classes (+ "
                                "extra values), boxes]")
    a = a.T
    cls = a[:, 4:4 + n_classes]
    scores = cls.max(axis=1) if n_classes else np.zeros(len(a))
    labels = cls.argmax(axis=1).astype(np.int64) if n_classes else np.zeros(len(a), dtype=np.int64)
    keep = np.flatnonzero((scores >= score_threshold) & np.isfinite(a[:, :4]).all(axis=1))
    keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_NMS_ROWS]]
    return a[keep], scores[keep], labels[keep]


def decode_yolo_obb(raw, score_threshold, iou_threshold, max_detections, n_classes):
    """One image's raw YOLO OBB output (Deepness ``YOLO_Ultralytics_obb``, Ultralytics' OBB head) [4 + C + 1, N]:
    cx, cy, w, h, C class scores and the angle in radians of the side ``w`` (x to the right, y down: clockwise on
    the screen; Ultralytics' ``xywhr``) -> (rotated boxes [n, 5] cx, cy, length, width, theta of
    :mod:`...geo.rotated`, labels [n] 0-based, scores [n]). Rows scoring at least ``score_threshold`` go through
    class-wise rotated NMS (:func:`..postprocess.rotated_nms`, rotated IoU above ``iou_threshold``); the
    ``max_detections`` best are kept."""
    a, scores, labels = ultralytics_candidates(raw, score_threshold, n_classes)
    if a.shape[1] < 5 + n_classes:
        raise ModelPackageError(f"the YOLO OBB output has {a.shape[1]} values per box; expected 4 + {n_classes} "
                                "classes + 1 angle")
    rb = np.stack([a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4 + n_classes]], axis=1)
    ok = (rb[:, 2] > 0) & (rb[:, 3] > 0) & np.isfinite(rb).all(axis=1)
    rb, scores, labels = normalise_rboxes(rb[ok]), scores[ok], labels[ok]  # long side first, angle in [0, pi)
    if len(rb):
        k = rotated_nms(rb, scores, labels, float(iou_threshold))[:int(max_detections)]
        rb, scores, labels = rb[k], scores[k], labels[k]
    return rb.reshape(-1, 5), labels, scores


class BoxMasks:
    """Object masks [n, T, T] bool kept as the parts inside their boxes (memory: the boxes' areas, not n tiles):
    ``masks[k]`` is object k's whole tile mask, made when asked (:func:`..inference.instances.tile_instances` asks
    for the objects it keeps); ``np.asarray(masks)`` makes them all."""

    def __init__(self, size, crops, offsets):
        self.size, self.crops, self.offsets = int(size), crops, offsets  # offsets: (row, col) of each crop

    @property
    def shape(self):
        return (len(self.crops), self.size, self.size)

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, k):
        full = np.zeros((self.size, self.size), dtype=bool)
        crop, (r, c) = self.crops[int(k)], self.offsets[int(k)]
        full[r:r + crop.shape[0], c:c + crop.shape[1]] = crop
        return full

    def __array__(self, dtype=None, copy=None):
        out = np.zeros(self.shape, dtype=bool)
        for k in range(len(self)):
            out[k] = self[k]
        return out if dtype is None else out.astype(dtype)


def decode_yolo_seg(raw, protos, size, score_threshold, iou_threshold, max_detections, n_classes,
                    mask_threshold=0.5):
    """One image's raw YOLO segmentation outputs (Deepness ``YOLO_Ultralytics_segmentation``, Ultralytics' Segment
    head): rows [4 + C + M, N] (cx, cy, w, h, C class scores, M mask coefficients) and prototypes [M, h, w] ->
    (boxes [n, 4] x0, y0, x1, y1, labels [n] 0-based, scores [n], masks [n, T, T] bool (:class:`BoxMasks`),
    T = ``size``).

    Boxes go through class-wise NMS as in :func:`decode_yolo`; each kept object's mask is
    ``sigmoid(coefficients @ prototypes)``, resized bilinearly to the tile (as :func:`..postprocess.resize_bilinear`
    does, computed for the pixels of its box only), cut to its box (the pixels whose index lies in [x0, x1) x
    [y0, y1), Ultralytics' ``crop_mask``) and thresholded at ``mask_threshold`` (0.5, as Deepness and Ultralytics)."""
    protos = np.asarray(protos, dtype=np.float32)
    a, scores, labels = ultralytics_candidates(raw, score_threshold, n_classes)
    m, mh, mw = protos.shape
    if a.shape[1] != 4 + n_classes + m:
        raise ModelPackageError(f"the YOLO segmentation output has {a.shape[1]} values per box; expected 4 + "
                                f"{n_classes} classes + {m} mask coefficients (the prototypes' channels)")
    boxes = np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2],
                     axis=1) if len(a) else np.zeros((0, 4))
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    a, boxes, scores, labels = a[ok], boxes[ok], scores[ok], labels[ok]
    if len(boxes):
        k = batched_nms(boxes, scores, labels, float(iou_threshold))[:int(max_detections)]
        a, boxes, scores, labels = a[k], boxes[k], scores[k], labels[k]
    t = int(size)
    coeffs = a[:, 4 + n_classes:].astype(np.float32)
    (j0, j1, wx), (i0, i1, wy) = linear_taps(mw, t), linear_taps(mh, t)
    # the pixels of each box: index >= x0 and < x1, within the tile
    c0, c1, r0, r1 = (np.clip(np.ceil(boxes[:, i]), 0, t).astype(np.int64) for i in (0, 2, 1, 3))
    crops, offsets = [], []
    for k in range(len(boxes)):
        cols, rows = slice(c0[k], max(c0[k], c1[k])), slice(r0[k], max(r0[k], r1[k]))
        if cols.start == cols.stop or rows.start == rows.stop:
            crops.append(np.zeros((0, 0), dtype=bool))
        else:  # the prototypes' cells the box's pixels interpolate between, then the bilinear taps of those pixels
            pc0, pc1 = int(j0[cols].min()), int(j1[cols].max()) + 1
            pr0, pr1 = int(i0[rows].min()), int(i1[rows].max()) + 1
            logits = coeffs[k] @ protos[:, pr0:pr1, pc0:pc1].reshape(m, -1)
            p = (1.0 / (1.0 + np.exp(-logits))).reshape(pr1 - pr0, pc1 - pc0).astype(np.float32)
            p = p[:, j0[cols] - pc0] * (1.0 - wx[cols]) + p[:, j1[cols] - pc0] * wx[cols]
            p = p[i0[rows] - pr0, :] * (1.0 - wy[rows])[:, None] + p[i1[rows] - pr0, :] * wy[rows][:, None]
            crops.append(p >= mask_threshold)
        offsets.append((rows.start, cols.start))
    return boxes.reshape(-1, 4), labels, scores, BoxMasks(t, crops, offsets)


class OnnxDetectionRunner(OnnxRunner):
    """batch float32 [B, C, T, T] -> per tile (boxes [n, 4] tile pixels, labels 0-based, scores), like
    :class:`.detect.DetectionRunner`."""

    def __init__(self, pkg, device, score_threshold, iou_threshold, max_detections):
        super().__init__(pkg, device)
        self.score, self.iou, self.maxd = score_threshold, iou_threshold, max_detections

    def __call__(self, batch):
        out = np.asarray(self._run(batch))
        if out.ndim != 3 or len(out) != len(batch):
            raise ModelPackageError(f"{self.pkg.source}: the detector returned shape {list(out.shape)}; expected "
                                    f"[batch, boxes, values] ({self.pkg.det_type})")
        n = len(self.pkg.classes)
        if self.pkg.oriented:  # YOLO OBB: rotated boxes [n, 5]
            return [self._decoded(decode_yolo_obb, o, self.score, self.iou, self.maxd, n) for o in out]
        return [decode_yolo(o, self.pkg.det_type, self.score, self.iou, self.maxd, n) for o in out]

    def _decoded(self, decode, *args):
        try:
            return decode(*args)
        except ModelPackageError as exc:
            raise ModelPackageError(f"{self.pkg.source}: {exc} ({self.pkg.det_type})") from exc


class OnnxInstanceRunner(OnnxDetectionRunner):
    """A YOLO segmentation model (``YOLO_Ultralytics_segmentation``): batch float32 [B, C, T, T] -> per tile
    (boxes [n, 4] tile pixels, labels 0-based, scores, masks [n, T, T] bool), like
    :class:`..runners.InstanceRunner`; :func:`decode_yolo_seg` decodes each tile."""

    mask_threshold = 0.5  # as Deepness and Ultralytics

    def __call__(self, batch):
        outs = [np.asarray(o) for o in self._run_all(batch)]
        rows = [o for o in outs if o.ndim == 3]
        protos = [o for o in outs if o.ndim == 4]
        if len(rows) != 1 or len(protos) != 1 or len(rows[0]) != len(batch) or len(protos[0]) != len(batch):
            raise ModelPackageError(f"{self.pkg.source}: the model returned outputs of shapes "
                                    f"{[list(o.shape) for o in outs]}; a {self.pkg.det_type} model returns rows "
                                    "[batch, 4 + classes + M, boxes] and mask prototypes [batch, M, height, width]")
        t, n = batch.shape[-1], len(self.pkg.classes)
        return [self._decoded(decode_yolo_seg, r, p, t, self.score, self.iou, self.maxd, n, self.mask_threshold)
                for r, p in zip(rows[0], protos[0])]
