"""Command line for scripts without QGIS, with a terminal progress bar.

    python -m rs_deep.rs_deep_plugin.engine segment scene.tif MODEL classes.tif [--vector out.geojson]
"""
import argparse
import json
import os
import sys
import tempfile

from .errors import RSDeepError
from .files import write_atomic
from .progress import terminal_progress
from .models.tta import TTA_CHOICES
from .tasks import SEGMENTATION, is_background


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m rs_deep.rs_deep_plugin.engine")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="semantic segmentation of a raster")
    s.add_argument("input")
    s.add_argument("model", help="model package folder or .zip")
    s.add_argument("output", help="class raster (.tif)")
    s.add_argument("--probabilities", help="float32 probability raster (.tif)")
    s.add_argument("--vector", help="polygons of each class except background (.geojson)")
    s.add_argument("--bands", help="comma-separated 1-based band numbers, in the model's order")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--tta", default="none", choices=TTA_CHOICES,
                   help="test-time augmentation: none, flips (3x the time) or d4 (flips and 90° rotations, 8x)")
    s.add_argument("--cluster", default=None,
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (N worker processes); "
                        "default: $RS_DEEP_DASK_SCHEDULER, else this process")
    s.add_argument("--block-size", type=int, default=4096, help="with --cluster: block size in pixels (default 4096)")
    s.add_argument("--min-area", type=float, default=None, help="m² (default 10 pixels)")
    s.add_argument("--simplify", type=float, default=None, help="map units (default one pixel)")
    args = ap.parse_args(argv)
    from .models.loading import load_package
    from .geo.raster import area_factor_m2
    from .inference.distributed import default_cluster
    from .inference.segment import segment
    from .geo.vectorize import vectorize
    try:
        pkg = load_package(args.model, task=SEGMENTATION.name)
        conf = None
        if args.vector:
            fd, conf = tempfile.mkstemp(suffix=".tif", prefix="rs_deep_conf_")
            os.close(fd)
        background = [c.value for c in pkg.classes if is_background(c.name)]
        res = segment(args.input, pkg, args.output, probabilities=args.probabilities, confidence=conf,
                      skip_classes=background, device=args.device, batch_size=args.batch_size, tta=args.tta,
                      bands=[int(b) for b in args.bands.split(",")] if args.bands else None,
                      progress=terminal_progress(), log=lambda m: print(m, file=sys.stderr),
                      cluster=default_cluster(args.cluster), block_size=args.block_size)
        for c in pkg.classes:
            print(f"{c.name}: {res.class_pixels.get(c.value, 0) * res.pixel_area_m2:,.1f} m²")
        if args.vector:
            try:
                recs = vectorize(res.output, conf, pkg.classes,
                                 min_area_m2=10 * res.pixel_area_m2 if args.min_area is None else args.min_area,
                                 simplify=abs(res.transform.a) if args.simplify is None else args.simplify,
                                 area_factor=area_factor_m2(res.crs, res.transform, res.width, res.height))
            finally:
                os.remove(conf)
            from shapely.geometry import mapping
            fc = {"type": "FeatureCollection",
                  "features": [{"type": "Feature", "geometry": mapping(r.pop("geometry")), "properties": r}
                               for r in recs]}
            if res.crs is not None:
                fc["crs"] = {"type": "name", "properties": {"name": res.crs.to_string()}}
            write_atomic(args.vector, json.dumps(fc))  # a full disk: an error, and the earlier file untouched
            print(f"{len(recs)} polygons -> {args.vector}")
    except RSDeepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
