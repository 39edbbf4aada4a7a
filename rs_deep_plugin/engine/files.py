"""Small files (JSON, HTML, CSV, PNG, ONNX, package members) written atomically, and RS Deep's temporary names
(QGIS-free)."""
import errno
import json
import os
import uuid

from .errors import InputError

DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temp_path(final, ext=None):
    """A hidden temporary path beside ``final``: ``.<stem>.rsdeep-<hex><ext>`` (``ext``: default final's). A later
    run into the same folder removes such names left by a killed run (``outputs.sweep_stale``)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(final)))
    stem, own = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.rsdeep-{uuid.uuid4().hex[:8]}{own if ext is None else ext}")


class StagedFile:
    """A small file (bytes) written to a hidden temporary file beside ``final``, synced; renamed by commit()."""

    def __init__(self, final, data, name=None):
        self.final = os.path.abspath(os.fspath(final))
        self.tmp = temp_path(self.final)
        if isinstance(data, str):
            data = data.encode("utf-8")
        try:
            with open(self.tmp, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise InputError(f"Writing {name or self.final} failed ({exc.strerror}); disk full? Free space or "
                                 "choose another output folder (earlier outputs were left untouched)") from exc
            if isinstance(exc, OSError):
                raise InputError(f"Cannot write {name or self.final}: {exc.strerror or exc}") from exc
            raise

    def commit(self):
        os.replace(self.tmp, self.final)

    def discard(self):
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


def write_atomic(path, data, name=None):
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a hidden temporary file beside it, synced to
    disk and renamed over ``path`` at the end: a failure never leaves a partial file nor clobbers an earlier one;
    a full disk raises :class:`InputError` naming ``name`` (default ``path``). The file is readable by all (0644:
    mkstemp's 0600 would hide shared packages and reports). Returns ``path``."""
    staged = StagedFile(path, data, name)
    try:
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return os.fspath(path)


def write_json(path, obj):
    """``obj`` as indented JSON, written atomically (:func:`write_atomic`). Returns ``path``."""
    return write_atomic(path, json.dumps(obj, indent=2) + "\n")
