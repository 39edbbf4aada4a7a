"""Which of the plugin's Python dependencies are importable (QGIS-free, imports nothing heavy)."""
import importlib.util

#: import name -> pip requirement (pinned in requirements.txt)
REQUIRED = {
    "torch": "torch",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "safetensors": "safetensors",
    "rasterio": "rasterio",
    "shapely": "shapely>=2",
}


def missing_dependencies():
    missing = []
    for module, requirement in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    return missing


def missing_message(missing):
    return ("RS Deep needs Python packages that are not installed in QGIS's Python: "
            f"{', '.join(missing)}. In QGIS, use Raster > RS Deep > Install Python dependencies… (it installs "
            "the pinned versions into the plugin's own folder of your profile); or install "
            "them from the plugin's requirements.txt with the Python QGIS uses (python3 -m pip install -r "
            "requirements.txt -c constraints.txt). See the README, section 'Using it in QGIS'.")
