"""Atomic file writing: write to a temporary name beside the target, then rename into place.

A reader (a person, a resumed run, TF Serving) never sees a half-written file, and an interrupted
write leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import Iterable, Sequence


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

    Example::

        with atomic_path("labels.csv") as tmp:
            frame.to_csv(tmp)
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


def write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def csv_text(header: Sequence, rows: Iterable[Sequence], lineterminator: str = "\r\n") -> str:
    r"""``header`` and ``rows`` as CSV text (the ``csv`` module's quoting; lines end with ``lineterminator``).

    >>> csv_text(["image", "reason"], [["1_left", "empty file"], ["2, right", ""]], lineterminator="\n")
    'image,reason\n1_left,empty file\n"2, right",\n'
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path, header: Sequence, rows: Iterable[Sequence], lineterminator: str = "\r\n") -> None:
    """Writes :func:`csv_text` of ``header`` and ``rows`` (UTF-8, exactly those line ends) to ``path`` atomically."""
    write_bytes(path, csv_text(header, rows, lineterminator).encode("utf-8"))


def write_json(path, data) -> None:
    """Writes ``data`` as indented JSON to ``path`` atomically; NaN and infinity are refused (not JSON)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path):
    """The JSON document in ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
