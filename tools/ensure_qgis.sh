#!/usr/bin/env bash
# Installs QGIS (and the GDAL-matched rasterio) from the distribution when it is missing.
set -euo pipefail
# libgeos-dev: shapely is built against the GEOS that QGIS uses (two GEOS in one process crash QGIS)
# python3-pyqt6: the static Qt6 (QGIS 4) check of the tests (tools/qt6_check.py) looks names up in the real PyQt6
PKGS="qgis python3-qgis qgis-providers python3-rasterio python3-venv python3-gdal gdal-bin libgeos-dev xvfb python3-pyqt6"
SYS_PY=$(command -p -v python3 || true)
if [ -n "$SYS_PY" ] && "$SYS_PY" -c "import qgis.core, rasterio" 2>/dev/null \
    && command -v qgis_process.bin >/dev/null 2>&1 && command -v gdal_polygonize.py >/dev/null 2>&1 && command -v geos-config >/dev/null 2>&1 \
    && "$SYS_PY" -c "import ensurepip, PyQt6.QtCore" 2>/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  echo "Installing QGIS from the distribution: $PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $PKGS >/dev/null
else
  echo "QGIS (with its Python bindings) is missing. Install it, then run make again:" >&2
  echo "  sudo apt-get install -y $PKGS" >&2
  exit 1
fi
