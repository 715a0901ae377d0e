"""One process per run folder (issue 16, defect 3): a second ``retina-scale train`` or ``tune`` of the same run
folder stops at once with one line naming the holder's pid and host, and a lock left by a process killed with
-9 does not block the rerun."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from retina_scale.cli import main
from retina_scale.utils.errors import UserError
from retina_scale.utils.locking import holder_of


def _overrides(tmp_path, small_cache, epochs=1):
    data, cache = small_cache
    return [f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", f"export_dir={json.dumps(str(tmp_path / 'export'))}",
            "name=t", "model.width=0.125", f"data.data={json.dumps(str(data))}",
            f"data.cache={json.dumps(str(cache))}", "data.workers=1", "data.val_fraction=0.25",
            "data.test_fraction=0.25", "global_batch_size=8", "eval_bootstrap=20", "tune.enabled=false",
            "fusion.enabled=false", f"stages=[{{stage: tiny, epochs: {epochs}, lr: 0.003}}]"]


def _no_data_work(monkeypatch):
    """Past the lock, the trainer and the search stop at their first piece of work (no training here)."""
    from retina_scale.training import stepwise, tuning

    def stop(*args, **kwargs):
        raise UserError("reached the data preparation")

    monkeypatch.setattr(stepwise, "prepare_run_data", stop)
    monkeypatch.setattr(tuning, "prepare_run_data", stop)


@pytest.mark.parametrize("command", [["train"], ["tune", "--stage", "tiny"]])
def test_a_second_process_is_refused_then_a_killed_holder_does_not_block(tmp_path, small_cache, lock_holder,
                                                                         monkeypatch, capsys, command):
    _no_data_work(monkeypatch)
    run_dir = tmp_path / "runs" / "t"
    proc = lock_holder(run_dir)
    code = main([*command, "--quiet", *_overrides(tmp_path, small_cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"run folder {run_dir} is in use by pid {proc.pid} on host {socket.gethostname()}" in err
    assert "use another run name" in err
    assert not (run_dir / "config.yaml").exists()  # refused before writing anything

    os.kill(proc.pid, signal.SIGKILL)  # its lock file stays behind, naming it
    proc.wait()
    assert holder_of(run_dir)["pid"] == proc.pid
    code = main([*command, "--quiet", *_overrides(tmp_path, small_cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "reached the data preparation" in err, err  # went past the stale lock


@pytest.mark.slow
def test_two_real_trainers_of_one_run_folder(tmp_path, small_cache, subprocess_env):
    """The audit's case: B started while A trains the same run; B must not train alongside A."""
    args = [sys.executable, "-m", "retina_scale", "train", "--quiet", *_overrides(tmp_path, small_cache, epochs=30)]
    run_dir = tmp_path / "runs" / "t"
    first = subprocess.Popen(args, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while holder_of(run_dir).get("pid") != first.pid and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()[-2000:]
        second = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and second.stdout == "", second.stdout[-2000:] + second.stderr[-2000:]
        assert "Traceback" not in second.stderr  # TensorFlow's start-up lines, then ours
        assert second.stderr.strip().splitlines()[-1:] == [
            f"retina-scale train: error: run folder {run_dir} is in use by pid {first.pid} on host "
            f"{socket.gethostname()}, since {holder_of(run_dir)['since']}; another retina-scale train or tune is "
            "writing it: wait for it to end, or use another run name (--name, name=...)"]
    finally:
        first.kill()
        first.wait()
    # Killed with -9, A leaves its lock file behind; the rerun resumes and finishes.
    assert holder_of(run_dir)["pid"] == first.pid
    rerun = subprocess.run(args, env=subprocess_env, capture_output=True, text=True, timeout=500)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert json.loads((run_dir / "stages" / "1-tiny" / "state.json").read_text())["status"] == "done"


def test_prepare_cache_waits_for_the_process_writing_the_cache(tmp_path, small_cache, lock_holder, capsys):
    import shutil
    import threading

    from retina_scale.data.cache import prepare_cache
    from retina_scale.data.sources import read_dataset

    data, cache = small_cache
    shutil.copytree(cache, tmp_path / "cache")
    proc = lock_holder(tmp_path / "cache")  # another process writing this cache
    results = []
    thread = threading.Thread(target=lambda: results.append(
        prepare_cache(read_dataset(data), tmp_path / "cache", sizes=(112, 224), workers=1, progress=False)))
    thread.start()
    try:
        thread.join(1.0)
        assert not results, "wrote a cache another process holds"
        assert f"waiting for cache {tmp_path / 'cache'}: in use by pid {proc.pid}" in capsys.readouterr().err
    finally:
        proc.stdin.close()
        thread.join(120)
    assert results[0].skipped == 48 and results[0].prepared == 0  # then it reuses what the other one wrote
