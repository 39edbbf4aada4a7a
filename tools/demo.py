"""make demo: the bundled models on their bundled samples, through qgis_process.

* rs_deep:segment, buildings_demo on atlanta_pan.tif -> demo_output/segmentation.tif + .gpkg
* rs_deep:detect, trees_demo on osbs_029.tif -> demo_output/detections.gpkg (+ detection_centroids.gpkg)
"""
import json
import os
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qgis_env import ROOT, run_qgis_process  # noqa: E402

OUT = os.path.join(ROOT, "demo_output")


def main():
    os.makedirs(OUT, exist_ok=True)
    sample = os.path.join(ROOT, "resources", "sample", "atlanta_pan.tif")
    raster = os.path.join(OUT, "segmentation.tif")
    vector = os.path.join(OUT, "segmentation.gpkg")
    if os.path.exists(vector):
        os.remove(vector)
    t0 = time.time()
    proc = run_qgis_process(["run", "rs_deep:segment", "--json", "--", f"INPUT={sample}", "MODEL=buildings_demo",
                             f"OUTPUT={raster}", f"OUTPUT_VECTOR={vector}"])
    secs = time.time() - t0
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    print(f"rs_deep:segment ran in {secs:.1f} s (qgis_process, including start-up)")
    print("wrote:")
    for key, path in sorted(res["results"].items()):
        print(f"  {key}: {path}")
    import rasterio
    import numpy as np
    with rasterio.open(raster) as ds:
        cls = ds.read(1)
        px = abs(ds.transform.a * ds.transform.e)
        names = json.load(open(os.path.join(ROOT, "resources", "models", "buildings_demo", "model.json")))
        classes = names["properties"]["mlm:output"][0]["classification:classes"]
        print(f"class raster: {ds.width} x {ds.height} px, {ds.crs}, {px:g} m² per pixel")
        print("area per class (raster):")
        for c in classes:
            n = int(np.sum(cls == c["value"]))
            print(f"  {c['name']:<12} {n * px:12,.1f} m²  ({100 * n / cls.size:.1f} %)")
    con = sqlite3.connect(vector)
    table = con.execute("select table_name from gpkg_contents where data_type='features'").fetchone()[0]
    rows = con.execute(f'select class_name, count(*), sum(area_m2), avg(mean_prob) from "{table}" '
                       "group by class_name").fetchall()
    con.close()
    print("polygons (vector):")
    for name, n, area, p in rows:
        print(f"  {name:<12} {n:5d} polygons {area:12,.1f} m²  mean probability {p:.2f}")
    detect_trees()


def detect_trees():
    sample = os.path.join(ROOT, "resources", "sample", "osbs_029.tif")
    boxes = os.path.join(OUT, "detections.gpkg")
    points = os.path.join(OUT, "detection_centroids.gpkg")
    for path in (boxes, points):
        if os.path.exists(path):
            os.remove(path)
    t0 = time.time()
    proc = run_qgis_process(["run", "rs_deep:detect", "--json", "--", f"INPUT={sample}", "MODEL=trees_demo",
                             f"OUTPUT={boxes}", f"OUTPUT_CENTROIDS={points}"])
    secs = time.time() - t0
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    print(f"\nrs_deep:detect ran in {secs:.1f} s (qgis_process, including start-up)")
    print("wrote:")
    for key, path in sorted(res["results"].items()):
        print(f"  {key}: {path}")
    con = sqlite3.connect(boxes)
    table = con.execute("select table_name from gpkg_contents where data_type='features'").fetchone()[0]
    rows = con.execute(f'select class_name, count(*), avg(score), min(score) from "{table}" '
                       "group by class_name").fetchall()
    con.close()
    print("boxes (vector):")
    if not rows:
        print("  none found")
    for name, n, avg, low in rows:
        print(f"  {name:<12} {n:5d} boxes, mean score {avg:.2f}, lowest {low:.2f}")


if __name__ == "__main__":
    main()
