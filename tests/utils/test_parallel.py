"""The shared process pool: order, where the work runs, the initializer, errors and clean-up."""

import multiprocessing
import os

import pytest

from retina_scale.utils.parallel import parallel_map, worker_count

_INITIALISED = False


def _mark_initialised():
    global _INITIALISED
    _INITIALISED = True


def _square_where(x):
    """``(x * x, pid, whether the initializer ran in this process)``; module level so workers can import it."""
    return x * x, os.getpid(), _INITIALISED


def _fail_on_three(x):
    if x == 3:
        raise ValueError("task 3 failed")
    return x


def test_worker_count():
    assert worker_count(4, 10) == 4
    assert worker_count(4, 2) == 2  # no idle process
    assert worker_count(3, 0) == 1
    assert worker_count(None, 1) == 1
    assert worker_count(None, 10_000) == (os.cpu_count() or 1)


def test_one_worker_runs_here_in_order_without_the_initializer():
    with parallel_map(_square_where, range(5), workers=1, initializer=_mark_initialised, progress=False) as results:
        out = list(results)
    assert [r[0] for r in out] == [0, 1, 4, 9, 16]
    assert {r[1] for r in out} == {os.getpid()}
    assert not _INITIALISED and not any(r[2] for r in out)


def test_a_pool_keeps_the_order_runs_the_initializer_and_leaves_no_process():
    tasks = list(range(12))
    with parallel_map(_square_where, tasks, workers=2, initializer=_mark_initialised, progress=False) as results:
        out = list(results)
    assert [r[0] for r in out] == [t * t for t in tasks]
    assert os.getpid() not in {r[1] for r in out}  # computed in the workers
    assert all(r[2] for r in out) and not _INITIALISED  # initialised there, not here
    assert multiprocessing.active_children() == []
    with parallel_map(_square_where, tasks, workers=2, ordered=False, progress=False) as results:
        assert sorted(r[0] for r in results) == [t * t for t in tasks]


def test_a_workers_error_is_raised_here_and_stops_the_pool():
    with pytest.raises(ValueError, match="task 3 failed"):
        with parallel_map(_fail_on_three, range(8), workers=2, progress=False) as results:
            for _ in results:
                pass
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="task 3 failed"):  # the same without a pool
        with parallel_map(_fail_on_three, range(8), workers=1, progress=False) as results:
            list(results)
