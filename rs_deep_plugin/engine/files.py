"""Small files (JSON, HTML, CSV, PNG, ONNX, package members) written atomically (QGIS-free)."""
import errno
import os
import uuid

from .errors import InputError

DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_atomic(path, data, name=None):
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a hidden temporary file beside it, synced to
    disk and renamed over ``path`` at the end: a failure never leaves a partial file nor clobbers an earlier one;
    a full disk raises :class:`InputError` naming ``name`` (default ``path``). The file is readable by all (0644:
    mkstemp's 0600 would hide shared packages and reports). Returns ``path``."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    # RS Deep's temporary name (.<stem>.rsdeep-<hex><ext>): a later run removes it if this process is killed
    tmp = os.path.join(folder, f".{stem}.rsdeep-{uuid.uuid4().hex[:8]}{ext}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a network or quota-limited disk may report a full disk only here
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            raise InputError(f"Writing {name or path} failed ({exc.strerror}); disk full? Free space or choose "
                             "another output folder (an earlier file there was left untouched)") from exc
        raise
    return path
