"""Shared pytest set-up: quiet TensorFlow, a fresh Keras session per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def _fresh_keras_session():
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def free_ports():
    """``free_ports(n)``: n TCP ports free on 127.0.0.1 (for localhost multi-worker tests)."""
    return _free_ports


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for a Python subprocess that runs this checkout's code, on the CPU, quietly."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    return env


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A small synthetic data set (48 photos, balanced grades) and its cache at 112 and 224 px,
    shared by the trainer's and the search's tests: ``(data folder, cache folder)``."""
    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset
    from retina_scale.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("stepwise-data")
    data = root / "synthetic"
    # In this process, no worker pool: one run of tests/data/test_synthetic.py followed by
    # tests/test_tuning.py stalled (undiagnosed) while this fixture's pool was the one new thing there.
    generate_dataset(str(data), count=48, size=224, seed=3, prior="balanced", workers=1, progress=False)
    cache = root / "cache"
    result = prepare_cache(read_dataset(data), cache, sizes=(112, 224), workers=1, progress=False)
    assert result.prepared == 48
    return data, cache


_LOCK_HOLDER = """
import sys
from retina_scale.utils.locking import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def lock_holder(subprocess_env):
    """``lock_holder(folder)``: a separate Python process holding ``folder``'s lock (as a running trainer holds its
    run folder) until its stdin is closed or it is killed; ``lock_holder.script`` is that process's code."""
    import subprocess
    import sys

    procs = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder)], env=subprocess_env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    start.script = _LOCK_HOLDER
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
