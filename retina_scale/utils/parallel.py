"""One process pool with a tqdm progress bar, for the per-image work of ``prepare`` and ``synth``.

Example::

    with parallel_map(render_one, jobs, workers=2, desc="synth") as results:
        for result in results:       # in the order of ``jobs`` (``ordered=False``: as they finish)
            write(result)

Leaving the ``with`` block, normally or by an exception, stops the workers at once: an interrupted run keeps
what its caller already wrote and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Callable, Iterable, Iterator

from retina_scale.utils.console import bar_interval


def worker_count(workers: int | None, tasks: int) -> int:
    """Processes worth starting: ``workers`` (``None``: every core), at most one per task, at least 1.

    >>> worker_count(4, 2), worker_count(2, 0), worker_count(1, 100)
    (2, 1, 1)
    """
    return max(1, min(workers or os.cpu_count() or 1, tasks or 1))


@contextlib.contextmanager
def parallel_map(fn: Callable, tasks: Iterable, workers: int | None, *, ordered: bool = True,
                 initializer: Callable | None = None, start_method: str = "spawn", progress: bool = True,
                 desc: str | None = None, unit: str = "img") -> Iterator[Iterator]:
    """A context whose value iterates over ``fn(task)`` for every task, computed by a pool of processes.

    Args:
        fn, tasks: a picklable module-level function and picklable tasks.
        workers: processes (``None``: every core); with one worker, or one task, ``fn`` runs in this
            process, one task after the other, and no pool is started.
        ordered: yield the results in the order of ``tasks`` (else as they finish).
        initializer: run once in each worker process (not in this process when no pool is started).
        start_method: ``"spawn"`` (the default: a fresh interpreter, safe whatever threads this process
            runs) or ``"fork"`` (starts faster; only where no thread pool is running, e.g. before
            TensorFlow or OpenCV work).
        progress, desc, unit: a tqdm bar of the finished tasks.

    An exception raised by ``fn`` in a worker is raised here, where its result would have been yielded.
    """
    from tqdm import tqdm

    tasks = list(tasks)
    n = worker_count(workers, len(tasks))
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True,
               mininterval=bar_interval())
    pool = None
    try:
        if n == 1:
            results = map(fn, tasks)
        else:
            pool = multiprocessing.get_context(start_method).Pool(n, initializer=initializer)
            results = (pool.imap if ordered else pool.imap_unordered)(fn, tasks, chunksize=1)
        yield _counted(results, bar)
    finally:
        bar.close()
        if pool is not None:  # finished or interrupted: nothing is left to wait for
            pool.terminate()
            pool.join()


def _counted(results: Iterator, bar) -> Iterator:
    for result in results:
        bar.update(1)
        yield result
