"""Small files (JSON, HTML, CSV, PNG, ONNX, package members) written atomically (QGIS-free)."""
import os
import tempfile


def write_atomic(path, data):
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a hidden temporary file beside it, renamed
    over ``path`` at the end: a failure never leaves a partial file nor clobbers an earlier one. The file is
    readable by all (0644: mkstemp's 0600 would hide shared packages and reports). Returns ``path``."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
