"""Exclusive locks on the folders that one process at a time may write: a run folder, a cache.

A lock is ``fcntl.flock`` on the file ``<folder>/.lock``. The kernel releases it when its process ends,
however it ends (``kill -9`` included), so a lock file left behind never blocks a rerun: only a living
process holds a lock. The holder writes its pid, host and start time into the file, and a second process
that finds the folder locked reads them for its message::

    with folder_lock("runs/quick", "run folder", hint="use another name (name=...)"):
        ...  # the second process: LockedError "run folder runs/quick is in use by pid 4711 on host gpu1 ..."

``wait=True`` waits for the holder to finish instead (after saying once who it waits for), for processes
that share a folder on purpose (several trainers reading one cache, the processes of a distributed search).

Locks are per process and re-entrant: a process that holds a folder's lock may take it again (a trainer
holding its run folder calls the search, which takes the same lock); the lock is released when the
outermost holder lets go. ``flock`` works on local file systems and on NFS v4 (Linux emulates it there
with POSIX locks); without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from retina_scale.utils.errors import UserError

__all__ = ["LOCK_FILE", "LockedError", "folder_lock", "holder_of", "holding", "locked_folder", "run_folder_lock"]

LOCK_FILE = ".lock"
"""The lock file's name inside a locked folder."""

_held: dict[str, list] = {}  # real path of a lock file -> [fd, depth] for the locks this process holds
_held_guard = threading.Lock()
_fork_hook = []  # set once the hook below is registered (on the first lock, not at import)


def _forget_locks_in_child() -> None:
    """After ``fork``: the child drops its copies of the lock files' descriptors (the parent keeps the locks),
    so a worker process outliving its killed parent does not keep a folder locked."""
    global _held_guard
    _held_guard = threading.Lock()
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


class LockedError(UserError):
    """Another process holds the folder's lock; ``pid`` and ``host`` name it (None if it has not said yet)."""

    def __init__(self, message: str, pid: int | None = None, host: str | None = None):
        super().__init__(message)
        self.pid = pid
        self.host = host


def holder_of(folder) -> dict:
    """What the lock file of ``folder`` says about its holder (``pid``, ``host``, ``since``), or ``{}``.

    The file is only meaningful while someone holds the lock; a released lock leaves it empty.
    """
    try:
        with open(Path(folder) / LOCK_FILE, encoding="utf-8") as handle:
            record = json.loads(handle.read(4096) or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe_holder(record: dict) -> str:
    if not record.get("pid"):
        return "another process (it has not written its pid yet)"
    since = f", since {record['since']}" if record.get("since") else ""
    return f"pid {record['pid']} on host {record.get('host', '?')}{since}"


def _locked_message(folder: Path, what: str, record: dict, hint: str) -> LockedError:
    text = f"{what} {folder} is in use by {_describe_holder(record)}"
    text += f"; {hint}" if hint else "; wait for it to finish"
    return LockedError(text, record.get("pid"), record.get("host"))


def _acquire(fd: int, folder: Path, what: str, wait: bool, hint: str, log: Callable[[str], None] | None) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        record = holder_of(folder)
    if not wait:
        raise _locked_message(folder, what, record, hint)
    message = f"waiting for {what} {folder}: in use by {_describe_holder(record)}"
    (log or (lambda text: print(text, file=sys.stderr, flush=True)))(message)
    fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def folder_lock(folder, what: str = "folder", *, wait: bool = False, hint: str = "",
                log: Callable[[str], None] | None = None):
    """Holds the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the folder to lock; the lock file is ``<folder>/.lock``.
        what: how messages name the folder (``"run folder"``, ``"cache"``).
        wait: wait for another holder to finish instead of raising (after one line to ``log``).
        hint: what the person should do, appended to the error (default: wait for it to finish).
        log: where the waiting line goes (default: standard error).

    Raises:
        LockedError: another process holds the lock (and ``wait`` is false); the message names its pid
            and host.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(folder / LOCK_FILE)
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with _held_guard:
        entry = _held.get(path)
        if entry is not None:  # this process holds it already: re-entrant
            entry[1] += 1
    if entry is None:
        entry = [_take(path, folder, what, wait, hint, log), 1]
        with _held_guard:
            _held[path] = entry
    try:
        yield
    finally:
        with _held_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[path]
        if last:
            _release(entry[0])


def _take(path: str, folder: Path, what: str, wait: bool, hint: str, log) -> int:
    """Opens the lock file, locks it and writes this process's record into it; returns the descriptor."""
    if not _fork_hook:
        os.register_at_fork(after_in_child=_forget_locks_in_child)
        _fork_hook.append(True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, folder, what, wait, hint, log)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(fd: int) -> None:
    import fcntl

    try:
        os.ftruncate(fd, 0)  # a released lock says nothing about a holder
    except OSError:  # pragma: no cover - e.g. the disk went read-only; the unlock matters more
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_folder_lock(root, *, wait: bool = False, log: Callable[[str], None] | None = None):
    """The lock of a run folder: one ``retina-scale train`` or ``tune`` writes a run folder at a time."""
    return folder_lock(root, "run folder", wait=wait, log=log,
                       hint="another retina-scale train or tune is writing it: wait for it to end, or "
                            "use another run name (--name, name=...)")


def holding(lock_for: Callable):
    """A decorator: the function runs inside ``lock_for(*args, **kwargs)``, a lock such as
    :func:`folder_lock` made from the call's arguments (or None: no lock for this call).

    Example::

        class Trainer:
            @holding(lambda self: run_folder_lock(self.run_dir))
            def run(self):
                ...
    """

    def decorate(function):
        @functools.wraps(function)
        def locked(*args, **kwargs):
            with lock_for(*args, **kwargs) or contextlib.nullcontext():
                return function(*args, **kwargs)

        return locked

    return decorate


def locked_folder(argument: str, what: str, *, wait: bool = False, hint: str = ""):
    """A decorator: the function runs holding the :func:`folder_lock` of its parameter ``argument``.

    Example::

        @locked_folder("out", "cache", wait=True)
        def prepare_cache(dataset, out, sizes=(112, 224)):
            ...
    """

    def decorate(function):
        signature = inspect.signature(function)

        def lock_for(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return folder_lock(bound.arguments[argument], what, wait=wait, hint=hint)

        return holding(lock_for)(function)

    return decorate
