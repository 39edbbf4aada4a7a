"""Vectorising class rasters: one polygon per patch, exact areas, class names, mean probability."""
import numpy as np
import pytest
import rasterio

from rs_deep.rs_deep_plugin.engine.models.package import ModelClass
from rs_deep.rs_deep_plugin.engine.inference.segment import segment
from rs_deep.rs_deep_plugin.engine.geo.vectorize import vectorize

from conftest import write_raster

CLASSES = [ModelClass(0, "background", "000000"), ModelClass(1, "building", "E31A1C"),
           ModelClass(2, "road", "777777")]


def _rasters(tmp_path):
    cls = np.zeros((120, 100), np.uint8)
    cls[10:30, 10:40] = 1       # 600 px
    cls[50:60, 70:90] = 1       # 200 px
    cls[80:110, 5:95] = 2       # 2700 px
    cls[0:2, 98:100] = 1        # 4 px: dropped by min area
    cls[115:120, 0:10] = 255    # nodata
    conf = np.where(cls == 0, 0, 200).astype(np.uint8)
    conf[cls == 255] = 0
    conf[10:30, 10:25] = 255    # half of the first building is certain
    c = write_raster(tmp_path / "c.tif", cls, nodata=255)
    k = write_raster(tmp_path / "k.tif", conf)
    return c, k


def test_polygons_areas_names_and_probabilities(tmp_path):
    c, k = _rasters(tmp_path)
    recs = vectorize(str(c), str(k), CLASSES, min_area_m2=10 * 0.25)
    by_area = sorted(recs, key=lambda r: r["area_m2"])
    assert [r["class_name"] for r in by_area] == ["building", "building", "road"]
    assert [r["area_m2"] for r in by_area] == pytest.approx([200 * 0.25, 600 * 0.25, 2700 * 0.25])
    assert by_area[0]["mean_probability"] == pytest.approx(200 / 255)
    assert by_area[1]["mean_probability"] == pytest.approx((255 + 200) / 2 / 255)
    with rasterio.open(c) as ds:
        left, top = ds.transform * (10, 10)
        right, bottom = ds.transform * (40, 30)
    minx, miny, maxx, maxy = by_area[1]["geometry"].bounds
    assert (minx, miny, maxx, maxy) == pytest.approx((left, bottom, right, top))


def test_simplify_keeps_areas_close_and_min_area_filters(tmp_path):
    c, k = _rasters(tmp_path)
    assert len(vectorize(str(c), str(k), CLASSES, min_area_m2=0)) == 4
    recs = vectorize(str(c), str(k), CLASSES, min_area_m2=0, simplify=0.5)
    for r in recs:
        assert r["geometry"].is_valid
        assert r["geometry"].area == pytest.approx(r["area_m2"], rel=0.1)


def test_segment_then_vectorise_covers_exactly_the_class_pixels(rgb_package, rgb_raster, tmp_path):
    res = segment(str(rgb_raster), str(rgb_package), str(tmp_path / "o.tif"), confidence=str(tmp_path / "k.tif"),
                  skip_classes=[0])
    recs = vectorize(res.output, res.confidence, CLASSES[:2], min_area_m2=0)
    total = sum(r["area_m2"] for r in recs)
    assert total == pytest.approx(res.class_pixels[1] * res.pixel_area_m2, rel=1e-6)
    assert all(r["class_id"] == 1 for r in recs)


def test_command_line_with_terminal_progress(rgb_package, rgb_raster, tmp_path, capsys):
    import json
    from rs_deep.rs_deep_plugin.engine.__main__ import main
    rc = main(["segment", str(rgb_raster), str(rgb_package), str(tmp_path / "c.tif"), "--vector",
               str(tmp_path / "v.geojson"), "--min-area", "0"])
    assert rc == 0
    out = capsys.readouterr()
    assert "100.0%" in out.err and "building:" in out.out
    fc = json.load(open(tmp_path / "v.geojson"))
    assert fc["crs"]["properties"]["name"] == "EPSG:32618"
    assert all(f["properties"]["class_name"] == "building" for f in fc["features"])
    assert main(["segment", str(rgb_raster), "/nope", str(tmp_path / "x.tif")]) == 2


def test_polygons_and_means_equal_those_made_one_polygon_at_a_time(tmp_path):
    """The array path (rings gathered from GDAL's polygoniser, polygons made, measured and burnt in whole arrays)
    gives the polygons, areas and mean probabilities of shapely and rasterio called one polygon at a time, on a
    class raster with thousands of patches, holes and patches inside holes."""
    from rasterio.features import rasterize, shapes
    from shapely.geometry import shape
    rng = np.random.default_rng(7)
    cls = (rng.random((300, 260)) < 0.45).astype(np.uint8)  # speckle: thousands of 4-connected patches
    cls[100:200, 50:150] = 2
    cls[120:180, 70:130] = 1    # a hole in the road patch...
    cls[140:160, 90:110] = 2    # ...with an island in it
    cls[0:3, 0:260] = 255       # nodata
    conf = rng.integers(1, 256, cls.shape).astype(np.uint8)
    conf[cls == 255] = 0
    c = write_raster(tmp_path / "c.tif", cls, nodata=255)
    k = write_raster(tmp_path / "k.tif", conf)
    recs = vectorize(str(c), str(k), CLASSES, min_area_m2=0, block_rows=64)
    with rasterio.open(c) as cds, rasterio.open(k) as kds:
        ref = [(shape(g), int(v)) for g, v in shapes(cds.read(1), mask=kds.read(1) > 0, connectivity=4,
                                                      transform=cds.transform)]
        burn = rasterize(((p, i + 1) for i, (p, _) in enumerate(ref)), out_shape=cls.shape,
                         transform=cds.transform, fill=0, dtype="int32")
        pixel_area = abs(cds.transform.a * cds.transform.e)
    assert len(ref) > 3000 and any(len(p.interiors) for p, _ in ref)
    assert len(recs) == len(ref)
    counts = np.maximum(1, np.bincount(burn.ravel()))
    means = np.bincount(burn.ravel(), weights=conf.ravel().astype(np.float64)) / counts
    for i, (r, (poly, value)) in enumerate(zip(recs, ref)):
        assert r["geometry"].equals_exact(poly, 0) and r["class_id"] == value
        assert r["area_m2"] == pytest.approx(poly.area) and r["area_m2"] >= pixel_area * 0.5
        assert r["mean_probability"] == pytest.approx(means[i + 1] / 255)
