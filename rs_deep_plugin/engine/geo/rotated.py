"""Rotated (oriented) boxes: conversions, rotated IoU and rotated NMS (QGIS-free; numpy and vectorised shapely 2).

A rotated box is a row ``(cx, cy, length, width, theta)``: its centre, its long side (``length``) and its short
side (``width``), and ``theta`` the direction of the long side in radians, in ``[0, pi)``, measured in the box's
own coordinates (pixels: x to the right, y down, so a growing theta turns clockwise on the screen). A rectangle
has one such row (the long side named first, the angle modulo 180 degrees); a square's angle is taken modulo 90
degrees, in ``[0, pi / 2)``.

Label polygons become rotated boxes through their minimum rotated rectangle (:func:`polygons_to_rboxes`,
shapely's ``minimum_rotated_rectangle``). Rotated IoU is the area of the intersection of the two rectangles
over the area of their union, computed with shapely on the pairs whose envelopes meet (an STRtree query, so
the work grows with the overlapping pairs, not the square of the boxes).
"""
import numpy as np

#: sides within this relative difference are a square (the angle is then taken modulo 90 degrees)
SQUARE_TOLERANCE = 1e-6


def rbox_corners(rboxes):
    """The four corners [N, 4, 2] of rotated boxes [N, 5], in order around the box (first along the long side)."""
    rb = np.asarray(rboxes, dtype=np.float64).reshape(-1, 5)
    cx, cy, length, width, t = rb.T
    ux, uy = np.cos(t), np.sin(t)  # along the long side
    vx, vy = -uy, ux  # along the short side
    hl, hw = length / 2, width / 2
    corners = []
    for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        corners.append(np.stack([cx + a * hl * ux + b * hw * vx, cy + a * hl * uy + b * hw * vy], axis=1))
    return np.stack(corners, axis=1)


def corners_to_rboxes(corners):
    """Rotated boxes [N, 5] of rectangles given by their corners [N, 4, 2] (in order around the rectangle, either
    way); the long side is the length, the angle that of the long side in [0, pi) (a square's in [0, pi / 2))."""
    q = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2)
    centre = q.mean(axis=1)
    e0 = q[:, 1] - q[:, 0]
    e1 = q[:, 2] - q[:, 1]
    l0, l1 = np.hypot(e0[:, 0], e0[:, 1]), np.hypot(e1[:, 0], e1[:, 1])
    first = l0 >= l1
    edge = np.where(first[:, None], e0, e1)
    length, width = np.maximum(l0, l1), np.minimum(l0, l1)
    theta = np.mod(np.arctan2(edge[:, 1], edge[:, 0]), np.pi)
    square = (length - width) <= SQUARE_TOLERANCE * np.maximum(length, 1e-12)
    theta = np.where(square, np.mod(theta, np.pi / 2), theta)
    theta = np.where(theta >= np.pi - 1e-12, 0.0, theta)
    return np.stack([centre[:, 0], centre[:, 1], length, width, theta], axis=1)


def normalise_rboxes(rboxes):
    """Rotated boxes in the one form of this module (long side first, angle in [0, pi))."""
    return corners_to_rboxes(rbox_corners(rboxes))


def rbox_envelopes(rboxes):
    """Axis-aligned envelopes [N, 4] (xmin, ymin, xmax, ymax) of rotated boxes [N, 5]."""
    c = rbox_corners(rboxes)
    return np.concatenate([c.min(axis=1), c.max(axis=1)], axis=1).reshape(-1, 4)


def rbox_polygons(rboxes):
    """Shapely polygons (an array) of rotated boxes [N, 5]."""
    import shapely
    c = rbox_corners(rboxes)
    return shapely.polygons(np.concatenate([c, c[:, :1]], axis=1))


def polygons_to_rboxes(geometries, where="labels"):
    """Rotated boxes [N, 5] of shapely geometries: each one's minimum rotated rectangle. Geometries without an
    area (points, lines, empty ones) raise a ValueError naming the first (the caller words the fix)."""
    import shapely
    geoms = np.asarray(list(geometries), dtype=object).reshape(-1)
    if not len(geoms):
        return np.zeros((0, 5))
    area = shapely.area(geoms)
    bad = np.flatnonzero(~(area > 0))
    if len(bad):
        g = geoms[bad[0]]
        kind = "an empty geometry" if g is None or g.is_empty else f"a {g.geom_type} (no area)"
        raise ValueError(f"{where}: feature {int(bad[0])} is {kind}; {len(bad)} of {len(geoms)} features are not "
                         "polygons")
    rects = shapely.minimum_rotated_rectangle(geoms)
    coords = shapely.get_coordinates(rects).reshape(len(geoms), 5, 2)[:, :4]
    return corners_to_rboxes(coords)


def transform_rboxes(rboxes, fn):
    """Rotated boxes after the point mapping ``fn(x, y) -> (x', y')`` (an affine map: a shift, a scale, a quarter
    turn, a flip, a pixel-to-map transform) applied to their corners."""
    c = rbox_corners(rboxes)
    x, y = fn(c[..., 0], c[..., 1])
    return corners_to_rboxes(np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=-1))


def intersecting_pairs(polys_a, polys_b=None):
    """Index pairs (i, j) of polygons of ``polys_a`` and ``polys_b`` whose envelopes meet; without ``polys_b``,
    the pairs i < j within ``polys_a``."""
    import shapely
    a = np.asarray(polys_a, dtype=object)
    b = a if polys_b is None else np.asarray(polys_b, dtype=object)
    if not len(a) or not len(b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = shapely.STRtree(b)
    i, j = tree.query(a)  # envelopes meet
    if polys_b is None:
        keep = i < j
        i, j = i[keep], j[keep]
    return i.astype(np.int64), j.astype(np.int64)


def pair_overlaps(polys, i, j):
    """(IoU, intersection / area of polygon i, intersection / area of polygon j) of the pairs (i, j)."""
    import shapely
    polys = np.asarray(polys, dtype=object)
    if not len(i):
        z = np.zeros(0)
        return z, z, z
    inter = shapely.area(shapely.intersection(polys[i], polys[j]))
    area = shapely.area(polys)
    ai, aj = area[i], area[j]
    union = ai + aj - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        ioa_i = np.where(ai > 0, inter / np.where(ai > 0, ai, 1), 0.0)
        ioa_j = np.where(aj > 0, inter / np.where(aj > 0, aj, 1), 0.0)
    return iou, ioa_i, ioa_j


def rotated_iou(a, b):
    """[N, M] rotated IoU of rotated boxes ``a`` [N, 5] and ``b`` [M, 5] (0 where the boxes do not overlap)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 5)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 5)
    return polygon_iou(rbox_polygons(a), rbox_polygons(b))


def polygon_iou(pa, pb):
    """[N, M] IoU of shapely polygons ``pa`` and ``pb`` (sequences; 0 where they do not overlap): rotated boxes,
    and the outlines of instance masks."""
    import shapely
    pa, pb = np.asarray(pa, dtype=object).reshape(-1), np.asarray(pb, dtype=object).reshape(-1)
    out = np.zeros((len(pa), len(pb)))
    i, j = intersecting_pairs(pa, pb)
    if len(i):
        inter = shapely.area(shapely.intersection(pa[i], pb[j]))
        union = shapely.area(pa)[i] + shapely.area(pb)[j] - inter
        out[i, j] = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return out


def map_rboxes(transform, rboxes):
    """Pixel rotated boxes [N, 5] -> (map corners [N, 4, 2], map rotated boxes [N, 5]) through the affine
    ``transform`` (the map boxes' angle is in map axes: x east, y north, counter-clockwise)."""
    from .raster import apply_affine
    c = rbox_corners(rboxes)
    x, y = apply_affine(transform, c[..., 0], c[..., 1])
    mc = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=-1)
    return mc, corners_to_rboxes(mc)


def azimuth_degrees(map_theta):
    """The direction of a map box's long side (``theta`` counter-clockwise from the x axis, map axes) as degrees
    clockwise from grid north, in [0, 180)."""
    return np.mod(90.0 - np.degrees(np.asarray(map_theta, dtype=np.float64)), 180.0)


__all__ = ["rbox_corners", "corners_to_rboxes", "normalise_rboxes", "rbox_envelopes", "rbox_polygons",
           "polygons_to_rboxes", "transform_rboxes", "intersecting_pairs", "pair_overlaps", "rotated_iou", "polygon_iou",
           "map_rboxes", "azimuth_degrees"]
