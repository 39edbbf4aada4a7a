"""Progress and cancel plumbing shared by every engine entry point.

Callers pass ``progress(fraction, message)`` and ``is_cancelled() -> bool``.
Processing algorithms adapt QgsProcessingFeedback to these; scripts get a
terminal bar from :func:`terminal_progress`.
"""
import sys
import time

from .errors import Cancelled


class Progress:
    """Maps the work of one step onto a slice of the overall 0..1 range."""

    def __init__(self, callback=None, is_cancelled=None, start=0.0, end=1.0):
        self._callback = callback
        self._is_cancelled = is_cancelled
        self.start = start
        self.end = end

    def check(self):
        if self._is_cancelled is not None and self._is_cancelled():
            raise Cancelled()

    def update(self, fraction, message=None):
        self.check()
        if self._callback is not None:
            value = self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)
            self._callback(value, message)

    def sub(self, start, end):
        """A child Progress covering [start, end] of this one."""
        span = self.end - self.start
        return Progress(self._callback, self._is_cancelled,
                        self.start + span * start, self.start + span * end)

    def message(self, text):
        if self._callback is not None:
            self._callback(None, text)


def terminal_progress(stream=None, width=30):
    """A progress callback drawing a bar on a terminal (stderr by default)."""
    stream = stream or sys.stderr
    t0 = time.time()
    state = {"last": -1.0}

    def callback(fraction, message=None):
        if fraction is None:
            if message:
                stream.write(f"\n{message}\n")
            return
        if fraction - state["last"] < 0.005 and fraction < 1.0:
            return
        state["last"] = fraction
        filled = int(width * fraction)
        elapsed = time.time() - t0
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% {elapsed:6.1f}s")
        if fraction >= 1.0:
            stream.write("\n")
        stream.flush()

    return callback
