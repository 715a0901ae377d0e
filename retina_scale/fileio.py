"""Atomic file writing: write to a temporary name beside the target, then rename into place.

A reader (a person, a resumed run, TF Serving) never sees a half-written file, and an interrupted
write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yields a temporary path in ``path``'s folder; on success renames it to ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0o666 & ~umask``), not
    ``mkstemp``'s private 0o600. On an exception the temporary file is removed and ``path`` is left
    as it was.

    Example:
    >>> with atomic_path("labels.csv") as tmp:
    ...     frame.to_csv(tmp)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
