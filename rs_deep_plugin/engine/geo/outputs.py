"""All the outputs of one run, committed together at the very end (QGIS-free).

An :class:`OutputTransaction` collects every output of a run while it is written to hidden temporary names beside
its destination (``.<stem>.rsdeep-<hex><ext>``): rasters (:class:`.writer.AtomicFile`, with their ``.aux.xml`` and
``.qml`` sidecars), small files (:meth:`OutputTransaction.write`), folders (:meth:`OutputTransaction.folder`) and
anything else with ``commit()`` / ``discard()`` (the QGIS feature sinks of ``processing_algorithms/sinks.py``).
:meth:`~OutputTransaction.commit` renames them all into place; :meth:`~OutputTransaction.discard` (a failure, a
cancel) removes every temporary file, so earlier outputs stay untouched and nothing of the run is left behind.

Engine entry points take an optional ``transaction``: given, they register their outputs and do not commit; not
given, they commit their own outputs as before (engine and CLI callers).

Runs killed outright (SIGKILL, power loss) leave their temporary files: :func:`sweep_stale` removes those older
than :data:`STALE_SECONDS` when the next run writes into the same folder. :func:`sigterm_cancels` turns a SIGTERM
into a cancel for the duration of a run in the main thread, so ``qgis_process`` killed politely cleans up.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time

from ..errors import InputError
from ..files import StagedFile, temp_path

STALE_SECONDS = 3600
# our temporary names: .<stem>.rsdeep-<8 hex>[<ext>] (files, folders, their sidecars)
TEMP_NAME = re.compile(r"^\..+\.rsdeep-[0-9a-f]{8}(\..*)?$")
FOLDER_MARKER = ".rs_deep-output"  # a hidden file in every folder RS Deep writes as one output


def is_temp_name(name):
    return bool(TEMP_NAME.match(name))


def sweep_stale(folder, max_age=STALE_SECONDS, now=None):
    """Remove the temporary files and folders of earlier runs (our naming pattern) in ``folder`` older than
    ``max_age`` seconds: a killed run could not remove them. Returns the names removed; never raises."""
    removed = []
    now = time.time() if now is None else now
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not is_temp_name(name):
            continue
        path = os.path.join(folder, name)
        try:
            if now - os.lstat(path).st_mtime < max_age:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            pass
    return removed


def _remove(path):
    """Remove a file, link or folder; missing is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except OSError:  # missing, or already gone with its folder
        pass


class StagedFolder:
    """A folder output written into a hidden temporary folder beside ``final`` and put in place by commit().

    ``entries``: the names RS Deep writes in such a folder. An existing ``final`` is replaced only when it holds
    :data:`FOLDER_MARKER` (made by RS Deep; ``ours`` may accept other proof, e.g. an earlier format) or is empty;
    even then only ``entries`` (and the marker) are replaced, every other file in it is kept."""

    def __init__(self, final, entries, what="OUTPUT", ours=None):
        self.final = os.path.abspath(os.fspath(final))
        self.entries = tuple(entries)
        check_folder_output(self.final, self.entries, what, ours)
        parent = os.path.dirname(self.final)
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise InputError(f"{what}: cannot create the folder {parent} ({exc.strerror or exc}); choose "
                                 "another location") from exc
        sweep_stale(parent)
        self.tmp = temp_path(self.final, ext="")
        os.mkdir(self.tmp)
        with open(os.path.join(self.tmp, FOLDER_MARKER), "w", encoding="utf-8") as f:
            f.write("Written by RS Deep: this folder may be replaced by a later run into it.\n")

    def commit(self):
        os.chmod(self.tmp, 0o755)
        if not os.path.isdir(self.final):
            os.rename(self.tmp, self.final)
            return
        trash = temp_path(self.final, ext="")
        os.mkdir(trash)
        for name in self.entries + (FOLDER_MARKER,):  # our own entries only: the user's other files stay
            old = os.path.join(self.final, name)
            if os.path.lexists(old):
                os.rename(old, os.path.join(trash, name))
        for name in os.listdir(self.tmp):
            os.rename(os.path.join(self.tmp, name), os.path.join(self.final, name))
        _remove(self.tmp)
        _remove(trash)

    def discard(self):
        _remove(self.tmp)


def check_folder_output(path, entries, what="OUTPUT", ours=None):
    """Refuse (InputError) a folder output ``path`` that exists and is not ours: a file, or a non-empty folder
    without :data:`FOLDER_MARKER` (``ours(path)`` may accept it otherwise, e.g. the format of an earlier version).
    Nothing in a folder that is not ours is ever replaced or mixed with RS Deep's files."""
    if os.path.isfile(path):
        raise InputError(f"{what}: {path} is a file; give a folder")
    if not os.path.isdir(path):
        return
    names = [n for n in os.listdir(path) if not is_temp_name(n)]
    if not names or os.path.isfile(os.path.join(path, FOLDER_MARKER)) or (ours is not None and ours(path)):
        return
    clash = sorted(set(names) & set(entries))
    held = (f"holds {', '.join(clash)} not written by RS Deep" if clash
            else "is not empty and was not written by RS Deep")
    raise InputError(f"{what}: the folder {path} {held}; choose an empty or new folder (nothing in it was changed)")


def json_has(path, key, value):
    """Whether the JSON file ``path`` (small) is an object with ``key`` == ``value``."""
    try:
        if os.path.getsize(path) > 64 << 20:
            return False
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get(key) == value


class OutputTransaction:
    """The outputs of one run: registered while written to temporary names, committed or discarded together."""

    def __init__(self):
        self.items = []
        self.state = "open"
        self._swept = set()

    def add(self, item):
        """Register ``item`` (``commit()``, ``discard()``; ``final``/``tmp`` paths where it has them)."""
        if self.state != "open":
            raise RuntimeError(f"the output transaction is {self.state}")
        self.items.append(item)
        final = getattr(item, "final", None)
        if final:
            self.sweep(os.path.dirname(final))
        return item

    def sweep(self, folder):
        """Remove stale temporary files of killed runs in ``folder`` (once per folder per run)."""
        folder = os.path.abspath(folder)
        if folder not in self._swept:
            self._swept.add(folder)
            sweep_stale(folder)

    def file(self, final):
        """An :class:`.writer.AtomicFile` for ``final``, registered."""
        from .writer import AtomicFile
        return self.add(AtomicFile(final))

    def write(self, final, data, name=None):
        """Write ``data`` (bytes or str) for ``final`` now, to a temporary file; returns that temporary path."""
        return self.add(StagedFile(final, data, name)).tmp

    def folder(self, final, entries, what="OUTPUT", ours=None):
        """A :class:`StagedFolder` for ``final``, registered; write into its ``tmp``."""
        return self.add(StagedFolder(final, entries, what, ours))

    def path(self, final):
        """Where the content of output ``final`` is now (its temporary path until commit), else ``final``."""
        final = os.path.abspath(os.fspath(final))
        for item in self.items:
            if getattr(item, "final", None) == final and getattr(item, "tmp", None):
                return item.tmp
        return final

    def commit(self):
        """Put every output in place (in the order registered). Call it only once all of them are complete."""
        if self.state != "open":
            raise RuntimeError(f"the output transaction is {self.state}")
        done = []
        try:
            for item in self.items:
                item.commit()
                done.append(item)
        except BaseException as exc:
            self.state = "failed"
            for item in self.items[len(done):]:
                item.discard()
            moved = ", ".join(str(getattr(i, "final", i)) for i in done)
            if isinstance(exc, OSError):
                raise InputError(f"Moving the outputs into place failed ({exc.strerror or exc})"
                                 + (f"; already in place: {moved}" if moved else "; no output was replaced")) from exc
            raise
        self.state = "committed"

    def discard(self):
        """Remove every temporary file of the run (also after a failed commit); never raises."""
        if self.state == "committed":
            return
        self.state = "discarded"
        for item in reversed(self.items):
            try:
                item.discard()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


@contextlib.contextmanager
def sigterm_cancels(cancel):
    """While the block runs, a SIGTERM calls ``cancel()`` (the run then stops at its next check and cleans up)
    instead of killing the process; the previous handler is restored after. Only in the main thread (signal
    handlers cannot be set elsewhere): in other threads the block runs unchanged. Yields a list that holds the
    signal number once one arrived."""
    got = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield got
        return

    def handler(signum, _frame):
        got.append(signum)
        cancel()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


__all__ = ["OutputTransaction", "StagedFile", "StagedFolder", "sweep_stale", "sigterm_cancels", "temp_path",
           "is_temp_name", "check_folder_output", "json_has", "FOLDER_MARKER", "STALE_SECONDS"]
