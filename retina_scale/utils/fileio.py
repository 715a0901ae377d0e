"""Atomic file writing: write to a temporary name beside the target, then rename into place.

A reader (a person, a resumed run, TF Serving) never sees a half-written file, and an interrupted
write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import json
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


def write_text(path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, data) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically; NaN and infinity are refused (not JSON)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path):
    """The JSON document in ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
