# RS Deep: developer commands. `make demo` and `make test` set everything up first.
SHELL := /bin/bash
# QGIS's own Python (Debian's system interpreter), not the first python3 on PATH
SYS_PY := $(shell command -p -v python3)
VENV := .venv
PY := $(VENV)/bin/python
QGIS_PROCESS := $(shell command -v qgis_process.bin 2>/dev/null || command -v qgis_process 2>/dev/null || echo qgis_process.bin)
export QT_QPA_PLATFORM ?= offscreen
export QGIS_PLUGINPATH := $(CURDIR)/build/dev-plugins
export QGIS_CUSTOM_CONFIG_PATH := $(CURDIR)/build/qgis-profile
export RS_DEEP_QGIS_PROCESS := $(QGIS_PROCESS)

.PHONY: setup qgis demo demo-model eval-models eval-multilabel eval-instances compare-rf eval-trees eval-similar screenshot test test-qgis344 qt6-check eval bench bench-dask bench-peers bench-train package clean help

help:
	@echo "make demo        segment the bundled sample with the bundled model (via qgis_process)"
	@echo "make test        run the test suite (on the samples in tests/data; needs nothing beside the checkout)"
	@echo "make test-qgis344 the same suite on QGIS 3.44 LTR (Python 3.13, numpy 2, GDAL 3.10) in a Debian trixie chroot"
	@echo "                 that it builds once (root, ~10 min; RS_DEEP_CHROOT, default /var/cache/rs_deep/trixie-qgis344)"
	@echo "make qt6-check   static QGIS 4 / Qt6 check of the code against PyQt6 (also part of make test)"
	@echo "make eval        run tests/eval: change detection on the research-only LEVIR-CD samples (../shared/data)"
	@echo "make setup       install QGIS (if missing, as root) and the pinned Python packages into .venv"
	@echo "make bench       benchmark detection (4096^2) and segmentation (8192^2) on generated rasters (CPU)"
	@echo "make bench-peers RS Deep vs GeoDeep (pip, own venv in build/peers) on the same ONNX model and 4096^2 raster"
	@echo "make bench-train training crops/s of rs_deep:train's default networks in float32 and in bfloat16"
	@echo "make bench-dask  segmentation (8192^2) in one process vs a Dask LocalCluster of 1 and 2 workers (CPU)"
	@echo "make package     build dist/rs_deep.zip for QGIS's plugin manager"
	@echo "make demo-model  retrain the bundled buildings demo model"
	@echo "make eval-models train the change and patch models that may not ship (build/models)"
	@echo "make eval-multilabel multi-label crop groups per 160 m patch: trained on the left, scored on the right of fields_denmark"
	@echo "make compare-rf  U-Net (rs_deep:train defaults) vs per-pixel random forest on held-out areas of ../shared/data"
	@echo "make eval-trees  tree detection on an unseen NEON site; fine-tuning vs scratch by number of labels"
	@echo "make eval-similar similarity search: building patches found on an unseen area (trained vs random encoder)"
	@echo "make eval-instances Mask R-CNN building polygons on held-back columns of buildings_atlanta (mask IoU), vs a"
	@echo "                 detector's boxes; EVAL_INSTANCES_ARGS=\"--minutes 6 --baseline-minutes 3\""
	@echo "make screenshot  QGIS under Xvfb with the dock and a result -> docs/screenshot.png"

setup: $(VENV)/.rs_deep-installed build/dev-plugins/rs_deep

qgis:
	@bash tools/ensure_qgis.sh

$(VENV)/.rs_deep-installed: requirements.txt requirements-dev.txt | qgis
	@test -x $(PY) || $(SYS_PY) -m venv --system-site-packages $(VENV)
	@$(SYS_PY) -c 'import numpy; print("numpy==" + numpy.__version__)' > constraints.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-cache-dir --no-binary shapely -c constraints.txt -r requirements-dev.txt
	$(PY) -c "import qgis.core, torch, torchvision, segmentation_models_pytorch, rasterio, shapely, safetensors, pytest_qgis; print('RS Deep environment ready: torch', torch.__version__, '| rasterio', rasterio.__version__, '| numpy', __import__('numpy').__version__)"
	@touch $@

# the development link: QGIS (QGIS_PLUGINPATH) and the tests import the repo as package `rs_deep`
build/dev-plugins/rs_deep:
	@mkdir -p build/dev-plugins
	@ln -sfn ../.. $@

demo: setup
	$(PY) tools/demo.py

demo-model: setup
	$(PY) tools/make_demo_model.py

eval-models: setup
	$(PY) tools/make_eval_models.py

compare-rf: setup
	$(PY) tools/compare_rf.py

eval-trees: setup
	$(PY) tools/eval_trees.py

eval-similar: setup
	$(PY) tools/eval_similar.py

eval-multilabel: setup
	$(PY) tools/eval_multilabel.py

eval-instances: setup
	$(PY) tools/eval_instances.py $(EVAL_INSTANCES_ARGS)

screenshot: setup
	$(PY) tools/screenshot.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-qgis344:
	bash tools/qgis_chroot.sh test

qt6-check: qgis
	$(SYS_PY) tools/qt6_check.py

eval: setup
	$(PY) -m pytest tests/eval

bench: setup
	$(PY) tools/bench_detect.py
	$(PY) tools/bench.py

bench-dask: setup
	$(PY) tools/bench_dask.py $(BENCH_ARGS)

bench-peers: setup
	$(PY) tools/bench_peers.py $(BENCH_ARGS)

bench-train: setup
	$(PY) tools/bench_train.py

package:
	$(SYS_PY) tools/package.py

clean:
	rm -rf build dist demo_output
