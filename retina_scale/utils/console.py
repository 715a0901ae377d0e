"""A quiet console: TensorFlow's C++ (absl) log lines are dropped from standard error, everything else passes.

TensorFlow 2.21 writes lines such as ``I0000 00:00:1796129396.901822  27364 port.cc:153] oneDNN custom
operations are on...``, ``E0000 ... cuda_platform.cc:52] failed call to cuInit`` and grappler's ``remapper
failed`` to file descriptor 2 from C++, some of them before ``TF_CPP_MIN_LOG_LEVEL`` is read (absl logs "before
absl::InitializeLog() is called" whatever that variable says). No Python setting reaches them, so
:class:`NativeLogFilter` puts a pipe in place of descriptor 2 and a thread copies to the real standard error
every line that is not in that format. Python's own output (tracebacks, warnings, tqdm's progress bars,
which rewrite one line with ``\\r``) passes through unchanged and at once; a traceback printed at exit is
copied before the process ends. ``retina-scale --verbose`` (or ``RETINA_SCALE_VERBOSE=1``) leaves standard
error alone.

Example:
    >>> NATIVE_LOG.match(b"I0000 00:00:1796129396.901822   27364 port.cc:153] oneDNN custom operations") is not None
    True
    >>> NATIVE_LOG.match(b"Stage 1 tiny: 8 epochs") is None
    True
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

NATIVE_LOG = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.+-]+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)
"""A line of TensorFlow's C++ logging (absl/glog format), or absl's notice that logging is not initialised."""

CONTINUATIONS = (b"To enable the following instructions:",)
"""Second lines of multi-line native messages (cpu_feature_guard's), dropped right after a native line."""

_HOLD_LIMIT = 512
"""A partial line that starts like a native log line ([IWEF]) and is shorter than this waits for its end."""


class NativeLogFilter:
    """Replaces file descriptor 2 by a pipe whose lines are copied to the real standard error, native log
    lines left out. ``start()`` once, early (before TensorFlow loads); ``stop()`` runs at exit."""

    def __init__(self):
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._after_native = False
        self.dropped = 0

    def start(self) -> "NativeLogFilter":
        if self._saved is not None:
            return self
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="native-log-filter", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Puts the real standard error back and copies what is still in the pipe."""
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)  # closes our write end: the pump reads to the end (children may hold theirs)
        self._thread.join(timeout=2.0)
        os.close(self._saved)
        self._saved = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._saved, view):]

    def _pump(self, read_end: int) -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while True:
                chunk = source.read(65536)
                if not chunk:
                    break
                pending = self._copy(pending + chunk)
        if pending and not NATIVE_LOG.match(pending):
            self._write(pending)

    def _copy(self, data: bytes) -> bytes:
        """Copies the complete lines of ``data`` that are not native log lines; returns what to hold."""
        *lines, rest = data.split(b"\n")
        out = []
        for line in lines:
            bare = line.lstrip(b"\r")
            if NATIVE_LOG.match(bare) or (self._after_native and bare.startswith(CONTINUATIONS)):
                self.dropped += 1
                self._after_native = True
            else:
                out.append(line + b"\n")
                self._after_native = False
        # A partial line passes at once (a progress bar redrawn with \r never ends with a newline), unless
        # it may be the beginning of a native log line, which then waits for the rest.
        if rest and not (rest[:1] in (b"I", b"W", b"E", b"F") and len(rest) < _HOLD_LIMIT):
            out.append(rest)
            rest = b""
        if out:
            self._write(b"".join(out))
        return rest


_FILTER: NativeLogFilter | None = None


LOG_BAR_SECONDS = 15.0
"""How often a tqdm bar redraws when standard error is not a terminal (a log file): tqdm's own 0.1 s would
write a redraw per image or batch into the log."""


def bar_interval(stream=None) -> float:
    """tqdm's ``mininterval`` for a bar on ``stream`` (standard error): 0.1 s on a terminal, else
    ``LOG_BAR_SECONDS``, so a log holds a few redraws of a bar and its final state, not thousands.

    >>> import io
    >>> bar_interval(io.StringIO())
    15.0
    """
    stream = sys.stderr if stream is None else stream
    try:
        return 0.1 if stream.isatty() else LOG_BAR_SECONDS
    except (AttributeError, ValueError):  # a closed or file-less stream
        return LOG_BAR_SECONDS


def quiet_native_logs() -> NativeLogFilter | None:
    """Starts the process's :class:`NativeLogFilter` (once) and sets ``TF_CPP_MIN_LOG_LEVEL=2`` for
    TensorFlow's later messages, unless ``RETINA_SCALE_VERBOSE`` is set; returns the filter (None if verbose)."""
    global _FILTER
    if os.environ.get("RETINA_SCALE_VERBOSE"):
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _FILTER is None:
        _FILTER = NativeLogFilter().start()
    return _FILTER
